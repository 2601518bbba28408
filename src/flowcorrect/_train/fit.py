"""The training loop: optax, orbax checkpoints with exact resume, data parallelism."""

import dataclasses
import functools
import itertools
import logging
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int, PRNGKeyArray
from tqdm.auto import tqdm

from .._correctors.base import AbstractCorrector
from .._model.base import AbstractLearnedEnergy
from .batch import Batch
from .checkpoint import Checkpointer, CheckpointError
from .infonce import check_learned, info_nce, typed_key
from .negatives import AbstractNegatives, make_negatives
from .report import EvalReport, evaluate

BATCH_AXIS = "batch"
logger = logging.getLogger("flowcorrect")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of [`flowcorrect.fit`][], serialisable to JSON.

    **Arguments:**

    - `num_steps`: optimiser steps in the whole run (a resumed run continues to it).
    - `learning_rate`: the peak learning rate of AdamW. Default `3e-4`.
    - `warmup_steps`: linear warm-up from 0 to the peak, then cosine decay to
        `final_learning_rate` at `num_steps`. Default 100 (capped below `num_steps`).
    - `final_learning_rate`: the learning rate at the end. Default 0.
    - `weight_decay`: AdamW's decoupled weight decay, on matrices only (not on biases,
        norms or the null token). Default `1e-4`.
    - `clip_norm`: global-norm gradient clipping. Default 1.0.
    - `ema_decay`: keep an exponential moving average of the weights with this decay
        (e.g. 0.999), returned as `FitResult.ema_model`; `None` (default) keeps none.
    - `tau`: InfoNCE temperature. Default 0.5.
    - `grad_penalty`, `grad_margin`: the gradient penalty of [`flowcorrect.info_nce`][].
        Default 0.1 and 0: on, because an energy sharp enough to classify pairs can
        still be useless for correction (see the training docs for measured effects);
        set `grad_penalty=0.0` for the reference's plain InfoNCE.
    - `pair_chunk`: score this many contexts at a time in the loss (memory); `None` = all.
    - `log_every`: average the metrics over this many steps, append them to the history,
        show them on the progress bar and call `callback`. Default 50.
    - `eval_every`: run [`flowcorrect.evaluate`][] on the held-out data this often;
        `None` (default) only at the end.
    - `checkpoint_every`: save a checkpoint this often (and at the end), when `fit` has a
        `checkpoint_dir`. Default 500.
    - `keep_checkpoints`: how many recent checkpoints to keep. Default 3.
    """

    num_steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    final_learning_rate: float = 0.0
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    ema_decay: float | None = None
    tau: float = 0.5
    grad_penalty: float = 0.1
    grad_margin: float = 0.0
    pair_chunk: int | None = None
    log_every: int = 50
    eval_every: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"`{name}` must be an int >= 1; got {v!r}.")
        if not (
            isinstance(self.warmup_steps, int)
            and not isinstance(self.warmup_steps, bool)
            and self.warmup_steps >= 0
        ):
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {self.warmup_steps!r}.")
        for name in ("pair_chunk", "eval_every"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"`{name}` must be None or an int >= 1; got {v!r}.")

        def real(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"`{name}` must be a number; got {v!r}.")
            if not math.isfinite(v):
                raise ValueError(
                    f"`{name}` must be a finite number; got {v!r}. (A non-finite setting "
                    "would turn every loss or update into inf or NaN.)"
                )
            return v

        for name in ("learning_rate", "tau", "clip_norm"):
            if not real(name) > 0:
                raise ValueError(
                    f"`{name}` must be a finite number > 0; got {getattr(self, name)!r}."
                )
        for name in ("weight_decay", "grad_penalty", "grad_margin", "final_learning_rate"):
            if not real(name) >= 0:
                raise ValueError(
                    f"`{name}` must be a finite number >= 0; got {getattr(self, name)!r}."
                )
        if self.ema_decay is not None and not 0 < real("ema_decay") < 1:
            raise ValueError(
                f"`ema_decay` must be None or in (0, 1), e.g. 0.999; got {self.ema_decay!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to `final_learning_rate`."""
    warmup = min(config.warmup_steps, config.num_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=config.num_steps,
        end_value=config.final_learning_rate,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a warm-up + cosine schedule.

    **Arguments:**

    - `config`: a [`flowcorrect.TrainConfig`][].
    - `optimizer`: any `optax.GradientTransformation`, applied to the model's float
        arrays; `None` (default) is `make_optimizer(config)`. With your own, the
        schedule fields of `config` (`learning_rate`, `warmup_steps`,
        `final_learning_rate`, `weight_decay`, `clip_norm`) are unused and the history
        has no `lr`. Pass the same object to a resumed run.

    **Returns:**

    An `optax.GradientTransformation`; weight decay applies to matrices only.
    """
    schedule = make_schedule(config)

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
    )


# Fields of TrainConfig that the optimiser and the compiled step read; together they
# fix the training trajectory, so a resumed run must agree with its checkpoint on them.
# The other fields only change logging and saving.
_OPTIMIZER_FIELDS = (
    "num_steps", "learning_rate", "warmup_steps", "final_learning_rate", "weight_decay",
    "clip_norm",
)  # fmt: skip
_LOSS_FIELDS = ("tau", "grad_penalty", "grad_margin", "pair_chunk", "ema_decay")
_TRAJECTORY_FIELDS = _OPTIMIZER_FIELDS + _LOSS_FIELDS


@functools.cache
def _optimizer(**fields: Any) -> optax.GradientTransformation:
    # One optimiser object per setting: the compiled step is cached on its identity, so
    # fits with the same settings (a resume, a test suite) compile once.
    return make_optimizer(TrainConfig(**fields))


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    """The settings the compiled step reads; logging and saving settings stay out of it."""

    tau: float
    grad_penalty: float
    grad_margin: float
    pair_chunk: int | None
    ema_decay: float | None


class TrainState(eqx.Module):
    """Everything a training run carries from step to step (and checkpoints)."""

    model: AbstractLearnedEnergy
    opt_state: Any
    ema: AbstractLearnedEnergy | None
    step: Int[Array, ""]


class FitResult(NamedTuple):
    """What [`flowcorrect.fit`][] returns.

    **Attributes:**

    - `model`: the trained model (same class as given to `fit`), in inference mode.
    - `ema_model`: the moving average of its weights (inference mode), or `None`.
    - `history`: one dict per logging interval: `step`, the mean of each metric of
        [`flowcorrect.info_nce`][] over the interval's applied steps, `skipped_steps`
        (the steps of the interval whose loss, gradients or updates were not finite,
        and which therefore changed nothing), plus `lr`, and `held_out/...` entries
        when evaluated.
    - `report`: the [`flowcorrect.EvalReport`][] on the held-out data, or `None`.
    """

    model: Any
    ema_model: Any
    history: list[dict[str, float]]
    report: EvalReport | None


def data_parallel_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh named `"batch"` over `devices` (default: all, on every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh) or BATCH_AXIS not in mesh.axis_names:
        raise ValueError(
            f"`mesh` must be a jax.sharding.Mesh with an axis named {BATCH_AXIS!r}, e.g. "
            "fc.data_parallel_mesh()."
        )


def _replicate(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)


def _place_batch(batch: Batch, mesh: Mesh | None) -> Batch:
    """Puts a batch on the device(s): split along its first axis over the mesh."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    n = mesh.shape[BATCH_AXIS]
    global_size = batch.size * jax.process_count()
    if global_size % n:
        raise ValueError(
            f"The global batch ({global_size} rows) must divide evenly over the mesh's "
            f"{n} devices along {BATCH_AXIS!r}; use a batch size that is a multiple of {n}."
        )

    def put(x: Any) -> Any:
        spec = PartitionSpec(BATCH_AXIS, *([None] * (x.ndim - 1)))
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        # Under jax.distributed each process holds its own rows of the global batch.
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)


