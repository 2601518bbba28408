"""The intersection of constraints, projected by Dykstra's alternating projections."""


from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._custom_types import Actions, RealLike, Scalar
from .._misc import count
from .base import (
    AbstractConstraint,
    acc_dtype,
    check_chunk,
    check_constraint,
    l2,
    relative_tolerance,
    rounding_tolerance,
)


class AllOf(AbstractConstraint):
    """Every one of several constraints at once (their intersection).

    Projection: Dykstra's alternating projections (Boyle and Dykstra 1986), which
    converge to the Euclidean projection onto the intersection of closed convex sets
    (plain alternating projections only reach some point of it). Each cycle projects
    onto every member in turn, carrying one correction per member; it runs in float32
    or wider and stops once the iterate satisfies every member to its tolerance plus
    `tol` relative to the chunk's magnitude and a whole cycle moved it by less than
    that, or after `max_steps` cycles. A member that is not convex
    ([`flowcorrect.constraints.OutsideBall`][]) voids the guarantee; `solve` says whether the
    stopping rule was met. Violation: the Euclidean norm of the members' violations.

    **Arguments:**

    - `*constraints`: the members, at least one.
    - `tol`: the relative tolerance (default `1e-5`).
    - `max_steps`: the most cycles (default 200). Static.

    !!! example

        ```python
        fcc = fc.constraints
        limits = fcc.AllOf(fcc.Box(-1.0, 1.0), fcc.MaxStepChange(0.1))
        safe, steps, converged = limits.solve(chunk)
        ```
    """

    constraints: tuple[AbstractConstraint, ...]
    tol: Float[Array, ""]
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        *constraints: AbstractConstraint | Sequence[AbstractConstraint],
        tol: RealLike = 1e-5,
        max_steps: int = 200,
    ):
        if not constraints:
            raise ValueError(
                "AllOf needs at least one constraint: AllOf(fc.constraints.Box(-1, 1), ...)."
            )
        if len(constraints) == 1 and isinstance(constraints[0], list | tuple):
            raise TypeError(
                "AllOf takes the constraints as separate arguments: AllOf(*constraints), "
                "not AllOf(constraints)."
            )
        for i, c in enumerate(constraints):
            check_constraint(c, f"AllOf constraint {i}")
        self.constraints = tuple(constraints)
        self.tol = relative_tolerance("AllOf", tol, "1e-5")
        self.max_steps = count("AllOf", "max_steps", max_steps, 1, "200")

    def solve(self, chunk: Actions) -> tuple[Actions, Int[Array, ""], Bool[Array, ""]]:
        """The projection with its diagnostics.

        **Returns:**

        `(projected, num_cycles, converged)`: the chunk in its dtype, how many Dykstra
        cycles ran, and whether the stopping rule was met (rather than the cap).
        """
        check_chunk("AllOf", chunk)
        acc = acc_dtype(chunk)
        y = chunk.astype(acc)

        def feasible_and_small(x, moved):
            slack = rounding_tolerance(self.tol, x)
            members = [c.violation(x) <= c.tolerance(x) + slack for c in self.constraints]
            return jnp.all(jnp.stack(members)) & (moved <= slack)

        def cycle(x, corrections):
            new = []
            for c, p in zip(self.constraints, corrections, strict=True):
                z = c.project(x + p).astype(acc)
                new.append(x + p - z)
                x = z
            return x, tuple(new)

        def cond(state):
            _, _, k, done = state
            return jnp.logical_not(done) & (k < self.max_steps)

        def body(state):
            x, corrections, k, _ = state
            x_new, corrections = cycle(x, corrections)
            moved = l2(x_new - x)
            stop = feasible_and_small(x_new, moved) | jnp.logical_not(jnp.isfinite(moved))
            return x_new, corrections, k + 1, stop

        corrections = tuple(jnp.zeros_like(y) for _ in self.constraints)
        init = (y, corrections, jnp.asarray(0, jnp.int32), jnp.asarray(False))
        x, _, k, done = jax.lax.while_loop(cond, body, init)
        converged = done & jnp.all(jnp.isfinite(x))
        return x.astype(chunk.dtype), k, converged

    def after(self, past: RealLike) -> "AllOf":
        """Every member continued after `past` (see
        [`flowcorrect.constraints.AbstractConstraint.after`][])."""
        return eqx.tree_at(lambda c: c.constraints, self,
                           tuple(c.after(past) for c in self.constraints))  # fmt: skip

    def project(self, chunk: Actions) -> Actions:
        return self.solve(chunk)[0]

    def violation(self, chunk: Actions) -> Scalar:
        check_chunk("AllOf", chunk)
        acc = acc_dtype(chunk)
        return l2(jnp.stack([c.violation(chunk).astype(acc) for c in self.constraints]))

    def tolerance(self, chunk: Actions) -> Scalar:
        acc = acc_dtype(chunk)
        members = jnp.stack([c.tolerance(chunk).astype(acc) for c in self.constraints])
        return l2(members) + rounding_tolerance(self.tol, chunk)
