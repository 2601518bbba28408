"""A maximum jerk (or acceleration): `|Δ^order a[t, d]| <= max_jerk` along time."""


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


class MaxJerk(AbstractConstraint):
    """A bound on the `order`-th difference of the actions along time: the jerk
    (`order = 3`, `a[t+3] - 3 a[t+2] + 3 a[t+1] - a[t]`) or the acceleration
    (`order = 2`, `a[t+2] - 2 a[t+1] + a[t]`), per control step, for the chosen
    dimensions: `|Δ^order a[t, d]| <= max_jerk`. With the actions executed before the
    chunk given, the differences that reach back into them are bounded too, so the
    chunk joins the motion smoothly.

    Projection: the method of [`flowcorrect.constraints.MaxStepChange`][] (proximal-gradient
    rounds with exact active-set solves) on the differences of this order, with the
    same tolerance, cap and feasible fallback. Violation: the Euclidean norm of the
    excess over every difference.

    **Arguments:**

    - `max_jerk`: a number `>= 0`, or one per constrained dimension (in action units
        per step cubed for `order = 3`; divide a physical limit by `dt**3`).
    - `order`: 2 (acceleration) or 3 (jerk, the default). Static.
    - `dims`: which action dimensions: `None` (every one; the default), an int `k` (the
        first `k`) or a sequence of indices. Static.
    - `previous`: the actions executed before the chunk, oldest first,
        `(num_previous, action_dim)` with `num_previous >= 1` (the last `order` rows are
        used), or `None` (the default).
    - `tol`: the relative tolerance of the projection (default `1e-5`).
    - `max_steps`: the cap on rounds of the method (default 50). Static.
    """

    max_jerk: Float[Array, "*limit_shape"]
    previous: Float[Array, "num_previous action_dim"] | None
    tol: Float[Array, ""]
    order: int = eqx.field(static=True)
    dims: tuple[int, ...] | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        max_jerk: RealLike,
        order: int = 3,
        dims: IndexLike | None = None,
        previous: RealLike | None = None,
        tol: RealLike = 1e-5,
        max_steps: int = 50,
    ):
        self.max_jerk = check_limit("MaxJerk", "max_jerk", max_jerk)
        order = count("MaxJerk", "order", order, 2, "3", "2 bounds the acceleration, 3 the jerk")
        if order > 3:
            raise ValueError(
                f"MaxJerk `order` must be 2 (acceleration) or 3 (jerk); got {order}. For the "
                "first difference use fc.constraints.MaxStepChange."
            )
        if previous is not None:
            previous = parameter("MaxJerk", "previous", previous,
                                 "previous=past_actions (shape (num_previous, action_dim))")
            if previous.ndim != 2 or previous.shape[0] < 1:
                raise ValueError(
                    "MaxJerk `previous` holds the actions executed before the chunk, oldest "
                    f"first, shape (num_previous, action_dim); got shape {previous.shape}. "
                    "For one action a pass a[None]."
                )
            previous = previous[-order:]
        self.previous = previous
        self.tol = relative_tolerance("MaxJerk", tol, "1e-5")
        self.order = order
        self.dims = as_dims("MaxJerk", dims)
        self.max_steps = count("MaxJerk", "max_steps", max_steps, 1, "50")

    def _parts(self, chunk: Array) -> tuple[Array, Array | None, Array]:
        check_chunk("MaxJerk", chunk)
        k = num_dims("MaxJerk", self.dims, chunk)
        prev = None
        if self.previous is not None:
            prev = check_previous("MaxJerk", self.previous, chunk, self.dims)
        return select(chunk, self.dims), prev, limit_for("MaxJerk", "max_jerk", self.max_jerk, k)

    def after(self, past: RealLike) -> "MaxJerk":
        """This limit with `previous` the last `order` rows of `past` (all of them when
        fewer were executed)."""
        return with_field(self, "previous", check_past("MaxJerk", past)[-self.order:])

    def project(self, chunk: Actions) -> Actions:
        y, prev, limit = self._parts(chunk)
        acc = acc_dtype(chunk)
        x, _ = project_differences(y.astype(acc), None if prev is None else prev.astype(acc),
                                   limit, self.order, self.max_steps, self.tol)
        return place(chunk, self.dims, x)

    def violation(self, chunk: Actions) -> Scalar:
        y, prev, limit = self._parts(chunk)
        return difference_violation(y, prev, limit, self.order)

    def tolerance(self, chunk: Actions) -> Scalar:
        num_prev = 0 if self.previous is None else self.previous.shape[0]
        solve = solve_rounding(chunk.shape[0], num_prev, self.order, acc_dtype(chunk))
        return rounding_tolerance(self.tol + solve, chunk)