def _constrain(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding) if eqx.is_array(x) else x, tree
    )


@eqx.filter_jit
def _train_step(
    state: TrainState,
    batch: Batch,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation,
    config: _StepConfig,
    negatives: tuple[AbstractNegatives, ...],
    to_context: Callable[[Any], Any] | None,
    mesh: Mesh | None,
) -> tuple[TrainState, dict[str, Array]]:
    # Keys are a function of the step, so an interrupted run resumed from a checkpoint
    # draws exactly what the uninterrupted one would have.
    step_key = jax.random.fold_in(key, state.step)
    k_neg, k_loss = jax.random.split(step_key)
    context = batch.context
    if to_context is not None:
        context = jax.lax.stop_gradient(to_context(context))
    extra = make_negatives(negatives, k_neg, context, batch.actions, batch.observation)
    if batch.negatives is not None:
        given = batch.negatives.astype(batch.actions.dtype)
        extra = given if extra is None else jnp.concatenate([given, extra], axis=1)

    def loss_fn(model: AbstractLearnedEnergy) -> Any:
        return info_nce(
            model,
            context,
            batch.actions,
            tau=config.tau,
            extra_negatives=extra,
            grad_penalty=config.grad_penalty,
            grad_margin=config.grad_margin,
            pair_chunk=config.pair_chunk,
            key=k_loss,
        )

    (loss, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.model)
    grad_leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    metrics["grad_global_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grad_leaves))
    new, skipped = guarded_update(state, loss, grads, optimizer, config.ema_decay)
    metrics["skipped_steps"] = skipped
    return _constrain(new, mesh), metrics


def _all_finite(tree: Any) -> Array:
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    leaves = [jnp.all(jnp.isfinite(x)) for x in arrays]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guarded_update(
    state: TrainState,
    loss: Array,
    grads: Any,
    optimizer: optax.GradientTransformation,
    ema_decay: float | None,
) -> tuple[TrainState, Array]:
    """One optimiser step, or none where the loss, the gradients or the updates are not
    finite: then the model, optimiser state and moving average stay as they were (one
    bad batch must not turn every parameter into NaN), and only the step advances, so
    the run goes on with the next batch. Returns `(state, skipped)`, `skipped` a float
    0/1 for the metrics."""
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)
    model = eqx.apply_updates(state.model, updates)
    ema = state.ema
    if ema is not None:
        d = ema_decay
        ema = jax.tree.map(
            lambda e, p: d * e + (1 - d) * p if eqx.is_inexact_array(e) else e, ema, model
        )

    def keep(new: Any, old: Any) -> Any:
        return jax.tree.map(
            lambda n, o: jnp.where(ok, n, o) if eqx.is_array(n) else n, new, old
        )

    new = TrainState(
        keep(model, state.model),
        keep(opt_state, state.opt_state),
        None if ema is None else keep(ema, state.ema),
        state.step + 1,
    )
    return new, jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


