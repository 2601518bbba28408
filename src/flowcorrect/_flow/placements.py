"""Where the correction goes relative to the flow ODE: placements.

A placement owns its behaviour. [`flowcorrect.sample`][] calls
`placement.sample(flow, noise, keys)` and never asks which placement it has, the way
diffrax's `diffeqsolve` calls `solver.step`. Two families:

- [`flowcorrect.AbstractInterleaved`][]: acts inside the Euler loop, one step at a time
  (`init`, `step`, `info`); [`flowcorrect.Plain`][], [`flowcorrect.Denoised`][],
  [`flowcorrect.Guided`][] and your own (momentum, inpainting, real-time chunking...).
- [`flowcorrect.AbstractPlacement`][] directly: produces whole samples from noise
  (`noise_shape`, `sample`); [`flowcorrect.PostHoc`][] and [`flowcorrect.BestOfN`][],
  which wrap any other placement, and [`flowcorrect.EarlyBestOfN`][], which ranks
  partially denoised candidates and finishes only the chosen one.

Each placement carries what it needs (its corrector, schedule, weight), so one call
can mix them: `fc.PostHoc(corrector, after=fc.BestOfN(8, fc.Guided(weight=2.0)))`.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._correct import CorrectionInfo, check_corrector
from .._correctors.base import AbstractCorrector
from .._correctors.recipes import reference_recipe
from .._custom_types import Scalar
from .._misc import concrete, count, float_array, shape_str
from .flow import BatchChunks, BatchKeys, Flow, all_finite, per_sample, sample_norms, split_keys
from .schedules import AbstractSchedule, AbstractWeight, EveryStep, as_weight
from .selection import AbstractSelection, ByEnergy, Selected, check_selection


class AbstractPlacement(eqx.Module):
    """Base class of placements: how a batch of chunks is produced from noise.

    Subclass [`flowcorrect.AbstractInterleaved`][] for a placement that acts at each
    Euler step; subclass this class directly for one that produces whole samples
    (ranking candidates, correcting afterwards), implementing the two methods below.
    """

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
        by the plain sampler's chunk from the same noise.
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
    placement: Any


class AbstractInterleaved(AbstractPlacement):
    """Base class of placements that act inside the Euler loop.

    Implement `init`, `step` and `info`; the Euler loop (one `lax.scan`) is run by
    [`flowcorrect.Flow.integrate`][]. Everything is batched: `x` is
    `(batch, horizon, action_dim)` and `keys` holds one key per sample; use the
    [`flowcorrect.Flow`][] methods for per-sample energies, gradients and corrections.
    A step must return exactly the plain Euler step `x + dt * v` for samples it does
    not change.

    !!! example

        ```python
        class Momentum(fc.AbstractInterleaved):
            beta: float = 0.5

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
        x, state, step_energy = flow.integrate(self, noise, keys)
        return x, InterleavedInfo(step_energy, self.info(flow, state))


class Plain(AbstractInterleaved):
    """The plain Euler step, no correction: what the policy does on its own.

    The default inner placement of [`flowcorrect.BestOfN`][] and
    [`flowcorrect.PostHoc`][]; in [`flowcorrect.sample`][] it is what no placement
    means. With an energy and `step_energies=True` it records the energy along the
    uncorrected flow.
    """

    def init(self, flow: Flow, x: BatchChunks) -> None:
        return None

    def step(self, flow, x, t, dt, index, state, keys):
        v = flow.velocity(x, t)
        return x + dt * v, v, None

    def info(self, flow: Flow, state: None) -> None:
        return None


class StepCounts(eqx.Module):
    """How often an interleaved correction acted, per sample.

    **Attributes:**

    - `num_applied`: flow steps at which the correction was applied.
    - `num_skipped`: scheduled steps of nonzero weight whose correction was not finite,
        so the plain Euler step was taken instead.
    """

    num_applied: Int[Array, " batch"]
    num_skipped: Int[Array, " batch"]


def _counts_init(flow: Flow) -> StepCounts:
    zero = jnp.zeros(flow.batch_size, jnp.int32)
    return StepCounts(zero, zero)


def _counts_add(counts: StepCounts, on: Bool[Array, ""], applied: Bool[Array, " batch"]):
    skipped = on & jnp.logical_not(applied)
    return StepCounts(
        counts.num_applied + applied.astype(jnp.int32),
        counts.num_skipped + skipped.astype(jnp.int32),
    )


def _check_schedule(schedule: Any) -> None:
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            "`schedule` must be a schedule such as fc.EveryStep(), fc.LastSteps(3) or "
            f"fc.EveryNth(2); got {type(schedule).__name__}."
        )


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

    def __init__(
        self,
        corrector: Any = reference_recipe(),
        schedule: Any = EveryStep(),
        weight: Any = 1.0,
    ):
        self.corrector = corrector
        self.schedule = schedule
        self.weight = as_weight(weight)

    def __check_init__(self):
        check_corrector(self.corrector, "Denoised corrector")
        _check_schedule(self.schedule)

    def init(self, flow: Flow, x: BatchChunks) -> StepCounts:
        return _counts_init(flow)

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
        return x_next, v, _counts_add(state, on, applied)

    def info(self, flow: Flow, state: StepCounts) -> StepCounts:
        return state


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

    def __init__(self, schedule: Any = EveryStep(), weight: Any = 1.0, cap: Any = 1.0):
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

    def init(self, flow: Flow, x: BatchChunks) -> StepCounts:
        flow.require_energy("Guided")
        return _counts_init(flow)

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
        return x + dt * v_used, v, _counts_add(state, on, applied)

    def info(self, flow: Flow, state: StepCounts) -> StepCounts:
        return state


class PostHocInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.PostHoc`][].

    **Attributes:**

    - `correction`: the [`flowcorrect.CorrectionInfo`][] of the correction.
    - `after`: the diagnostics of the placement that produced the chunk.
    """

    correction: CorrectionInfo
    after: Any


class PostHoc(AbstractPlacement):
    """Runs a corrector on the finished chunk: the reference method.

    [`flowcorrect.correct`][] applied to the sample, after the flow ODE (or after any
    other placement: `PostHoc(corrector, after=fc.BestOfN(8))`).

    !!! warning

        In every closed-loop evaluation here, post-hoc gradient steps on an energy
        trained on the policy's own demonstrations lowered task success (78 to 54 and
        70 to 21 of 100 on two Meta-World tasks). Measure before deploying it.

    **Arguments:**

    - `corrector`: defaults to [`flowcorrect.reference_recipe`][].
    - `after`: the placement producing the chunk; defaults to [`flowcorrect.Plain`][].
    """

    corrector: AbstractCorrector
    after: AbstractPlacement

    # Arguments typed loosely so that a wrong one gets the message of `__check_init__`.
    def __init__(self, corrector: Any = reference_recipe(), after: Any = Plain()):
        # Checked before the fields are set too, for openpi's older jaxtyping (see BestOfN).
        check_corrector(corrector, "PostHoc corrector")
        check_placement(after, "PostHoc `after`")
        self.corrector = corrector
        self.after = after

    def __check_init__(self):
        check_corrector(self.corrector, "PostHoc corrector")
        check_placement(self.after, "PostHoc `after`")

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return self.after.noise_shape(chunk_shape)

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, PostHocInfo]:
        flow.require_energy("PostHoc")
        after_keys, correct_keys = split_keys(keys, 2)
        x, after_info = self.after.sample(flow, noise, after_keys)
        out, info = flow.correct(x, self.corrector, correct_keys, "PostHoc")
        return out, PostHocInfo(info, after_info)


class BestOfNInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.BestOfN`][].

    **Attributes:**

    - `candidate_energy`: `(batch, n)`, each candidate's energy; `inf` where the
        candidate or its energy was not finite (never chosen). `None` when the
        selection rule needs no energy (it is then not computed).
    - `candidate_score`: `(batch, n)`, the selection rule's score of each candidate,
        lower preferred (the energy for [`flowcorrect.ByEnergy`][], the mean distance
        to the others for [`flowcorrect.Medoid`][]); `inf` where not choosable.
    - `selected`: `(batch,)`, the index of the chosen candidate (for a rule that
        synthesises a chunk, such as [`flowcorrect.ClusterMean`][], the candidate
        nearest to it).
    - `num_ok`: `(batch,)`, how many candidates were finite.
    - `inner`: the inner placement's diagnostics for the chosen candidate.
    """

    candidate_energy: Float[Array, "batch n"] | None
    candidate_score: Float[Array, "batch n"]
    selected: Int[Array, " batch"]
    num_ok: Int[Array, " batch"]
    inner: Any


