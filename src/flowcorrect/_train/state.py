"""The state a training run carries from step to step, and the guarded update."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from .._model.base import AbstractLearnedEnergy
from .config import TrainConfig


class TrainState(eqx.Module):
    """Everything a training run carries from step to step (and checkpoints)."""

    model: AbstractLearnedEnergy
    opt_state: Any
    ema: AbstractLearnedEnergy | None
    step: Int[Array, ""]


def _all_finite(tree: Any) -> Array:
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    leaves = [jnp.all(jnp.isfinite(x)) for x in arrays]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guarded_update(
    state: TrainState,
    loss: Array,
    grads: Any,
    optimizer: optax.GradientTransformation,
    ema_decay: float | None,
) -> tuple[TrainState, Array]:
    """One optimiser step, or none where the loss, the gradients or the updates are not
    finite: then the model, optimiser state and moving average stay as they were (one
    bad batch must not turn every parameter into NaN), and only the step advances, so
    the run goes on with the next batch. Returns `(state, skipped)`, `skipped` a float
    0/1 for the metrics."""
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)
    model = eqx.apply_updates(state.model, updates)
    ema = state.ema
    if ema is not None:
        d = ema_decay
        ema = jax.tree.map(
            lambda e, p: d * e + (1 - d) * p if eqx.is_inexact_array(e) else e, ema, model
        )

    def keep(new: Any, old: Any) -> Any:
        return jax.tree.map(
            lambda n, o: jnp.where(ok, n, o) if eqx.is_array(n) else n, new, old
        )

    new = TrainState(
        keep(model, state.model),
        keep(opt_state, state.opt_state),
        None if ema is None else keep(ema, state.ema),
        state.step + 1,
    )
    return new, jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


def initial_state(
    model: AbstractLearnedEnergy, config: TrainConfig, optimizer: optax.GradientTransformation
) -> TrainState:
    return TrainState(
        model=model,
        opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        ema=model if config.ema_decay is not None else None,
        step=jnp.asarray(0, jnp.int32),
    )