def _initial_state(
    model: AbstractLearnedEnergy, config: TrainConfig, optimizer: optax.GradientTransformation
) -> TrainState:
    return TrainState(
        model=model,
        opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        ema=model if config.ema_decay is not None else None,
        step=jnp.asarray(0, jnp.int32),
    )


def _save(
    checkpointer: Checkpointer, step: int, state: TrainState, key: Any, meta: dict[str, Any]
) -> None:
    tree = (eqx.filter(state, eqx.is_array), jax.random.key_data(key))
    checkpointer.save(step, tree, meta)


def _restore(
    checkpointer: Checkpointer, step: int, like: TrainState, key: Any
) -> tuple[TrainState, Any]:
    """Checkpoint `step` restored into the structure (and devices) of `like` and `key`."""
    arrays, static = eqx.partition(like, eqx.is_array)
    arrays, key_data = checkpointer.restore(step, (arrays, jax.random.key_data(key)))
    return eqx.combine(arrays, static), jax.random.wrap_key_data(key_data)


def _batches(data: Any, start: int) -> Iterator[Batch]:
    if callable(data):
        return (data(step) for step in itertools.count(start))
    if isinstance(data, Iterable):
        # An iterable cannot seek: skip what the checkpointed run already consumed. This
        # is exact only if iterating `data` afresh replays the same batches.
        return itertools.islice(iter(data), start, None)
    raise TypeError(
        "`data` must be a function step -> Batch (e.g. fc.ShuffledBatches) or an iterable "
        f"of Batch; got {type(data).__name__}."
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
            stacklevel=3,
        )


