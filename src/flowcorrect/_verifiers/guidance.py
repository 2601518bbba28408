"""Will guidance by a verifier's gradient help? Offline checks on held-out rollouts.

Ranking uses a verifier's *values* at the policy's own candidates; guidance uses its
*gradient* in action space, inside the flow steps. A verifier can rank one state's
candidates almost at random (a tiny within-state spread) and still have a gradient that
points somewhere useful, or the reverse. The checks below look at the gradient:

- Self-graded: the verifier's own score drop under one normalised step down its
  gradient, and how that drop differs between failed and succeeded queries. A verifier
  always agrees with its own gradient; these say how steep it is, not whether it is right.
- Judged: a second verifier trained on disjoint episodes (the *judge*) scores the chunks
  that the first one's gradient produces. Two verifiers that learned the same thing from
  different episodes agree on which way is downhill; a verifier's private quirks (the
  directions an optimiser would exploit) are not shared by the judge.
- Ground truth, where it exists: at pairs of similar held-out states, one from a
  succeeded and one from a failed episode, does the gradient at the failed chunk point
  towards the succeeded one?
- The guided sampler itself, when the caller hands in its chunks: do the judge's scores
  of guided chunks beat those of plain chunks at the same states (and the same noise)?
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._energy import as_energy
from .metrics import auc
from .rollouts import Rollouts


@dataclasses.dataclass(frozen=True)
class GuidanceReport:
    """Offline checks of guidance by a verifier's gradient (energy low = success).

    A step below is one move of each candidate chunk down the verifier's gradient,
    normalised: `a - step_size * r * g / ||g||`, with `g = grad_a E(s, a)` and `r` the
    root-mean-square distance of the query's candidates to their mean (the policy's own
    spread at that state, so the step is as large as the variety the policy already
    shows, whatever the action units). Energies are in units of their within-state
    standard deviation (the mean over queries of the std across candidates).

    **Attributes:**

    - `step_size`: the `step_size` above.
    - `self_drop`: the verifier's own mean score drop under the step, in its within-state
        std. Always positive for a small enough step: how steep, not how right.
    - `drop_auc`: AUC of the executed chunk's own drop under the step for the episode's
        *failure*: 0.5 = the verifier's slope is the same at failed and succeeded queries;
        above 0.5 = its gradient finds more to gain where the outcome was failure.
    - `judge_success_auc`: the judge's success AUC on these rollouts (NaN without a judge).
    - `judge_agreement`: fraction of the candidates whose judge energy falls under the
        verifier's step; `judge_null_agreement`: the same for a step of the same length in
        a random direction (about 0.5 for any judge). NaN without a judge.
    - `judge_drop`: the judge's mean energy drop under the verifier's step, in the judge's
        within-state std.
    - `gradient_cosine`: mean cosine between the verifier's and the judge's gradients at
        the candidates (0 for unrelated directions).
    - `pair_cosine`: at pairs of similar states (a failed query, a succeeded one; see
        [`flowcorrect.verifiers.similar_state_pairs`][]), the mean cosine between the verifier's
        downhill direction at the failed chunk and the direction from it to the
        succeeded chunk; `pair_cosine_se`: its standard error; `num_pairs`. NaN and 0
        when the observation is not an array or no pair is close enough.
    - `guided_gain`: with `guided` chunks given, the mean over queries of the judge's mean
        energy of the plain chunks minus that of the guided chunks, in the judge's
        within-state std (positive: the judge prefers guided); `guided_win`: the fraction
        of queries where it does; `guided_shift`: the mean distance between a guided
        chunk and its plain twin, over `r`. NaN without `guided` (or, for the first two,
        without a judge).
    - `num_queries`.
    """

    step_size: float
    self_drop: float
    drop_auc: float
    judge_success_auc: float
    judge_agreement: float
    judge_null_agreement: float
    judge_drop: float
    gradient_cosine: float
    pair_cosine: float
    pair_cosine_se: float
    num_pairs: int
    guided_gain: float
    guided_win: float
    guided_shift: float
    num_queries: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@eqx.filter_jit
def _values_and_grads(energy: Any, obs: Any, chunks: jax.Array) -> tuple[jax.Array, jax.Array]:
    def per_query(o, cs):
        enc = energy.encode(o)
        return jax.vmap(jax.value_and_grad(lambda a: energy.score(enc, a)))(cs)

    e, g = jax.vmap(per_query)(obs, chunks)
    return e.astype(jnp.float32), g.astype(jnp.float32)


def values_and_grads(energy: Any, observation: Any, chunks: np.ndarray, block: int = 512
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`(Q, M)` energies and `(Q, M, H, D)` action gradients of `chunks` `(Q, M, H, D)`
    at each query's observation (an array or a pytree, query axis first)."""
    energy = as_energy(energy)
    es, gs = [], []
    for i in range(0, chunks.shape[0], block):
        rows = slice(i, i + block)
        e, g = _values_and_grads(energy, jax.tree.map(lambda x: jnp.asarray(x[rows]),
                                                      observation),
                                 jnp.asarray(chunks[rows], jnp.float32))
        es.append(np.asarray(e, np.float64))
        gs.append(np.asarray(g, np.float64))
    return np.concatenate(es), np.concatenate(gs)


def _energies(energy: Any, observation: Any, chunks: np.ndarray) -> np.ndarray:
    return values_and_grads(energy, observation, chunks)[0]


def _unit(g: np.ndarray) -> np.ndarray:
    """Each chunk's direction (zero where the norm is zero or not finite)."""
    n = np.sqrt((g ** 2).sum((-2, -1), keepdims=True))
    ok = np.isfinite(n) & (n > 0)
    return np.where(ok, g / np.where(ok, n, 1.0), 0.0)


