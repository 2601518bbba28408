"""Where the correction goes relative to the flow ODE.

Placements are configuration: [`flowcorrect.sample`][] reads them. The energy and the
corrector are given to `sample` itself, so the same placement can be tried with
different energies and correctors.
"""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Float

from .._misc import concrete, float_array, shape_str
from .schedules import AbstractSchedule, AbstractWeight, EveryStep, as_weight


class AbstractPlacement(eqx.Module):
    """Base class of placements: where the correction goes relative to the flow ODE."""


class PostHoc(AbstractPlacement):
    """Runs the corrector once on the final chunk, after the last Euler step.

    This is the reference method: [`flowcorrect.correct`][] applied to the sample.
    The corrector given to [`flowcorrect.sample`][] is used.
    """


class AbstractInterleaved(AbstractPlacement):
    """Base class of placements that act inside the Euler loop.

    At the steps chosen by `schedule`, with a weight `weight(t)`; a step whose weight
    is zero is exactly the plain Euler step. The concrete placements are
    [`flowcorrect.Denoised`][] and [`flowcorrect.Guided`][]; [`flowcorrect.sample`][]
    knows how to run each, so new subclasses are not supported yet.
    """

    schedule: eqx.AbstractVar[AbstractSchedule]
    weight: eqx.AbstractVar[AbstractWeight]


class Denoised(AbstractInterleaved):
    """Corrects the denoised estimate at chosen steps and moves `x_t` consistently.

    At a scheduled step from `t` to `t_next` the velocity `v` gives the denoised
    estimate `a_hat` (see [`flowcorrect.AbstractConvention.denoised`][]). The
    corrector given to [`flowcorrect.sample`][] runs on `a_hat` and gives `a_corr`;
    with `delta = weight(t) * (a_corr - a_hat)` the Euler step becomes

    `x_next = x + dt * v + progress(t_next) * delta`,

    which is the Euler step taken from the sample that has the same noise estimate and
    the corrected denoised estimate `a_hat + delta`. In openpi's convention
    (`x_t = t * noise + (1 - t) * a`) this is `x_t -> x_t + (1 - t) * delta` with the
    velocity `v - delta` consistent with it. No gradient flows through the policy.
    At the last step `progress(t_next) = 1`, so the last correction lands on the
    chunk in full; earlier ones are pulled by the flow as it sees fit.

    **Arguments:**

    - `schedule`: which steps to correct; defaults to [`flowcorrect.EveryStep`][].
    - `weight`: scales `delta`; a number, a function of `t`, or an
        [`flowcorrect.AbstractWeight`][]. Defaults to 1 (the corrector's full step).
    """

    schedule: AbstractSchedule
    weight: AbstractWeight

    def __init__(self, schedule: AbstractSchedule = EveryStep(), weight: Any = 1.0):
        self.schedule = schedule
        self.weight = as_weight(weight)

    def __check_init__(self):
        _check_schedule(self.schedule)


class Guided(AbstractInterleaved):
    """Adds the energy's gradient through the policy to the velocity (guidance).

    At a scheduled step, with `g = grad_x E(a_hat(x))` taken through the velocity
    function by a vector-Jacobian product (as in PiGDM and real-time chunking), the
    velocity becomes `v - direction * weight(t) * g`, where `direction` is the sign of
    `dt`. So the Euler step `x + dt * v` moves `x` by `-|dt| * weight(t) * g`, downhill,
    in either convention: in openpi's (`dt < 0`) the term is `+ weight * g`, in the
    reverse one `- weight * g`. The corrector given to [`flowcorrect.sample`][] is not
    used.

    **Arguments:**

    - `schedule`: which steps to guide; defaults to [`flowcorrect.EveryStep`][].
    - `weight`: the guidance weight; a number, a function of `t`, or an
        [`flowcorrect.AbstractWeight`][]. Defaults to 1.
    - `cap`: a bound on the added term relative to the velocity:
        `||added|| <= cap * ||v||` (Frobenius norms over the chunk), by scaling the
        term down. `None` removes the bound. Defaults to 1: guidance never outweighs
        the policy's own velocity.
    """

    schedule: AbstractSchedule
    weight: AbstractWeight
    cap: Float[Array, ""]

    def __init__(self, schedule: AbstractSchedule = EveryStep(), weight: Any = 1.0, cap: Any = 1.0):
        self.schedule = schedule
        self.weight = as_weight(weight)
        self.cap = float_array(float("inf") if cap is None else cap)

    def __check_init__(self):
        _check_schedule(self.schedule)
        c = concrete(self.cap)
        if self.cap.shape != () or (c is not None and not c > 0):
            shown = c if c is not None else shape_str(self.cap)
            raise ValueError(
                f"`cap` must be a number > 0 (1 lets guidance be as large as the velocity) "
                f"or None for no bound; got {shown}. For no guidance use weight=0."
            )


class BestOfN(AbstractPlacement):
    """Samples `n` chunks from `n` noises for the same context, keeps the lowest energy.

    The `n` samples are one batched (`vmap`ped) computation; the energy's context is
    encoded once. Samples whose final energy is not finite are never chosen.

    **Arguments:**

    - `n`: how many chunks, an int `>= 1`. Static: a new `n` compiles anew.
    - `inner`: how each of the `n` chunks is sampled: `None` (default) for the plain
        sampler, or an interleaved placement ([`flowcorrect.Denoised`][],
        [`flowcorrect.Guided`][]).
    - `then`: `None` (default), or [`flowcorrect.PostHoc`][] to run the corrector on
        the chosen chunk.
    """

    n: int = eqx.field(static=True)
    # Typed loosely so that a wrong placement gets the message of `__check_init__`.
    inner: AbstractPlacement | None = None
    then: AbstractPlacement | None = None

    def __check_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"`n` must be an int >= 1 (8 is a good start); got {self.n!r}.")
        if self.inner is not None and not isinstance(self.inner, AbstractInterleaved):
            raise ValueError(
                "`inner` must be None (plain sampling) or an interleaved placement "
                f"(Denoised, Guided); got {type(self.inner).__name__}. To correct the "
                "chosen chunk afterwards use then=PostHoc()."
            )
        if self.then is not None and not isinstance(self.then, PostHoc):
            raise ValueError(f"`then` must be None or PostHoc(); got {type(self.then).__name__}.")


def _check_schedule(schedule: Any) -> None:
    if not isinstance(schedule, AbstractSchedule):
        raise ValueError(
            "`schedule` must be a schedule such as EveryStep(), LastSteps(3) or "
            f"EveryNth(2); got {type(schedule).__name__}."
        )
