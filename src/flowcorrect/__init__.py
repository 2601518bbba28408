"""flowcorrect: test-time correction of flow-matching policies with learned energies."""

import importlib.metadata

from ._correct import (
    CorrectionInfo as CorrectionInfo,
    correct as correct,
    correct_one as correct_one,
)
from ._correctors.base import AbstractCorrector as AbstractCorrector
from ._correctors.recipes import reference_recipe as reference_recipe
from ._correctors.steps import (
    GradientStep as GradientStep,
    LangevinStep as LangevinStep,
    OptaxStep as OptaxStep,
)
from ._correctors.wrappers import (
    ActionDimMask as ActionDimMask,
    Backtrack as Backtrack,
    Chain as Chain,
    ClipStep as ClipStep,
    HorizonMask as HorizonMask,
    ProjectBounds as ProjectBounds,
    Repeat as Repeat,
)
from ._energy import (
    AbstractEnergy as AbstractEnergy,
    BoundEnergy as BoundEnergy,
    BoundsPenalty as BoundsPenalty,
    EnergyFn as EnergyFn,
    SplitEnergyFn as SplitEnergyFn,
    SquaredDistance as SquaredDistance,
    SumEnergy as SumEnergy,
    prepare as prepare,
)

# -- flow sampler (issue 3) --

# -- energy model and training (issue 4) --

__version__ = importlib.metadata.version("flowcorrect")
