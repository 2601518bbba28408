"""flowcorrect: test-time correction of flow-matching policies with learned energies."""

import importlib.metadata

from . import (
    configs as configs,
    constraints as constraints,
    rtc as rtc,
    train as train,
    verifiers as verifiers,
)

# -- hard constraints on chunks: projections, violations, placements --
# -- time conventions of the flow --
from ._conventions import (
    AbstractConvention as AbstractConvention,
    OpenPI as OpenPI,
    Reverse as Reverse,
)
from ._correct import (
    CorrectionInfo as CorrectionInfo,
    correct as correct,
)
from ._correctors.base import AbstractCorrector as AbstractCorrector
from ._correctors.recipes import reference_recipe as reference_recipe
from ._correctors.steps import (
    GradientStep as GradientStep,
    LangevinStep as LangevinStep,
    OptaxStep as OptaxStep,
)
from ._correctors.wrappers import (
    Backtrack as Backtrack,
    Chain as Chain,
    ClipStep as ClipStep,
    Mask as Mask,
    ProjectBounds as ProjectBounds,
    Repeat as Repeat,
)
from ._custom_types import IndexLike as IndexLike, RealLike as RealLike
from ._energy import (
    AbstractEnergy as AbstractEnergy,
    BoundEnergy as BoundEnergy,
    BoundsPenalty as BoundsPenalty,
    EnergyFn as EnergyFn,
    Ensemble as Ensemble,
    FnEnergy as FnEnergy,
    OnActionDims as OnActionDims,
    SplitEnergyFn as SplitEnergyFn,
    SquaredDistance as SquaredDistance,
    SumEnergy as SumEnergy,
    as_energy as as_energy,
    bind as bind,
)

# -- real-time chunking --
# -- flow sampler --
from ._flow.flow import Flow as Flow
from ._flow.integrate import Stepper as Stepper, integrate as integrate
from ._flow.schedules import (
    AbstractSchedule as AbstractSchedule,
    AbstractWeight as AbstractWeight,
    ConstantWeight as ConstantWeight,
    EveryNth as EveryNth,
    EveryStep as EveryStep,
    FnWeight as FnWeight,
    LastSteps as LastSteps,
    PowerWeight as PowerWeight,
)
from ._flow.selection import (
    AbstractSelection as AbstractSelection,
    ByEnergy as ByEnergy,
    ClusterMean as ClusterMean,
    Medoid as Medoid,
    NearMean as NearMean,
    Selected as Selected,
    SoftmaxSample as SoftmaxSample,
)

# -- energy model and training --
from ._model.base import (
    AbstractLearnedEnergy as AbstractLearnedEnergy,
    LearnedEnergyConfig as LearnedEnergyConfig,
)
from ._model.config import EnergyModelConfig as EnergyModelConfig
from ._model.context import TokenContext as TokenContext
from ._model.energy_model import (
    EmbeddedActions as EmbeddedActions,
    EncodedContext as EncodedContext,
    EnergyModel as EnergyModel,
)
from ._model.mlp_energy import (
    MLPEnergy as MLPEnergy,
    MLPEnergyConfig as MLPEnergyConfig,
)
from ._model.pooled import (
    PooledContext as PooledContext,
    pool_tokens as pool_tokens,
)
from ._model.serialise import (
    ModelFileError as ModelFileError,
    load_model as load_model,
    save_model as save_model,
)

# -- placements: where the correction goes relative to the flow --
from ._placements.base import (
    AbstractInterleaved as AbstractInterleaved,
    AbstractPlacement as AbstractPlacement,
    InterleavedInfo as InterleavedInfo,
)
from ._placements.best_of_n import (
    BestOfN as BestOfN,
    BestOfNInfo as BestOfNInfo,
    EarlyBestOfN as EarlyBestOfN,
    EarlyBestOfNInfo as EarlyBestOfNInfo,
)
from ._placements.common import StepCounts as StepCounts
from ._placements.denoised import Denoised as Denoised
from ._placements.guided import Guided as Guided
from ._placements.plain import Plain as Plain
from ._placements.post_hoc import (
    PostHoc as PostHoc,
    PostHocInfo as PostHocInfo,
)
from ._placements.project import (
    Project as Project,
    ProjectInfo as ProjectInfo,
)
from ._placements.rtc import (
    RealTimeChunking as RealTimeChunking,
    RealTimeChunkingInfo as RealTimeChunkingInfo,
)

# -- a Pi0-shaped reference policy --
from ._policies.pi0_shaped import (
    Pi0ShapedConfig as Pi0ShapedConfig,
    Pi0ShapedObservation as Pi0ShapedObservation,
    Pi0ShapedPolicy as Pi0ShapedPolicy,
    Pi0ShapedPrefix as Pi0ShapedPrefix,
)
from ._policy import (
    AbstractBatchedPolicy as AbstractBatchedPolicy,
    AbstractPolicy as AbstractPolicy,
    VelocityPolicy as VelocityPolicy,
)
from ._sample import (
    SampleInfo as SampleInfo,
    sample as sample,
)

