"""A best-of-N rule that prefers feasible candidates before any other rule."""


import jax
import jax.numpy as jnp

from .._flow.selection import AbstractSelection, ByEnergy, Selected, check_selection
from .._misc import MISSING, renamed, renamed_attribute
from .base import AbstractConstraint, check_constraint


class FeasibleFirst(AbstractSelection):
    """Only feasible candidates may be chosen, and `inner` chooses among them.

    A candidate is feasible when its violation is within the constraint's tolerance
    (`constraint.is_feasible`). When no usable candidate is feasible, the ones of least
    violation remain (usually one), so the chunk handed on is the nearest to feasible;
    project it afterwards for the guarantee:
    `fc.Project(c, fc.BestOfN(8, select=fc.constraints.FeasibleFirst(c)))`.

    **Arguments:**

    - `constraint`: any [`flowcorrect.constraints.AbstractConstraint`][].
    - `inner`: the rule among the remaining candidates; defaults to
        [`flowcorrect.ByEnergy`][]. With a rule that needs no energy
        (`fc.Medoid()`), no energy is needed.
    """

    constraint: AbstractConstraint
    inner: AbstractSelection

    def __init__(
        self,
        constraint: AbstractConstraint,
        inner: AbstractSelection = MISSING,
        *,
        then: AbstractSelection = MISSING,
    ):
        inner = renamed("FeasibleFirst", "inner", inner, "then", then, ByEnergy())
        # Checked before the fields are set: older jaxtyping (openpi's 0.2.36)
        # type-checks the fields first, with a vaguer message.
        check_constraint(constraint, "FeasibleFirst `constraint`")
        check_selection(inner, "FeasibleFirst `inner`")
        self.constraint = constraint
        self.inner = inner

    @property
    def needs_energy(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.needs_energy

    @property
    def then(self) -> AbstractSelection:
        """Deprecated name of `inner`."""
        return renamed_attribute("FeasibleFirst", "then", "inner", self.inner)

    def select(self, candidates, energy, ok, key) -> Selected:
        violation = jax.vmap(self.constraint.violation)(candidates)
        feasible = jax.vmap(self.constraint.is_feasible)(candidates)
        usable = ok & jnp.isfinite(violation)
        least = jnp.min(jnp.where(usable, violation, jnp.inf))
        any_feasible = jnp.any(usable & feasible)
        mask = jnp.where(any_feasible, usable & feasible, usable & (violation <= least))
        return self.inner.select(candidates, energy, mask, key)
