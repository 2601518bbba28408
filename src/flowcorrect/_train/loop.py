"""The training loop: one loop for every loss, with optax, orbax checkpoints with exact
resume, data parallelism, held-out evaluation and a pluggable progress meter."""

import itertools
import math
import pathlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray

from .._correctors.base import AbstractCorrector
from .._model.base import AbstractLearnedEnergy
from .batch import Batch
from .checkpoint import Checkpointer
from .config import OPTIMIZER_FIELDS, TrainConfig, cached_optimizer, make_schedule
from .infonce import check_learned, typed_key
from .loss import AbstractLoss, InfoNCELoss
from .negatives import AbstractNegatives
from .progress import AbstractProgressMeter, progress_meter
from .report import EvalReport
from .resume import resume, save
from .sharding import check_mesh, constrain, place_batch, replicate
from .state import TrainState, guarded_update, initial_state


class FitResult(NamedTuple):
    """What [`flowcorrect.train.fit`][] returns.

    **Attributes:**

    - `model`: the trained model (same class as given to `fit`), in inference mode.
    - `ema_model`: the moving average of its weights (inference mode), or `None`.
    - `history`: one dict per logging interval: `step`, the mean of each metric of
        the loss (e.g. [`flowcorrect.train.info_nce`][]'s) over the interval's applied steps,
        `grad_global_norm` (the gradients' global norm before clipping), `skipped_steps`
        (the steps of the interval whose loss, gradients or updates were not finite,
        and which therefore changed nothing), plus `lr`, and `held_out/...` entries
        when evaluated.
    - `report`: the [`flowcorrect.train.EvalReport`][] on the held-out data, or `None`.
    """

    model: Any
    ema_model: Any
    history: list[dict[str, float]]
    report: EvalReport | None


