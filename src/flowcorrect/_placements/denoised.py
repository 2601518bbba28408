"""Correction of the denoised estimate inside the flow."""


import jax
import jax.numpy as jnp

from .._correctors.base import AbstractCorrector, check_is_corrector
from .._correctors.recipes import reference_recipe
from .._custom_types import RealLike
from .._flow.flow import BatchChunks, Flow, all_finite, per_sample
from .._flow.schedules import AbstractSchedule, AbstractWeight, EveryStep, as_weight
from .base import AbstractInterleaved
from .common import StepCounts, check_schedule, counts_add, counts_init


class Denoised(AbstractInterleaved):
    """Corrects the denoised estimate at chosen steps and moves `x_t` consistently.

    At a scheduled step from `t` to `t_next = t + dt` the velocity `v` gives the
    denoised estimate `a_hat` (see [`flowcorrect.AbstractConvention.denoised`][]);
    `corrector` runs on `a_hat` and gives `a_corr`; with
    `delta = weight(t) * (a_corr - a_hat)` the Euler step becomes

    `x_next = x + dt * v + progress(t_next) * delta`,

    the Euler step taken from the sample with the same noise estimate and the
    corrected denoised estimate `a_hat + delta`. In openpi's convention
    (`x_t = t * noise + (1 - t) * a`) this is `x_t -> x_t + (1 - t) * delta`. No
    gradient flows through the policy. At the last step `progress(t_next) = 1`, so the
    last correction lands on the chunk in full; earlier ones are pulled by the flow.

    **Arguments:**

    - `corrector`: run on the denoised estimate; defaults to
        [`flowcorrect.reference_recipe`][].
    - `schedule`: which steps to correct; defaults to [`flowcorrect.EveryStep`][].
    - `weight`: scales `delta`; a number, a function of `t`, or an
        [`flowcorrect.AbstractWeight`][]. Defaults to 1 (the corrector's full step).
    """

    corrector: AbstractCorrector
    schedule: AbstractSchedule
    weight: AbstractWeight
    needs_energy = True

    def __init__(
        self,
        corrector: AbstractCorrector = reference_recipe(),
        schedule: AbstractSchedule = EveryStep(),
        weight: RealLike | AbstractWeight = 1.0,
    ):
        self.corrector = corrector
        self.schedule = schedule
        self.weight = as_weight(weight)

    def __check_init__(self):
        check_is_corrector("Denoised", "corrector", self.corrector)
        check_schedule(self.schedule)

    def init(self, flow: Flow, x: BatchChunks) -> StepCounts:
        return counts_init(flow)

    def step(self, flow, x, t, dt, index, state, keys):
        v = flow.velocity(x, t)
        w = self.weight(t, flow.convention)
        # The predicate depends on the step and the weight only, never on a sample,
        # so it is a real branch and unscheduled steps cost nothing extra.
        on = self.schedule.mask(flow.num_steps)[index] & (w != 0)
        x_plain = x + dt * v

        def corrected(_):
            a_hat = flow.denoised(x, v, t)
            a_corr, info = flow.correct(a_hat, self.corrector, keys, "Denoised")
            delta = w * (a_corr - a_hat)
            ok = jnp.logical_not(info.fell_back) & all_finite(delta)
            progress = flow.convention.progress(t + dt).astype(x.dtype)
            shifted = x_plain + progress * jnp.where(per_sample(ok, delta), delta, 0)
            return jnp.where(per_sample(ok, x), shifted, x_plain), ok

        def plain(_):
            return x_plain, jnp.zeros(flow.batch_size, bool)

        x_next, applied = jax.lax.cond(on, corrected, plain, None)
        return x_next, v, counts_add(state, on, applied)

    def info(self, flow: Flow, state: StepCounts) -> StepCounts:
        return state


__all__ = ["Denoised"]
