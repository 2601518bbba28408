"""A constraint of the user's own, given as a violation function and a projection."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import Actions, RealLike, Scalar
from .._misc import shape_str
from .base import AbstractConstraint, acc_dtype, check_chunk, relative_tolerance, rounding_tolerance


class FnConstraint(AbstractConstraint):
    """A constraint made of two functions of one chunk.

    **Arguments:**

    - `violation`: `violation(chunk) -> scalar`, `>= 0`, `0` exactly on feasible
        chunks, in action units, with finite gradients (for guidance; beware
        `jnp.sqrt` of a sum that is zero on feasible chunks: its gradient there is NaN).
    - `project`: `project(chunk) -> chunk` of the same shape: the nearest feasible chunk.
        Exactness is yours to promise; [`flowcorrect.Project`][] reports the violation
        after it, whatever it returns.
    - `tol`: the violation, relative to the chunk's magnitude, that still counts as
        feasible, on top of the rounding of the chunk's dtype (default `1e-6`).

    Functions are static to `jit` (pass the same objects on every call); an
    `eqx.Module`'s arrays are traced.

    !!! example

        ```python
        # The gripper (dimension 6) stays within 0.02 of its first command.
        def violation(a):
            return jnp.sum(jnp.maximum(jnp.abs(a[:, 6] - a[0, 6]) - 0.02, 0))

        def project(a):
            return a.at[:, 6].set(jnp.clip(a[:, 6], a[0, 6] - 0.02, a[0, 6] + 0.02))

        constraint = fc.constraints.FnConstraint(violation, project)
        ```
    """

    violation_fn: Callable[[Actions], Scalar]
    project_fn: Callable[[Actions], Actions]
    tol: Float[Array, ""]

    def __init__(
        self,
        violation: Callable[[Actions], Scalar],
        project: Callable[[Actions], Actions],
        tol: RealLike = 1e-6,
    ):
        for name, fn in (("violation", violation), ("project", project)):
            if not callable(fn):
                raise TypeError(
                    f"FnConstraint `{name}` must be a function of one chunk (horizon, "
                    f"action_dim); got {type(fn).__name__}."
                )
        self.violation_fn = violation
        self.project_fn = project
        self.tol = relative_tolerance("FnConstraint", tol, "1e-6")

    def project(self, chunk: Actions) -> Actions:
        check_chunk("FnConstraint", chunk)
        out = self.project_fn(chunk)
        if getattr(out, "shape", None) != chunk.shape:
            raise ValueError(
                f"FnConstraint `project` must return a chunk of the input's shape "
                f"{shape_str(chunk)}; got {shape_str(out)}."
            )
        return jnp.asarray(out).astype(chunk.dtype)

    def violation(self, chunk: Actions) -> Scalar:
        check_chunk("FnConstraint", chunk)
        out = self.violation_fn(chunk)
        if not (isinstance(out, jax.Array) and out.shape == ()):
            raise ValueError(
                "FnConstraint `violation` must return a scalar array for one chunk of shape "
                f"{shape_str(chunk)}; got {shape_str(out)}. Reduce over the chunk."
            )
        acc = acc_dtype(chunk)
        return out.astype(jnp.promote_types(out.dtype, acc))

    def tolerance(self, chunk: Actions) -> Scalar:
        return rounding_tolerance(self.tol, chunk)
