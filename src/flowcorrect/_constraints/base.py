"""The constraint family: what a placement needs from a feasible set of chunks.

A constraint describes a set of feasible action chunks `(horizon, action_dim)`. The
placements of this package call exactly the methods declared here:

- `project(chunk)`: the nearest feasible chunk in the Euclidean (Frobenius) norm;
- `violation(chunk)`: how far the chunk is from satisfying the constraint, in action
    units, `>= 0` and `0` exactly on feasible chunks, with finite gradients (so that
    [`flowcorrect.constraints.ViolationEnergy`][] can guide by it);
- `tolerance(chunk)`: the violation a projected chunk may still have (the rounding of
    its dtype, and an iterative method's tolerance), so that `is_feasible` can tell
    feasible from infeasible in any dtype.
"""

import abc
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from .._custom_types import Actions, RealLike, Scalar
from .._misc import accumulation_dtype, float_array, is_int, shape_str


class AbstractConstraint(eqx.Module):
    """Base class of constraints on one action chunk `(horizon, action_dim)`.

    Implement `project`, `violation` and `tolerance`; `is_feasible` follows from them.
    A constraint works per chunk: batch it with `jax.vmap`. For a constraint given as
    two functions, use [`flowcorrect.constraints.FnConstraint`][].

    !!! example

        ```python
        class NonNegative(fc.constraints.AbstractConstraint):
            def project(self, chunk):
                return jnp.maximum(chunk, 0)

            def violation(self, chunk):
                return jnp.sum(jnp.maximum(-chunk, 0).astype(jnp.float32))

            def tolerance(self, chunk):
                return jnp.zeros((), jnp.float32)
        ```
    """

    @abc.abstractmethod
    def project(self, chunk: Actions) -> Actions:
        """The feasible chunk nearest to `chunk` (Euclidean norm over the whole chunk),
        in `chunk`'s dtype. Feasible chunks are returned unchanged (to rounding)."""

    @abc.abstractmethod
    def violation(self, chunk: Actions) -> Scalar:
        """How far `chunk` is from feasible, in action units: a scalar `>= 0` (float32,
        or float64 for a float64 chunk), `0` exactly when `chunk` is feasible, with
        finite gradients everywhere."""

    @abc.abstractmethod
    def tolerance(self, chunk: Actions) -> Scalar:
        """The largest violation that still counts as feasible for a chunk like this
        one: what `project` guarantees, `violation(project(chunk)) <= tolerance(...)`
        of the projected chunk."""

    def after(self, past: RealLike) -> "AbstractConstraint":
        """The constraint on the chunk that the robot executes right after `past`, the
        actions it executed before, oldest first, in the same units as the chunk.

        A constraint of one chunk alone (bounds, regions) returns itself, the default.
        One that joins the chunk to the motion before it returns a copy that bounds
        that join too: [`flowcorrect.constraints.MaxStepChange`][] from `past[-1]`,
        [`flowcorrect.constraints.MaxJerk`][] from its last `order` rows. A server
        calls this per request with the actions an episode executed, so that its
        limits hold across chunks; override it in a constraint of your own that reads
        what came before.
        """
        del past
        return self

    def is_feasible(self, chunk: Actions) -> Bool[Array, ""]:
        """Whether `violation(chunk) <= tolerance(chunk)` (`False` for a chunk that is
        not finite)."""
        v = self.violation(chunk)
        return jnp.isfinite(v) & (v <= self.tolerance(chunk))


def check_constraint(constraint: Any, name: str) -> None:
    if not isinstance(constraint, AbstractConstraint):
        hint = ""
        if callable(constraint):
            hint = (
                " For a violation function, wrap it with its projection: "
                "fc.constraints.FnConstraint(violation_fn, project_fn)."
            )
        raise TypeError(
            f"`{name}` must be a constraint of fc.constraints such as Box(low, high), "
            "MaxStepChange(d), MaxJerk(j), HalfSpace(normal, offset), Ball(centre, radius), "
            "OutsideBall(centre, radius), AllOf(...), InRobotSpace(...) or your own "
            f"fc.constraints.AbstractConstraint subclass; got {type(constraint).__name__}.{hint}"
        )