class BestOfN(AbstractPlacement):
    """Samples `n` candidates per observation and keeps one, chosen by a rule.

    The candidates share the policy's once-per-observation pass and the energy's
    encoding, and run as one batch of `batch * n` through the velocity. A candidate
    with any non-finite action, or a non-finite energy, is never chosen (an energy
    that ignores some action dimensions can be finite on a chunk holding NaN).

    By default the rule is [`flowcorrect.ByEnergy`][]: the lowest energy. Consensus
    rules need no energy at all: `fc.BestOfN(8, select=fc.Medoid())`; a guard keeps a
    learned verifier on the policy's mode: `fc.BestOfN(8, select=fc.NearMean(4))`.

    **Arguments:**

    - `n`: how many candidates, an int `>= 1`. Static: a new `n` compiles anew.
    - `inner`: how each candidate is produced: any placement; defaults to
        [`flowcorrect.Plain`][].
    - `select`: the selection rule, a [`flowcorrect.AbstractSelection`][]; defaults
        to [`flowcorrect.ByEnergy`][].
    """

    n: int = eqx.field(static=True)
    inner: AbstractPlacement
    select: AbstractSelection

    def __init__(self, n: Any, inner: Any = Plain(), select: Any = ByEnergy()):
        # Also checked before the fields are set: older jaxtyping (openpi's 0.2.36)
        # type-checks the fields before __check_init__ runs, with a vaguer message.
        check_selection(select, "BestOfN `select`")
        self.n = _check_n(n, "BestOfN")
        self.inner = inner
        self.select = select

    def __check_init__(self):
        _check_n(self.n, "BestOfN")
        check_placement(self.inner, "BestOfN `inner`")
        check_selection(self.select, "BestOfN `select`")

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return (self.n, *self.inner.noise_shape(chunk_shape))

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, BestOfNInfo]:
        if self.select.needs_energy:
            flow.require_energy("BestOfN")
        batch, n = flow.batch_size, self.n
        candidates_flow = flow.repeat(n)
        candidates, inner = self.inner.sample(
            candidates_flow, _flat_noise(noise, batch, n), _candidate_keys(keys, n)
        )
        chosen, energy, ok = _rank(
            self.select, candidates_flow, candidates, all_finite(candidates), keys, n, "BestOfN"
        )
        rows = jnp.arange(batch)
        selected = chosen.index.astype(jnp.int32)

        def choose(a: Array) -> Array:
            return a.reshape(batch, n, *a.shape[1:])[rows, selected]

        info = BestOfNInfo(
            energy, chosen.score, selected, jnp.sum(ok, axis=1, dtype=jnp.int32),
            jax.tree.map(choose, inner),
        )
        return chosen.actions.astype(candidates.dtype), info


