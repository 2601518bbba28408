from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

Actions: TypeAlias = Float[Array, "horizon action_dim"]
BatchActions: TypeAlias = Float[Array, "batch horizon action_dim"]
Scalar: TypeAlias = Float[Array, ""]
IntScalar: TypeAlias = Int[Array, ""]
BoolScalar: TypeAlias = Bool[Array, ""]
HorizonMask: TypeAlias = Bool[Array, " horizon"]
DimMask: TypeAlias = Bool[Array, " action_dim"]
Context: TypeAlias = PyTree[Any]
Encoded: TypeAlias = PyTree[Any]
Key: TypeAlias = PRNGKeyArray
ArrayLike: TypeAlias = Shaped[Array, "..."] | float | int
# What public arguments accept. A function or constructor that takes one checks the
# value itself, with a message naming the fix (a bool is not a number, a scalar must
# have shape ()), so these say the kind, the check says the rest.
RealLike: TypeAlias = float | int | np.number | np.ndarray | Array
"""A real number or array of them: a Python float or int (not a bool), a NumPy scalar
or array, or a JAX array. Hyperparameters held as arrays take one (a new value does not
recompile); where one scalar is meant, its shape must be `()`."""
IndexLike: TypeAlias = int | Sequence[int] | np.ndarray | Array
"""Which action dimensions (or steps): an int `k` for the first `k`, or the indices
themselves, in the order given."""
# An energy with its context already bound: a function of one action chunk alone.
# This is what correctors receive; they call `energy(actions)`.
ChunkEnergy: TypeAlias = Callable[[Actions], Scalar]

__all__ = [
    "Actions",
    "ArrayLike",
    "BatchActions",
    "BoolScalar",
    "ChunkEnergy",
    "Context",
    "DimMask",
    "Encoded",
    "HorizonMask",
    "IndexLike",
    "IntScalar",
    "Key",
    "RealLike",
    "Scalar",
]
