"""Ranking candidates: best-of-N, of finished chunks or of partially denoised ones."""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._flow.flow import BatchChunks, BatchKeys, Flow, all_finite
from .._flow.integrate import integrate
from .._flow.selection import AbstractSelection, ByEnergy, Selected, check_selection
from .._misc import count
from .base import (
    AbstractInterleaved,
    AbstractPlacement,
    InterleavedInfo,
    check_placement,
    step_energy_of,
)
from .plain import Plain


class BestOfNInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.BestOfN`][].

    **Attributes:**

    - `candidate_energy`: `(batch, n)`, each candidate's energy (with `rank_at`, the
        energy of its denoised estimate at the ranking time); `inf` where the candidate
        (or its estimate) or its energy was not finite (never chosen). `None` when the
        selection rule needs no energy (it is then not computed).
    - `candidate_score`: `(batch, n)`, the selection rule's score of each candidate,
        lower preferred (the energy for [`flowcorrect.ByEnergy`][], the mean distance
        to the others for [`flowcorrect.Medoid`][]); `inf` where not choosable.
    - `selected`: `(batch,)`, the index of the chosen candidate (for a rule that
        synthesises a chunk, such as [`flowcorrect.ClusterMean`][], the candidate
        nearest to it); with `rank_at`, the candidate that was continued.
    - `num_ok`: `(batch,)`, how many candidates were finite (at the ranking time).
    - `inner`: the inner placement's diagnostics for the chosen candidate (with
        `rank_at`, an [`flowcorrect.InterleavedInfo`][] whose `placement` is the inner's
        `info` of the continuation, or of the chosen candidate for
        `rank_at = num_steps`).
    - `t`: `(batch,)`, with `rank_at`, the flow time at which the candidates were
        ranked (`t_rank_at` of the Euler grid: 1 in openpi's convention for
        `rank_at = 0`); `None` without `rank_at`.
    - `step_energy`: `(batch, num_steps)`, the energy of the denoised estimate at every
        flow step along the returned chunk's path (the chosen candidate's; with
        `rank_at`, its first `rank_at` steps, then the continuation's); `None` unless
        `fc.sample` was called with `step_energies=True` and an energy (and the inner
        placement records them).
    """

    candidate_energy: Float[Array, "batch n"] | None
    candidate_score: Float[Array, "batch n"]
    selected: Int[Array, " batch"]
    num_ok: Int[Array, " batch"]
    inner: PyTree[Any]
    t: Float[Array, " batch"] | None = None
    step_energy: Float[Array, "batch num_steps"] | None = None


class BestOfN(AbstractPlacement):
    """Samples `n` candidates per observation and keeps one, chosen by a rule.

    The candidates share the policy's once-per-observation pass and the energy's
    encoding, and run as one batch of `batch * n` through the velocity. A candidate
    with any non-finite action, or a non-finite energy, is never chosen (an energy
    that ignores some action dimensions can be finite on a chunk holding NaN).

    By default the rule is [`flowcorrect.ByEnergy`][]: the lowest energy. Consensus
    rules need no energy at all: `fc.BestOfN(8, select=fc.Medoid())`; a guard keeps a
    learned verifier on the policy's mode: `fc.BestOfN(8, select=fc.NearMean(4))`.

    **Early ranking.** With `rank_at = k`, as FM-Steer does to save compute, the
    candidates run the inner placement's Euler steps for the first `k` flow steps only.
    At the grid time `t = t_k`, one more velocity pass gives each candidate's denoised
    estimate `a_hat = flow.denoised(x_t, v_t, t)` (`x_t - t * v_t` in openpi's
    convention, see [`flowcorrect.AbstractConvention.denoised`][]); the rule ranks these
    estimates, and only the chosen candidate's `x_t` is integrated for the remaining
    `num_steps - k` steps, on a batch of `batch` (the inner placement's state starts
    afresh there). Per observation this costs `n * k` velocity evaluations for the early
    steps, `n` for the ranking pass and `num_steps - k` for the chosen candidate,
    against `n * num_steps`: with `n = 8`, 10 steps and `k = 3`, 24 + 8 + 7 = 39
    instead of 80. The denoised estimate is coarser the earlier it is read, so an early
    ranking is a cheaper, noisier one. `rank_at = num_steps` ranks the finished
    candidates as they are (no ranking pass): exactly `rank_at = None`, the rule's chunk
    included. A rule that synthesises a chunk, such as [`flowcorrect.ClusterMean`][],
    synthesises a denoised estimate, which has no `x_t` to continue: the candidate it
    reports, `chosen.index`, is the one continued.

    **Arguments:**

    - `n`: how many candidates, an int `>= 1`. Static: a new `n` compiles anew.
    - `inner`: how each candidate is produced: any placement; defaults to
        [`flowcorrect.Plain`][]. With `rank_at`, an
        [`flowcorrect.AbstractInterleaved`][] one (its steps are split at the ranking).
    - `select`: the selection rule, a [`flowcorrect.AbstractSelection`][]; defaults
        to [`flowcorrect.ByEnergy`][].
    - `rank_at`: `None` (default) ranks the finished candidates; an int `k` with
        `0 <= k <= num_steps` ranks their denoised estimates after `k` of the flow's
        Euler steps (`num_steps` is [`flowcorrect.sample`][]'s, so the upper bound is
        checked there); `0` ranks at pure noise. Static.

    !!! example

        ```python
        # 8 candidates, ranked by their medoid after 3 of 10 steps; 7 steps for one.
        actions, info = fc.sample(policy, observation, key, num_steps=10,
                                  placement=fc.BestOfN(8, select=fc.Medoid(), rank_at=3))
        print(info.placement.selected, info.placement.t)
        ```
    """

    n: int = eqx.field(static=True)
    inner: AbstractPlacement
    select: AbstractSelection
    rank_at: int | None = eqx.field(static=True)

    def __init__(
        self,
        n: int,
        inner: AbstractPlacement = Plain(),
        select: AbstractSelection = ByEnergy(),
        *,
        rank_at: int | None = None,
    ):
        # Also checked before the fields are set: older jaxtyping (openpi's 0.2.36)
        # type-checks the fields before __check_init__ runs, with a vaguer message.
        check_selection(select, "BestOfN `select`")
        self.n = _check_n(n, "BestOfN")
        self.inner = inner
        self.select = select
        self.rank_at = None if rank_at is None else _check_rank_at(rank_at)

    def __check_init__(self):
        _check_n(self.n, "BestOfN")
        check_placement(self.inner, "BestOfN `inner`")
        check_selection(self.select, "BestOfN `select`")
        if self.rank_at is not None:
            _check_rank_at(self.rank_at)
            if not isinstance(self.inner, AbstractInterleaved):
                raise ValueError(
                    "BestOfN with `rank_at` splits the inner placement's Euler steps at the "
                    "ranking, so `inner` must be an fc.AbstractInterleaved placement "
                    f"(fc.Plain(), fc.Guided(...), fc.Denoised(...)); got "
                    f"{type(self.inner).__name__}. Use rank_at=None to rank finished chunks."
                )

    @property
    def needs_energy(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.select.needs_energy or self.inner.needs_energy

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return (self.n, *self.inner.noise_shape(chunk_shape))

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, BestOfNInfo]:
        num_steps, k, n = flow.num_steps, self.rank_at, self.n
        if k is not None and k > num_steps:
            raise ValueError(
                f"BestOfN `rank_at` must be at most the flow's num_steps: got "
                f"rank_at={k} with num_steps={num_steps}. Use rank_at <= {num_steps} "
                f"(rank_at=None ranks finished chunks), or sample with num_steps >= {k}."
            )
        if self.select.needs_energy:
            flow.require_energy("BestOfN")
        batch = flow.batch_size
        candidates_flow = flow.repeat(n)
        flat_noise, candidate_keys = _flat_noise(noise, batch, n), _candidate_keys(keys, n)
        t = early_energy = None
        if k is None:
            x, inner = self.inner.sample(candidates_flow, flat_noise, candidate_keys)
            estimate = x
            ok = all_finite(x)
        else:
            stepper: Any = self.inner
            x, state, early_energy = integrate(
                candidates_flow, stepper, flat_noise, candidate_keys, stop=k
            )
            t = flow.convention.times(num_steps, x.dtype)[k]
            if k == num_steps:
                estimate = x
            else:
                estimate = candidates_flow.denoised(x, candidates_flow.velocity(x, t), t)
            ok = all_finite(x) & all_finite(estimate)
        chosen, energy, ok = _rank(self.select, candidates_flow, estimate, ok, keys, n)
        rows = jnp.arange(batch)
        selected = chosen.index.astype(jnp.int32)

        def choose(a: Array) -> Array:
            return a.reshape(batch, n, *a.shape[1:])[rows, selected]

        step_energy = None if early_energy is None else choose(early_energy)
        if k is None or k == num_steps:
            out = chosen.actions.astype(x.dtype)
            if k is not None:
                inner = jax.tree.map(choose, stepper.info(candidates_flow, state))
        else:
            # The chosen candidate's own x_t, whatever chunk the rule synthesised: only
            # a sample of the flow can be continued by the flow.
            out, state, late_energy = integrate(flow, stepper, choose(x), keys, start=k)
            inner = stepper.info(flow, state)
            if step_energy is not None and late_energy is not None:
                step_energy = jnp.concatenate([step_energy, late_energy], axis=1)
        if k is None:
            inner = jax.tree.map(choose, inner)
            step_energy = step_energy_of(inner)
        else:
            # What the inner placement's own `sample` would report, along this path.
            inner = InterleavedInfo(step_energy, inner)
        info = BestOfNInfo(
            energy, chosen.score, selected, jnp.sum(ok, axis=1, dtype=jnp.int32), inner,
            None if t is None else jnp.broadcast_to(t, (batch,)), step_energy,
        )
        return out, info


def _check_n(n: Any, owner: str) -> int:
    return count(owner, "n", n, 1, "8", "8 is a good start")


def _check_rank_at(r: Any) -> int:
    return count(
        "BestOfN", "rank_at", r, 0, "3", "and at most fc.sample's num_steps: the number "
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
) -> tuple[Selected, Float[Array, "batch n"] | None, Bool[Array, "batch n"]]:
    """Ranks each observation's `n` candidates (the rows of `candidates`, observation-
    major, at `candidates_flow`) with `select`: `(chosen, energy, ok)`, with the
    energies computed only when the rule reads them, and `inf` where not `ok`."""
    batch = candidates_flow.batch_size // n
    energy = None
    if select.needs_energy:
        energy = candidates_flow.energies(candidates, "BestOfN")
        ok = ok & jnp.isfinite(energy)
        energy = jnp.where(ok, energy, jnp.inf).reshape(batch, n)
    ok = ok.reshape(batch, n)
    # Folded, not split, so that the candidates' keys (and samples) stay what they
    # were before selection rules existed.
    select_keys = jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)
    per_obs = candidates.reshape(batch, n, *candidates.shape[1:])
    chosen = jax.vmap(select.select)(per_obs, energy, ok, select_keys)
    return chosen, energy, ok


def EarlyBestOfN(n: int, rank_at: int, select: AbstractSelection = ByEnergy()) -> BestOfN:
    """Deprecated: `fc.BestOfN(n, select=select, rank_at=rank_at)`, which it returns.

    Ranks `n` partially denoised candidates after `rank_at` Euler steps and finishes only
    the chosen one; see [`flowcorrect.BestOfN`][]'s `rank_at`. Emits a
    `DeprecationWarning`; removed in the next release.
    """
    warnings.warn(
        "fc.EarlyBestOfN(n, rank_at, select) is deprecated and will be removed in the next "
        "release; use fc.BestOfN(n, select=select, rank_at=rank_at), the same placement.",
        DeprecationWarning,
        stacklevel=2,
    )
    return BestOfN(n, select=select, rank_at=_check_rank_at(rank_at))


#: Deprecated: the diagnostics of early ranking are a [`flowcorrect.BestOfNInfo`][].
EarlyBestOfNInfo = BestOfNInfo

__all__ = ["BestOfN", "BestOfNInfo", "EarlyBestOfN", "EarlyBestOfNInfo"]
