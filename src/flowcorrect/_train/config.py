"""Training settings: the hyperparameters and the default optimiser they build."""

import dataclasses
import functools
import math
from typing import Any

import jax
import optax

from .._misc import is_int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of [`flowcorrect.train.fit`][], serialisable to JSON.

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
    - `tau`: InfoNCE temperature. Default 0.5. This and the next three fields set
        [`flowcorrect.train.fit`][]'s default loss, [`flowcorrect.train.InfoNCELoss`][].
    - `grad_penalty`, `grad_margin`: the gradient penalty of [`flowcorrect.train.info_nce`][].
        Default 0.1 and 0: on, because an energy sharp enough to classify pairs can
        still be useless for correction (see the training docs for measured effects);
        set `grad_penalty=0.0` for the reference's plain InfoNCE.
    - `pair_chunk`: score this many contexts at a time in the loss (memory); `None` = all.
    - `log_every`: average the metrics over this many steps, append them to the history,
        show them on the progress bar and call `callback`. Default 50.
    - `eval_every`: run [`flowcorrect.train.evaluate`][] on the held-out data this often;
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
            if not (is_int(v) and v >= 1):
                raise ValueError(f"`{name}` must be an int >= 1; got {v!r}.")
        if not (
            isinstance(self.warmup_steps, int)
            and not isinstance(self.warmup_steps, bool)
            and self.warmup_steps >= 0
        ):
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {self.warmup_steps!r}.")
        for name in ("pair_chunk", "eval_every"):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 1):
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

    This is the optimiser [`flowcorrect.train.fit`][] uses when given none.

    **Arguments:**

    - `config`: a [`flowcorrect.train.TrainConfig`][]; its `learning_rate`, `warmup_steps`,
        `final_learning_rate` and `num_steps` set the schedule
        ([`flowcorrect.train.TrainConfig`][] says how), `clip_norm` the global-norm clip and
        `weight_decay` AdamW's decoupled weight decay.

    **Returns:**

    An `optax.GradientTransformation`; weight decay applies to matrices only (arrays of
    two or more dimensions).
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
OPTIMIZER_FIELDS = (
    "num_steps", "learning_rate", "warmup_steps", "final_learning_rate", "weight_decay",
    "clip_norm",
)  # fmt: skip
LOSS_FIELDS = ("tau", "grad_penalty", "grad_margin", "pair_chunk", "ema_decay")
TRAJECTORY_FIELDS = OPTIMIZER_FIELDS + LOSS_FIELDS


@functools.cache
def cached_optimizer(**fields: Any) -> optax.GradientTransformation:
    # One optimiser object per setting: the compiled step is cached on its identity, so
    # fits with the same settings (a resume, a test suite) compile once.
    return make_optimizer(TrainConfig(**fields))