def _within_std(e: np.ndarray) -> float:
    s = float(np.mean(e.std(1)))
    return s if s > 0 else float("nan")


def guidance_report(energy: Any, rollouts: Rollouts, *, judge: Any = None,
                    guided: Any = None, plain: Any = None, step_size: float = 0.5,
                    pair_distance: float = 1.0, seed: int = 0) -> GuidanceReport:
    """The `GuidanceReport` of `energy` on (held-out) `rollouts`.

    **Arguments:**

    - `energy`: the verifier that would guide (low = success).
    - `rollouts`: held-out [`flowcorrect.verifiers.Rollouts`][]; their candidates are the chunks
        stepped.
    - `judge`: a second verifier trained on episodes disjoint from `energy`'s and from
        `rollouts`; without it the judged fields are NaN.
    - `guided`: optional `(Q, M, H, D)`: chunks the guided sampler produced at each
        query's observation; `plain`: the plain sampler's chunks from the same noise
        (defaults to the rollouts' candidates).
    - `step_size`: the step's length in units of the candidates' spread `r`.
    - `pair_distance`: how close two states must be to form a pair (as in
        [`flowcorrect.verifiers.similar_state_pairs`][]).
    - `seed`: for the random directions and the pairs.
    """
    from .train import similar_state_pairs

    if not isinstance(rollouts, Rollouts):
        raise TypeError(f"`rollouts` must be fc.verifiers.Rollouts; got {type(rollouts).__name__}.")
    if rollouts.num_queries == 0:
        raise ValueError("guidance_report needs at least one query in `rollouts`.")
    if not step_size > 0:
        raise ValueError(f"`step_size` must be > 0; got {step_size}.")
    obs, cand = rollouts.observation, np.asarray(rollouts.candidates, np.float64)
    q = np.arange(rollouts.num_queries)
    failure = ~np.asarray(rollouts.success, bool)
    e, g = values_and_grads(energy, obs, cand)
    spread = np.sqrt(((cand - cand.mean(1, keepdims=True)) ** 2).sum((-2, -1)).mean(1))
    length = (step_size * spread)[:, None, None, None]
    down = -_unit(g)
    stepped = cand + length * down
    e_step = _energies(energy, obs, stepped)
    scale = _within_std(e)
    drop = (e - e_step) / scale

    nan = float("nan")
    judged = dict(judge_success_auc=nan, judge_agreement=nan, judge_null_agreement=nan,
                  judge_drop=nan, gradient_cosine=nan)
    guided_fields = dict(guided_gain=nan, guided_win=nan, guided_shift=nan)
    if judge is not None:
        ej, gj = values_and_grads(judge, obs, cand)
        ej_step = _energies(judge, obs, stepped)
        rng = np.random.default_rng(seed)
        rand = _unit(rng.standard_normal(cand.shape))
        ej_null = _energies(judge, obs, cand + length * rand)
        scale_j = _within_std(ej)
        judged = dict(
            judge_success_auc=auc(-ej[q, rollouts.executed], ~failure),
            judge_agreement=float(np.mean(ej_step < ej)),
            judge_null_agreement=float(np.mean(ej_null < ej)),
            judge_drop=float(np.mean(ej - ej_step) / scale_j),
            gradient_cosine=float(np.mean((_unit(g) * _unit(gj)).sum((-2, -1)))),
        )
    if guided is not None:
        guided = np.asarray(guided, np.float64)
        plain = cand if plain is None else np.asarray(plain, np.float64)
        if guided.shape[0] != rollouts.num_queries or guided.shape[2:] != cand.shape[2:] \
                or plain.shape != guided.shape:
            raise ValueError(
                f"`guided` (and `plain`) must be (queries, M, *chunk) with the rollouts' "
                f"{rollouts.num_queries} queries and chunk {cand.shape[2:]}, `plain` of the "
                f"same shape; got guided {guided.shape}, plain {plain.shape}."
            )
        shift = np.sqrt(((guided - plain) ** 2).sum((-2, -1))).mean(1)
        guided_fields["guided_shift"] = float(np.mean(shift / np.where(spread > 0, spread,
                                                                       np.nan)))
        if judge is not None:
            eg = _energies(judge, obs, guided).mean(1)
            ep = _energies(judge, obs, plain).mean(1)
            guided_fields["guided_gain"] = float(np.mean(ep - eg) / _within_std(ej))
            guided_fields["guided_win"] = float(np.mean(eg < ep))
    pair = dict(pair_cosine=nan, pair_cosine_se=nan, num_pairs=0)
    if isinstance(obs, np.ndarray) and failure.any() and (~failure).any():
        win, lose = similar_state_pairs(rollouts, max_distance=pair_distance, seed=seed)
        if len(win):
            a_win = rollouts.executed_actions[win].astype(np.float64)
            a_lose = rollouts.executed_actions[lose].astype(np.float64)
            g_lose = g[lose, rollouts.executed[lose]]
            cos = (-_unit(g_lose) * _unit(a_win - a_lose)).sum((-2, -1))
            pair = dict(pair_cosine=float(cos.mean()),
                        pair_cosine_se=float(cos.std() / np.sqrt(len(cos))),
                        num_pairs=int(len(cos)))
    return GuidanceReport(
        step_size=float(step_size), self_drop=float(np.mean(drop)),
        drop_auc=auc(drop[q, rollouts.executed], failure), **judged, **pair,
        **guided_fields, num_queries=rollouts.num_queries,
    )
