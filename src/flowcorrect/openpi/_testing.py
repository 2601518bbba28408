"""A test and CPU helper: build openpi's Pi0 with a small SigLIP."""

import contextlib
from collections.abc import Iterator

from ._import import import_openpi


@contextlib.contextmanager
def tiny_siglip(variant: str = "mu/14") -> Iterator[None]:
    """Within this block, openpi builds its SigLIP image encoder as `variant`.

    openpi's Pi0 hard-codes SigLIP's `So400m/14` (about 20 s a call on two CPU cores,
    even with the test-size `dummy` Gemma variants). A model created inside this block
    uses a smaller SigLIP of the same code (`mu/14` by default: a fraction of a second a
    call), so tests and CPU measurements exercise every code path of the real model in
    reasonable time. It is for tests and measurements only: the weights of a real
    checkpoint do not fit the smaller encoder. The swap is undone on leaving the block,
    also on an error; it is not thread-safe (it replaces `openpi.models.siglip.Module`
    while the block runs).

    **Arguments:**

    - `variant`: a SigLIP variant name openpi's `siglip` module knows (`"mu/14"`,
        `"S/14"`, `"B/16"`, ...).

    !!! example

        ```python
        from openpi.models import pi0_config
        from flowcorrect.openpi import tiny_siglip

        config = pi0_config.Pi0Config(paligemma_variant="dummy",
                                      action_expert_variant="dummy")
        with tiny_siglip():
            model = config.create(jax.random.key(0))
        ```
    """
    import_openpi()
    import openpi.models.siglip as siglip

    try:
        siglip.decode_variant(variant)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(
            f"`variant` must be a SigLIP variant name of openpi's siglip module, such as "
            f"'mu/14' (the default) or 'S/14'; got {variant!r}."
        ) from None
    original = siglip.Module

    def module(*args, **kwargs):
        kwargs["variant"] = variant
        return original(*args, **kwargs)

    siglip.Module = module
    try:
        yield
    finally:
        siglip.Module = original