@eqx.filter_jit
def _train_step(
    state: TrainState,
    batch: Any,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation,
    loss: AbstractLoss,
    ema_decay: float | None,
    mesh: Mesh | None,
) -> tuple[TrainState, dict[str, Array]]:
    # Keys are a function of the step, so an interrupted run resumed from a checkpoint
    # draws exactly what the uninterrupted one would have.
    step_key = jax.random.fold_in(key, state.step)
    (value, metrics), grads = eqx.filter_value_and_grad(
        lambda m: loss(m, batch, step_key), has_aux=True
    )(state.model)
    metrics = dict(metrics)
    grad_leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    metrics["grad_global_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grad_leaves))
    new, skipped = guarded_update(state, value, grads, optimizer, ema_decay)
    metrics["skipped_steps"] = skipped
    return constrain(new, mesh), metrics


def fit(
    model: AbstractLearnedEnergy,
    data: Callable[[int], Any] | Iterable[Any],
    loss: AbstractLoss | None = None,
    *,
    key: PRNGKeyArray,
    config: TrainConfig = TrainConfig(),
    optimizer: optax.GradientTransformation | None = None,
    negatives: Sequence[AbstractNegatives] = (),
    to_context: Callable[[Any], Any] | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    on_corrupt: str = "raise",
    mesh: Mesh | None = None,
    held_out: Batch | None = None,
    held_out_policy_samples: Array | None = None,
    eval_corrector: AbstractCorrector | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool | AbstractProgressMeter = True,
) -> FitResult:
    """Trains a learned energy: InfoNCE on demonstrations by default, or any `loss`;
    checkpointed, resumable, data-parallel.

    Each step calls `loss(model, batch, key)` (by default [`flowcorrect.train.InfoNCELoss`][]:
    all pairs of the batch, [`flowcorrect.train.info_nce`][], plus any extra negatives) and
    applies an optax optimiser: by default global-norm clipping and AdamW on a
    warm-up + cosine schedule ([`flowcorrect.train.make_optimizer`][]). Only the energy
    model trains; `to_context` (e.g. the frozen policy's prefix pass) is run inside the
    compiled step under `stop_gradient`.

    **Data and exact resume.** `data` is either a function `step -> Batch` (e.g.
    [`flowcorrect.train.ShuffledBatches`][]), which makes resuming exact: the run continues
    with the very batch it would have seen; or an iterable of batches, of which a
    resumed run skips the ones already used (exact only if iterating it again replays
    the same batches). Dropout and negatives draw from `fold_in(key, step)`. A step whose
    loss, gradients or updates are not finite (a NaN or inf row in its batch) is skipped:
    the parameters and optimiser state stay as they were, the history counts it in
    `skipped_steps`, and one warning at the end gives the total;
    [`flowcorrect.train.ShuffledBatches`][] refuses a data set with non-finite values up
    front. With `checkpoint_dir`, a run killed at any point and started again with the
    same arguments resumes from its newest checkpoint and ends with the same parameters
    as an uninterrupted run (the PRNG key stored in the checkpoint is used).

    **Several devices.** With `mesh` (see [`flowcorrect.train.data_parallel_mesh`][]) each
    batch is split along its first axis over the mesh's `"batch"` axis and the
    parameters are replicated; the loss is the same as on one device up to float
    rounding. Under `jax.distributed`, every process calls `fit` alike and `data`
    returns that process's rows of the global batch.

    **Arguments:**

    - `model`: the learned energy to train: any [`flowcorrect.AbstractLearnedEnergy`][]
        ([`flowcorrect.EnergyModel`][], a fresh one in training mode;
        [`flowcorrect.MLPEnergy`][]; your own subclass).
    - `data`: batches, as above, of the type `loss` reads. A [`flowcorrect.train.Batch`][]
        (InfoNCE) has contexts, expert chunks, and optionally precomputed negatives
        (e.g. policy samples).
    - `loss`: the objective, an [`flowcorrect.train.AbstractLoss`][]:
        [`flowcorrect.train.InfoNCELoss`][], a verifier loss
        ([`flowcorrect.verifiers.OutcomeLoss`][],
        [`flowcorrect.verifiers.BradleyTerryLoss`][]) or your own. `None` (default) is
        `InfoNCELoss` with `config`'s `tau`, `grad_penalty`, `grad_margin` and
        `pair_chunk` and the `negatives` and `to_context` below.
    - `key`: a PRNG key for dropout and negatives.
    - `config`: a [`flowcorrect.train.TrainConfig`][].
    - `optimizer`: any `optax.GradientTransformation`, applied to the model's float
        arrays; `None` (default) is `make_optimizer(config)`. With your own, the
        schedule fields of `config` (`learning_rate`, `warmup_steps`,
        `final_learning_rate`, `weight_decay`, `clip_norm`) are unused and the history
        has no `lr`. Pass the same object to a resumed run.
    - `negatives`: generators of extra negatives ([`flowcorrect.train.NoiseNegatives`][],
        [`flowcorrect.train.PolicyNegatives`][], ...), appended to `Batch.negatives`; only
        with `loss=None` (otherwise they are the loss's own).
    - `to_context`: turns `Batch.context` (raw observations) into what the model's
        `encode` reads, batched (a [`flowcorrect.TokenContext`][] for an
        `EnergyModel`); `None` if batches hold contexts already. Only with `loss=None`.
    - `checkpoint_dir`: where to save checkpoints and resume from; `None` = no checkpoints.
    - `on_corrupt`: what a resumed run does when the newest checkpoint cannot be read
        (truncated, partly deleted, edited): `"raise"` (default) raises a
        `CheckpointError` naming the step, the folder and the ways on; `"fallback"`
        resumes from the newest intact older checkpoint, logs a warning naming what it
        skipped, and moves the broken ones into `<checkpoint_dir>/corrupt/`. Starting
        from step 0 is logged too (a warning if `checkpoint_dir` existed but was empty).
        Messages go to the `"flowcorrect"` logger.
    - `mesh`: a device mesh for data parallelism; `None` = the default device.
    - `held_out`, `held_out_policy_samples`, `eval_corrector`: data for
        [`flowcorrect.train.evaluate`][], run at the end (and every `config.eval_every` steps)
        on the moving average if one is kept, else on the model; InfoNCE losses only.
    - `callback`: called as `callback(step, metrics)` at every logging step.
    - `progress`: an [`flowcorrect.train.AbstractProgressMeter`][], or `True` (default) for a
        tqdm bar ([`flowcorrect.train.TqdmProgressMeter`][]) with the loss's chosen metrics
        (InfoNCE: the loss, the top-1 and pairwise accuracies, E_pos and E_neg), or
        `False` for none.

    **Returns:**

    A [`flowcorrect.train.FitResult`][]: `(model, ema_model, history, report)`.
    """
    if loss is None:
        negatives = tuple(negatives)
        for n in negatives:
            if not isinstance(n, AbstractNegatives):
                raise TypeError(
                    f"`negatives` must hold AbstractNegatives; got {type(n).__name__}."
                )
        loss = InfoNCELoss(
            tau=config.tau,
            grad_penalty=config.grad_penalty,
            grad_margin=config.grad_margin,
            pair_chunk=config.pair_chunk,
            negatives=negatives,
            to_context=to_context,
        )
        # The loss is built from `config`, whose fields the checkpoint records.
        loss_meta: dict[str, Any] = {}
    else:
        if not isinstance(loss, AbstractLoss):
            raise TypeError(
                "`loss` must be an fc.train.AbstractLoss (fc.train.InfoNCELoss, "
                "fc.verifiers.OutcomeLoss, fc.verifiers.BradleyTerryLoss, your own) or None; "
                f"got {type(loss).__name__}."
            )
        if tuple(negatives) or to_context is not None:
            raise ValueError(
                "`negatives` and `to_context` build fit's default InfoNCE loss; with your "
                "own `loss`, give them to it: fc.train.InfoNCELoss(negatives=..., to_context=...)."
            )
        loss_meta = {"loss": repr(loss)}
    evaluate = None
    if held_out is not None:
        if not isinstance(loss, InfoNCELoss):
            raise ValueError(
                "`held_out` is evaluated with fc.train.evaluate, for InfoNCE training; for a "
                "verifier use fc.verifiers.verifier_report on held-out rollouts."
            )

        def evaluate(model: AbstractLearnedEnergy) -> EvalReport:
            return loss.evaluate(
                model,
                replicate(held_out, mesh),
                replicate(held_out_policy_samples, mesh),
                eval_corrector,
            )

    return train(
        model,
        data,
        loss,
        key=key,
        config=config,
        optimizer=optimizer,
        checkpoint_dir=checkpoint_dir,
        on_corrupt=on_corrupt,
        mesh=mesh,
        evaluate=evaluate,
        callback=callback,
        progress=progress,
        loss_meta=loss_meta,
        who="fit",
    )


def train(
    model: AbstractLearnedEnergy,
    data: Any,
    loss: AbstractLoss,
    *,
    key: PRNGKeyArray,
    config: TrainConfig,
    optimizer: optax.GradientTransformation | None,
    checkpoint_dir: str | pathlib.Path | None,
    on_corrupt: str,
    mesh: Mesh | None,
    evaluate: Callable[[AbstractLearnedEnergy], EvalReport] | None,
    callback: Callable[[int, dict[str, float]], None] | None,
    progress: bool | AbstractProgressMeter,
    loss_meta: dict[str, Any],
    who: str,
) -> FitResult:
    """The loop of [`flowcorrect.train.fit`][] and [`flowcorrect.verifiers.fit_verifier`][] (`who`
    names the caller in messages). `loss_meta` is written into every checkpoint and a
    resumed run must find the same there."""
    check_learned(model, who)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig; got {type(config).__name__}.")
    if on_corrupt not in ("raise", "fallback"):
        raise ValueError(f"`on_corrupt` must be 'raise' or 'fallback'; got {on_corrupt!r}.")
    custom = optimizer is not None
    if custom and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation, e.g. "
            f"optax.adam(1e-3); got {type(optimizer).__name__}."
        )
    if mesh is not None:
        check_mesh(mesh)
    meter = progress_meter(progress)
    key = typed_key(jnp.asarray(key) if not isinstance(key, jax.Array) else key)

    if optimizer is None:
        optimizer = cached_optimizer(**{f: getattr(config, f) for f in OPTIMIZER_FIELDS})
    schedule_lr = None if custom else make_schedule(config)
    state = replicate(initial_state(model, config, optimizer), mesh)
    key = replicate(key, mesh)
    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    start = 0

    checkpointer = None
    if checkpoint_dir is not None:
        existed = pathlib.Path(checkpoint_dir).exists()
        checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
    try:
        if checkpointer is not None:
            start, state, key, meta = resume(
                checkpointer, state, key, model, config, custom, on_corrupt, existed, who
            )
            if meta is not None:
                for name, value in loss_meta.items():
                    if meta.get(name) != value:
                        raise ValueError(
                            f"The checkpoint in {checkpoint_dir} was trained with "
                            f"{meta.get(name)}, not {value}; use a fresh checkpoint_dir."
                        )
                history = list(meta.get("history", []))
                window = list(meta.get("window", []))

        pending: list[dict[str, Array]] = []
        batches = _batches(data, start)
        bar = meter.init(total=config.num_steps, initial=start, desc=who)
        try:
            for step in range(start, config.num_steps):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ValueError(
                        f"`data` ran out after {step} batches; config.num_steps is "
                        f"{config.num_steps}."
                    ) from None
                batch = place_batch(batch, mesh)
                state, metrics = _train_step(
                    state, batch, key, optimizer, loss, config.ema_decay, mesh
                )
                pending.append(metrics)
                done = step + 1
                log_now = done % config.log_every == 0 or done == config.num_steps
                save_now = checkpointer is not None and (
                    done % config.checkpoint_every == 0 or done == config.num_steps
                )
                if log_now or save_now:
                    # One device-to-host transfer per interval, not one per step.
                    host = jax.device_get(pending)
                    window += [{k: float(v) for k, v in m.items()} for m in host]
                    pending = []
                postfix = None
                if log_now:
                    entry: dict[str, float] = {"step": done}
                    if schedule_lr is not None:
                        entry["lr"] = float(schedule_lr(step))
                    entry.update(_mean(window))
                    window = []
                    eval_every = config.eval_every
                    if evaluate is not None and eval_every and done % eval_every == 0:
                        rep = evaluate(_deployed(state))
                        entry.update({f"held_out/{k}": v for k, v in rep.to_dict().items()})
                    history.append(entry)
                    postfix = loss.postfix(entry)
                bar = meter.step(bar, postfix)
                if log_now and callback is not None:
                    callback(done, entry)
                if save_now:
                    meta = {
                        "step": done,
                        "model_class": type(model).__name__,
                        "model_config": model.config.to_dict(),
                        "custom_optimizer": custom,
                        "train_config": config.to_dict(),
                        "history": history,
                        "window": window,
                        **loss_meta,
                    }
                    save(checkpointer, done, state, key, meta)
        finally:
            meter.close(bar)
    finally:
        if checkpointer is not None:
            checkpointer.close()

    report = None if evaluate is None else evaluate(_deployed(state))
    warn_skipped(who, history, config.num_steps)
    trained = eqx.nn.inference_mode(state.model)
    ema = None if state.ema is None else eqx.nn.inference_mode(state.ema)
    return FitResult(trained, ema, history, report)