def _check_resume(
    meta: dict[str, Any], model: AbstractLearnedEnergy, config: TrainConfig, path: Any, custom: bool
) -> None:
    saved_class = meta.get("model_class", type(model).__name__)
    if saved_class != type(model).__name__ or meta.get("model_config") != model.config.to_dict():
        raise ValueError(
            f"The checkpoint in {path} was written for a {saved_class} with config "
            f"{meta.get('model_config')}, not a {type(model).__name__} with "
            f"{model.config.to_dict()}. Resume with the same model class and config (the "
            "same EnergyModelConfig, say) or use a fresh checkpoint_dir."
        )
    saved = meta.get("train_config", {})
    current = config.to_dict()
    # With a user's optimiser the schedule fields of TrainConfig are not used.
    fields = _LOSS_FIELDS if custom else _TRAJECTORY_FIELDS
    diff = [
        f"{f}={saved.get(f)!r} (now {current[f]!r})" for f in fields if saved.get(f) != current[f]
    ]
    was = meta.get("custom_optimizer", False)
    if was != custom:
        names = {True: "your optimizer", False: "the default optimizer"}
        diff.append(f"{names[was]} (now {names[custom]})")
    if diff:
        raise ValueError(
            f"The checkpoint in {path} was written with different training settings: "
            + ", ".join(diff)
            + "; an exact resume needs the same. Use a fresh checkpoint_dir to start over."
        )


def _resume(
    checkpointer: Checkpointer,
    state: TrainState,
    key: Any,
    model: AbstractLearnedEnergy,
    config: TrainConfig,
    custom: bool,
    on_corrupt: str,
    existed: bool,
    who: str = "fit",
) -> tuple[int, TrainState, Any, dict[str, Any] | None]:
    """Restores the newest checkpoint (or, with `on_corrupt="fallback"`, the newest
    intact one). Returns `(start, state, key, meta)`; `meta` is None when starting anew."""
    steps = sorted(checkpointer.all_steps(), reverse=True)
    where = checkpointer.directory
    if not steps:
        if existed:
            logger.warning(
                "%s: checkpoint_dir %s exists but holds no checkpoint: training starts from "
                "step 0. (If checkpoints were there before, they were deleted.)",
                who,
                where,
            )
        else:
            logger.info("%s: no checkpoint in %s; training starts from step 0.", who, where)
        return 0, state, key, None
    broken: list[tuple[int, CheckpointError]] = []
    for step in steps:
        try:
            meta = checkpointer.read_meta(step)
            # Settings that differ are the caller's mistake, not a corruption: raised
            # as they are, never skipped over.
            _check_resume(meta, model, config, where, custom)
            state, key = _restore(checkpointer, step, state, key)
        except CheckpointError as e:
            if on_corrupt == "raise":
                older = sorted(s for s in steps if s < step)
                raise CheckpointError(
                    f"{e} To go on from the newest intact older checkpoint "
                    f"(steps {older} remain), call {who}(..., on_corrupt='fallback'); or "
                    f"delete {checkpointer.step_path(step)}; or use a fresh checkpoint_dir "
                    "to start over."
                    if older
                    else f"{e} No older checkpoint is left: delete "
                    f"{checkpointer.step_path(step)} (or use a fresh checkpoint_dir) to "
                    "start over from step 0."
                ) from e.__cause__
            broken.append((step, e))
            logger.warning("%s: %s Falling back to an older checkpoint.", who, e)
            continue
        if broken:
            checkpointer.set_aside([s for s, _ in broken])
            logger.warning(
                "%s: resuming from step %d, the newest intact checkpoint in %s; the broken "
                "checkpoint(s) at step(s) %s were moved aside to %s.",
                who,
                step,
                where,
                [s for s, _ in broken],
                checkpointer.aside_dir,
            )
        else:
            logger.info("%s: resuming from the checkpoint at step %d in %s.", who, step, where)
        return step, state, key, meta
    raise CheckpointError(
        f"Every checkpoint in {where} (steps {steps}) is broken; the newest: {broken[0][1]} "
        "Delete them or use a fresh checkpoint_dir to start over from step 0."
    )


