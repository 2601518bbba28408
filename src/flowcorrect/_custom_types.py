from collections.abc import Callable
from typing import Any, TypeAlias

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
    "IntScalar",
    "Key",
    "Scalar",
]
