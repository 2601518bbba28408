"""Checkpoints of a training run: saving its state, and resuming exactly from one."""

import logging
from typing import Any

import equinox as eqx
import jax

from .._model.base import AbstractLearnedEnergy
from .checkpoint import Checkpointer, CheckpointError
from .config import LOSS_FIELDS, TRAJECTORY_FIELDS, TrainConfig
from .state import TrainState

logger = logging.getLogger("flowcorrect")


def _log(level: int, msg: str, *args: Any) -> None:
    # Under jax.distributed every process resumes alike: one of them says so.
    if jax.process_index() == 0:
        logger.log(level, msg, *args, stacklevel=2)


def save(
    checkpointer: Checkpointer, step: int, state: TrainState, key: Any, meta: dict[str, Any]
) -> None:
    tree = (eqx.filter(state, eqx.is_array), jax.random.key_data(key))
    checkpointer.save(step, tree, meta)


def restore(
    checkpointer: Checkpointer, step: int, like: TrainState, key: Any
) -> tuple[TrainState, Any]:
    """Checkpoint `step` restored into the structure (and devices) of `like` and `key`."""
    arrays, static = eqx.partition(like, eqx.is_array)
    arrays, key_data = checkpointer.restore(step, (arrays, jax.random.key_data(key)))
    return eqx.combine(arrays, static), jax.random.wrap_key_data(key_data)


def _check_resume(
    meta: dict[str, Any],
    model: AbstractLearnedEnergy,
    config: TrainConfig,
    path: Any,
    custom: bool,
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
    fields = LOSS_FIELDS if custom else TRAJECTORY_FIELDS
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


def resume(
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
            _log(logging.WARNING, 
                "%s: checkpoint_dir %s exists but holds no checkpoint: training starts from "
                "step 0. (If checkpoints were there before, they were deleted.)",
                who,
                where,
            )
        else:
            _log(logging.INFO, "%s: no checkpoint in %s; training starts from step 0.", who, where)
        return 0, state, key, None
    broken: list[tuple[int, CheckpointError]] = []
    for step in steps:
        try:
            meta = checkpointer.read_meta(step)
            # Settings that differ are the caller's mistake, not a corruption: raised
            # as they are, never skipped over.
            _check_resume(meta, model, config, where, custom)
            state, key = restore(checkpointer, step, state, key)
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
            _log(logging.WARNING, "%s: %s Falling back to an older checkpoint.", who, e)
            continue
        if broken:
            checkpointer.set_aside([s for s, _ in broken])
            _log(logging.WARNING, 
                "%s: resuming from step %d, the newest intact checkpoint in %s; the broken "
                "checkpoint(s) at step(s) %s were moved aside to %s.",
                who,
                step,
                where,
                [s for s, _ in broken],
                checkpointer.aside_dir,
            )
        else:
            _log(
                logging.INFO, "%s: resuming from the checkpoint at step %d in %s.", who, step, where
            )
        return step, state, key, meta
    raise CheckpointError(
        f"Every checkpoint in {where} (steps {steps}) is broken; the newest: {broken[0][1]} "
        "Delete them or use a fresh checkpoint_dir to start over from step 0."
    )