def check_chunk(owner: str, chunk: Any) -> None:
    """A plain error at trace time for anything but one floating chunk."""
    if getattr(chunk, "ndim", None) != 2 or not jnp.issubdtype(chunk.dtype, jnp.floating):
        raise ValueError(
            f"{owner} acts on one floating action chunk of shape (horizon, action_dim); got "
            f"{shape_str(chunk)} of dtype {getattr(chunk, 'dtype', None)}. Call it per "
            "sample (jax.vmap for a batch)."
        )


def acc_dtype(chunk: Array) -> Any:
    return accumulation_dtype(chunk.dtype)


def rounding_tolerance(tol: Array, chunk: Array) -> Scalar:
    """`(tol + 8 * sqrt(size) * eps) * scale`: a method's relative tolerance `tol` plus
    the rounding of the chunk's dtype, at the chunk's magnitude `scale = max|chunk|`.

    A chunk rounded to its dtype is off by half an ulp per entry, at most
    `eps * |a| / 2`; a difference of order 3 sums 8 such errors per row, and a norm
    over the rows multiplies by at most `sqrt(size)`.
    """
    acc = acc_dtype(chunk)
    x = chunk.astype(acc)
    eps = float(jnp.finfo(chunk.dtype).eps)
    scale = jnp.maximum(jnp.max(jnp.abs(x)), jnp.finfo(acc).tiny)
    return (tol.astype(acc) + 8.0 * math.sqrt(chunk.size) * eps) * scale


def l2(h: Array) -> Scalar:
    """The Euclidean norm of all of `h` (in its dtype), computed so that it cannot
    overflow, with gradient `h / ||h||` away from zero and `0` at zero (where the norm
    has no gradient), so that a violation has finite gradients on feasible chunks."""
    if h.size == 0:
        return jnp.zeros((), h.dtype)
    biggest = jnp.max(jnp.abs(h))
    nonzero = (biggest > 0) & jnp.isfinite(biggest)
    divisor = jnp.where(nonzero, biggest, 1)
    inner = jnp.sum(jnp.square(h / divisor))
    norm = divisor * jnp.sqrt(jnp.where(nonzero, inner, 1))
    # 0 for a zero `h`; inf or NaN (`biggest`) for a non-finite one.
    return jnp.where(nonzero, norm, biggest)


def step_norms(d: Array) -> Array:
    """The Euclidean norm of each row of `d` (`(horizon, k)` -> `(horizon,)`), safe as
    `l2` is: no overflow, gradient `0` at a zero row."""
    return jax.vmap(l2)(d)


Dims = tuple[int, ...] | None


def as_dims(owner: str, dims: Any) -> Dims:
    """`None` (every dimension), an int `k` (the first `k`) or a sequence of distinct
    indices in increasing order, as a static tuple; a clear error otherwise."""
    if dims is None:
        return None
    if is_int(dims):
        if dims < 1:
            raise ValueError(
                f"{owner} `dims` as an int is the number of leading action dimensions "
                f"constrained and must be >= 1; got {int(dims)}. Pass None for every "
                "dimension."
            )
        return tuple(range(int(dims)))
    if isinstance(dims, Sequence | np.ndarray) and not isinstance(dims, str | bytes):
        values = np.asarray(dims).tolist() if isinstance(dims, np.ndarray) else list(dims)
        if not all(is_int(d) for d in values):
            raise TypeError(
                f"{owner} `dims` must hold int dimension indices; got {dims!r}. A boolean "
                "mask m is np.flatnonzero(m)."
            )
        values = [int(d) for d in values]
        if not values:
            raise ValueError(f"{owner} `dims` is empty; give at least one dimension index.")
        if min(values) < 0 or any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"{owner} `dims` must be distinct non-negative indices in increasing "
                f"order; got {values}. Sort them: sorted(set(dims))."
            )
        return tuple(values)
    raise TypeError(
        f"{owner} `dims` must be None (every action dimension), an int k (the first k) or "
        f"a sequence of indices; got {type(dims).__name__} {dims!r}."
    )


