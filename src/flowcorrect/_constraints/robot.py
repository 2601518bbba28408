"""A constraint stated in the robot's units, applied to chunks in the policy's
normalised action space."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import Actions, RealLike, Scalar
from .._misc import concrete
from .base import (
    AbstractConstraint,
    acc_dtype,
    check_broadcast,
    check_chunk,
    check_constraint,
    check_past,
    parameter,
    rounding_tolerance,
)


class InRobotSpace(AbstractConstraint):
    """A constraint in robot units for chunks in the policy's normalised units, through
    the affine map the policy's normalisation inverts: `robot = offset + scale * a`.

    `project` maps the chunk to robot units, projects there with `constraint`, and maps
    back. What is exact: the result is the feasible chunk nearest to the input in robot
    units, `||scale * (a' - a)||`, which is the Euclidean projection in the policy's
    units as well when `scale` is the same number everywhere, or when the constraint
    acts on each entry separately ([`flowcorrect.constraints.Box`][]). For other constraints with
    per-dimension scales it is the projection in that weighted norm: still feasible,
    and the nearest in the robot's own units, which is usually what a limit means.
    Violation and tolerance are the constraint's, in robot units.

    openpi's normalisations: `InRobotSpace.from_quantiles(c, q01, q99)` for
    `a = 2 (x - q01) / (q99 - q01) - 1` and `InRobotSpace.from_mean_std(c, mean, std)`
    for `a = (x - mean) / (std + 1e-6)`, with the statistics of the policy's output
    transforms (padded to the policy's action dimension with scale 1, offset 0).

    **Arguments:**

    - `constraint`: the constraint in robot units.
    - `scale`: broadcastable to the chunk, usually `(action_dim,)`; no zeros.
    - `offset`: broadcastable to the chunk, usually `(action_dim,)`.
    """

    constraint: AbstractConstraint
    scale: Float[Array, "*scale_shape"]
    offset: Float[Array, "*offset_shape"]

    def __init__(self, constraint: AbstractConstraint, scale: RealLike, offset: RealLike = 0.0):
        check_constraint(constraint, "InRobotSpace `constraint`")
        s = parameter("InRobotSpace", "scale", scale, "scale=(q99 - q01) / 2")
        value = concrete(s)
        if value is not None and (value == 0).any():
            raise ValueError(
                f"InRobotSpace `scale` is zero at {int((value == 0).sum())} entries, which "
                "cannot be mapped back; give the normalisation's scale (pad unused "
                "dimensions with 1)."
            )
        self.constraint = constraint
        self.scale = s
        self.offset = parameter("InRobotSpace", "offset", offset, "offset=(q99 + q01) / 2")

    @classmethod
    def from_quantiles(cls, constraint: Any, q01: Any, q99: Any) -> "InRobotSpace":
        """For openpi's quantile normalisation, `robot = (a + 1) / 2 * (q99 - q01) + q01`."""
        lo = parameter("InRobotSpace.from_quantiles", "q01", q01, "the q01 statistics")
        hi = parameter("InRobotSpace.from_quantiles", "q99", q99, "the q99 statistics")
        return cls(constraint, (hi - lo) / 2, (hi + lo) / 2)

    @classmethod
    def from_mean_std(cls, constraint: Any, mean: Any, std: Any) -> "InRobotSpace":
        """For openpi's z-score normalisation, `robot = a * (std + 1e-6) + mean`."""
        m = parameter("InRobotSpace.from_mean_std", "mean", mean, "the mean statistics")
        s = parameter("InRobotSpace.from_mean_std", "std", std, "the std statistics")
        return cls(constraint, s + 1e-6, m)

    def _map(self, chunk: Array) -> tuple[Array, Array, Array]:
        check_chunk("InRobotSpace", chunk)
        for name, value in (("scale", self.scale), ("offset", self.offset)):
            check_broadcast("InRobotSpace", name, value, chunk.shape, "the chunk's shape")
        acc = acc_dtype(chunk)
        scale = jnp.broadcast_to(self.scale, chunk.shape).astype(acc)
        offset = jnp.broadcast_to(self.offset, chunk.shape).astype(acc)
        return offset + scale * chunk.astype(acc), scale, offset

    def after(self, past: RealLike) -> "InRobotSpace":
        """The robot-units constraint continued after `past`, given in the policy's
        units like the chunk (it is mapped to robot units here)."""
        robot = self._map(check_past("InRobotSpace", past))[0]
        return eqx.tree_at(lambda c: c.constraint, self, self.constraint.after(robot))

    def project(self, chunk: Actions) -> Actions:
        robot, scale, offset = self._map(chunk)
        projected = self.constraint.project(robot).astype(robot.dtype)
        return ((projected - offset) / scale).astype(chunk.dtype)

    def violation(self, chunk: Actions) -> Scalar:
        return self.constraint.violation(self._map(chunk)[0])

    def tolerance(self, chunk: Actions) -> Scalar:
        robot, scale, _ = self._map(chunk)
        # The inner tolerance at the robot's magnitude, plus the chunk's own rounding
        # carried through the scale.
        scaled = (scale * chunk.astype(robot.dtype)).astype(chunk.dtype)
        carried = rounding_tolerance(jnp.zeros(()), scaled)
        return self.constraint.tolerance(robot) + carried