def _check_n(n: Any, owner: str) -> int:
    return count(owner, "n", n, 1, "8", "8 is a good start")


def _check_rank_at(r: Any) -> int:
    return count(
        "EarlyBestOfN", "rank_at", r, 0, "3", "and at most fc.sample's num_steps: the number "
        "of Euler steps before ranking; 0 ranks at pure noise",
    )


def _flat_noise(noise: Array, batch: int, n: int) -> Array:
    """`(batch, n, ...)` noise as one batch of `batch * n` candidates, observation-major."""
    return noise.reshape(batch * n, *noise.shape[2:])


def _candidate_keys(keys: BatchKeys, n: int) -> BatchKeys:
    """One key per candidate, `(batch * n,)`, observation-major."""
    return jax.vmap(lambda k: jax.random.split(k, n))(keys).reshape(keys.shape[0] * n)


def _rank(
    select: AbstractSelection,
    candidates_flow: Flow,
    candidates: Float[Array, "candidates horizon action_dim"],
    ok: Bool[Array, " candidates"],
    keys: BatchKeys,
    n: int,
    who: str,
) -> tuple[Selected, Float[Array, "batch n"] | None, Bool[Array, "batch n"]]:
    """Ranks each observation's `n` candidates (the rows of `candidates`, observation-
    major, at `candidates_flow`) with `select`: `(chosen, energy, ok)`, with the
    energies computed only when the rule reads them, and `inf` where not `ok`."""
    batch = candidates_flow.batch_size // n
    energy = None
    if select.needs_energy:
        energy = candidates_flow.energies(candidates, who)
        ok = ok & jnp.isfinite(energy)
        energy = jnp.where(ok, energy, jnp.inf).reshape(batch, n)
    ok = ok.reshape(batch, n)
    # Folded, not split, so that the candidates' keys (and samples) stay what they
    # were before selection rules existed.
    select_keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)
    per_obs = candidates.reshape(batch, n, *candidates.shape[1:])
    chosen = jax.vmap(select.select)(per_obs, energy, ok, select_keys)
    return chosen, energy, ok


class EarlyBestOfNInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.EarlyBestOfN`][].

    **Attributes:**

    - `candidate_energy`: `(batch, n)`, the energy of each candidate's denoised
        estimate at the ranking time; `inf` where the candidate, its estimate or the
        energy was not finite (never chosen). `None` when the selection rule needs no
        energy (it is then not computed).
    - `candidate_score`: `(batch, n)`, the selection rule's score of each candidate's
        denoised estimate, lower preferred; `inf` where not choosable.
    - `selected`: `(batch,)`, the index of the candidate that was continued (for a rule
        that synthesises a chunk, such as [`flowcorrect.ClusterMean`][], the candidate
        nearest to it).
    - `num_ok`: `(batch,)`, how many candidates were finite at the ranking time.
    - `t`: `(batch,)`, the flow time at which the candidates were ranked (`t_rank_at`
        of the Euler grid: 1 in openpi's convention for `rank_at = 0`).
    - `step_energy`: `(batch, num_steps)`, the energy of the denoised estimate at every
        flow step along the returned chunk's path (the chosen candidate's first
        `rank_at` steps, then the continuation's); `None` unless `fc.sample` was called
        with `step_energies=True` and an energy.
    """

    candidate_energy: Float[Array, "batch n"] | None
    candidate_score: Float[Array, "batch n"]
    selected: Int[Array, " batch"]
    num_ok: Int[Array, " batch"]
    t: Float[Array, " batch"]
    step_energy: Float[Array, "batch num_steps"] | None


class EarlyBestOfN(AbstractPlacement):
    """Ranks `n` partially denoised candidates early and finishes only the chosen one.

    As FM-Steer does to save compute: the `n` candidates per observation run the plain
    Euler step for the first `rank_at` flow steps, as one batch of `batch * n` sharing
    the policy's once-per-observation pass and the energy's encoding (like
    [`flowcorrect.BestOfN`][]). At the grid time `t = t_rank_at`, one more velocity
    pass gives each candidate's denoised estimate
    `a_hat = flow.denoised(x_t, v_t, t)` (`x_t - t * v_t` in openpi's convention, see
    [`flowcorrect.AbstractConvention.denoised`][]); the selection rule ranks these
    estimates, and only the chosen candidate's `x_t` is integrated, with the plain
    Euler step, for the remaining `num_steps - rank_at` steps, on a batch of `batch`.

    Per observation this costs `n * rank_at` velocity evaluations for the early steps,
    `n` for the ranking pass (and `n` energy evaluations if the rule reads energies),
    and `num_steps - rank_at` for the chosen candidate, against
    [`flowcorrect.BestOfN`][]'s `n * num_steps`: with `n = 8`, 10 steps and
    `rank_at = 3`, 24 + 8 + 7 = 39 instead of 80. The denoised estimate is coarser the
    earlier it is read, so an early ranking is a cheaper, noisier one.

    - `rank_at = num_steps`: the candidates are finished and the rule ranks them as
        they are (no ranking pass: the denoised estimate of a finished sample is the
        sample): exactly `fc.BestOfN(n, select=select)`, the rule's chunk included.
    - `rank_at = 0`: the denoised estimates at pure noise are ranked (one velocity pass
        on all `n`), and one chain runs all the steps.

    A candidate whose `x_t`, denoised estimate or energy is not finite is never
    chosen. A rule that synthesises a chunk, such as [`flowcorrect.ClusterMean`][],
    synthesises a denoised estimate, which has no `x_t` to continue: the candidate
    it reports, `chosen.index` (for `ClusterMean`, the candidate nearest the
    candidates' mean), is the one continued.

    **Arguments:**

    - `n`: how many candidates, an int `>= 1`. Static: a new `n` compiles anew.
    - `rank_at`: after how many of the flow's `num_steps` Euler steps the candidates are
        ranked, an int with `0 <= rank_at <= num_steps` (`num_steps` is
        [`flowcorrect.sample`][]'s, so the upper bound is checked there). Static.
    - `select`: the selection rule, a [`flowcorrect.AbstractSelection`][]; defaults to
        [`flowcorrect.ByEnergy`][] (the lowest energy of the denoised estimate).
        Consensus rules such as [`flowcorrect.Medoid`][] need no energy.

    !!! example

        ```python
        # 8 candidates, ranked by their medoid after 3 of 10 steps; 7 steps for one.
        actions, info = fc.sample(policy, observation, key, num_steps=10,
                                  placement=fc.EarlyBestOfN(8, 3, select=fc.Medoid()))
        print(info.placement.selected, info.placement.t)
        ```
    """

    n: int = eqx.field(static=True)
    rank_at: int = eqx.field(static=True)
    select: AbstractSelection

    def __init__(self, n: Any, rank_at: Any, select: Any = ByEnergy()):
        # Also checked before the fields are set: older jaxtyping (openpi's 0.2.36)
        # type-checks the fields before __check_init__ runs, with a vaguer message.
        check_selection(select, "EarlyBestOfN `select`")
        self.n = _check_n(n, "EarlyBestOfN")
        self.rank_at = _check_rank_at(rank_at)
        self.select = select

    def __check_init__(self):
        _check_n(self.n, "EarlyBestOfN")
        _check_rank_at(self.rank_at)
        check_selection(self.select, "EarlyBestOfN `select`")

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return (self.n, *chunk_shape)

    def sample(
        self, flow: Flow, noise: Array, keys: BatchKeys
    ) -> tuple[BatchChunks, EarlyBestOfNInfo]:
        num_steps, k, n = flow.num_steps, self.rank_at, self.n
        if k > num_steps:
            raise ValueError(
                f"EarlyBestOfN `rank_at` must be at most the flow's num_steps: got "
                f"rank_at={k} with num_steps={num_steps}. Use rank_at <= {num_steps} "
                f"(rank_at={num_steps} is fc.BestOfN), or sample with num_steps >= {k}."
            )
        if self.select.needs_energy:
            flow.require_energy("EarlyBestOfN")
        batch = flow.batch_size
        candidates_flow = flow.repeat(n)
        x, _, early_energy = candidates_flow.integrate(
            Plain(), _flat_noise(noise, batch, n), _candidate_keys(keys, n), stop=k
        )
        t = flow.convention.times(num_steps, x.dtype)[k]
        if k == num_steps:
            estimate = x
        else:
            estimate = candidates_flow.denoised(x, candidates_flow.velocity(x, t), t)
        ok = all_finite(x) & all_finite(estimate)
        chosen, energy, ok = _rank(self.select, candidates_flow, estimate, ok, keys, n,
                                   "EarlyBestOfN")
        rows = jnp.arange(batch)
        selected = chosen.index.astype(jnp.int32)

        def choose(a: Array) -> Array:
            return a.reshape(batch, n, *a.shape[1:])[rows, selected]

        step_energy = None if early_energy is None else choose(early_energy)
        if k == num_steps:
            out = chosen.actions.astype(x.dtype)
        else:
            # The chosen candidate's own x_t, whatever chunk the rule synthesised: only
            # a sample of the flow can be continued by the flow.
            out, _, late_energy = flow.integrate(Plain(), choose(x), keys, start=k)
            if step_energy is not None and late_energy is not None:
                step_energy = jnp.concatenate([step_energy, late_energy], axis=1)
        info = EarlyBestOfNInfo(
            energy, chosen.score, selected, jnp.sum(ok, axis=1, dtype=jnp.int32),
            jnp.broadcast_to(t, (batch,)), step_energy,
        )
        return out, info


def check_placement(placement: Any, name: str = "placement") -> None:
    if not isinstance(placement, AbstractPlacement):
        raise TypeError(
            f"`{name}` must be a placement: fc.PostHoc(corrector), fc.Denoised(corrector, "
            "schedule, weight), fc.Guided(schedule, weight), fc.BestOfN(n, inner), "
            "fc.EarlyBestOfN(n, rank_at) or your own fc.AbstractPlacement subclass; got "
            f"{type(placement).__name__}."
        )


__all__ = [
    "AbstractInterleaved",
    "AbstractPlacement",
    "BestOfN",
    "BestOfNInfo",
    "Denoised",
    "EarlyBestOfN",
    "EarlyBestOfNInfo",
    "Guided",
    "InterleavedInfo",
    "Plain",
    "PostHoc",
    "PostHocInfo",
    "StepCounts",
]