def fit(
    model: AbstractLearnedEnergy,
    data: Callable[[int], Batch] | Iterable[Batch],
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
    progress: bool = True,
) -> FitResult:
    """Trains a learned energy with InfoNCE: checkpointed, resumable, data-parallel.

    Each step scores all pairs of the batch ([`flowcorrect.info_nce`][]) plus any extra
    negatives and applies an optax optimiser: by default global-norm clipping and AdamW
    on a warm-up + cosine schedule ([`flowcorrect.make_optimizer`][]). Only the energy
    model trains; `to_context` (e.g. the frozen
    policy's prefix pass) is run inside the compiled step under `stop_gradient`.

    **Data and exact resume.** `data` is either a function `step -> Batch` (e.g.
    [`flowcorrect.ShuffledBatches`][]), which makes resuming exact: the run continues
    with the very batch it would have seen; or an iterable of batches, of which a
    resumed run skips the ones already used (exact only if iterating it again replays
    the same batches). Dropout and negatives draw from `fold_in(key, step)`. A step whose
    loss, gradients or updates are not finite (a NaN or inf row in its batch) is skipped:
    the parameters and optimiser state stay as they were, the history counts it in
    `skipped_steps`, and one warning at the end gives the total;
    [`flowcorrect.ShuffledBatches`][] refuses a data set with non-finite values up
    front. With `checkpoint_dir`, a run killed at any point and started again with the
    same arguments resumes from its newest checkpoint and ends with the same parameters
    as an uninterrupted run (the PRNG key stored in the checkpoint is used).

    **Several devices.** With `mesh` (see [`flowcorrect.data_parallel_mesh`][]) each
    batch is split along its first axis over the mesh's `"batch"` axis and the
    parameters are replicated; the loss is the same as on one device up to float
    rounding. Under `jax.distributed`, every process calls `fit` alike and `data`
    returns that process's rows of the global batch.

    **Arguments:**

    - `model`: the learned energy to train: any [`flowcorrect.AbstractLearnedEnergy`][]
        ([`flowcorrect.EnergyModel`][], a fresh one in training mode;
        [`flowcorrect.MLPEnergy`][]; your own subclass).
    - `data`: batches, as above. A [`flowcorrect.Batch`][] has contexts, expert chunks,
        and optionally precomputed negatives (e.g. policy samples).
    - `key`: a PRNG key for dropout and negatives.
    - `config`: a [`flowcorrect.TrainConfig`][].
    - `optimizer`: any `optax.GradientTransformation`, applied to the model's float
        arrays; `None` (default) is `make_optimizer(config)`. With your own, the
        schedule fields of `config` (`learning_rate`, `warmup_steps`,
        `final_learning_rate`, `weight_decay`, `clip_norm`) are unused and the history
        has no `lr`. Pass the same object to a resumed run.
    - `negatives`: generators of extra negatives ([`flowcorrect.NoiseNegatives`][],
        [`flowcorrect.PolicyNegatives`][], ...), appended to `Batch.negatives`.
    - `to_context`: turns `Batch.context` (raw observations) into what the model's
        `encode` reads, batched (a [`flowcorrect.TokenContext`][] for an
        `EnergyModel`); `None` if batches hold contexts already.
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
        [`flowcorrect.evaluate`][], run at the end (and every `config.eval_every` steps).
    - `callback`: called as `callback(step, metrics)` at every logging step.
    - `progress`: show a tqdm progress bar with the loss, the top-1 and pairwise
        accuracies, E_pos and E_neg.

    **Returns:**

    A [`flowcorrect.FitResult`][]: `(model, ema_model, history, report)`.
    """
    check_learned(model, "fit")
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
    negatives = tuple(negatives)
    for n in negatives:
        if not isinstance(n, AbstractNegatives):
            raise TypeError(f"`negatives` must hold AbstractNegatives; got {type(n).__name__}.")
    if mesh is not None:
        _check_mesh(mesh)
    key = typed_key(jnp.asarray(key) if not isinstance(key, jax.Array) else key)

    if optimizer is None:
        optimizer = _optimizer(**{f: getattr(config, f) for f in _OPTIMIZER_FIELDS})
    schedule_lr = None if custom else make_schedule(config)
    step_config = _StepConfig(**{f: getattr(config, f) for f in _LOSS_FIELDS})
    state = _replicate(_initial_state(model, config, optimizer), mesh)
    key = _replicate(key, mesh)
    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    start = 0

    checkpointer = None
    if checkpoint_dir is not None:
        existed = pathlib.Path(checkpoint_dir).exists()
        checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
    try:
        if checkpointer is not None:
            start, state, key, meta = _resume(
                checkpointer, state, key, model, config, custom, on_corrupt, existed
            )
            if meta is not None:
                history = list(meta.get("history", []))
                window = list(meta.get("window", []))

        bar = tqdm(
            total=config.num_steps, initial=start, disable=not progress, desc="fit", leave=False
        )
        pending: list[dict[str, Array]] = []
        batches = _batches(data, start)
        with bar:
            for step in range(start, config.num_steps):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ValueError(
                        f"`data` ran out after {step} batches; config.num_steps is "
                        f"{config.num_steps}."
                    ) from None
                if not isinstance(batch, Batch):
                    raise TypeError(
                        f"`data` gave a {type(batch).__name__} at step {step}; it must give "
                        "flowcorrect.Batch objects."
                    )
                batch = _place_batch(batch, mesh)
                state, metrics = _train_step(
                    state, batch, key, optimizer, step_config, negatives, to_context, mesh
                )
                pending.append(metrics)
                done = step + 1
                bar.update(1)
                log_now = done % config.log_every == 0 or done == config.num_steps
                save_now = checkpointer is not None and (
                    done % config.checkpoint_every == 0 or done == config.num_steps
                )
                if log_now or save_now:
                    # One device-to-host transfer per interval, not one per step.
                    window += [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
                    pending = []
                if log_now:
                    entry: dict[str, float] = {"step": done}
                    if schedule_lr is not None:
                        entry["lr"] = float(schedule_lr(step))
                    entry.update(_mean(window))
                    window = []
                    eval_every = config.eval_every
                    if held_out is not None and eval_every and done % eval_every == 0:
                        rep = _held_out(
                            state,
                            held_out,
                            held_out_policy_samples,
                            eval_corrector,
                            config,
                            to_context,
                            mesh,
                        )
                        entry.update({f"held_out/{k}": v for k, v in rep.to_dict().items()})
                    history.append(entry)
                    bar.set_postfix(
                        loss=f"{entry['loss']:.3f}",
                        top1=f"{entry['top1_accuracy']:.2f}",
                        pairwise=f"{entry['pairwise_accuracy']:.2f}",
                        E_pos=f"{entry['e_pos']:.3f}",
                        E_neg=f"{entry['e_neg']:.3f}",
                    )
                    if callback is not None:
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
                    }
                    _save(checkpointer, done, state, key, meta)
    finally:
        if checkpointer is not None:
            checkpointer.close()

    report = None
    if held_out is not None:
        report = _held_out(
            state, held_out, held_out_policy_samples, eval_corrector, config, to_context, mesh
        )
    warn_skipped("fit", history, config.num_steps)
    trained = eqx.nn.inference_mode(state.model)
    ema = None if state.ema is None else eqx.nn.inference_mode(state.ema)
    return FitResult(trained, ema, history, report)


def _held_out(
    state: TrainState,
    held_out: Batch,
    policy_samples: Any,
    corrector: Any,
    config: TrainConfig,
    to_context: Any,
    mesh: Mesh | None,
) -> EvalReport:
    # The moving average, when kept, is the model one would deploy.
    model = state.model if state.ema is None else state.ema
    return evaluate(
        model,
        _replicate(held_out, mesh),
        policy_samples=_replicate(policy_samples, mesh),
        corrector=corrector,
        tau=config.tau,
        pair_chunk=config.pair_chunk,
        to_context=to_context,
    )
