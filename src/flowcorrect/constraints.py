"""Hard constraints on action chunks: sets, their projections and violations,
and the energy and selection that read them (the placement is `flowcorrect.Project`)."""

from ._constraints.all_of import (
    AllOf as AllOf,
)
from ._constraints.ball import (
    Ball as Ball,
    OutsideBall as OutsideBall,
)
from ._constraints.base import (
    AbstractConstraint as AbstractConstraint,
)
from ._constraints.box import (
    Box as Box,
)
from ._constraints.continuing import (
    Continuing as Continuing,
)
from ._constraints.energy import (
    ViolationEnergy as ViolationEnergy,
)
from ._constraints.fn import (
    FnConstraint as FnConstraint,
)
from ._constraints.halfspace import (
    HalfSpace as HalfSpace,
)
from ._constraints.jerk import (
    MaxJerk as MaxJerk,
)
from ._constraints.robot import (
    InRobotSpace as InRobotSpace,
)
from ._constraints.selection import (
    FeasibleFirst as FeasibleFirst,
)
from ._constraints.step import (
    MaxStepChange as MaxStepChange,
)

__all__ = [
    "AbstractConstraint",
    "AllOf",
    "Ball",
    "Box",
    "FeasibleFirst",
    "FnConstraint",
    "Continuing",
    "HalfSpace",
    "InRobotSpace",
    "MaxJerk",
    "MaxStepChange",
    "OutsideBall",
    "ViolationEnergy",
]
