"""Verifiers: learned energies trained on the outcomes of the policy's own rollouts.

Low energy means "this chunk leads to success from here". Three losses, all on the
same model classes as InfoNCE ([`flowcorrect.MLPEnergy`][],
[`flowcorrect.EnergyModel`][], your own [`flowcorrect.AbstractLearnedEnergy`][]):

- [`flowcorrect.verifiers.OutcomeLoss`][]: logistic regression of the outcome on `-E(s, a)`, so
    `E = -logit P(success | s, a)`; with `target="discounted"` the soft target is
    `gamma ** steps_to_success` (a Monte-Carlo value of the chunk under the policy).
- [`flowcorrect.verifiers.BradleyTerryLoss`][]: `-log sigmoid(E(s', a_fail) - E(s, a_success))`
    over pairs of queries at similar states, one from a succeeding and one from a
    failing episode ([`flowcorrect.verifiers.similar_state_pairs`][]).

The losses are [`flowcorrect.train.AbstractLoss`][]es: [`flowcorrect.train.fit`][] trains with them
as it does with InfoNCE (the same [`flowcorrect.train.TrainConfig`][] and optax optimiser,
orbax checkpoints with exact resume, a progress meter, a data-parallel mesh), and
[`flowcorrect.verifiers.fit_verifier`][] is that loop.
"""

import abc
import pathlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._custom_types import RealLike
from .._model.base import AbstractLearnedEnergy
from .._train.config import TrainConfig
from .._train.infonce import check_learned
from .._train.loop import FitResult, train
from .._train.loss import AbstractLoss
from .._train.progress import AbstractProgressMeter
from .rollouts import Rollouts, observation_leaves


class LabelledBatch(eqx.Module):
    """Queries with a target in `[0, 1]`: `context` (the rows' observations: an array
    `(B, ...)` or a pytree of them), `actions` `(B, horizon, action_dim)`, `target`
    `(B,)` (1 = success, or a discounted value)."""

    context: PyTree[Any]
    actions: Float[Array, "B horizon action_dim"]
    target: Float[Array, " B"]


class PairBatch(eqx.Module):
    """Pairs of queries: the `win` chunk's episode succeeded, the `lose` chunk's failed,
    at similar states. The contexts are the rows' observations (arrays or pytrees)."""

    context_win: PyTree[Any]
    actions_win: Float[Array, "B horizon action_dim"]
    context_lose: PyTree[Any]
    actions_lose: Float[Array, "B horizon action_dim"]


def _energies(model: AbstractLearnedEnergy, context: Any, actions: Array, key: Any) -> Array:
    keys = jax.random.split(key, actions.shape[0])

    def one(c, a, k):
        return model.score_embedded(model.encode(c), model.embed_actions(a, key=k))

    return jax.vmap(one)(context, actions, keys).astype(jnp.float32)


class AbstractVerifierLoss(AbstractLoss):
    """A loss of [`flowcorrect.verifiers.fit_verifier`][] (and [`flowcorrect.train.fit`][]):
    `loss(model, batch, key) -> (scalar, metrics)`, with a `metrics` dict of scalars
    for the history and the progress meter, which shows `loss` and `accuracy`."""

    @abc.abstractmethod
    def __call__(self, model: AbstractLearnedEnergy, batch: Any, key: PRNGKeyArray) -> tuple[
        Array, dict[str, Array]
    ]:
        """The mean loss over the batch and its metrics."""

    def postfix(self, entry: dict[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{entry['loss']:.3f}",
            "acc": f"{entry.get('accuracy', float('nan')):.2f}",
        }


class OutcomeLoss(AbstractVerifierLoss):
    """Binary cross-entropy of the target on the logit `-E(s, a)` (`E = -logit p`).

    Reads a [`flowcorrect.verifiers.LabelledBatch`][]; the target is the episode's success, or a
    soft value in `[0, 1]` such as `gamma ** steps_to_success`
    ([`flowcorrect.verifiers.outcome_batches`][] builds either). Metrics: `loss`, `accuracy`
    (threshold 0.5 on both), `e_success`, `e_failure` (mean energies of targets above
    and below 0.5).
    """

    def __call__(self, model, batch: LabelledBatch, key):
        e = _energies(model, batch.context, batch.actions, key)
        y = batch.target.astype(jnp.float32)
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(-e, y))
        win = y > 0.5
        nw = jnp.maximum(jnp.sum(win), 1)
        nl = jnp.maximum(jnp.sum(~win), 1)
        return loss, {
            "loss": loss,
            "accuracy": jnp.mean((-e > 0) == win),
            "e_success": jnp.sum(jnp.where(win, e, 0)) / nw,
            "e_failure": jnp.sum(jnp.where(win, 0, e)) / nl,
        }


