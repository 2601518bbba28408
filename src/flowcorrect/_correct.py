"""`correct`: post-hoc correction of action chunks, and the per-sample step the
placements of the flow sampler share."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._correctors.base import AbstractCorrector, check_is_corrector, uses_key
from ._correctors.recipes import reference_recipe
from ._custom_types import Actions, Context, Key
from ._energy import AbstractEnergy, ChunkFn, EnergyFn, as_energy
from ._misc import safe_norm, shape_str


class CorrectionInfo(eqx.Module):
    """Diagnostics of one correction; every field has a leading batch axis for a batch.

    **Attributes:**

    - `energy_before`: the energy of the incoming chunk.
    - `energy_after`: the energy of the returned chunk.
    - `delta_norm`: `||a_out - a_in||`, Frobenius norm over the chunk.
    - `num_accepted`: how many elementary update steps were kept (a step whose clip
        bound could not be computed, or that a monotone wrapper rejected, counts zero).
    - `fell_back`: `True` where the energy or its gradient at the incoming chunk, or
        the corrected chunk or its energy, was not finite, so the incoming chunk was
        returned unchanged.
    """

    energy_before: Float[Array, "*batch"]
    energy_after: Float[Array, "*batch"]
    delta_norm: Float[Array, "*batch"]
    num_accepted: Int[Array, "*batch"]
    fell_back: Bool[Array, "*batch"]


def check_actions(actions: Any, name: str = "actions") -> None:
    if not isinstance(actions, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        raise TypeError(
            f"`{name}` must be a JAX or NumPy array of shape (horizon, action_dim) or "
            f"(batch, horizon, action_dim); got {type(actions).__name__}. Convert it with "
            "jnp.asarray."
        )
    if actions.ndim not in (2, 3):
        raise ValueError(
            f"`{name}` must have shape (horizon, action_dim) for one sample or "
            f"(batch, horizon, action_dim) for a batch; got {shape_str(actions)}."
        )
    if not jnp.issubdtype(actions.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be floating point; got dtype {actions.dtype}.")


def correct_single(
    energy: AbstractEnergy, encoded: Any, actions: Actions, corrector: AbstractCorrector, key: Key
) -> tuple[Actions, CorrectionInfo]:
    """Corrects one chunk at one encoded context, with the non-finite fallback.

    Not jitted and not batched: the building block of [`flowcorrect.correct`][] and of
    the placements of [`flowcorrect.sample`][].
    """
    fn = ChunkFn(energy, encoded)
    # The gradient at the incoming chunk is what the first step of a gradient corrector
    # computes too (XLA shares the two); a non-finite one means no step can be trusted.
    e0, g0 = jax.value_and_grad(fn)(actions)
    state = corrector.init(fn, actions)
    out, _, n = corrector.step(fn, actions, state, key)
    if getattr(out, "shape", None) != actions.shape:
        raise ValueError(
            f"{type(corrector).__name__} returned actions of shape {shape_str(out)} for "
            f"input of shape {shape_str(actions)}; a corrector must keep the shape."
        )
    out = out.astype(actions.dtype)
    e1 = fn(out)
    ok = jnp.isfinite(e0) & jnp.all(jnp.isfinite(g0))
    ok = ok & jnp.isfinite(e1) & jnp.all(jnp.isfinite(out))
    out = jnp.where(ok, out, actions)
    e1 = jnp.where(ok, e1, e0)
    info = CorrectionInfo(
        energy_before=e0,
        energy_after=e1,
        delta_norm=safe_norm(out - actions),
        num_accepted=jnp.where(ok, n, 0),
        fell_back=jnp.logical_not(ok),
    )
    return out, info


def check_batched_context(context: Context, batch: int, name: str = "context") -> None:
    """Raises a clear error unless every leaf of `context` is an array with leading
    axis `batch`."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(context):
        where = f"`{name}{jax.tree_util.keystr(path)}`"
        if not hasattr(leaf, "shape"):
            raise TypeError(
                f"For a batch of {batch} action chunks, every leaf of `{name}` must be an "
                f"array with a leading batch axis of size {batch}; {where} is a "
                f"{type(leaf).__name__}. Convert it with jnp.asarray (and stack one per "
                "sample), or bind a shared context with fc.bind(energy, context)."
            )
        if leaf.ndim == 0 or leaf.shape[0] != batch:
            raise ValueError(
                f"For a batch of {batch} action chunks, every array in `{name}` needs a "
                f"leading batch axis of size {batch}; {where} has shape {shape_str(leaf)}. "
                "For a context shared by the whole batch, bind it: "
                "fc.correct(fc.bind(energy, context), None, actions)."
            )