def _deployed(state: TrainState) -> AbstractLearnedEnergy:
    # The moving average, when kept, is the model one would deploy.
    return state.model if state.ema is None else state.ema


def _batches(data: Any, start: int) -> Iterator[Any]:
    if callable(data):
        return (data(step) for step in itertools.count(start))
    if isinstance(data, Iterable):
        # An iterable cannot seek: skip what the checkpointed run already consumed. This
        # is exact only if iterating `data` afresh replays the same batches.
        return itertools.islice(iter(data), start, None)
    raise TypeError(
        "`data` must be a function step -> batch (e.g. fc.train.ShuffledBatches) or an "
        f"iterable of batches; got {type(data).__name__}."
    )


def _mean(window: list[dict[str, float]]) -> dict[str, Any]:
    """The interval's metrics: means over the steps that were applied (a skipped step's
    loss is NaN and says nothing), and the count of skipped steps."""
    applied = [w for w in window if not w.get("skipped_steps", 0.0)]
    out: dict[str, Any] = {
        k: float(np.mean([w[k] for w in applied])) if applied else math.nan
        for k in window[0]
        if k != "skipped_steps"
    }
    out["skipped_steps"] = int(sum(w.get("skipped_steps", 0.0) for w in window))
    return out


def warn_skipped(who: str, history: list[dict[str, Any]], num_steps: int) -> None:
    """One warning at the end of a run that skipped non-finite steps (resumed runs
    count the steps skipped before the interruption too: they are in the history)."""
    total = int(sum(h.get("skipped_steps", 0) for h in history))
    if total:
        where = [int(h["step"]) for h in history if h.get("skipped_steps", 0)]
        warnings.warn(
            f"{who} skipped {total} of {num_steps} steps because their loss, gradients or "
            "updates were not finite (NaN or inf); those steps left the model and the "
            "optimiser state unchanged. The `skipped_steps` entries of the history count "
            f"them per logging interval (intervals ending at steps {where[:10]}"
            f"{'...' if len(where) > 10 else ''}). Look for NaN or inf in the batches "
            "of those steps, or lower the learning rate if the model diverged.",
            RuntimeWarning,
            stacklevel=4,
        )