class BradleyTerryLoss(AbstractVerifierLoss):
    """`-log sigmoid(E_lose - E_win)` over a [`flowcorrect.verifiers.PairBatch`][]: the chunk that
    led to success should get the lower energy. Sees only energy differences, so it
    cannot learn a state's value from pairs at one state, only which action is better.

    Metrics: `loss`, `accuracy` (fraction of pairs ordered right), `margin`.
    """

    def __call__(self, model, batch: PairBatch, key):
        k1, k2 = jax.random.split(key)
        ew = _energies(model, batch.context_win, batch.actions_win, k1)
        el = _energies(model, batch.context_lose, batch.actions_lose, k2)
        margin = el - ew
        loss = jnp.mean(-jax.nn.log_sigmoid(margin))
        return loss, {"loss": loss, "accuracy": jnp.mean(margin > 0), "margin": jnp.mean(margin)}


def outcome_batches(
    rollouts: Rollouts, batch_size: int, *, target: str = "success", gamma: float = 0.99,
    seed: int = 0,
) -> Callable[[int], LabelledBatch]:
    """A batch source `step -> LabelledBatch` over the executed chunks of `rollouts`.

    Reshuffled each epoch with `default_rng([seed, epoch])`, so batch `n` is a pure
    function of `n` (exact resume).

    **Arguments:**

    - `rollouts`: [`flowcorrect.verifiers.Rollouts`][].
    - `batch_size`: rows per batch, at most the number of queries.
    - `target`: `"success"` (the episode's outcome) or `"discounted"`
        (`gamma ** steps_to_success`, 0 for a failed episode).
    - `gamma`: the discount per environment step.
    """
    if target not in ("success", "discounted"):
        raise ValueError(f"`target` must be 'success' or 'discounted'; got {target!r}.")
    y = (rollouts.success.astype(np.float32) if target == "success"
         else rollouts.discounted(gamma))
    return _shuffled(
        (rollouts.observation, rollouts.executed_actions, y), batch_size, seed,
        lambda c, a, t: LabelledBatch(_device(c), jnp.asarray(a), jnp.asarray(t)),
    )