def check_key(key: Any, corrector: AbstractCorrector | None, where: str) -> Key:
    if key is None:
        if corrector is not None and uses_key(corrector):
            raise ValueError(
                f"The corrector given to {where} is stochastic ({type(corrector).__name__} "
                "contains a step that draws noise), so it needs `key`: pass "
                "key=jax.random.key(seed). Without one every call would draw the same noise."
            )
        return jax.random.key(0)
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
        raise TypeError(
            f"`key` must be a PRNG key from jax.random.key(seed); got {shape_str(key)} "
            f"of type {type(key).__name__}."
        )
    if key.shape != ():
        raise ValueError(f"`key` must be a single PRNG key; got shape {key.shape}.")
    return key


def correct(
    energy: EnergyFn,
    context: Context,
    actions: Float[Array, "*batch horizon action_dim"] | np.ndarray,
    *,
    corrector: AbstractCorrector = reference_recipe(),
    key: Key | None = None,
) -> tuple[Float[Array, "*batch horizon action_dim"], CorrectionInfo]:
    """Corrects action chunks by descending a learned (or hand-written) energy.

    Jitted; the context is encoded once per observation and every step of the
    corrector reuses it. Samples whose energy, gradient or result is not finite keep
    their incoming actions and are flagged in `info.fell_back`, so finite actions in
    never give NaN or inf out.

    **Arguments:**

    - `energy`: any [`flowcorrect.EnergyFn`][], e.g. a trained
        [`flowcorrect.EnergyModel`][], [`flowcorrect.SquaredDistance`][], or an energy
        whose context is already bound ([`flowcorrect.bind`][]).
    - `context`: the context of one observation, or, for a batch, a pytree whose
        every array has a leading batch axis. `None` for a bound energy or one that
        ignores its context.
    - `actions`: one chunk `(horizon, action_dim)` or a batch
        `(batch, horizon, action_dim)`.
    - `corrector`: what to do; defaults to [`flowcorrect.reference_recipe`][]
        (3 gradient steps of alpha 0.1 clipped to 20% of the chunk's norm).
    - `key`: a PRNG key; required by stochastic correctors (Langevin), which raise
        without one. Split per sample for a batch.

    **Returns:**

    `(actions, info)`: the corrected chunk(s), same shape and dtype, and a
    [`flowcorrect.CorrectionInfo`][].

    !!! example

        ```python
        import flowcorrect as fc
        energy = fc.SquaredDistance(target)           # any EnergyFn
        actions, info = fc.correct(energy, None, actions)
        print(info.energy_before, info.energy_after)
        ```
    """
    check_actions(actions)
    check_is_corrector("fc.correct", "corrector", corrector)
    energy = as_energy(energy)
    key = check_key(key, corrector, "fc.correct")
    return _correct(energy, context, actions, corrector, key)


@eqx.filter_jit
def _correct(energy, context, actions, corrector, key):
    if actions.ndim == 2:
        return correct_single(energy, energy.encode(context), actions, corrector, key)
    batch = actions.shape[0]
    check_batched_context(context, batch)
    keys = jax.random.split(key, batch)

    def one(ctx, a, k):
        return correct_single(energy, energy.encode(ctx), a, corrector, k)

    return jax.vmap(one)(context, actions, keys)