# Names that moved into the subpackages: importable from the top level for one more
# release, with a DeprecationWarning that names the new place.
_MOVED = {
    "AbstractConstraint": "constraints",
    "AbstractDelays": "rtc",
    "AbstractLoss": "train",
    "AbstractNegatives": "train",
    "AbstractProgressMeter": "train",
    "AbstractVerifierLoss": "verifiers",
    "accepts_token_time": "rtc",
    "ActionQueue": "rtc",
    "AllOf": "constraints",
    "auc": "verifiers",
    "Ball": "constraints",
    "Batch": "train",
    "Box": "constraints",
    "BradleyTerryLoss": "verifiers",
    "candidate_energies": "verifiers",
    "CheckpointError": "train",
    "ChunkArrival": "rtc",
    "ChunkRequest": "rtc",
    "clean_time": "rtc",
    "ConditionedExample": "rtc",
    "data_parallel_mesh": "train",
    "energy_matrix": "train",
    "EvalReport": "train",
    "evaluate": "train",
    "ExponentialDelays": "rtc",
    "FeasibleFirst": "constraints",
    "fit": "train",
    "fit_verifier": "verifiers",
    "FitResult": "train",
    "FnConstraint": "constraints",
    "HalfSpace": "constraints",
    "info_nce": "train",
    "InfoNCELoss": "train",
    "InRobotSpace": "constraints",
    "LabelledBatch": "verifiers",
    "LatencyTracker": "rtc",
    "load_rollouts": "verifiers",
    "make_optimizer": "train",
    "masked_flow_loss": "rtc",
    "MaxJerk": "constraints",
    "MaxStepChange": "constraints",
    "NoiseNegatives": "train",
    "NoProgressMeter": "train",
    "outcome_batches": "verifiers",
    "OutcomeLoss": "verifiers",
    "OutsideBall": "constraints",
    "pair_batches": "verifiers",
    "pair_energies": "train",
    "PairBatch": "verifiers",
    "PiGDMWeight": "rtc",
    "policy_negatives": "train",
    "PolicyNegatives": "train",
    "prefix_conditioned_loss": "rtc",
    "PrefixConditioned": "rtc",
    "PrefixConditioning": "rtc",
    "Rollouts": "verifiers",
    "RolloutWriter": "verifiers",
    "rtc_prefix_weights": "rtc",
    "RTCEnergy": "rtc",
    "ShuffledBatches": "train",
    "similar_state_pairs": "verifiers",
    "SwapDimNegatives": "train",
    "TimeShiftNegatives": "train",
    "token_times": "rtc",
    "TqdmProgressMeter": "train",
    "TrainConfig": "train",
    "UniformDelays": "rtc",
    "verifier_report": "verifiers",
    "VerifierReport": "verifiers",
    "ViolationEnergy": "constraints",
}


def __getattr__(name: str):
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'flowcorrect' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"flowcorrect.{name} is now flowcorrect.{where}.{name}; the top-level name "
        "will be removed in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"flowcorrect.{where}"), name)


def __dir__():
    return sorted(__all__)


__all__ = [
    "__version__",
    "AbstractBatchedPolicy",
    "AbstractConvention",
    "AbstractCorrector",
    "AbstractEnergy",
    "AbstractInterleaved",
    "AbstractLearnedEnergy",
    "AbstractPlacement",
    "AbstractPolicy",
    "AbstractSchedule",
    "AbstractSelection",
    "AbstractWeight",
    "as_energy",
    "Backtrack",
    "BestOfN",
    "BestOfNInfo",
    "bind",
    "BoundEnergy",
    "BoundsPenalty",
    "ByEnergy",
    "Chain",
    "ClipStep",
    "ClusterMean",
    "ConstantWeight",
    "configs",
    "constraints",
    "correct",
    "CorrectionInfo",
    "Denoised",
    "EarlyBestOfN",
    "EarlyBestOfNInfo",
    "EmbeddedActions",
    "EncodedContext",
    "EnergyFn",
    "EnergyModel",
    "EnergyModelConfig",
    "Ensemble",
    "EveryNth",
    "EveryStep",
    "Flow",
    "FnEnergy",
    "FnWeight",
    "GradientStep",
    "Guided",
    "integrate",
    "InterleavedInfo",
    "LangevinStep",
    "LastSteps",
    "LearnedEnergyConfig",
    "load_model",
    "Mask",
    "Medoid",
    "MLPEnergy",
    "MLPEnergyConfig",
    "ModelFileError",
    "NearMean",
    "OnActionDims",
    "OpenPI",
    "OptaxStep",
    "Pi0ShapedConfig",
    "Pi0ShapedObservation",
    "Pi0ShapedPolicy",
    "Pi0ShapedPrefix",
    "Plain",
    "pool_tokens",
    "PooledContext",
    "PostHoc",
    "PostHocInfo",
    "PowerWeight",
    "Project",
    "ProjectBounds",
    "ProjectInfo",
    "RealTimeChunking",
    "RealTimeChunkingInfo",
    "reference_recipe",
    "Repeat",
    "Reverse",
    "rtc",
    "sample",
    "Stepper",
    "RealLike",
    "IndexLike",
    "SampleInfo",
    "save_model",
    "Selected",
    "SoftmaxSample",
    "SplitEnergyFn",
    "SquaredDistance",
    "StepCounts",
    "SumEnergy",
    "TokenContext",
    "train",
    "VelocityPolicy",
    "verifiers",
]

try:
    __version__ = importlib.metadata.version("flowcorrect")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0+unknown"
