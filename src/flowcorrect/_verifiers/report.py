"""Does a verifier know which action is better, or only which state is good?

A verifier trained on outcomes can predict success well (high AUC) from the state
alone and still rank one state's candidates at random: on Meta-World such a verifier
had held-out AUC 0.92-0.96 and scores that barely varied between candidates. The
report below separates the two before any closed-loop run.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import RealLike
from .._energy import EnergyFn, as_energy
from .._flow.selection import Medoid
from .guidance import GuidanceReport, guidance_report
from .metrics import auc as auc
from .rollouts import Rollouts


@eqx.filter_jit
def _score_block(energy: Any, obs: Any, candidates: jax.Array) -> jax.Array:
    def per_query(o, cs):
        enc = energy.encode(o)
        return jax.vmap(lambda a: energy.score(enc, a))(cs)

    return jax.vmap(per_query)(obs, candidates).astype(jnp.float32)


def candidate_energies(energy: EnergyFn, rollouts: Rollouts, block: int = 1024) -> np.ndarray:
    """`(Q, N)`: the energy of every candidate at its query's observation.

    The energy's context is one query's observation, of the observation's structure
    (an array, or the pytree with each leaf's row), scored `block` queries at a time.
    """
    if not isinstance(rollouts, Rollouts):
        raise TypeError(f"`rollouts` must be fc.verifiers.Rollouts; got {type(rollouts).__name__}.")
    energy = as_energy(energy)
    out = []
    for i in range(0, rollouts.num_queries, block):
        rows = slice(i, i + block)
        out.append(np.asarray(_score_block(
            energy, jax.tree.map(lambda x: jnp.asarray(x[rows]), rollouts.observation),
            jnp.asarray(rollouts.candidates[rows]),
        )))
    return np.concatenate(out) if out else np.zeros((0, rollouts.candidates.shape[1]), np.float32)


def medoid_index(candidates: np.ndarray) -> np.ndarray:
    """`(Q,)`: each query's medoid candidate, by [`flowcorrect.Medoid`][]'s own rule,
    so that a rollout whose chunk that selection chose counts as the medoid's."""
    pick = jax.vmap(lambda c: Medoid().select(c, None, jnp.ones(c.shape[0], bool), None).index)
    return np.asarray(pick(jnp.asarray(candidates, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class VerifierReport:
    """Held-out calibration of a verifier on rollouts (energy low = success).

    **Attributes:**

    - `success_auc`: AUC of `-E(s, a_executed)` for the episode's success.
    - `action_advantage_auc`: AUC of `-(E(s, a_executed) - mean_j E(s, a_j))` for
        success: does the score of the executed chunk, relative to the other candidates
        at the same state, predict the outcome? 0.5 = the verifier knows nothing about
        the action beyond the state.
    - `within_state_std`: mean over queries of the std of the energy across the
        candidates; `between_state_std`: the std over queries of the candidates' mean
        energy; `spread_ratio`: the first over the second.
    - `top_success`, `top_count`: the success rate of the queries whose executed chunk
        was the verifier's argmin, and how many such queries there are (offline
        estimate of best-of-N's effect; queries are correlated within an episode).
    - `medoid_success`, `medoid_count`: the same for the candidates' medoid.
    - `random_success`: the success rate over all queries (a random candidate).
    - `num_queries`, `num_episodes`.
    - `guidance`: the offline checks of guidance by the verifier's gradient (a
        `GuidanceReport`: its own score drop under a normalised gradient step, a
        judge's view of that step and of guided chunks, the gradient at pairs of similar
        states), or `None` when not asked for.
    """

    success_auc: float
    action_advantage_auc: float
    within_state_std: float
    between_state_std: float
    spread_ratio: float
    top_success: float
    top_count: int
    medoid_success: float
    medoid_count: int
    random_success: float
    num_queries: int
    num_episodes: int
    guidance: GuidanceReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verifier_report(energy: EnergyFn, rollouts: Rollouts, *, guidance: bool = False,
                    judge: EnergyFn | None = None, guided: RealLike | None = None,
                    plain: RealLike | None = None,
                    step_size: float = 0.5) -> VerifierReport:
    """The [`flowcorrect.verifiers.VerifierReport`][] of `energy` on (held-out) `rollouts`.

    **Arguments:**

    - `energy`: the verifier (low energy = success).
    - `rollouts`: held-out [`flowcorrect.verifiers.Rollouts`][].
    - `guidance`: also check guidance by the verifier's gradient (the report's
        `guidance` field). Implied by `judge` or `guided`.
    - `judge`: a second verifier trained on episodes disjoint from `energy`'s and from
        `rollouts`, which scores the chunks `energy`'s gradient produces.
    - `guided`: `(queries, M, horizon, action_dim)`, the guided sampler's chunks at each
        query's observation; `plain`: the plain sampler's from the same noise (default:
        the rollouts' candidates).
    - `step_size`: the gradient step's length, in units of the spread of the query's
        candidates around their mean.
    """
    if not isinstance(rollouts, Rollouts):
        raise TypeError(f"`rollouts` must be fc.verifiers.Rollouts; got {type(rollouts).__name__}.")
    if rollouts.num_queries == 0:
        raise ValueError("verifier_report needs at least one query in `rollouts`.")
    e = candidate_energies(energy, rollouts)
    q = np.arange(rollouts.num_queries)
    executed = e[q, rollouts.executed]
    mean = e.mean(1)
    success = rollouts.success
    within = float(np.mean(e.std(1)))
    between = float(np.std(mean))
    top = e.argmin(1) == rollouts.executed
    med = medoid_index(rollouts.candidates) == rollouts.executed

    def rate(mask: np.ndarray) -> float:
        return float(success[mask].mean()) if mask.any() else float("nan")

    return VerifierReport(
        success_auc=auc(-executed, success),
        action_advantage_auc=auc(-(executed - mean), success),
        within_state_std=within,
        between_state_std=between,
        spread_ratio=within / between if between > 0 else float("inf"),
        top_success=rate(top),
        top_count=int(top.sum()),
        medoid_success=rate(med),
        medoid_count=int(med.sum()),
        random_success=float(success.mean()),
        num_queries=rollouts.num_queries,
        num_episodes=rollouts.num_episodes,
        guidance=guidance_report(energy, rollouts, judge=judge, guided=guided, plain=plain,
                                 step_size=step_size)
        if guidance or judge is not None or guided is not None else None,
    )
