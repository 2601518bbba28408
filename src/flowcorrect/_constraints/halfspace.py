"""A half-space on chosen dimensions of every action: `normal . a[t, dims] <= offset`."""


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import Actions, IndexLike, RealLike, Scalar
from .base import (
    AbstractConstraint,
    acc_dtype,
    as_dims,
    check_chunk,
    l2,
    num_dims,
    parameter,
    place,
    rounding_tolerance,
    select,
)


class HalfSpace(AbstractConstraint):
    """Every action of the chunk on one side of a plane: `normal . a[t, dims] <= offset`
    (a wall, a table top, a keep-out side of the workspace).

    Projection: closed form, exact: each action that crosses the plane moves along the
    normal onto it, `a - relu(normal . a - offset) / |normal|^2 * normal` (computed in
    float32 or wider; optax 0.2.4 has no half-space projection). Violation: the
    Euclidean distance to the feasible set, `||relu(normal . a[t] - offset)|| /
    |normal|` over the steps, exact too.

    **Arguments:**

    - `normal`: `(len(dims),)`, the outward normal, not zero.
    - `offset`: a number: the plane is `normal . a = offset`.
    - `dims`: which action dimensions the plane lives in: `None` (every one; the
        default), an int `k` (the first `k`) or a sequence of indices. Static.
    """

    normal: Float[Array, " k"]
    offset: Float[Array, ""]
    dims: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, normal: RealLike, offset: RealLike, dims: IndexLike | None = None):
        n = parameter("HalfSpace", "normal", normal, "HalfSpace(normal=[0.0, 0.0, 1.0], ...)")
        if n.ndim != 1 or n.shape[0] == 0:
            raise ValueError(
                f"HalfSpace `normal` must be a vector, one entry per constrained dimension; "
                f"got shape {n.shape}."
            )
        if not isinstance(n, jax.core.Tracer) and not bool(jnp.any(n != 0)):
            raise ValueError("HalfSpace `normal` is zero; give the plane's normal vector.")
        b = parameter("HalfSpace", "offset", offset, "HalfSpace(..., offset=0.5)")
        if b.shape != ():
            raise ValueError(f"HalfSpace `offset` must be one number; got shape {b.shape}.")
        self.normal = n
        self.offset = b
        self.dims = as_dims("HalfSpace", dims)

    def _excess(self, chunk: Array) -> tuple[Array, Array, Array]:
        check_chunk("HalfSpace", chunk)
        k = num_dims("HalfSpace", self.dims, chunk)
        if self.normal.shape[0] != k:
            raise ValueError(
                f"HalfSpace `normal` has {self.normal.shape[0]} entries but {k} dimensions "
                f"are constrained (chunk of shape {chunk.shape}, dims={self.dims}); give one "
                "entry per constrained dimension."
            )
        acc = acc_dtype(chunk)
        a = select(chunk, self.dims).astype(acc)
        n = self.normal.astype(acc)
        norm = l2(n)
        unit = n / norm
        # In units of the unit normal, so |normal| of any size neither overflows nor
        # flushes to zero.
        excess = jnp.maximum(a @ unit - self.offset.astype(acc) / norm, 0)
        return a, unit, excess

    def project(self, chunk: Actions) -> Actions:
        a, unit, excess = self._excess(chunk)
        return place(chunk, self.dims, a - excess[:, None] * unit[None, :])

    def violation(self, chunk: Actions) -> Scalar:
        return l2(self._excess(chunk)[2])

    def tolerance(self, chunk: Actions) -> Scalar:
        return rounding_tolerance(jnp.zeros(()), chunk)

