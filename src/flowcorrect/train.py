"""Training learned energies: the loop, its losses, data, negatives and reports."""

from ._train.batch import (
    Batch as Batch,
)
from ._train.checkpoint import (
    CheckpointError as CheckpointError,
)
from ._train.config import (
    TrainConfig as TrainConfig,
    make_optimizer as make_optimizer,
)
from ._train.data import (
    ShuffledBatches as ShuffledBatches,
)
from ._train.infonce import (
    energy_matrix as energy_matrix,
    info_nce as info_nce,
    pair_energies as pair_energies,
)
from ._train.loop import (
    FitResult as FitResult,
    fit as fit,
)
from ._train.loss import (
    AbstractLoss as AbstractLoss,
    InfoNCELoss as InfoNCELoss,
)
from ._train.negatives import (
    AbstractNegatives as AbstractNegatives,
    NoiseNegatives as NoiseNegatives,
    PolicyNegatives as PolicyNegatives,
    SwapDimNegatives as SwapDimNegatives,
    TimeShiftNegatives as TimeShiftNegatives,
    policy_negatives as policy_negatives,
)
from ._train.progress import (
    AbstractProgressMeter as AbstractProgressMeter,
    NoProgressMeter as NoProgressMeter,
    TqdmProgressMeter as TqdmProgressMeter,
)
from ._train.report import (
    EvalReport as EvalReport,
    evaluate as evaluate,
)
from ._train.sharding import (
    data_parallel_mesh as data_parallel_mesh,
)

__all__ = [
    "AbstractLoss",
    "AbstractNegatives",
    "AbstractProgressMeter",
    "Batch",
    "CheckpointError",
    "data_parallel_mesh",
    "energy_matrix",
    "EvalReport",
    "evaluate",
    "fit",
    "FitResult",
    "info_nce",
    "InfoNCELoss",
    "make_optimizer",
    "NoiseNegatives",
    "NoProgressMeter",
    "pair_energies",
    "policy_negatives",
    "PolicyNegatives",
    "ShuffledBatches",
    "SwapDimNegatives",
    "TimeShiftNegatives",
    "TqdmProgressMeter",
    "TrainConfig",
]
