"""Box bounds on chosen action dimensions: `low <= a[t, d] <= high`."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from optax import projections

from .._custom_types import Actions, IndexLike, RealLike, Scalar
from .._misc import concrete
from .base import (
    AbstractConstraint,
    acc_dtype,
    as_dims,
    check_broadcast,
    check_chunk,
    l2,
    num_dims,
    parameter,
    place,
    rounding_tolerance,
    select,
)


class Box(AbstractConstraint):
    """Bounds on every action of the chunk: `low <= a[t, d] <= high` for the chosen
    dimensions `d` (joint limits, gripper range, workspace box in joint space).

    Projection: `clip`, by `optax.projections.projection_box`, exact (the set is a
    product of intervals). Violation: the Euclidean distance to the box,
    `||relu(a - high) + relu(low - a)||`, which is exact too.

    **Arguments:**

    - `low`, `high`: numbers or arrays broadcastable to `(horizon, len(dims))`, usually
        one value per constrained dimension; `-inf` / `inf` leave a side unbounded;
        `low <= high`.
    - `dims`: which action dimensions are bounded: `None` (every one; the default), an
        int `k` (the first `k`) or a sequence of indices. Static.
    """

    low: Float[Array, "*low_shape"]
    high: Float[Array, "*high_shape"]
    dims: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, low: RealLike, high: RealLike, dims: IndexLike | None = None):
        example = "Box(low=-1.0, high=1.0) or one value per dimension"
        lo = parameter("Box", "low", low, example, allow_inf=True)
        hi = parameter("Box", "high", high, example, allow_inf=True)
        try:
            np.broadcast_shapes(lo.shape, hi.shape)
        except ValueError:
            raise ValueError(
                f"Box `low` {lo.shape} and `high` {hi.shape} must broadcast together."
            ) from None
        lo_np, hi_np = concrete(lo), concrete(hi)
        if lo_np is not None and hi_np is not None and (lo_np > hi_np).any():
            raise ValueError(
                f"Box needs `low <= high` everywhere; got low > high at "
                f"{int((lo_np > hi_np).sum())} entries. Swap or fix the bounds."
            )
        for name, value, bad in (("low", lo_np, np.inf), ("high", hi_np, -np.inf)):
            if value is not None and (value == bad).any():
                raise ValueError(
                    f"Box `{name}` is {bad} at {int((value == bad).sum())} entries, which no "
                    f"action satisfies; use {-bad} for an unbounded side."
                )
        self.low = lo
        self.high = hi
        self.dims = as_dims("Box", dims)

    def _bounds(self, chunk: Array, dtype: Any) -> tuple[Array, Array]:
        check_chunk("Box", chunk)
        shape = (chunk.shape[0], num_dims("Box", self.dims, chunk))
        for name, value in (("low", self.low), ("high", self.high)):
            check_broadcast("Box", name, value, shape, "the constrained chunk's shape")
        return (jnp.broadcast_to(self.low, shape).astype(dtype),
                jnp.broadcast_to(self.high, shape).astype(dtype))

    def project(self, chunk: Actions) -> Actions:
        low, high = self._bounds(chunk, chunk.dtype)
        return place(chunk, self.dims, projections.projection_box(select(chunk, self.dims),
                                                                  low, high))

    def violation(self, chunk: Actions) -> Scalar:
        acc = acc_dtype(chunk)
        low, high = self._bounds(chunk, acc)
        a = select(chunk, self.dims).astype(acc)
        return l2(jnp.maximum(a - high, 0) + jnp.maximum(low - a, 0))

    def tolerance(self, chunk: Actions) -> Scalar:
        return rounding_tolerance(jnp.zeros(()), chunk)
