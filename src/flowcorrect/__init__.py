"""flowcorrect: test-time correction of flow-matching policies with learned energies."""

import importlib.metadata

# -- hard constraints on chunks: projections, violations, placements --
from ._constraints.all_of import AllOf as AllOf
from ._constraints.ball import Ball as Ball, OutsideBall as OutsideBall
from ._constraints.base import AbstractConstraint as AbstractConstraint
from ._constraints.box import Box as Box
from ._constraints.energy import ViolationEnergy as ViolationEnergy
from ._constraints.fn import FnConstraint as FnConstraint
from ._constraints.halfspace import HalfSpace as HalfSpace
from ._constraints.jerk import MaxJerk as MaxJerk
from ._constraints.robot import InRobotSpace as InRobotSpace
from ._constraints.selection import FeasibleFirst as FeasibleFirst
from ._constraints.step import MaxStepChange as MaxStepChange

# -- time conventions of the flow --
from ._conventions import (
    AbstractConvention as AbstractConvention,
    OpenPI as OpenPI,
    Reverse as Reverse,
)
from ._correct import CorrectionInfo as CorrectionInfo, correct as correct
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
from ._executor import (
    ActionQueue as ActionQueue,
    ChunkArrival as ChunkArrival,
    ChunkRequest as ChunkRequest,
    LatencyTracker as LatencyTracker,
)

# -- flow sampler --
from ._flow.flow import Flow as Flow
from ._flow.integrate import integrate as integrate
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
from ._model.mlp_energy import MLPEnergy as MLPEnergy, MLPEnergyConfig as MLPEnergyConfig
from ._model.pooled import PooledContext as PooledContext, pool_tokens as pool_tokens
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
from ._placements.post_hoc import PostHoc as PostHoc, PostHocInfo as PostHocInfo
from ._placements.project import Project as Project, ProjectInfo as ProjectInfo
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
from ._rtc import (
    PiGDMWeight as PiGDMWeight,
    RTCEnergy as RTCEnergy,
    rtc_prefix_weights as rtc_prefix_weights,
)
from ._rtc_training import (
    AbstractDelays as AbstractDelays,
    ConditionedExample as ConditionedExample,
    ExponentialDelays as ExponentialDelays,
    PrefixConditioned as PrefixConditioned,
    PrefixConditioning as PrefixConditioning,
    UniformDelays as UniformDelays,
    accepts_token_time as accepts_token_time,
    clean_time as clean_time,
    masked_flow_loss as masked_flow_loss,
    prefix_conditioned_loss as prefix_conditioned_loss,
    token_times as token_times,
)
from ._sample import SampleInfo as SampleInfo, sample as sample
from ._train.batch import Batch as Batch
from ._train.checkpoint import CheckpointError as CheckpointError
from ._train.config import TrainConfig as TrainConfig, make_optimizer as make_optimizer
from ._train.data import ShuffledBatches as ShuffledBatches
from ._train.infonce import (
    energy_matrix as energy_matrix,
    info_nce as info_nce,
    pair_energies as pair_energies,
)
from ._train.loop import FitResult as FitResult, fit as fit
from ._train.loss import AbstractLoss as AbstractLoss, InfoNCELoss as InfoNCELoss
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
from ._train.report import EvalReport as EvalReport, evaluate as evaluate
from ._train.sharding import data_parallel_mesh as data_parallel_mesh

# -- verifiers from the policy's own rollouts --
from ._verifiers.report import (
    VerifierReport as VerifierReport,
    auc as auc,
    candidate_energies as candidate_energies,
    verifier_report as verifier_report,
)
from ._verifiers.rollouts import (
    Rollouts as Rollouts,
    RolloutWriter as RolloutWriter,
    load_rollouts as load_rollouts,
)
from ._verifiers.train import (
    AbstractVerifierLoss as AbstractVerifierLoss,
    BradleyTerryLoss as BradleyTerryLoss,
    LabelledBatch as LabelledBatch,
    OutcomeLoss as OutcomeLoss,
    PairBatch as PairBatch,
    fit_verifier as fit_verifier,
    outcome_batches as outcome_batches,
    pair_batches as pair_batches,
    similar_state_pairs as similar_state_pairs,
)

try:
    __version__ = importlib.metadata.version("flowcorrect")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0+unknown"
