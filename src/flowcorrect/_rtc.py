"""Real-time chunking: guidance towards the actions the robot has already committed to.

Black, Galliker and Levine (2025), "Real-Time Execution of Action Chunking Flow
Policies" (RTC). While a chunked policy thinks, the robot keeps executing the previous
chunk; the new chunk must agree with the actions that will run before it arrives (the
first `d`, the inference delay) and should blend smoothly into the rest of the overlap.
RTC does this at inference time by inpainting: guidance through the policy's velocity
(PiGDM) towards the previous chunk's leftover, with weights that decay over the horizon.

In the library's terms that is an energy (a weighted squared distance from the denoised
estimate to the leftover, [`flowcorrect.rtc.RTCEnergy`][]), a guidance weight of time
([`flowcorrect.rtc.PiGDMWeight`][]) and the [`flowcorrect.Guided`][] placement with no cap.
The placement [`flowcorrect.RealTimeChunking`][] (in `_placements/rtc.py`) assembles
the three so that none can be set wrong.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._conventions import AbstractConvention
from ._custom_types import Actions, Encoded, IntScalar, RealLike, Scalar
from ._energy import AbstractEnergy
from ._flow.flow import BatchChunks
from ._flow.schedules import AbstractWeight
from ._misc import INT32_MAX, concrete, count, scalar_float, shape_str

# The paper's prefix-attention schedules (its Figure / eq. 5 and the reference code).
SCHEDULES = ("ones", "zeros", "linear", "exp")


def _schedule_index(schedule: Any) -> int:
    name = schedule.lower() if isinstance(schedule, str) else schedule
    if name not in SCHEDULES:
        raise ValueError(
            f"`prefix_attention_schedule` must be one of {SCHEDULES} (the paper uses 'exp'); "
            f"got {schedule!r}."
        )
    return SCHEDULES.index(name)


def check_leftover(left: Array, inference_delay: Any) -> None:
    """Refuses a previous chunk's leftover that is not `(leftover, action_dim)` or
    `(batch, leftover, action_dim)` floats with `leftover >= 1`, or that holds fewer
    actions than a concrete `inference_delay`."""
    if left.ndim not in (2, 3) or left.shape[-2] < 1:
        raise ValueError(
            "`prev_chunk_left_over` must have shape (leftover, action_dim) with leftover "
            f">= 1, or (batch, leftover, action_dim); got {shape_str(left)}."
        )
    if not jnp.issubdtype(left.dtype, jnp.floating):
        raise ValueError(f"`prev_chunk_left_over` must be floating; got {left.dtype}.")
    d = concrete(inference_delay)
    if d is not None and d > left.shape[-2]:
        raise ValueError(
            f"`inference_delay` {int(d)} exceeds the {left.shape[-2]} actions left in "
            "`prev_chunk_left_over`: the robot would run out of committed actions before "
            "the new chunk arrives. Start inference earlier (a smaller execution "
            "horizon) or pass the whole leftover."
        )


def leftover_target(left: Array, batch: int, horizon: int, dtype: Any) -> BatchChunks:
    """The previous chunk's leftover as the sampler's batch of targets: zero-padded to
    `horizon` rows, one per sample (shared, one per observation, or repeated over the
    candidates best-of-N draws per observation)."""
    left = left.astype(dtype)
    pad = [(0, 0)] * (left.ndim - 2) + [(0, horizon - left.shape[-2]), (0, 0)]
    left = jnp.pad(left, pad)
    if left.ndim == 2:
        return jnp.broadcast_to(left, (batch, *left.shape))
    rows = left.shape[0]
    if rows == batch:
        return left
    if batch % rows == 0:  # best-of-N repeats each observation in a row
        return jnp.repeat(left, batch // rows, axis=0)
    raise ValueError(
        f"`prev_chunk_left_over` has a batch axis of {rows} but the sampler runs a batch "
        f"of {batch}; give one leftover per observation, or one (leftover, action_dim) "
        "for all."
    )


def _int_scalar(
    owner: str, name: str, value: Any, low: int, example: str, hint: str
) -> Int[Array, ""]:
    """A Python or NumPy int, or a scalar int array (possibly traced: new values do not
    recompile), as an int32 array; checked before it is converted, so that a string,
    `None` or an int too large for int32 gets an error naming the argument."""
    if not isinstance(value, jax.Array | np.ndarray):
        return jnp.asarray(count(owner, name, value, low, example, hint), jnp.int32)
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(
            f"{owner} `{name}` must be a scalar int ({hint}); got {shape_str(value)} of dtype "
            f"{value.dtype}; pass e.g. {owner}(..., {name}={example})."
        )
    v = concrete(value)
    if v is not None and not low <= v <= INT32_MAX:
        raise ValueError(
            f"{owner} `{name}` must be an int from {low} to 2**31 - 1 ({hint}); got {int(v)}; "
            f"pass e.g. {owner}(..., {name}={example})."
        )
    return jnp.asarray(value).astype(jnp.int32)


def _check_known_timing(owner: str, d: Array, s: Array, horizon: int) -> None:
    """The checks of `_check_timing` for the values known now, as `ValueError`s."""
    sv, dv = concrete(s), concrete(d)
    if sv is not None and sv > horizon:
        raise ValueError(
            f"{owner} `execution_horizon` {int(sv)} exceeds the chunk's horizon {horizon}; "
            f"use execution_horizon <= {horizon}."
        )
    if sv is not None and dv is not None and dv > horizon - sv:
        raise ValueError(
            f"{owner} `inference_delay` {int(dv)} exceeds horizon - execution_horizon = "
            f"{horizon} - {int(sv)}: the previous chunk has only {horizon - int(sv)} actions "
            f"left when inference starts. Use execution_horizon <= {horizon - int(dv)}."
        )


def _check_timing(
    owner: str, d: Int[Array, ""], s: Int[Array, ""], horizon: int
) -> Int[Array, ""]:
    """Checks `1 <= s <= horizon` and `0 <= d <= horizon - s`: a `ValueError` for values
    known now, `eqx.error_if` for traced ones.

    Returns `d` carrying the run-time checks: the caller must compute with it, or XLA
    drops the checks along with the unused value.
    """
    _check_known_timing(owner, d, s, horizon)
    if concrete(s) is not None and concrete(d) is not None:
        return d
    d = eqx.error_if(
        d, (s < 1) | (s > horizon),
        f"{owner}: `execution_horizon` must be from 1 to the chunk's horizon {horizon}.",
    )
    return eqx.error_if(
        d, (d < 0) | (d > horizon - s),
        f"{owner}: `inference_delay` must be from 0 to horizon - `execution_horizon` "
        f"(horizon {horizon}): the previous chunk has no actions left for the whole delay. "
        "Use a shorter execution horizon or start inference earlier.",
    )


def _weights(
    horizon: int, start: Array, end: Array, schedule: Array
) -> Float[Array, " horizon"]:
    # Eq. (5) of the paper: 1 before `start`, c_i (e^c_i - 1) / (e - 1) over the overlap
    # for 'exp' (c_i itself for 'linear'), 0 from `end` on, with
    # c_i = (end - i) / (end - start + 1). `end` wins over `start`.
    i = jnp.arange(horizon)
    start = jnp.minimum(start, end)
    dtype = jnp.result_type(float)  # float64 under x64, so exact users get exact weights
    c = jnp.clip((end - i) / (end - start + 1), 0.0, 1.0).astype(dtype)
    table = jnp.stack([
        jnp.ones(horizon, dtype),
        (i < start).astype(dtype),
        c,
        c * jnp.expm1(c) / (np.e - 1),
    ])
    # Exactly 1 on the committed prefix, as eq. 5 writes it (the exp formula rounds).
    w = jnp.where(i < start, 1.0, table[schedule])
    return jnp.where(i >= end, 0.0, w)


def rtc_prefix_weights(
    horizon: int,
    inference_delay: int | IntScalar,
    execution_horizon: int | IntScalar,
    prefix_attention_schedule: str = "exp",
) -> Float[Array, " horizon"]:
    """The paper's weights over the new chunk's horizon (its eq. 5).

    With `d` the inference delay and `s` the execution horizon: 1 on the first `d`
    actions (they run before the new chunk arrives, so they are fixed), decaying over
    the rest of the overlap with the previous chunk, and 0 from `horizon - s` on (the
    previous chunk has no actions there).

    **Arguments:**

    - `horizon`: the chunk length `H`, a Python int `>= 1`.
    - `inference_delay`: `d`, in control steps (an int, or an int array: traced values
        do not recompile), with `0 <= d <= H - s`.
    - `execution_horizon`: `s`, the actions executed from a chunk before the next
        inference starts, with `1 <= s <= H`.
    - `prefix_attention_schedule`: `'exp'` (the paper's), `'linear'`, `'ones'` (1 on the
        whole overlap) or `'zeros'` (1 on the first `d` actions only: the committed
        prefix, nothing else).

    **Returns:**

    An array of shape `(horizon,)` with values in `[0, 1]`. Values out of range raise a
    `ValueError`; traced ones an error at run time (`eqx.error_if`).
    """
    owner = "rtc_prefix_weights"
    horizon = count(owner, "horizon", horizon, 1, "8", "the chunk length")
    d = _int_scalar(owner, "inference_delay", inference_delay, 0, "2", "control steps")
    s = _int_scalar(owner, "execution_horizon", execution_horizon, 1, "4", "actions per chunk")
    schedule = jnp.asarray(_schedule_index(prefix_attention_schedule))
    d = _check_timing(owner, d, s, horizon)
    return _weights(horizon, d, horizon - s, schedule)


class RTCEnergy(AbstractEnergy):
    """The energy of real-time chunking: `0.5 * sum_i w_i * ||a_i - y_i||^2`.

    `y` is the previous chunk's leftover in the new chunk's frame (row `i` is the action
    the previous chunk would execute at the same time as the new chunk's row `i`) and
    `w` the per-step weights of [`flowcorrect.rtc.rtc_prefix_weights`][]. Its gradient is
    `w_i (a_i - y_i)`, so `-grad` is the paper's `diag(W) (Y - A_hat)`.

    The context is the pair `(target, weights)` of shapes `(horizon, action_dim)` and
    `(horizon,)`; both are data, so a new previous chunk or delay does not recompile.
    """

    def encode(self, context: Encoded) -> Encoded:
        return context

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        target, weights = encoded
        if target.shape != actions.shape or weights.shape != actions.shape[:1]:
            raise ValueError(
                "RTCEnergy's context must be (target, weights) with target of the actions' "
                f"shape {shape_str(actions)} and weights of shape {actions.shape[:1]}; got "
                f"{shape_str(target)} and {shape_str(weights)}."
            )
        diff = actions - target.astype(actions.dtype)
        return 0.5 * jnp.sum(weights.astype(actions.dtype)[:, None] * diff**2)


class PiGDMWeight(AbstractWeight):
    """The guidance weight of PiGDM as real-time chunking uses it: `min(beta, (1 - tau) /
    (tau * r_tau^2))`, `r_tau^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)`.

    **Time.** `tau` is the paper's time, 0 at noise and 1 at actions. Every convention
    says how far `t` is from noise, `convention.progress(t)`, and that is `tau`: `t`
    itself in [`flowcorrect.Reverse`][], `1 - t` in [`flowcorrect.OpenPI`][]. The formula
    equals `(tau^2 + (1 - tau)^2) / (tau (1 - tau))`, symmetric under `tau <-> 1 - tau`,
    so plugging openpi's `t` in unmapped gives the same numbers inside `(0, 1)` but 0/0 =
    NaN at `t = 1`, openpi's first step; a placement that skips non-finite guidance then
    silently drops the first (largest) guided step. Here the ends are clamped to `beta`:
    the limit of the formula at `tau -> 0` is `+inf`, so the min is `beta` there.

    **Sign.** With `E(A_hat) = 0.5 (A_hat - Y)^T diag(W) (A_hat - Y)` (see
    [`flowcorrect.rtc.RTCEnergy`][]) and `g = (dA_hat/dx)^T grad E` (one VJP), the paper's
    guided velocity in its convention is `v + w * (dA_hat/dx)^T diag(W) (Y - A_hat) =
    v - w g`; the Euler step `x + dt v` with `dt > 0` moves `x` downhill. In openpi's
    convention the sample `x_t` at `t = 1 - tau` is the same point, the velocity is the
    negative (`noise - actions` vs `actions - noise`), the denoised estimate is the same
    (`x - t v = x + (1 - tau) v_reverse`) and `dt < 0`, so the same step needs
    `v + w g`. [`flowcorrect.Guided`][] adds `-sign(dt) * w * g`, which is both.

    **Arguments:**

    - `max_guidance_weight`: the clip `beta` (the paper uses 5), a finite number `>= 0`;
        0 switches guidance off. Stored as an array: a new value does not recompile. A
        traced value that is negative or not finite gives a NaN weight, so a placement
        takes the plain step and counts it as skipped (as for any guidance that is not
        finite) instead of guiding away from the target.
    """

    max_guidance_weight: Float[Array, ""]

    def __init__(self, max_guidance_weight: RealLike = 5.0):
        self.max_guidance_weight = scalar_float(
            "PiGDMWeight", "max_guidance_weight", max_guidance_weight, "5.0"
        )

    def __check_init__(self):
        beta = self.max_guidance_weight
        v = concrete(beta)
        if beta.shape != () or (v is not None and not (np.isfinite(v) and v >= 0)):
            shown = v if v is not None and beta.shape == () else shape_str(beta)
            raise ValueError(
                "`max_guidance_weight` must be a finite number >= 0 (the paper's beta; it "
                f"uses 5); got {shown}."
            )

    def __call__(self, t: Float[Array, ""], convention: AbstractConvention) -> Scalar:
        dtype = jnp.promote_types(t.dtype, jnp.float32)
        tau = jnp.clip(convention.progress(t).astype(dtype), 0, 1)
        inside = (tau > 0) & (tau < 1)
        safe = jnp.where(inside, tau, 0.5)
        r2 = (1 - safe) ** 2 / (safe**2 + (1 - safe) ** 2)
        w = (1 - safe) / (safe * r2)
        beta = self.max_guidance_weight.astype(dtype)
        # Only a traced beta can be bad here (a known one is refused at construction).
        beta = jnp.where(jnp.isfinite(beta) & (beta >= 0), beta, jnp.nan)
        return jnp.where(inside, jnp.minimum(beta, w), beta).astype(t.dtype)


__all__ = ["PiGDMWeight", "RTCEnergy", "leftover_target", "rtc_prefix_weights"]