def similar_state_pairs(
    rollouts: Rollouts, *, max_distance: float = 1.0, scale: RealLike | None = None, seed: int = 0,
    compare_by: str | Callable[[Any], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs `(win, lose)` of query indices at similar states: for each query of a
    succeeding episode, a query of a failing episode drawn at random among those within
    `max_distance` (Euclidean, after dividing each dimension of the state vector by
    `scale`; default its standard deviation over the queries). Queries with no failing
    query that close are left out.

    **Arguments:**

    - `rollouts`: [`flowcorrect.verifiers.Rollouts`][].
    - `max_distance`, `scale`, `seed`: as above.
    - `compare_by`: what state vector to compare queries by. `None` (default): the
        observation, which must then be an array (flattened per query). For a pytree
        observation, the path of one leaf (`"state"`, or `"observation/state"`, as in
        the rollouts' layout), or a function of the observation of all queries (each
        leaf `(Q, ...)`) returning `(Q, d)`, e.g. `lambda o: o["state"][:, :3]`.

    **Returns:** two int arrays of equal length; empty when no episode failed or
    succeeded, or no pair is close enough.
    """
    obs = _state_vectors(rollouts, compare_by, "similar_state_pairs")
    if scale is None:
        scale = obs.std(0) + 1e-6
    z = obs / np.asarray(scale, np.float64)
    win = np.flatnonzero(rollouts.success)
    lose = np.flatnonzero(~rollouts.success)
    if len(win) == 0 or len(lose) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    chosen = np.full(len(win), -1, np.int64)
    zl = z[lose]
    for start in range(0, len(win), 256):
        block = z[win[start : start + 256]]
        d = np.sqrt(((block[:, None, :] - zl[None, :, :]) ** 2).sum(-1))
        close = d <= max_distance
        # A uniform draw among the close ones: the largest of uniform keys.
        keys = np.where(close, rng.random(d.shape), -1.0)
        j = keys.argmax(1)
        chosen[start : start + 256] = np.where(close.any(1), lose[j], -1)
    keep = chosen >= 0
    return win[keep], chosen[keep]


def _state_vectors(rollouts: Rollouts, compare_by: Any, owner: str) -> np.ndarray:
    """`(Q, d)` float64: the state of each query that `compare_by` names."""
    if not isinstance(rollouts, Rollouts):
        raise TypeError(f"`rollouts` must be fc.verifiers.Rollouts; got {type(rollouts).__name__}.")
    q = rollouts.num_queries
    leaves = dict(observation_leaves(rollouts.observation))
    if compare_by is None:
        if isinstance(rollouts.observation, np.ndarray):
            return rollouts.observation.reshape(q, -1).astype(np.float64)
        raise ValueError(
            f"{owner} compares states by one vector per query, and `rollouts.observation` "
            f"is a pytree with the leaves {list(leaves)}: pass compare_by= the path of the "
            "leaf to compare by (e.g. compare_by='state'), or a function of the observation "
            "returning (queries, d), e.g. compare_by=lambda o: o['state']."
        )
    if isinstance(compare_by, str):
        path = (compare_by if compare_by == "observation" or compare_by.startswith("observation/")
                else "observation/" + compare_by)
        if path not in leaves:
            raise ValueError(
                f"{owner}: compare_by={compare_by!r} names no leaf of the observation; its "
                f"leaves are {list(leaves)} (give one of them, with or without the leading "
                "'observation/')."
            )
        value, what = leaves[path], f"the leaf `{path}`"
    elif callable(compare_by):
        value, what = np.asarray(compare_by(rollouts.observation)), "compare_by(observation)"
    else:
        raise TypeError(
            f"{owner}: `compare_by` must be a leaf path (str) or a function of the "
            f"observation; got {type(compare_by).__name__}."
        )
    if value.ndim == 0 or len(value) != q or value.dtype.kind not in "biuf":
        raise ValueError(
            f"{owner}: {what} must be a numeric array with one row per query ({q}); got "
            f"shape {value.shape}, dtype {value.dtype}."
        )
    value = value.reshape(q, -1).astype(np.float64)
    if not np.isfinite(value).all():
        raise ValueError(
            f"{owner}: {what} has NaN or inf entries, which are at no distance from any "
            "state; compare by finite values."
        )
    return value


def pair_batches(
    rollouts: Rollouts, batch_size: int, *, max_distance: float = 1.0, seed: int = 0,
    compare_by: str | Callable[[Any], Any] | None = None,
) -> Callable[[int], PairBatch]:
    """A batch source `step -> PairBatch` over [`flowcorrect.verifiers.similar_state_pairs`][]
    (`compare_by` as there: needed for a pytree observation). The contexts are the
    pairs' observations, of the observation's structure."""
    win, lose = similar_state_pairs(rollouts, max_distance=max_distance, seed=seed,
                                    compare_by=compare_by)
    if len(win) < batch_size:
        raise ValueError(
            f"Only {len(win)} pairs of similar states (succeeding vs failing, within "
            f"max_distance={max_distance}) for batch_size={batch_size}: raise "
            "max_distance, lower batch_size, or collect rollouts with both outcomes."
        )
    obs, act = rollouts.observation, rollouts.executed_actions
    rows = lambda tree, idx: jax.tree.map(lambda x: x[idx], tree)  # noqa: E731
    return _shuffled(
        (rows(obs, win), act[win], rows(obs, lose), act[lose]), batch_size, seed,
        lambda a, b, c, d: PairBatch(*(_device(x) for x in (a, b, c, d))),
    )


def _device(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


def _shuffled(arrays: tuple, batch_size: int, seed: int, make: Callable) -> Callable:
    """`arrays`: a tuple of arrays or pytrees of them, one row per item on every leaf."""
    n = len(jax.tree.leaves(arrays[0])[0])
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n):
        raise ValueError(f"`batch_size` must be an int in [1, {n}] (the rows); got {batch_size!r}.")
    per_epoch = n // batch_size

    def batch(step: int):
        epoch, i = divmod(int(step), per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[i * batch_size : (i + 1) * batch_size]
        return make(*(jax.tree.map(lambda x: x[idx], a) for a in arrays))

    return batch


# `model`, `data` and `loss` are typed loosely so that a wrong one gets the messages below.
def fit_verifier(
    model: AbstractLearnedEnergy,
    data: Callable[[int], Any],
    loss: AbstractVerifierLoss,
    *,
    key: PRNGKeyArray,
    config: TrainConfig = TrainConfig(),
    checkpoint_dir: str | pathlib.Path | None = None,
    on_corrupt: str = "raise",
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool | AbstractProgressMeter = True,
) -> FitResult:
    """Trains a learned energy as a verifier: the loop of [`flowcorrect.train.fit`][] with a
    verifier loss.

    **Arguments:**

    - `model`: any [`flowcorrect.AbstractLearnedEnergy`][], e.g. a fresh
        [`flowcorrect.MLPEnergy`][] for state vectors, or your own whose `encode` reads
        one query's observation pytree (a small CNN over an image plus the state).
    - `data`: a function `step -> batch` ([`flowcorrect.verifiers.outcome_batches`][],
        [`flowcorrect.verifiers.pair_batches`][]); batch `n` must not depend on the run, so that a
        resumed run is exact.
    - `loss`: an [`flowcorrect.verifiers.AbstractVerifierLoss`][] reading that batch type.
    - `key`: a PRNG key (dropout).
    - `config`: a [`flowcorrect.train.TrainConfig`][]; the optimiser fields and
        `num_steps`, `log_every`, `checkpoint_every`, `keep_checkpoints` are used (not
        `tau`, the gradient penalty or `ema_decay`).
    - `checkpoint_dir`: save orbax checkpoints there and resume from the newest.
    - `on_corrupt`: when the newest checkpoint cannot be read, `"raise"` (default) a
        `CheckpointError` naming it, or `"fallback"`: resume from the newest intact
        older one and move the broken ones to `<checkpoint_dir>/corrupt/`, as
        [`flowcorrect.train.fit`][] does.
    - `callback`: `callback(step, metrics)` at every logging step.
    - `progress`: `True` (default) for a tqdm bar with the loss and accuracy, `False`
        for none, or an [`flowcorrect.train.AbstractProgressMeter`][].

    A step whose loss, gradients or updates are not finite is skipped (the model and
    optimiser state stay as they were), counted in the history's `skipped_steps` and
    reported in one warning at the end, as in [`flowcorrect.train.fit`][].

    **Returns:**

    A [`flowcorrect.train.FitResult`][] (`report` is `None`: use
    [`flowcorrect.verifiers.verifier_report`][] on held-out rollouts).
    """
    check_learned(model, "fit_verifier")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig; got {type(config).__name__}.")
    if not isinstance(loss, AbstractVerifierLoss):
        raise TypeError(
            "`loss` must be a verifier loss: fc.verifiers.OutcomeLoss() or "
            "fc.verifiers.BradleyTerryLoss() (or your own fc.verifiers.AbstractVerifierLoss); "
            f"got {type(loss).__name__}."
        )
    if not callable(data):
        raise TypeError(
            "`data` must be a function step -> batch, e.g. "
            f"fc.verifiers.outcome_batches(rollouts, 256); got {type(data).__name__}."
        )
    if config.ema_decay is not None:
        raise ValueError(
            "fit_verifier keeps no moving average: use ema_decay=None (fc.train.fit(model, data, "
            "loss, ...) keeps one)."
        )
    return train(
        model,
        data,
        loss,
        key=key,
        config=config,
        optimizer=None,
        checkpoint_dir=checkpoint_dir,
        on_corrupt=on_corrupt,
        mesh=None,
        evaluate=None,
        callback=callback,
        progress=progress,
        loss_meta={"loss": repr(loss)},
        who="fit_verifier",
    )
