"""Small helpers shared by the modules of flowcorrect."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def float_array(x: Any) -> jax.Array:
    """Converts a hyperparameter to a strongly typed float array.

    Storing hyperparameters as arrays (not Python floats) keeps them out of the static
    part of a Module, so changing them does not recompile a jitted function; a fixed,
    strong dtype stops `0.1` and `np.float64(0.1)` from tracing twice.
    """
    return jnp.asarray(x, dtype=jnp.result_type(float))


def concrete(x: Any) -> np.ndarray | None:
    """Returns `x` as a NumPy array when its value is known, `None` under a trace."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def shape_str(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return str(tuple(shape)) if shape is not None else type(x).__name__
