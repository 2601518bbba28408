"""Ranking candidates: best-of-N, of finished chunks or of partially denoised ones."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._flow.flow import BatchChunks, BatchKeys, Flow, all_finite
from .._flow.integrate import integrate
from .._flow.selection import AbstractSelection, ByEnergy, Selected, check_selection
from .._misc import count
from .base import AbstractPlacement, check_placement
from .plain import Plain


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

    @property
    def needs_energy(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.select.needs_energy or self.inner.needs_energy

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

    @property
    def needs_energy(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.select.needs_energy

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
        x, _, early_energy = integrate(
            candidates_flow, Plain(), _flat_noise(noise, batch, n), _candidate_keys(keys, n),
            stop=k,
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
            out, _, late_energy = integrate(flow, Plain(), choose(x), keys, start=k)
            if step_energy is not None and late_energy is not None:
                step_energy = jnp.concatenate([step_energy, late_energy], axis=1)
        info = EarlyBestOfNInfo(
            energy, chosen.score, selected, jnp.sum(ok, axis=1, dtype=jnp.int32),
            jnp.broadcast_to(t, (batch,)), step_energy,
        )
        return out, info


__all__ = ["BestOfN", "BestOfNInfo", "EarlyBestOfN", "EarlyBestOfNInfo"]
