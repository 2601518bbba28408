"""Small helpers shared by the modules of flowcorrect."""

import warnings
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


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype to accumulate sums of `dtype` in: float64 for float64, else float32.

    float16 overflows at 65504 and bfloat16 keeps 8 bits of mantissa, so sums over a
    chunk (norms, energies) in those dtypes overflow or lose the small terms.
    """
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def safe_norm(x: jax.Array) -> jax.Array:
    """The Euclidean (Frobenius) norm of all of `x`, computed so that it cannot overflow.

    `sqrt(sum(x**2))` overflows once `sum(x**2)` does: in float16 already for a 50 x 32
    chunk with entries around 6.5 (norm 260). Here `x` is divided by `max|x|` first
    and the squares are summed in at least float32, so the result is finite whenever
    every entry is finite and the norm itself fits in the result's dtype.

    **Arguments:**

    - `x`: a floating array of any shape.

    **Returns:**

    A scalar: float64 for float64 input, float32 otherwise. NaN if `x` has a NaN,
    inf if it has an inf (and no NaN).
    """
    acc = accumulation_dtype(x.dtype)
    x = x.astype(acc)
    if x.size == 0:
        return jnp.zeros((), acc)
    biggest = jnp.max(jnp.abs(x))
    # A zero or non-finite maximum is left unscaled: 0 gives 0, inf gives inf, NaN NaN.
    divisor = jnp.where((biggest > 0) & jnp.isfinite(biggest), biggest, 1).astype(acc)
    return divisor * jnp.sqrt(jnp.sum(jnp.square(x / divisor)))


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    return f"{type(value).__name__} {value!r}"


def scalar_float(owner: str, name: str, value: Any, example: str) -> jax.Array:
    """A scalar floating hyperparameter as a float array, or a clear error.

    Refuses arrays that are not scalars (`clip_frac=[.1, .2]`), booleans, strings and
    complex numbers, naming the argument, what was seen and what to pass instead. The
    value itself (finite, positive, ...) is checked by the caller's `__check_init__`.
    """
    fix = f"pass one real number, e.g. {owner}(..., {name}={example})"
    if isinstance(value, bool | np.bool_) or np.dtype(getattr(value, "dtype", object)) == np.bool_:
        raise TypeError(f"{owner} `{name}` must be a number, not a boolean; {fix}.")
    if isinstance(value, str | bytes) or value is None:
        raise TypeError(f"{owner} `{name}` must be a number; got {_describe(value)}; {fix}.")
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner} `{name}` must be a number; got {_describe(value)}; {fix}."
        ) from None
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"{owner} `{name}` must be a real number; got {_describe(value)}; {fix}.")
    if array.shape != ():
        raise ValueError(
            f"{owner} `{name}` must be a scalar; got {_describe(array)}. One {owner} "
            f"holds one value: {fix} (for several values, build several {owner}s)."
        )
    return float_array(array)


INT32_MAX = 2**31 - 1


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a string, a boolean, a float where an int goes).

    Also a `ValueError`, so that `except ValueError` around a constructor catches every
    refused argument, whichever check refused it.
    """


def is_int(value: Any) -> bool:
    """Whether `value` is an integer (Python's or NumPy's) and not a boolean, which
    Python counts as an int (`True + True == 2`)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """Whether `value` is a real number (Python's or NumPy's int or float) and not a
    boolean."""
    return is_int(value) or isinstance(value, float | np.floating)


def count(owner: str, name: str, value: Any, minimum: int, example: str, why: str = "") -> int:
    """A count given as a Python int (or NumPy integer), or a clear error.

    Refuses booleans (`Repeat(True)` is a mistake, not one step), floats (`2.7` would
    silently become 2), strings, `None`, arrays, anything below `minimum` and anything
    above `2**31 - 1` (the largest int32, which jitted code stores counts in).

    **Arguments:**

    - `owner`: who takes the argument, as the user writes it (`"BestOfN"`, `"fc.sample"`).
    - `name`: the argument's name.
    - `value`: what was passed.
    - `minimum`: the smallest valid value.
    - `example`: a good value, shown in the fix.
    - `why`: what the count means, shown after the bound (`"8 is a good start"`).

    **Returns:**

    `value` as a Python int.
    """
    what = f"{owner} `{name}` must be an int >= {minimum}" + (f" ({why})" if why else "")
    fix = f"pass e.g. {owner}(..., {name}={example})"
    if isinstance(value, bool | np.bool_):
        raise ArgumentTypeError(f"{what}, not a boolean; got {value!r}; {fix}.")
    if not isinstance(value, int | np.integer):
        raise ArgumentTypeError(f"{what}; got {_describe(value)}; {fix}.")
    if value < minimum:
        raise ValueError(f"{what}; got {int(value)}; {fix}.")
    if value > INT32_MAX:
        raise ValueError(
            f"{what} and at most 2**31 - 1 = {INT32_MAX}; got {int(value)}; {fix}."
        )
    return int(value)


def flag(owner: str, name: str, value: Any, example: str) -> jax.Array:
    """A switch given as a bool (Python, NumPy or a scalar bool array, possibly traced) as
    a bool array, or a clear error.

    Refuses strings (`"no"` is truthy), numbers and `None`: none of them says which way
    the switch was meant to go.
    """
    if isinstance(value, bool | np.bool_):
        return jnp.asarray(value)
    if isinstance(value, jax.Array | np.ndarray) and value.dtype == np.bool_:
        if value.shape != ():
            raise ValueError(
                f"{owner} `{name}` must be one bool; got {_describe(value)}; pass e.g. "
                f"{owner}(..., {name}={example})."
            )
        return jnp.asarray(value)
    raise ArgumentTypeError(
        f"{owner} `{name}` must be True or False; got {_describe(value)}, which is not read "
        f"as a bool; pass e.g. {owner}(..., {name}={example})."
    )


class _Missing:
    """The default of an argument that has a deprecated alias: not given."""

    def __repr__(self) -> str:
        return "<default>"


MISSING: Any = _Missing()


def renamed(owner: str, new: str, new_value: Any, old: str, old_value: Any, default: Any) -> Any:
    """The value of argument `new`, which may still be given under its deprecated name
    `old` (with a `DeprecationWarning`); `default` when neither is given."""
    if old_value is MISSING:
        return default if new_value is MISSING else new_value
    if new_value is not MISSING:
        raise TypeError(f"{owner} takes `{new}` or its deprecated name `{old}`, not both.")
    warnings.warn(
        f"{owner}'s `{old}` is deprecated and will be removed in the next release; the "
        f"argument is called `{new}`: {owner}(..., {new}=...).",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def renamed_attribute(owner: str, old: str, new: str, value: Any) -> Any:
    """`value`, read under the deprecated attribute name `old` (with a warning)."""
    warnings.warn(
        f"{owner}.{old} is deprecated and will be removed in the next release; read "
        f"{owner}.{new}.",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
