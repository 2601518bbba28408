"""openpi's own JAX Pi0 for the overhead benchmark, where openpi is importable.

The rows are the same functions as for `fc.Pi0ShapedPolicy` (see `overhead.py`), run on
[`flowcorrect.openpi.Pi0Policy`][] of a real openpi `Pi0` with random weights, plus
`openpi_sample_actions`: openpi's own `Pi0.sample_actions`, jitted.

Sizes: `--preset tiny` and `cpu` build openpi's test-size Pi0 (its `dummy` Gemma
variants, width 64 and 4 layers, and SigLIP's `mu/14` in place of the hard-coded
`So400m/14`, which takes about 20 s a call on two CPU cores); the prefix is still 3
images of 256 tokens plus a 48-token prompt. `--preset pi0` builds Pi0's real sizes
(`gemma_2b` + `gemma_300m`, `So400m/14`, bfloat16): for a GPU.

Nothing here imports openpi until `build` is called; `unavailable()` says why the rows
are skipped where it cannot be imported.
"""

import contextlib
import importlib.util
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc

# The energy model's (hidden, heads) for each preset (the reference's at Pi0's size).
ENERGY = {"tiny": (32, 2), "cpu": (128, 4), "pi0": (512, 8)}


def unavailable() -> str | None:
    """None where openpi's Pi0 can be built here; otherwise why it cannot."""
    if importlib.util.find_spec("openpi") is None:
        return (
            "openpi is not installed here (it is not on PyPI); run the benchmark in an "
            "environment that has it (docs/openpi.md) for these rows"
        )
    try:
        from flowcorrect.openpi import Pi0Policy  # noqa: F401
    except ImportError as e:
        return f"flowcorrect.openpi cannot import openpi: {e}"
    return None


@contextlib.contextmanager
def tiny_siglip():
    """Builds Pi0 with SigLIP's `mu/14` variant instead of the hard-coded `So400m/14`."""
    import openpi.models.siglip as siglip

    original = siglip.Module

    def module(*args, variant=None, **kwargs):
        return original(*args, variant="mu/14", **kwargs)

    siglip.Module = module
    try:
        yield
    finally:
        siglip.Module = original


@contextlib.contextmanager
def allowances():
    """What openpi's model code needs while its rows are built and compiled, whatever the
    caller has set: implicit rank promotion (its Gemma's RMSNorm multiplies (b, t, d) by
    (d,)), and no jaxtyping checks (jax 0.5.3 lowers a jitted function by rebuilding its
    arguments with placeholder leaves, which openpi's type-checked `Observation`
    rejects)."""
    import jaxtyping

    disabled = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with jax.numpy_rank_promotion("allow"):
            yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", disabled)


def build(preset: str, key: jax.Array) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Returns (openpi config, `Pi0Policy`, energy model in inference mode, settings)."""
    from openpi.models import gemma, pi0_config

    from flowcorrect.openpi import Pi0Policy

    k_model, k_energy = jax.random.split(key)
    if preset == "pi0":
        config = pi0_config.Pi0Config(dtype="bfloat16")
        model = config.create(k_model)
        size = "Pi0's sizes (gemma_2b + gemma_300m, SigLIP So400m/14), bfloat16"
    else:
        config = pi0_config.Pi0Config(
            paligemma_variant="dummy", action_expert_variant="dummy", dtype="float32"
        )
        with tiny_siglip():
            model = config.create(k_model)
        size = "test size (Gemma 'dummy': width 64, 4 layers; SigLIP mu/14), float32"
    policy = Pi0Policy(model)
    width = gemma.get_config(config.paligemma_variant).width
    hidden, heads = ENERGY[preset]
    energy_config = fc.EnergyModelConfig(
        context_dim=width, action_dim=config.action_dim, hidden=hidden, num_heads=heads
    )
    energy = eqx.nn.inference_mode(fc.EnergyModel(energy_config, key=k_energy))
    parameters = sum(x.size for x in jax.tree.leaves(policy.weights) if isinstance(x, jax.Array))
    prefix_len = 3 * 256 + config.max_token_len  # 224 x 224 images in 14 x 14 patches
    settings = {
        "policy": (
            f"openpi Pi0 ({size}), random weights, {parameters:,} parameters; prefix "
            f"{prefix_len} tokens (3 images x 256 + a {config.max_token_len}-token prompt, "
            f"its last quarter padding); chunk {policy.chunk_shape}"
        ),
        "policy_parameters": int(parameters),
        "energy": f"EnergyModel hidden {hidden}, {heads} heads, "
        f"{energy.num_parameters():,} parameters",
        "energy_config": energy_config.to_dict(),
        "energy_parameters": energy.num_parameters(),
    }
    return config, policy, energy, settings


def observation(config: Any, batch: int, key: jax.Array) -> Any:
    """Random images and state, and a prompt whose last quarter is padding (so the
    prefix mask has False entries that every row must respect)."""
    from openpi.models import model as _model

    spec, _ = config.inputs_spec(batch_size=batch)
    keys = iter(jax.random.split(key, 8))
    images = {
        name: jax.random.uniform(next(keys), s.shape, minval=-1.0, maxval=1.0)
        for name, s in spec.images.items()
    }
    length = spec.tokenized_prompt.shape[1]
    return _model.Observation(
        images=images,
        image_masks={name: jnp.ones((batch,), bool) for name in spec.images},
        state=jax.random.normal(next(keys), spec.state.shape),
        tokenized_prompt=jax.random.randint(next(keys), (batch, length), 1, 1000),
        tokenized_prompt_mask=jnp.broadcast_to(
            jnp.arange(length) < length - length // 4, (batch, length)
        ),
    )


def sample_actions(policy: Any, obs: Any, key: jax.Array, num_steps: int) -> jax.Array:
    """openpi's own sampler, `Pi0.sample_actions` (a `while_loop` over the flow steps),
    on the policy's weights."""
    from flax import nnx

    model = nnx.merge(policy.graphdef, policy.weights)
    return model.sample_actions(key, obs, num_steps=num_steps)
