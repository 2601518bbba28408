import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._correctors.base import AbstractCorrector
from ._correctors.recipes import reference_recipe
from ._custom_types import Actions, Context, Key
from ._energy import BoundEnergy, EnergyFn, prepare
from ._misc import shape_str


class CorrectionInfo(eqx.Module):
    """Diagnostics of one correction; every field has a leading batch axis for a batch.

    **Attributes:**

    - `energy_before`: the energy of the incoming chunk.
    - `energy_after`: the energy of the returned chunk.
    - `delta_norm`: `||a_out - a_in||`, Frobenius norm over the chunk.
    - `num_accepted`: how many elementary update steps were kept.
    - `fell_back`: `True` where the energy, its gradient or the corrected chunk was
        not finite, so the incoming chunk was returned unchanged.
    """

    energy_before: Float[Array, "*batch"]
    energy_after: Float[Array, "*batch"]
    delta_norm: Float[Array, "*batch"]
    num_accepted: Int[Array, "*batch"]
    fell_back: Bool[Array, "*batch"]


def _check_actions(actions) -> None:
    if not isinstance(actions, jax.Array | jax.ShapeDtypeStruct) and not hasattr(
        actions, "__array__"
    ):
        raise TypeError(f"`actions` must be an array; got {type(actions).__name__}.")
    if actions.ndim not in (2, 3):
        raise ValueError(
            "`actions` must have shape (horizon, action_dim) for one sample or "
            f"(batch, horizon, action_dim) for a batch; got {shape_str(actions)}."
        )
    if not jnp.issubdtype(actions.dtype, jnp.floating):
        raise ValueError(f"`actions` must be floating point; got dtype {actions.dtype}.")


def correct_one(
    energy: EnergyFn, context: Context, actions: Actions, corrector: AbstractCorrector, key: Key
) -> tuple[Actions, CorrectionInfo]:
    """[`flowcorrect.correct`][] on one sample, without `jit`: for use inside other code."""
    return correct_prepared(prepare(energy, context), actions, corrector, key)


def correct_prepared(
    bound: BoundEnergy, actions: Actions, corrector: AbstractCorrector, key: Key
) -> tuple[Actions, CorrectionInfo]:
    """Like [`flowcorrect.correct_one`][] for an energy whose context is already bound.

    For code that corrects many chunks of one observation (a flow sampler correcting
    at several steps, best-of-N): call [`flowcorrect.prepare`][] once and this per chunk.
    """
    e0 = bound(actions)
    state = corrector.init(bound, actions)
    out, _, n = corrector.step(bound, actions, state, key)
    if out.shape != actions.shape:
        raise ValueError(
            f"{type(corrector).__name__} returned actions of shape {shape_str(out)} for "
            f"input of shape {shape_str(actions)}; a corrector must keep the shape."
        )
    out = out.astype(actions.dtype)
    e1 = bound(out)
    ok = jnp.isfinite(e0) & jnp.isfinite(e1) & jnp.all(jnp.isfinite(out))
    out = jnp.where(ok, out, actions)
    e1 = jnp.where(ok, e1, e0)
    info = CorrectionInfo(
        energy_before=e0,
        energy_after=e1,
        delta_norm=jnp.linalg.norm(out - actions),
        num_accepted=jnp.where(ok, n, 0),
        fell_back=jnp.logical_not(ok),
    )
    return out, info


def check_batched_context(context: Context, batch: int, name: str = "context") -> None:
    """Raises a clear error unless every array in `context` has leading axis `batch`."""
    leaves = jax.tree_util.tree_leaves_with_path(context)
    for path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            continue
        if leaf.ndim == 0 or leaf.shape[0] != batch:
            raise ValueError(
                f"For a batch of {batch} action chunks, every array in `{name}` needs a "
                f"leading batch axis of size {batch}; `{name}{jax.tree_util.keystr(path)}` "
                f"has shape {shape_str(leaf)}."
            )


@eqx.filter_jit
def correct(
    energy: EnergyFn,
    context: Context,
    actions: Float[Array, "*batch horizon action_dim"],
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
        [`flowcorrect.EnergyModel`][] or [`flowcorrect.SquaredDistance`][].
    - `context`: the context of one observation, or, for a batch, a pytree whose
        every array has a leading batch axis.
    - `actions`: one chunk `(horizon, action_dim)` or a batch
        `(batch, horizon, action_dim)`.
    - `corrector`: what to do; defaults to [`flowcorrect.reference_recipe`][]
        (3 gradient steps of alpha 0.1 clipped to 20% of the chunk's norm).
    - `key`: a PRNG key for stochastic correctors (Langevin); defaults to
        `jax.random.key(0)`. Split per sample for a batch.

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
    _check_actions(actions)
    if not isinstance(corrector, AbstractCorrector):
        raise TypeError(
            "`corrector` must be an AbstractCorrector (e.g. fc.reference_recipe()); "
            f"got {type(corrector).__name__}."
        )
    if key is None:
        key = jax.random.key(0)
    if actions.ndim == 2:
        return correct_one(energy, context, actions, corrector, key)
    batch = actions.shape[0]
    check_batched_context(context, batch)
    keys = jax.random.split(key, batch)
    return eqx.filter_vmap(correct_one, in_axes=(None, eqx.if_array(0), 0, None, 0))(
        energy, context, actions, corrector, keys
    )
