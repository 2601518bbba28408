"""Balls on chosen dimensions of every action: stay inside one (a reach limit), or keep
out of one (an obstacle)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
from optax import projections

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
    step_norms,
)


def _ball_fields(owner: str, centre: Any, radius: Any) -> tuple[Array, Array]:
    c = parameter(owner, "centre", centre, f"{owner}(centre=[0.4, 0.0, 0.2], radius=0.1)")
    if c.ndim != 1 or c.shape[0] == 0:
        raise ValueError(
            f"{owner} `centre` must be a vector, one entry per constrained dimension; got "
            f"shape {c.shape}."
        )
    r = parameter(owner, "radius", radius, f"{owner}(..., radius=0.1)")
    if r.shape != () or (not isinstance(r, jax.core.Tracer) and not float(r) >= 0):
        raise ValueError(f"{owner} `radius` must be one number >= 0; got {r.tolist()}.")
    return c, r


def _offsets(owner: str, centre: Array, dims: Any, chunk: Array) -> Array:
    """`a[t, dims] - centre` in the accumulation dtype, `(horizon, k)`."""
    check_chunk(owner, chunk)
    k = num_dims(owner, dims, chunk)
    if centre.shape[0] != k:
        raise ValueError(
            f"{owner} `centre` has {centre.shape[0]} entries but {k} dimensions are "
            f"constrained (chunk of shape {chunk.shape}, dims={dims}); give one entry per "
            "constrained dimension."
        )
    acc = acc_dtype(chunk)
    return select(chunk, dims).astype(acc) - centre.astype(acc)[None, :]


class Ball(AbstractConstraint):
    """Every action inside a ball: `||a[t, dims] - centre|| <= radius` (a reach limit,
    a speed ball on velocity dimensions).

    Projection: closed form, exact: each action outside moves radially onto the sphere,
    by `optax.projections.projection_l2_ball` per step (in float32 or wider). Violation:
    the Euclidean distance to the feasible set, `||relu(||a[t] - centre|| - radius)||`
    over the steps, exact too.

    **Arguments:**

    - `centre`: `(len(dims),)`.
    - `radius`: a number `>= 0`.
    - `dims`: which action dimensions: `None` (every one; the default), an int `k` (the
        first `k`) or a sequence of indices. Static.
    """

    centre: Float[Array, " k"]
    radius: Float[Array, ""]
    dims: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, centre: RealLike, radius: RealLike, dims: IndexLike | None = None):
        self.centre, self.radius = _ball_fields("Ball", centre, radius)
        self.dims = as_dims("Ball", dims)

    def project(self, chunk: Actions) -> Actions:
        d = _offsets("Ball", self.centre, self.dims, chunk)
        radius = self.radius.astype(d.dtype)
        inside = jax.vmap(lambda row: projections.projection_l2_ball(row, radius))(d)
        return place(chunk, self.dims, inside + self.centre.astype(d.dtype)[None, :])

    def violation(self, chunk: Actions) -> Scalar:
        d = _offsets("Ball", self.centre, self.dims, chunk)
        return l2(jnp.maximum(step_norms(d) - self.radius.astype(d.dtype), 0))

    def tolerance(self, chunk: Actions) -> Scalar:
        return rounding_tolerance(jnp.zeros(()), chunk)


class OutsideBall(AbstractConstraint):
    """Every action outside a ball: `||a[t, dims] - centre|| >= radius` (an obstacle,
    a keep-out zone around a person).

    The feasible set is not convex. Its projection is still unique for every action
    except one at the centre exactly: each action inside moves radially out onto the
    sphere, `centre + radius * (a - centre) / ||a - centre||`, the nearest feasible
    point (closed form, exact). An action exactly at the centre has every point of the
    sphere at the same distance; it moves, deterministically, along the first
    constrained dimension, to `centre + radius * e_0`. Violation: the Euclidean distance
    to the feasible set, `||relu(radius - ||a[t] - centre||)||` over the steps; its
    gradient is zero at the centre (where the distance has none), so guidance cannot
    move an action off the centre exactly: the projection does.

    Combined with other constraints in [`flowcorrect.constraints.AllOf`][], Dykstra's method has no
    convergence guarantee for a set that is not convex; check `AllOf.solve`'s flag.

    **Arguments:**

    - `centre`: `(len(dims),)`.
    - `radius`: a number `>= 0`.
    - `dims`: which action dimensions: `None` (every one; the default), an int `k` (the
        first `k`) or a sequence of indices. Static.
    """

    centre: Float[Array, " k"]
    radius: Float[Array, ""]
    dims: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, centre: RealLike, radius: RealLike, dims: IndexLike | None = None):
        self.centre, self.radius = _ball_fields("OutsideBall", centre, radius)
        self.dims = as_dims("OutsideBall", dims)

    def project(self, chunk: Actions) -> Actions:
        d = _offsets("OutsideBall", self.centre, self.dims, chunk)
        radius = self.radius.astype(d.dtype)
        norms = step_norms(d)
        # The direction of each offset, scaled by its largest entry first so that an
        # offset of subnormal size still has a direction.
        biggest = jnp.max(jnp.abs(d), axis=1, keepdims=True)
        at_centre = biggest[:, 0] == 0
        scaled = d / jnp.where(at_centre[:, None], 1, biggest)
        first = jnp.zeros_like(d).at[:, 0].set(1)
        unit = jnp.where(at_centre[:, None], first,
                         scaled / jnp.where(at_centre, 1, step_norms(scaled))[:, None])
        moved = jnp.where((norms < radius)[:, None], radius * unit, d)
        return place(chunk, self.dims, moved + self.centre.astype(d.dtype)[None, :])

    def violation(self, chunk: Actions) -> Scalar:
        d = _offsets("OutsideBall", self.centre, self.dims, chunk)
        return l2(jnp.maximum(self.radius.astype(d.dtype) - step_norms(d), 0))

    def tolerance(self, chunk: Actions) -> Scalar:
        return rounding_tolerance(jnp.zeros(()), chunk)
