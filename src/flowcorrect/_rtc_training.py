"""Training-time real-time chunking: the committed prefix as a clean input, not a guide.

Black, Ren, Equi and Levine (2025), "Training-Time Action Conditioning for Efficient
Real-Time Chunking" (arXiv 2512.05964). Inference-time RTC ([`flowcorrect.RealTimeChunking`][])
inpaints the actions the robot has committed to by guidance through the velocity (one
VJP per flow step). Training-time RTC teaches the policy the same thing instead: during
training the first `d` actions of each chunk are given *clean*, at a per-token flow time
set to the data end of the flow, `d` is drawn per example, and the loss is taken only on
the remaining actions. At inference the committed prefix goes in clean at that same time
value: plain Euler steps, no guidance, no VJP, the cost of plain sampling.

**The convention matters.** The clean end of the flow is `t = 0` in openpi's convention
([`flowcorrect.OpenPI`][]: `x_t = t * noise + (1 - t) * actions`) and `t = 1` in the
reverse one ([`flowcorrect.Reverse`][], which the paper writes). Everything here reads it
from the policy's convention, [`flowcorrect.rtc.clean_time`][]: `1 - convention.noise_time`.

**What a policy needs.** Its velocity must take a flow time per action token: `t` of
shape `(horizon,)` (one time per row of the chunk) as well as a scalar. A policy says so
with a class attribute or field `accepts_token_time = True`; a velocity that silently
broadcast a vector of times against something else would train nonsense, so the
placement and the loss refuse a policy that does not declare it.

- [`flowcorrect.rtc.ExponentialDelays`][], [`flowcorrect.rtc.UniformDelays`][]: how `d` is drawn
  per training example.
- [`flowcorrect.rtc.PrefixConditioning`][]: the training transform (noisy input, per-token
  times, loss mask), and [`flowcorrect.rtc.prefix_conditioned_loss`][], a flow-matching loss
  built on it.
- [`flowcorrect.rtc.PrefixConditioned`][]: the inference placement.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._conventions import AbstractConvention
from ._custom_types import IntScalar, RealLike
from ._flow.flow import BatchChunks, Flow, VmappedPolicy
from ._misc import concrete, count, shape_str
from ._placements.base import AbstractInterleaved, AbstractPlacement
from ._placements.rtc import RealTimeChunking
from ._policy import AbstractBatchedPolicy, AbstractPolicy
from ._rtc import _int_scalar, check_leftover, leftover_target


def clean_time(convention: AbstractConvention) -> float:
    """The flow time of clean actions (the data end) in `convention`: `0.0` for
    [`flowcorrect.OpenPI`][], `1.0` for [`flowcorrect.Reverse`][]."""
    if not isinstance(convention, AbstractConvention):
        raise TypeError(
            "`convention` must be fc.OpenPI() or fc.Reverse() (a policy's `.convention`); "
            f"got {type(convention).__name__}."
        )
    return 1.0 - convention.noise_time


def token_times(
    t: RealLike, inference_delay: int | IntScalar, horizon: int, convention: AbstractConvention
) -> Float[Array, " horizon"]:
    """Per-token flow times: the clean time on the first `inference_delay` rows, `t` on
    the rest.

    **Arguments:**

    - `t`: the flow time of the rows still being generated, a scalar.
    - `inference_delay`: `d`, an int or a scalar int array (`0 <= d <= horizon`).
    - `horizon`: the chunk length, a Python int.
    - `convention`: the policy's convention (where the clean end is).

    **Returns:**

    An array of shape `(horizon,)` in `t`'s dtype.
    """
    t = jnp.asarray(t)
    if t.shape != ():
        raise ValueError(f"`t` must be a scalar flow time; got {shape_str(t)}.")
    prefix = jnp.arange(horizon) < inference_delay
    return jnp.where(prefix, jnp.asarray(clean_time(convention), t.dtype), t)


def accepts_token_time(policy: object) -> bool:
    """Whether `policy` declares a velocity that takes a flow time per action token
    (`accepts_token_time = True`; a per-sample policy vmapped by the sampler is looked
    through)."""
    if isinstance(policy, VmappedPolicy):
        policy = policy.policy
    return getattr(policy, "accepts_token_time", False) is True


def _require_token_time(policy: Any, who: str) -> None:
    if not accepts_token_time(policy):
        inner = policy.policy if isinstance(policy, VmappedPolicy) else policy
        raise TypeError(
            f"{who} needs a policy whose velocity takes a flow time per action token "
            f"(shape (horizon,)) and says so with `accepts_token_time = True`; "
            f"{type(inner).__name__} does not. For the Meta-World harness policy use "
            "`flowcorrect.metaworld.policy.with_token_time(policy)`; for openpi's Pi0, "
            "`flowcorrect.openpi.Pi0TokenTimePolicy(model)`."
        )


# ------------------------------------------------------------------ delay distributions
class AbstractDelays(eqx.Module):
    """How the delay `d` of a training example is drawn, over `0 ... max_delay`."""

    max_delay: eqx.AbstractVar[int]

    @abc.abstractmethod
    def probabilities(self) -> Float[Array, " max_delay_plus_one"]:
        """`P(d = k)` for `k = 0 ... max_delay`, summing to 1."""

    def sample(self, key: PRNGKeyArray) -> Int[Array, ""]:
        """One delay, an int32 scalar."""
        p = self.probabilities()
        return jax.random.choice(key, p.shape[0], p=p).astype(jnp.int32)


class ExponentialDelays(AbstractDelays):
    """Exponentially decaying delays: `P(d = k) ∝ exp(-rate * k)` for `k = 0 ... max_delay`.

    Short delays (the common case on a robot) get most examples and long ones still
    appear; `d = 0` keeps the policy a plain one when nothing is committed. The paper
    draws `d` from an exponentially decaying distribution; `rate` is this library's
    parameter, not a constant taken from the paper.

    **Arguments:**

    - `max_delay`: the largest delay, an int `>= 0` (at most `horizon - s` for an
        execution horizon `s`: the actions the previous chunk has left).
    - `rate`: the decay per control step, a number `>= 0` (0 is uniform). Default 0.5.
    """

    max_delay: int = eqx.field(static=True)
    rate: float | int = eqx.field(static=True, default=0.5)

    def __check_init__(self):
        count("ExponentialDelays", "max_delay", self.max_delay, 0, "4", "control steps")
        if not (isinstance(self.rate, int | float) and not isinstance(self.rate, bool)
                and np.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(
                f"ExponentialDelays `rate` must be a finite number >= 0; got {self.rate!r}; "
                "pass e.g. ExponentialDelays(4, rate=0.5)."
            )

    def probabilities(self) -> Float[Array, " max_delay_plus_one"]:
        w = np.exp(-self.rate * np.arange(self.max_delay + 1))
        return jnp.asarray(w / w.sum(), jnp.float32)


class UniformDelays(AbstractDelays):
    """Delays uniform over `min_delay ... max_delay`.

    **Arguments:**

    - `max_delay`: the largest delay, an int `>= 0`.
    - `min_delay`: the smallest, `0 <= min_delay <= max_delay`. Default 0.
    """

    max_delay: int = eqx.field(static=True)
    min_delay: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        count("UniformDelays", "max_delay", self.max_delay, 0, "4", "control steps")
        count("UniformDelays", "min_delay", self.min_delay, 0, "0", "control steps")
        if self.min_delay > self.max_delay:
            raise ValueError(
                f"UniformDelays `min_delay` {self.min_delay} exceeds `max_delay` "
                f"{self.max_delay}; pass UniformDelays(max_delay, min_delay=k) with k <= "
                "max_delay."
            )

    def probabilities(self) -> Float[Array, " max_delay_plus_one"]:
        k = np.arange(self.max_delay + 1)
        w = (k >= self.min_delay).astype(np.float64)
        return jnp.asarray(w / w.sum(), jnp.float32)


# ------------------------------------------------------------------ training transform
class ConditionedExample(eqx.Module):
    """One training example after [`flowcorrect.rtc.PrefixConditioning`][].

    **Attributes:**

    - `x_t`: `(horizon, action_dim)`, the noisy chunk with its first `delay` rows clean
        (exactly the actions).
    - `t`: `(horizon,)`, the per-token flow times: the clean time on the prefix, the
        example's flow time on the rest.
    - `target`: `(horizon, action_dim)`, the velocity target of the convention.
    - `loss_mask`: `(horizon,)`, True on the rows the loss is taken on (the postfix).
    - `delay`: the example's `d`, an int32 scalar.
    """

    x_t: Float[Array, "horizon action_dim"]
    t: Float[Array, " horizon"]
    target: Float[Array, "horizon action_dim"]
    loss_mask: Bool[Array, " horizon"]
    delay: Int[Array, ""]


class PrefixConditioning(eqx.Module):
    """The training transform of training-time real-time chunking, for one example.

    Draws `d` from `delays`, sets the first `d` rows of the noisy chunk to the
    ground-truth actions at the clean end of the flow (per-token time
    [`flowcorrect.rtc.clean_time`][] of the convention), keeps the example's own flow time
    `t` on the other rows, and masks the loss to those rows. With `d = 0` it is plain
    flow matching. Vmap it over a batch (one `d` per example).

    **Arguments:**

    - `delays`: an [`flowcorrect.rtc.AbstractDelays`][], e.g.
        `fc.rtc.ExponentialDelays(max_delay=4)` or `fc.rtc.UniformDelays(4)`.

    !!! example

        ```python
        transform = fc.rtc.PrefixConditioning(fc.rtc.ExponentialDelays(max_delay=4))
        ex = transform(fc.OpenPI(), actions, noise, t, key)   # one example
        v = policy.velocity(policy.condition(obs), ex.x_t, ex.t)  # t per token
        loss = fc.rtc.masked_flow_loss(v, ex)
        ```
    """

    delays: AbstractDelays

    def __check_init__(self):
        if not isinstance(self.delays, AbstractDelays):
            raise TypeError(
                "`delays` must be a delay distribution such as fc.rtc.ExponentialDelays(4) or "
                f"fc.rtc.UniformDelays(4); got {type(self.delays).__name__}."
            )

    def __call__(
        self,
        convention: AbstractConvention,
        actions: Float[Array, "horizon action_dim"],
        noise: Float[Array, "horizon action_dim"],
        t: Float[Array, ""] | float,
        key: PRNGKeyArray,
        delay: Int[Array, ""] | int | None = None,
    ) -> ConditionedExample:
        """**Arguments:** the policy's `convention`; the clean `actions` and the `noise`,
        both `(horizon, action_dim)`; the example's flow time `t` (a scalar); a `key`
        for `d`; or `delay` to set `d` instead of drawing it.

        **Returns:** a [`flowcorrect.rtc.ConditionedExample`][].
        """
        if actions.ndim != 2 or noise.shape != actions.shape:
            raise ValueError(
                "PrefixConditioning works on one example: `actions` and `noise` must both "
                f"be (horizon, action_dim); got {shape_str(actions)} and {shape_str(noise)}. "
                "Vmap it over a batch."
            )
        horizon = actions.shape[0]
        if self.delays.max_delay > horizon:
            raise ValueError(
                f"The delays reach {self.delays.max_delay} but the chunk has {horizon} rows."
            )
        d = self.delays.sample(key) if delay is None else jnp.asarray(delay, jnp.int32)
        times = token_times(jnp.asarray(t, actions.dtype), d, horizon, convention)
        # Row by row: a convention mixes at one time, and each row has its own.
        x_t = jax.vmap(convention.interpolate)(noise[:, None], actions[:, None], times)[:, 0]
        prefix = jnp.arange(horizon) < d
        # Exactly the actions on the prefix (interpolating at the clean time rounds).
        x_t = jnp.where(prefix[:, None], actions, x_t)
        target = convention.velocity_target(noise, actions)
        return ConditionedExample(x_t, times, target, ~prefix, d)


def masked_flow_loss(
    velocity: Float[Array, "horizon action_dim"], example: ConditionedExample
) -> Float[Array, ""]:
    """The squared error of `velocity` against the example's target, averaged over the
    rows of its loss mask (the postfix) and the action dims; 0 for an example with no
    row left (`d = horizon`)."""
    err = jnp.mean((velocity - example.target) ** 2, axis=-1)
    m = example.loss_mask.astype(err.dtype)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def prefix_conditioned_loss(
    policy: AbstractPolicy,
    observations: PyTree[Any],
    actions: Float[Array, "batch horizon action_dim"],
    key: PRNGKeyArray,
    delays: AbstractDelays,
    *,
    time_sampler: Callable[[PRNGKeyArray, tuple[int, ...]], Array] | None = None,
) -> Float[Array, ""]:
    """Flow matching with training-time RTC for a per-sample policy, on a batch.

    Per example: noise, a flow time (uniform on `[0, 1)` unless `time_sampler(key,
    batch)` is given), a delay from `delays`, the transform of
    [`flowcorrect.rtc.PrefixConditioning`][], the velocity with per-token times, and the
    loss on the postfix. Postfix rows are weighted equally across examples (the mean of
    the per-example masked means would up-weight rows of long delays).

    **Arguments:**

    - `policy`: an [`flowcorrect.AbstractPolicy`][] with `accepts_token_time = True`.
    - `observations`: a batch of observations (every array with a leading batch axis).
    - `actions`: `(batch, horizon, action_dim)`, the demonstrated chunks.
    - `key`: a PRNG key.
    - `delays`: an [`flowcorrect.rtc.AbstractDelays`][].
    - `time_sampler`: optional `time_sampler(key, batch) -> (batch,)` flow times.
    """
    _require_token_time(policy, "prefix_conditioned_loss")
    batch = actions.shape[0]
    k_noise, k_t, k_d = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, actions.shape, actions.dtype)
    if time_sampler is None:
        t = jax.random.uniform(k_t, (batch,), actions.dtype)
    else:
        t = jnp.asarray(time_sampler(k_t, batch), actions.dtype)
    transform = PrefixConditioning(delays)
    conv = policy.convention
    examples = jax.vmap(lambda a, n, s, k: transform(conv, a, n, s, k))(
        actions, noise, t, jax.random.split(k_d, batch)
    )
    v = jax.vmap(lambda o, x, s: policy.velocity(policy.condition(o), x, s))(
        observations, examples.x_t, examples.t
    )
    err = jnp.mean((v - examples.target) ** 2, axis=-1)
    m = examples.loss_mask.astype(err.dtype)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


# ------------------------------------------------------------------ inference placement
class PrefixConditioned(AbstractInterleaved):
    """Inference with training-time real-time chunking: the committed actions go in clean.

    At every flow step the first `d` rows of the sample are the previous chunk's
    leftover (the actions the robot executes while the policy thinks), at the clean
    flow time of the policy's convention; the other rows run the plain Euler step at the
    step's time. One velocity call per step, no gradient: the cost of plain sampling.
    The returned chunk's first `d` rows are the leftover exactly. With `d = 0` this is
    plain sampling (for a policy whose velocity with all times equal is its scalar-time
    velocity).

    Needs a policy trained (or fine-tuned) with [`flowcorrect.rtc.PrefixConditioning`][]
    whose velocity takes per-token times (`accepts_token_time = True`). Pass it as
    `placement=` to [`flowcorrect.sample`][]. `inference_delay` is data: a new delay
    does not recompile.

    **Arguments:**

    - `prev_chunk_left_over`: the previous chunk's actions not yet executed, in the new
        chunk's frame, `(leftover, action_dim)` or `(batch, leftover, action_dim)`
        (`queue.request().prev_chunk_left_over` of an [`flowcorrect.rtc.ActionQueue`][]).
    - `inference_delay`: `d`, `0 <= d <= leftover` and `d <= horizon`.

    !!! example

        ```python
        request = queue.request()
        placement = fc.rtc.PrefixConditioned(request.prev_chunk_left_over,
                                         request.inference_delay)
        actions, _ = fc.sample(trt_policy, observation, key, placement=placement)
        ```
    """

    prev_chunk_left_over: Float[Array, "*batch leftover action_dim"]
    inference_delay: Int[Array, ""]
    needs_energy = False

    def __init__(self, prev_chunk_left_over: RealLike, inference_delay: int | IntScalar):
        if not isinstance(prev_chunk_left_over, jax.Array | np.ndarray):
            raise TypeError(
                "`prev_chunk_left_over` must be a JAX or NumPy array of shape (leftover, "
                f"action_dim); got {type(prev_chunk_left_over).__name__}."
            )
        self.prev_chunk_left_over = jnp.asarray(prev_chunk_left_over)
        self.inference_delay = _int_scalar(
            "PrefixConditioned", "inference_delay", inference_delay, 0, "2",
            "control steps executed from the previous chunk while the policy thinks",
        )

    def __check_init__(self):
        check_leftover(self.prev_chunk_left_over, self.inference_delay)

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        horizon, action_dim = chunk_shape
        left = self.prev_chunk_left_over
        if left.shape[-1] != action_dim or left.shape[-2] > horizon:
            raise ValueError(
                f"`prev_chunk_left_over` has shape {shape_str(left)} but the policy's chunks "
                f"are {(horizon, action_dim)}: it needs action_dim {action_dim} and at most "
                f"{horizon} rows."
            )
        return tuple(chunk_shape)

    def _target(self, batch: int, horizon: int, dtype: Any) -> BatchChunks:
        return leftover_target(self.prev_chunk_left_over, batch, horizon, dtype)

    def _prefix(self, flow: Flow, x: BatchChunks) -> tuple[Bool[Array, " horizon"], BatchChunks]:
        horizon = x.shape[1]
        rows = self.prev_chunk_left_over.shape[-2]
        d = self.inference_delay
        if concrete(d) is None:
            d = eqx.error_if(d, d > rows, "PrefixConditioned: `inference_delay` exceeds the "
                             "actions left in `prev_chunk_left_over`.")
        return jnp.arange(horizon) < d, self._target(flow.batch_size, horizon, x.dtype)

    def init(self, flow: Flow, x: BatchChunks) -> tuple[Array, BatchChunks]:
        _require_token_time(flow.policy, "PrefixConditioned")
        # Once, before the loop: the state carries the prefix mask and the target (and the
        # run-time check of a traced delay), so a step adds two selects to plain Euler.
        mask, target = self._prefix(flow, x)
        return mask[None, :, None], target

    def step(self, flow, x, t, dt, index, state, keys):
        mask, target = state
        x = jnp.where(mask, target, x)
        times = token_times(t, self.inference_delay, x.shape[1], flow.convention)
        v = flow.velocity(x, times)
        x_next = jnp.where(mask, target, x + dt * v)
        return x_next, v, state

    def info(self, flow: Flow, state: Any) -> None:
        return None


class _CommittedClean(AbstractBatchedPolicy):
    """A token-time policy whose first `d` rows are the committed actions, given clean.

    Its velocity reads `target` in place of the sample's first `d` rows, at the clean
    flow time, and the sample's own rows at `t`. On those `d` rows it returns the
    straight-line velocity to `target` (the one whose denoised estimate is `target`), so
    they carry no guidance gradient and end on the committed actions.
    """

    policy: AbstractBatchedPolicy
    target: BatchChunks
    inference_delay: Int[Array, ""]

    @property
    def chunk_shape(self) -> tuple[int, int]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.chunk_shape

    @property
    def convention(self) -> AbstractConvention:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.convention

    def condition(self, observations: Any) -> Any:
        return self.policy.condition(observations)

    def batch_size(self, cond: Any) -> int:
        return self.policy.batch_size(cond)

    def energy_context(self, cond: Any) -> Any:
        return self.policy.energy_context(cond)

    def repeat(self, cond: Any, n: int) -> Any:
        return self.policy.repeat(cond, n)

    def velocity(self, cond: Any, x_t: BatchChunks, t: Any) -> BatchChunks:
        horizon = x_t.shape[1]
        mask = (jnp.arange(horizon) < self.inference_delay)[None, :, None]
        target = self.target.astype(x_t.dtype)
        convention = self.policy.convention
        times = token_times(t, self.inference_delay, horizon, convention)
        v = self.policy.velocity(cond, jnp.where(mask, target, x_t), times)
        # x_t = interpolate(noise, target, t) solved for the noise; never at the clean
        # end, where Euler evaluates no velocity.
        p = convention.progress(t).astype(x_t.dtype)
        noise = (x_t - p * target) / jnp.where(p < 1, 1 - p, 1)
        return jnp.where(mask, convention.velocity_target(noise, target).astype(v.dtype), v)


class PrefixConditionedRTC(AbstractPlacement):
    """Training-time and inference-time real-time chunking together: the committed
    actions go in clean, as for [`flowcorrect.rtc.PrefixConditioned`][], and the rest of
    the overlap is guided towards the previous chunk's leftover, as by
    [`flowcorrect.RealTimeChunking`][].

    The first `d` rows are given to the policy clean at the clean flow time (what a
    policy trained with [`flowcorrect.rtc.PrefixConditioning`][] expects); they follow
    the straight path to the committed actions and end on them exactly, so they add
    nothing to the guidance, which then acts through the velocity on the rows from `d`
    to `horizon - s` with RTC's schedule and weight (one VJP per flow step: the cost of
    inference-time RTC). With `max_guidance_weight = 0` it is `PrefixConditioned`.

    **Arguments:** as for [`flowcorrect.RealTimeChunking`][] (`hard_prefix` is always on).
    Needs a policy with `accepts_token_time = True`.
    """

    rtc: RealTimeChunking
    needs_energy = False

    def __init__(
        self,
        prev_chunk_left_over: RealLike,
        inference_delay: int | IntScalar,
        execution_horizon: int | IntScalar,
        *,
        prefix_attention_schedule: str = "exp",
        max_guidance_weight: RealLike = 5.0,
    ):
        self.rtc = RealTimeChunking(
            prev_chunk_left_over, inference_delay, execution_horizon,
            prefix_attention_schedule=prefix_attention_schedule,
            max_guidance_weight=max_guidance_weight, hard_prefix=True,
        )  # fmt: skip

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return self.rtc.noise_shape(chunk_shape)

    def sample(self, flow: Flow, noise: Array, keys: Any) -> tuple[BatchChunks, Any]:
        _require_token_time(flow.policy, "PrefixConditionedRTC")
        rtc = self.rtc
        target = leftover_target(rtc.prev_chunk_left_over, flow.batch_size, noise.shape[1],
                                 noise.dtype)  # fmt: skip
        committed = _CommittedClean(flow.policy, target, rtc.inference_delay)
        return rtc.sample(eqx.tree_at(lambda f: f.policy, flow, committed), noise, keys)


__all__ = [
    "AbstractDelays",
    "ConditionedExample",
    "ExponentialDelays",
    "PrefixConditioned",
    "PrefixConditionedRTC",
    "PrefixConditioning",
    "UniformDelays",
    "accepts_token_time",
    "clean_time",
    "masked_flow_loss",
    "prefix_conditioned_loss",
    "token_times",
]
