"""A constraint's violation as an energy, so that guidance and ranking can use it."""


from .._custom_types import Actions, Context, Encoded, Scalar
from .._energy import AbstractEnergy
from .base import AbstractConstraint, check_constraint


class ViolationEnergy(AbstractEnergy):
    """The violation of a constraint as an energy; the context is ignored.

    Low energy is feasible: `fc.Guided` with this energy steers the flow towards the
    feasible set during the flow steps (the violation's gradient, pulled back through
    the policy's velocity), so that a projection afterwards moves the chunk little:
    `fc.sample(..., energy=fc.constraints.ViolationEnergy(c),
    placement=fc.Project(c, fc.Guided()))`.
    Add it to a learned energy with [`flowcorrect.SumEnergy`][].

    **Arguments:**

    - `constraint`: any [`flowcorrect.constraints.AbstractConstraint`][].
    """

    constraint: AbstractConstraint

    def __init__(self, constraint: AbstractConstraint):
        check_constraint(constraint, "ViolationEnergy `constraint`")
        self.constraint = constraint

    def encode(self, context: Context) -> Encoded:
        return None

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        return self.constraint.violation(actions)
