"""The constraint on a chunk that continues the actions executed before it, when its
first rows are ones the robot already executed (real-time chunking's committed
prefix)."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import Actions, RealLike, Scalar
from .._misc import shape_str
from .base import (
    AbstractConstraint,
    acc_dtype,
    check_chunk,
    check_constraint,
    check_past,
    l2,
)


class Continuing(AbstractConstraint):
    """`constraint` on the chunk the robot executes right after `past`, when the
    chunk's first `start` rows are the last `start` actions of `past`.

    Under real-time chunking with delay `d`, the robot executes `d` more actions of
    the previous chunk while the next is computed and switches to it at row `d`; the
    new chunk's first `d` rows stand for those actions. What the robot executes is
    then `past` (every action before the switch) followed by `chunk[d:]`. This is the
    set of chunks whose first `start` rows equal the committed actions and whose
    rest satisfies `constraint.after(past)`
    ([`flowcorrect.constraints.AbstractConstraint.after`][]), so a step or jerk limit
    holds across the switch as well as inside the chunk.

    Projection (exact): the first `start` rows set to the committed actions, the rest
    projected by `constraint.after(past)`. Violation: the Euclidean norm of the first
    rows' distance from the committed actions and the rest's violation. With
    `start = 0` it is `constraint.after(past)` on the whole chunk.

    **Arguments:**

    - `constraint`: any constraint (its `after` reads `past`).
    - `past`: the actions executed before the chunk's row `start`, oldest first,
        `(num_past, action_dim)`, in the chunk's units.
    - `start`: how many of the chunk's first rows were executed already, as the last
        rows of `past`, `0 <= start <= num_past`. Static.
    """

    constraint: AbstractConstraint
    committed: Float[Array, "start action_dim"] | None
    start: int = eqx.field(static=True)

    def __init__(self, constraint: AbstractConstraint, past: RealLike, start: int = 0):
        check_constraint(constraint, "Continuing `constraint`")
        past = check_past("Continuing", past)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                f"Continuing `start` counts the chunk's rows that were executed already, "
                f"an int >= 0; got {start!r}."
            )
        if start > past.shape[0]:
            raise ValueError(
                f"Continuing `start` = {start} rows must be among the executed actions, "
                f"but `past` has {past.shape[0]} rows ({shape_str(past)})."
            )
        self.constraint = constraint.after(past)
        self.committed = past[past.shape[0] - start:] if start else None
        self.start = start

    def _split(self, chunk: Array) -> tuple[Array, Array]:
        check_chunk("Continuing", chunk)
        if self.start >= chunk.shape[0]:
            raise ValueError(
                f"Continuing `start` = {self.start} leaves no rows of a chunk "
                f"{shape_str(chunk)}; it must be below the horizon {chunk.shape[0]}."
            )
        return chunk[: self.start], chunk[self.start:]

    def project(self, chunk: Actions) -> Actions:
        _, tail = self._split(chunk)
        tail = self.constraint.project(tail).astype(chunk.dtype)
        if self.committed is None:
            return tail
        if self.committed.shape[1] != chunk.shape[1]:
            raise ValueError(
                f"Continuing `past` has {self.committed.shape[1]} action dims but the "
                f"chunk {shape_str(chunk)} has {chunk.shape[1]}."
            )
        return jnp.concatenate([self.committed.astype(chunk.dtype), tail])

    def violation(self, chunk: Actions) -> Scalar:
        head, tail = self._split(chunk)
        v = self.constraint.violation(tail)
        if self.committed is None:
            return v
        acc = acc_dtype(chunk)
        # Against the committed actions in the chunk's dtype, which the projection
        # returns exactly.
        gap = l2((head - self.committed.astype(chunk.dtype)).astype(acc))
        return l2(jnp.stack([gap, v.astype(acc)]))

    def tolerance(self, chunk: Actions) -> Scalar:
        return self.constraint.tolerance(self._split(chunk)[1])