def num_dims(owner: str, dims: Dims, chunk: Array) -> int:
    action_dim = chunk.shape[1]
    if dims is None:
        return action_dim
    if dims[-1] >= action_dim:
        raise ValueError(
            f"{owner} constrains action dimension {dims[-1]}, but the chunk has only "
            f"{action_dim} (shape {shape_str(chunk)}); `dims` must be < {action_dim}."
        )
    return len(dims)


def select(chunk: Array, dims: Dims) -> Array:
    return chunk if dims is None else chunk[:, np.asarray(dims)]


def place(chunk: Array, dims: Dims, values: Array) -> Array:
    values = values.astype(chunk.dtype)
    return values if dims is None else chunk.at[:, np.asarray(dims)].set(values)


def parameter(owner: str, name: str, value: Any, example: str, *, finite: bool = True,
              allow_inf: bool = False) -> Float[Array, "..."]:
    """A real-valued parameter as a float array, or an error naming it and the fix."""
    if value is None or isinstance(value, str | bytes | bool | np.bool_):
        raise TypeError(
            f"{owner} `{name}` must be a number or an array of numbers; got "
            f"{type(value).__name__} {value!r}; pass e.g. {example}."
        )
    if isinstance(value, jax.core.Tracer):
        # Built under a trace (a previous action inside a jitted loop): the values are
        # unknown here, so only the dtype is checked.
        if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
            value.dtype, jnp.integer
        ):
            raise TypeError(f"{owner} `{name}` must be real numbers; got dtype {value.dtype}.")
        return value.astype(jnp.result_type(float))
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner} `{name}` must be a number or an array of numbers; got "
            f"{type(value).__name__}; pass e.g. {example}."
        ) from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(
            f"{owner} `{name}` must be real numbers; got dtype {array.dtype}; pass e.g. "
            f"{example}."
        )
    if np.isnan(array).any():
        raise ValueError(
            f"{owner} `{name}` has NaN at {int(np.isnan(array).sum())} entries; pass e.g. "
            f"{example}."
        )
    if finite and not allow_inf and np.isinf(array).any():
        raise ValueError(
            f"{owner} `{name}` must be finite; got inf at {int(np.isinf(array).sum())} "
            f"entries; pass e.g. {example}."
        )
    return float_array(array)


def check_broadcast(owner: str, name: str, value: Array, shape: tuple[int, ...],
                    what: str) -> None:
    """A plain error at trace time when a parameter does not broadcast to `shape`."""
    try:
        if jnp.broadcast_shapes(value.shape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{owner} `{name}` has shape {shape_str(value)}, which does not broadcast to "
            f"{what} {tuple(shape)}. Give one value, or one per constrained dimension."
        ) from None


def relative_tolerance(owner: str, tol: Any, example: str) -> Float[Array, ""]:
    t = parameter(owner, "tol", tol, f"{owner}(..., tol={example})")
    if t.shape != () or not float(t) >= 0:
        raise ValueError(
            f"{owner} `tol` must be one number >= 0 (relative to the chunk's magnitude); got "
            f"{np.asarray(t).tolist()}; pass e.g. {owner}(..., tol={example})."
        )
    return t


__all__ = ["AbstractConstraint"]


def check_past(owner: str, past: Any) -> Array:
    """`past` as a float array `(num_past, action_dim)` with at least one row."""
    past = jnp.asarray(past)
    if past.ndim != 2 or past.shape[0] < 1 or not jnp.issubdtype(past.dtype, jnp.floating):
        raise ValueError(
            f"{owner}.after takes the actions executed before the chunk, oldest first, as "
            f"a float array (num_past, action_dim) with num_past >= 1; got "
            f"{shape_str(past)} of dtype {past.dtype}. For one action a pass a[None]."
        )
    return past


def with_field(module: Any, name: str, value: Any) -> Any:
    """A copy of `module` with the field `name` (which may be `None`) set to `value`."""
    return eqx.tree_at(lambda m: getattr(m, name), module, value, is_leaf=lambda x: x is None)
