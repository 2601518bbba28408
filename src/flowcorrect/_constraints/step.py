"""A maximum change between consecutive actions: `|a[t + 1, d] - a[t, d]| <= max_change`."""


import equinox as eqx
from jaxtyping import Array, Float

from .._custom_types import Actions, IndexLike, RealLike, Scalar
from .._misc import count
from .base import (
    AbstractConstraint,
    acc_dtype,
    as_dims,
    check_chunk,
    check_past,
    num_dims,
    parameter,
    place,
    relative_tolerance,
    rounding_tolerance,
    select,
    with_field,
)
from .difference import (
    check_limit,
    check_previous,
    difference_violation,
    limit_for,
    project_differences,
    solve_rounding,
)


class MaxStepChange(AbstractConstraint):
    """A bound on the change between consecutive actions (a speed limit per control
    step): `|a[t + 1, d] - a[t, d]| <= max_change` for the chosen dimensions, and
    `|a[0, d] - previous[d]| <= max_change` when the action executed before the chunk
    is given.

    Projection: accelerated proximal-gradient rounds on the dual, each followed by a
    few exact active-set solves (see the module `flowcorrect._constraints.difference`),
    exact when it converges (to the rounding of a linear solve); it stops after
    `max_steps` rounds or when the KKT conditions hold to `tol` relative to the
    chunk's magnitude, and an unconverged result is made
    feasible by clamping each action against the one before it. Violation: the
    Euclidean norm of the excess `relu(|Δa| - max_change)` over every pair.

    **Arguments:**

    - `max_change`: a number `>= 0`, or one per constrained dimension.
    - `dims`: which action dimensions: `None` (every one; the default), an int `k` (the
        first `k`) or a sequence of indices. Static.
    - `previous`: the action executed before the chunk, `(action_dim,)` (the whole
        action; `dims` selects from it), or `None` (the default: the first action is
        free). An array, so a new previous action does not recompile.
    - `tol`: the relative tolerance of the projection (default `1e-5`).
    - `max_steps`: the cap on rounds of the method (default 50). Static.
    """

    max_change: Float[Array, "*limit_shape"]
    previous: Float[Array, " action_dim"] | None
    tol: Float[Array, ""]
    dims: tuple[int, ...] | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        max_change: RealLike,
        dims: IndexLike | None = None,
        previous: RealLike | None = None,
        tol: RealLike = 1e-5,
        max_steps: int = 50,
    ):
        self.max_change = check_limit("MaxStepChange", "max_change", max_change)
        if previous is not None:
            previous = parameter("MaxStepChange", "previous", previous,
                                 "previous=last_action (shape (action_dim,))")
            if previous.ndim != 1:
                raise ValueError(
                    "MaxStepChange `previous` is the one action executed before the chunk, "
                    f"shape (action_dim,); got shape {previous.shape}. For a chunk of past "
                    "actions pass its last row, previous=past[-1]."
                )
        self.previous = previous
        self.tol = relative_tolerance("MaxStepChange", tol, "1e-5")
        self.dims = as_dims("MaxStepChange", dims)
        self.max_steps = count("MaxStepChange", "max_steps", max_steps, 1, "50")

    def _parts(self, chunk: Array) -> tuple[Array, Array | None, Array]:
        check_chunk("MaxStepChange", chunk)
        k = num_dims("MaxStepChange", self.dims, chunk)
        prev = None
        if self.previous is not None:
            prev = check_previous("MaxStepChange", self.previous[None], chunk, self.dims)
        return select(chunk, self.dims), prev, limit_for("MaxStepChange", "max_change",
                                                       self.max_change, k)

    def after(self, past: RealLike) -> "MaxStepChange":
        """This limit with `previous = past[-1]`, the last action executed."""
        return with_field(self, "previous", check_past("MaxStepChange", past)[-1])

    def project(self, chunk: Actions) -> Actions:
        y, prev, limit = self._parts(chunk)
        acc = acc_dtype(chunk)
        x, _ = project_differences(y.astype(acc), None if prev is None else prev.astype(acc),
                                   limit, 1, self.max_steps, self.tol)
        return place(chunk, self.dims, x)

    def violation(self, chunk: Actions) -> Scalar:
        y, prev, limit = self._parts(chunk)
        return difference_violation(y, prev, limit, 1)

    def tolerance(self, chunk: Actions) -> Scalar:
        num_prev = 0 if self.previous is None else 1
        solve = solve_rounding(chunk.shape[0], num_prev, 1, acc_dtype(chunk))
        return rounding_tolerance(self.tol + solve, chunk)
