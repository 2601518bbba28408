"""The base classes of placements: where the correction goes relative to the flow ODE.

A placement owns its behaviour. [`flowcorrect.sample`][] calls
`placement.sample(flow, noise, keys)` and never asks which placement it has, the way
diffrax's `diffeqsolve` calls `solver.step`. Two families:

- [`flowcorrect.AbstractInterleaved`][]: acts inside the Euler loop, one step at a time
  (`init`, `step`, `info`); [`flowcorrect.Plain`][], [`flowcorrect.Denoised`][],
  [`flowcorrect.Guided`][] and your own (momentum, inpainting, real-time chunking...).
- [`flowcorrect.AbstractPlacement`][] directly: produces whole samples from noise
  (`noise_shape`, `sample`); [`flowcorrect.PostHoc`][], [`flowcorrect.BestOfN`][] (which
  also ranks partially denoised candidates and finishes only the chosen one) and
  [`flowcorrect.Project`][], which wrap any other placement, and
  [`flowcorrect.RealTimeChunking`][].

Each placement carries what it needs (its corrector, schedule, weight), so one call
can mix them: `fc.PostHoc(corrector, inner=fc.BestOfN(8, fc.Guided(weight=2.0)))`.
"""

import abc
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, Int, PyTree

from .._custom_types import Scalar
from .._flow.flow import BatchChunks, BatchKeys, Flow
from .._flow.integrate import integrate


class AbstractPlacement(eqx.Module):
    """Base class of placements: how a batch of chunks is produced from noise.

    Subclass [`flowcorrect.AbstractInterleaved`][] for a placement that acts at each
    Euler step; subclass this class directly for one that produces whole samples
    (ranking candidates, correcting afterwards), implementing the two methods below.

    Every placement also declares `needs_energy`, a bool (a class attribute, a field or
    a property): whether it reads the energy given to [`flowcorrect.sample`][]. The
    sampler refuses a placement that needs one when none is given, and a server serves
    a placement that needs none without an energy, without asking which placement it
    is. A wrapper derives it from its parts (`fc.BestOfN(8, select=fc.Medoid())` needs
    none; `fc.BestOfN(8)` ranks by the energy).
    """

    needs_energy: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        """The shape of one sample's noise, given the policy's chunk shape (best-of-N
        draws `(n, horizon, action_dim)`).

        Also where a placement checks itself against the chunk shape: raise a
        `ValueError` here for chunks it cannot run on. [`flowcorrect.sample`][] calls it
        once before tracing, where the placement's arrays still hold their values (a
        check may read them, e.g. `inference_delay <= horizon - execution_horizon`), and
        again under the trace, where they may be tracers. A wrapper forwards the call
        to the placement it wraps."""

    @abc.abstractmethod
    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, Any]:
        """Produces one chunk per observation of the batch.

        **Arguments:**

        - `flow`: the policy at this batch of observations, with the energy; see
            [`flowcorrect.Flow`][].
        - `noise`: `(batch, *noise_shape(chunk_shape))`, already scaled by the
            sampler's `noise_scale`.
        - `keys`: one PRNG key per sample, shape `(batch,)`.

        **Returns:**

        `(actions, info)`: the chunks `(batch, horizon, action_dim)` and this
        placement's diagnostics (a Module whose arrays have a leading batch axis, or
        `None`). The sampler checks the chunks: a sample that is not finite is replaced
        by the plain sampler's chunk from the same noise. If the diagnostics have a
        `step_energy` attribute, `(batch, num_steps)` or `None` (see
        [`flowcorrect.integrate`][]), the sampler reports it as
        [`flowcorrect.SampleInfo`][]'s `step_energy`; a wrapper forwards its inner
        placement's (`step_energy_of`).
        """


class InterleavedInfo(eqx.Module):
    """Diagnostics of an interleaved placement.

    **Attributes:**

    - `step_energy`: `(batch, num_steps)`, the energy of the denoised estimate at each
        flow step before that step's correction; `None` unless `fc.sample` was called
        with `step_energies=True` and an energy.
    - `placement`: what the placement's `info` method returned (for
        [`flowcorrect.Denoised`][] and [`flowcorrect.Guided`][], a
        [`flowcorrect.StepCounts`][]).
    """

    step_energy: Float[Array, "batch num_steps"] | None
    placement: PyTree[Any]


class AbstractInterleaved(AbstractPlacement):
    """Base class of placements that act inside the Euler loop.

    Implement `init`, `step` and `info`; the Euler loop (one `lax.scan`) is run by
    [`flowcorrect.integrate`][], which calls only these methods. Everything is batched: `x` is
    `(batch, horizon, action_dim)` and `keys` holds one key per sample; use the
    [`flowcorrect.Flow`][] methods for per-sample energies, gradients and corrections.
    A step must return exactly the plain Euler step `x + dt * v` for samples it does
    not change.

    !!! example

        ```python
        class Momentum(fc.AbstractInterleaved):
            beta: float = 0.5
            needs_energy = False

            def init(self, flow, x):
                return jnp.zeros_like(x)

            def step(self, flow, x, t, dt, index, state, keys):
                v = flow.velocity(x, t)
                m = self.beta * state + (1 - self.beta) * v
                return x + dt * m, v, m

            def info(self, flow, state):
                return None
        ```
    """

    @abc.abstractmethod
    def init(self, flow: Flow, x: BatchChunks) -> Any:
        """The placement's state before the first step (`None` if stateless)."""

    @abc.abstractmethod
    def step(
        self,
        flow: Flow,
        x: BatchChunks,
        t: Scalar,
        dt: Scalar,
        index: Int[Array, ""],
        state: Any,
        keys: BatchKeys,
    ) -> tuple[BatchChunks, BatchChunks, Any]:
        """One flow step from time `t` to `t + dt`.

        **Arguments:**

        - `flow`: the policy at this batch, with the energy.
        - `x`: the samples at time `t`.
        - `t`, `dt`: the time and the step (`dt < 0` in openpi's convention); `t + dt`
            is the next time of the grid.
        - `index`: the step's number, `0 ... num_steps - 1` from noise to actions.
        - `state`: from `init` or the previous step.
        - `keys`: one key per sample for this step.

        **Returns:**

        `(x_next, v, state)`: the samples at `t + dt`, the policy's own velocity at
        `(x, t)` (for the step-energy diagnostics), and the new state.
        """

    @abc.abstractmethod
    def info(self, flow: Flow, state: Any) -> Any:
        """The placement's diagnostics from its final state (arrays with a leading
        batch axis, or `None`)."""

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return tuple(chunk_shape)

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, Any]:
        x, state, step_energy = integrate(flow, self, noise, keys)
        return x, InterleavedInfo(step_energy, self.info(flow, state))


def step_energy_of(info: Any) -> Float[Array, "batch num_steps"] | None:
    """The step energies a placement's diagnostics carry (their `step_energy`), or
    `None` where they carry none."""
    return getattr(info, "step_energy", None)


def check_placement(placement: Any, name: str = "placement") -> None:
    if not isinstance(placement, AbstractPlacement):
        raise TypeError(
            f"`{name}` must be a placement: fc.PostHoc(corrector), fc.Denoised(corrector, "
            "schedule, weight), fc.Guided(schedule, weight), fc.BestOfN(n, inner) (with "
            "rank_at=k to rank early), fc.RealTimeChunking(...), fc.Project(constraint) or "
            "your own fc.AbstractPlacement subclass; got "
            f"{type(placement).__name__}."
        )


__all__ = [
    "AbstractInterleaved",
    "AbstractPlacement",
    "InterleavedInfo",
    "check_placement",
    "step_energy_of",
]
