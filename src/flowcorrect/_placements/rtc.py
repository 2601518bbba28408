"""Real-time chunking as a placement: PiGDM guidance towards the previous chunk's leftover.

Black, Galliker and Levine (2025), "Real-Time Execution of Action Chunking Flow
Policies". The energy, the guidance weight and the prefix weights are in `_rtc.py`;
this placement assembles them with [`flowcorrect.Guided`][] so that none can be set
wrong.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._custom_types import BoolScalar, IntScalar, RealLike
from .._flow.flow import BatchChunks, BatchKeys, Flow
from .._flow.integrate import integrate
from .._flow.schedules import EveryStep
from .._misc import concrete, flag, scalar_float, shape_str
from .._rtc import (
    PiGDMWeight,
    RTCEnergy,
    _check_known_timing,
    _check_timing,
    _int_scalar,
    _schedule_index,
    _weights,
    check_leftover,
    leftover_target,
)
from .base import AbstractPlacement
from .common import StepCounts
from .guided import Guided
from .plain import Plain


class RealTimeChunkingInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.RealTimeChunking`][] (arrays with a leading batch axis).

    **Attributes:**

    - `weights`: `(batch, horizon)`, the prefix weights used.
    - `guidance`: a [`flowcorrect.StepCounts`][]: guided flow steps, and steps whose
        guidance was not finite (the plain step was taken): every step, for a leftover
        that is not finite or a traced `max_guidance_weight` that is negative or not
        finite.
    - `step_energy`: `(batch, num_steps)`, the RTC energy of the denoised estimate at
        each step, with `fc.sample(..., step_energies=True)`; else `None`.
    - `rtc_energy`: `(batch,)`, the RTC energy of the sampled chunk (before the hard
        prefix, which makes the committed part exact).
    """

    weights: Float[Array, "batch horizon"]
    guidance: StepCounts
    step_energy: Float[Array, "batch num_steps"] | None
    rtc_energy: Float[Array, " batch"]


