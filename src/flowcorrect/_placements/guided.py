"""Guidance: the energy's gradient through the policy's velocity."""


import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import RealLike
from .._flow.flow import BatchChunks, Flow, all_finite, per_sample, sample_norms
from .._flow.schedules import AbstractSchedule, AbstractWeight, EveryStep, as_weight
from .._misc import concrete, float_array, shape_str
from .base import AbstractInterleaved
from .common import StepCounts, check_schedule, counts_add, counts_init


class Guided(AbstractInterleaved):
    """Adds the energy's gradient through the policy to the velocity (guidance).

    At a scheduled step, with `g = grad_x E(a_hat(x))` taken through the velocity by a
    vector-Jacobian product (as in PiGDM and real-time chunking), the velocity becomes
    `v - direction * weight(t) * g`, where `direction` is the sign of `dt`. So the
    Euler step `x + dt * v` moves `x` by `-|dt| * weight(t) * g`, downhill, in either
    convention: in openpi's (`dt < 0`) the term is `+ weight * g`, in the reverse one
    `- weight * g`. One VJP of the policy's velocity per guided step and nothing else:
    its forward pass is the step's velocity.

    **Arguments:**

    - `schedule`: which steps to guide; defaults to [`flowcorrect.EveryStep`][].
    - `weight`: the guidance weight; a number, a function of `t`, or an
        [`flowcorrect.AbstractWeight`][]. Defaults to 1.
    - `cap`: a bound on the added term relative to the velocity, per sample:
        `||added|| <= cap * ||v||` (Frobenius norms over the chunk, computed so they
        cannot overflow), by scaling the term down. `None` removes the bound (what
        real-time chunking needs). Defaults to 1: guidance never outweighs the
        policy's own velocity.
    """

    schedule: AbstractSchedule
    weight: AbstractWeight
    cap: Float[Array, ""]
    needs_energy = True

    def __init__(
        self,
        schedule: AbstractSchedule = EveryStep(),
        weight: RealLike | AbstractWeight = 1.0,
        cap: RealLike | None = 1.0,
    ):
        self.schedule = schedule
        self.weight = as_weight(weight)
        self.cap = float_array(float("inf") if cap is None else cap)

    def __check_init__(self):
        check_schedule(self.schedule)
        c = concrete(self.cap)
        if self.cap.shape != () or (c is not None and not c > 0):
            shown = c if c is not None else shape_str(self.cap)
            raise ValueError(
                f"`cap` must be a number > 0 (1 lets guidance be as large as the velocity) "
                f"or None for no bound; got {shown}. For no guidance use weight=0."
            )

    def init(self, flow: Flow, x: BatchChunks) -> StepCounts:
        flow.require_energy("Guided")
        return counts_init(flow)

    def step(self, flow, x, t, dt, index, state, keys):
        w = self.weight(t, flow.convention)
        on = self.schedule.mask(flow.num_steps)[index] & (w != 0)

        def guided(x):
            def estimate(x):
                v = flow.velocity(x, t)
                return flow.denoised(x, v, t), v

            a_hat, pullback, v = jax.vjp(estimate, x, has_aux=True)
            e, grad_a = flow.energy_and_grad(a_hat, "Guided")
            # The policy's samples do not interact, so pulling back the stacked
            # per-sample gradients gives each sample's own gradient.
            (g,) = pullback(grad_a)
            added = (-flow.convention.direction * w * g).astype(x.dtype)
            norm = sample_norms(added)
            bound = self.cap * sample_norms(v)
            scale = jnp.where(norm > bound, bound / jnp.where(norm > 0, norm, 1), 1)
            scaled = added * per_sample(scale, added).astype(x.dtype)
            ok = jnp.isfinite(e) & all_finite(scaled) & jnp.isfinite(scale)
            return v, jnp.where(per_sample(ok, v), v + scaled, v), ok

        def plain(x):
            v = flow.velocity(x, t)
            return v, v, jnp.zeros(flow.batch_size, bool)

        v, v_used, applied = jax.lax.cond(on, guided, plain, x)
        return x + dt * v_used, v, counts_add(state, on, applied)

    def info(self, flow: Flow, state: StepCounts) -> StepCounts:
        return state


__all__ = ["Guided"]