class RealTimeChunking(AbstractPlacement):
    """Real-time chunking (Black, Galliker, Levine 2025): the new chunk inpaints the
    previous chunk's leftover, by PiGDM guidance through the policy's velocity.

    At every flow step the velocity becomes `v - sign(dt) * w(tau) * g`, with `g` the
    gradient of [`flowcorrect.rtc.RTCEnergy`][] through the denoised estimate (one VJP of the
    policy per step), `w` the [`flowcorrect.rtc.PiGDMWeight`][] at the paper's time `tau`
    (mapped from the policy's convention), and no cap relative to the velocity: the
    paper's algorithm exactly, in either convention. Pass it as `placement=` to
    [`flowcorrect.sample`][]; it needs no `energy` (one given there is only reported in
    `info.final_energy`).

    Everything is data: a new leftover, delay, execution horizon, weight clip, schedule
    or hard-prefix switch does not recompile, so a control loop compiles once. With
    all-zero weights (`d = 0` and the 'zeros' schedule) or `max_guidance_weight = 0`
    the flow is the plain sampler's, bit for bit.

    **Arguments:**

    - `prev_chunk_left_over`: the previous chunk's actions not yet executed when this
        inference starts, in the new chunk's frame: row `i` is what the previous chunk
        would execute at the time of the new chunk's row `i`. Shape
        `(leftover, action_dim)` with `leftover <= horizon`, or with a leading batch
        axis matching the sampler's batch. Rows past `leftover` get weight 0.
        With an [`flowcorrect.rtc.ActionQueue`][], `queue.request().prev_chunk_left_over`.
    - `inference_delay`: `d`, the control steps the robot executes from the previous
        chunk before the new one arrives: the new chunk's first `d` actions are never
        executed and are pulled onto the leftover with weight 1. `0 <= d <= leftover`
        and `d <= horizon - execution_horizon`.
    - `execution_horizon`: `s`, the actions executed from each chunk before the next
        inference starts, `1 <= s <= horizon`; the weights vanish from `horizon - s` on.
    - `prefix_attention_schedule`: `'exp'` (default, the paper's), `'linear'`,
        `'ones'` or `'zeros'` (guide towards the first `d` actions only); see
        [`flowcorrect.rtc.rtc_prefix_weights`][].
    - `max_guidance_weight`: the paper's `beta`, a finite number `>= 0`, default 5 (see
        [`flowcorrect.rtc.PiGDMWeight`][] for a bad traced value).
    - `hard_prefix`: `True` or `False` (or a scalar bool array): after sampling, copy
        the first `d` actions from the leftover, so the chunk agrees with the committed
        actions exactly. Default `False`.

    `inference_delay` and `execution_horizon` may be ints or scalar int arrays. Values
    known when [`flowcorrect.sample`][] is called are checked against the policy's
    horizon before it compiles (a `ValueError`); traced ones inside the compiled
    function (`eqx.error_if`, an error at run time).

    !!! example

        ```python
        rtc = fc.RealTimeChunking(prev_chunk_left_over=leftover, inference_delay=2,
                                  execution_horizon=4)
        actions, info = fc.sample(policy, observation, key, placement=rtc)
        ```
    """

    prev_chunk_left_over: Float[Array, "*batch leftover action_dim"]
    inference_delay: Int[Array, ""]
    execution_horizon: Int[Array, ""]
    max_guidance_weight: Float[Array, ""]
    prefix_attention_schedule: Int[Array, ""]
    hard_prefix: Bool[Array, ""]
    # Its own energy, to the previous chunk's leftover: none from the sampler.
    needs_energy = False

    def __init__(
        self,
        prev_chunk_left_over: RealLike,
        inference_delay: int | IntScalar,
        execution_horizon: int | IntScalar,
        *,
        prefix_attention_schedule: str = "exp",
        max_guidance_weight: RealLike = 5.0,
        hard_prefix: bool | BoolScalar = False,
    ):
        if not isinstance(prev_chunk_left_over, jax.Array | np.ndarray):
            raise TypeError(
                "`prev_chunk_left_over` must be a JAX or NumPy array of shape (leftover, "
                f"action_dim); got {type(prev_chunk_left_over).__name__}."
            )
        owner = "RealTimeChunking"
        self.prev_chunk_left_over = jnp.asarray(prev_chunk_left_over)
        self.inference_delay = _int_scalar(
            owner, "inference_delay", inference_delay, 0, "2", "control steps executed from "
            "the previous chunk while the policy thinks",
        )
        self.execution_horizon = _int_scalar(
            owner, "execution_horizon", execution_horizon, 1, "4", "actions executed from "
            "each chunk before the next inference starts",
        )
        beta = scalar_float(owner, "max_guidance_weight", max_guidance_weight, "5.0")
        self.max_guidance_weight = PiGDMWeight(beta).max_guidance_weight
        self.prefix_attention_schedule = jnp.asarray(
            _schedule_index(prefix_attention_schedule), jnp.int32
        )
        self.hard_prefix = flag(owner, "hard_prefix", hard_prefix, "True")

    def __check_init__(self):
        check_leftover(self.prev_chunk_left_over, self.inference_delay)
        if self.hard_prefix.shape != ():
            raise ValueError(f"`hard_prefix` must be one bool; got {shape_str(self.hard_prefix)}.")

    def _check(self, chunk_shape: tuple[int, ...]) -> None:
        horizon, action_dim = chunk_shape[-2:]
        left = self.prev_chunk_left_over
        if left.shape[-1] != action_dim or left.shape[-2] > horizon:
            raise ValueError(
                f"`prev_chunk_left_over` has shape {shape_str(left)} but the policy's chunks "
                f"are {(horizon, action_dim)}: it needs action_dim {action_dim} and at most "
                f"{horizon} rows (the previous chunk's actions from the time this inference "
                "starts)."
            )
        _check_known_timing("RealTimeChunking", self.inference_delay, self.execution_horizon,
                            horizon)

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        self._check(chunk_shape)
        return tuple(chunk_shape)

    def _target(self, batch: int, horizon: int, dtype: Any) -> BatchChunks:
        return leftover_target(self.prev_chunk_left_over, batch, horizon, dtype)

    def weights(self, horizon: int) -> Float[Array, " horizon"]:
        """The prefix weights over a chunk of `horizon` actions (checking the delay and
        the execution horizon against it)."""
        rows = self.prev_chunk_left_over.shape[-2]
        d = _check_timing("RealTimeChunking", self.inference_delay, self.execution_horizon,
                          horizon)
        if concrete(d) is None:
            d = eqx.error_if(
                d, d > rows,
                f"RealTimeChunking: `inference_delay` exceeds the {rows} actions left in "
                "`prev_chunk_left_over`: start inference earlier or pass the whole leftover.",
            )
        end = jnp.minimum(horizon - self.execution_horizon, rows)
        return _weights(horizon, d, end, self.prefix_attention_schedule)

    def sample(
        self, flow: Flow, noise: Array, keys: BatchKeys
    ) -> tuple[BatchChunks, RealTimeChunkingInfo]:
        self._check(noise.shape)
        batch, horizon = flow.batch_size, noise.shape[1]
        target = self._target(batch, horizon, noise.dtype)
        # Carries the run-time checks of traced values: every output depends on it.
        w = self.weights(horizon)
        weights = jnp.broadcast_to(w, (batch, horizon))
        # The RTC energy replaces the sampler's: the guidance reads only this one.
        rtc_flow = flow.with_energy(RTCEnergy(), (target, weights))
        # No cap: the paper's guidance is not bounded relative to the velocity.
        guided = Guided(EveryStep(), PiGDMWeight(self.max_guidance_weight), cap=None)

        def plain(_):
            x, _, step_energy = integrate(rtc_flow, Plain(), noise, keys)
            zero = jnp.zeros(batch, jnp.int32)
            return x, StepCounts(zero, zero), step_energy

        def rtc(_):
            return integrate(rtc_flow, guided, noise, keys)

        # A batch-level branch: with nothing to guide towards, the plain flow exactly.
        off = jnp.all(w == 0) | (self.max_guidance_weight == 0)
        x, counts, step_energy = jax.lax.cond(off, plain, rtc, None)
        rtc_energy = rtc_flow.energies(x)
        committed = (jnp.arange(horizon) < self.inference_delay) & self.hard_prefix
        x = jnp.where(committed[None, :, None], target, x)
        return x, RealTimeChunkingInfo(weights, counts, step_energy, rtc_energy)


__all__ = ["RealTimeChunking", "RealTimeChunkingInfo"]
