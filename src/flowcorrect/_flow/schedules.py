"""When an interleaved correction runs (schedules) and how strongly (weights).

Both are Modules whose values are arrays, so changing `k` in `LastSteps(k)` or the
value of a weight does not recompile [`flowcorrect.sample`][].
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._conventions import AbstractConvention
from .._custom_types import RealLike, Scalar
from .._misc import concrete, float_array, shape_str


def _int_at_least(name: str, value: Array, low: int, hint: str) -> None:
    v = concrete(value)
    if value.shape != () or (v is not None and v < low):
        shown = v if v is not None else shape_str(value)
        raise ValueError(f"`{name}` must be an integer >= {low} ({hint}); got {shown}.")


class AbstractSchedule(eqx.Module):
    """Base class of schedules: which flow steps an interleaved correction runs after.

    Steps are numbered `0, ..., num_steps - 1` from noise to actions, whatever the
    time convention.
    """

    @abc.abstractmethod
    def mask(self, num_steps: int) -> Bool[Array, " num_steps"]:
        """`True` at the steps where the correction runs.

        **Arguments:**

        - `num_steps`: the number of flow steps (static).

        **Returns:**

        A boolean array of shape `(num_steps,)`.
        """


class EveryStep(AbstractSchedule):
    """Corrects at every flow step."""

    def mask(self, num_steps: int) -> Bool[Array, " num_steps"]:
        return jnp.ones(num_steps, bool)


class LastSteps(AbstractSchedule):
    """Corrects at the last `k` flow steps (the ones nearest the actions).

    **Arguments:**

    - `k`: an integer `>= 1`; `k >= num_steps` corrects every step. Stored as an array,
        so a new `k` does not recompile.
    """

    k: Int[Array, ""]

    def __init__(self, k: int):
        self.k = jnp.asarray(k, jnp.int32)

    def __check_init__(self):
        _int_at_least("k", self.k, 1, "the number of final flow steps to correct")

    def mask(self, num_steps: int) -> Bool[Array, " num_steps"]:
        return jnp.arange(num_steps) >= num_steps - self.k


class EveryNth(AbstractSchedule):
    """Corrects at every `m`-th flow step, counted back from the last one.

    The last step is always corrected, then the steps `m`, `2m`, ... before it: with
    10 steps and `m = 3`, steps 9, 6, 3 and 0. Counting from the end keeps the step
    that shapes the final chunk most.

    **Arguments:**

    - `m`: an integer `>= 1`; `m = 1` is [`flowcorrect.EveryStep`][]. Stored as an
        array, so a new `m` does not recompile.
    """

    m: Int[Array, ""]

    def __init__(self, m: int):
        self.m = jnp.asarray(m, jnp.int32)

    def __check_init__(self):
        _int_at_least("m", self.m, 1, "1 corrects every step")

    def mask(self, num_steps: int) -> Bool[Array, " num_steps"]:
        return (num_steps - 1 - jnp.arange(num_steps)) % self.m == 0


class AbstractWeight(eqx.Module):
    """Base class of correction weights, functions of flow time.

    A weight of exactly zero at a step switches the correction off there: the step is
    then bit for bit the plain Euler step.
    """

    @abc.abstractmethod
    def __call__(self, t: Float[Array, ""], convention: AbstractConvention) -> Scalar:
        """The weight at flow time `t` (in `convention`'s time; use
        `convention.progress(t)` for a schedule that does not depend on the convention).
        """


class ConstantWeight(AbstractWeight):
    """The same weight at every flow step.

    **Arguments:**

    - `value`: a number `>= 0`. Stored as an array: a new value does not recompile.
    """

    value: Float[Array, ""]

    def __init__(self, value: RealLike):
        self.value = float_array(value)

    def __check_init__(self):
        _check_weight_value("value", self.value)

    def __call__(self, t: Float[Array, ""], convention: AbstractConvention) -> Scalar:
        return self.value.astype(t.dtype)


class PowerWeight(AbstractWeight):
    """`scale * progress(t) ** power`: grows from noise (progress 0) to actions (1).

    The same schedule in every convention. `power = 0` is a constant weight;
    `power = 1` ramps linearly; large powers concentrate the correction near the end.

    **Arguments:**

    - `scale`: the weight at the actions' end, `>= 0`.
    - `power`: the exponent, `>= 0`.
    """

    scale: Float[Array, ""]
    power: Float[Array, ""]

    def __init__(self, scale: RealLike = 1.0, power: RealLike = 1.0):
        self.scale = float_array(scale)
        self.power = float_array(power)

    def __check_init__(self):
        _check_weight_value("scale", self.scale)
        _check_weight_value("power", self.power)

    def __call__(self, t: Float[Array, ""], convention: AbstractConvention) -> Scalar:
        progress = jnp.clip(convention.progress(t), 0, 1)
        return (self.scale * progress**self.power).astype(t.dtype)


class FnWeight(AbstractWeight):
    """Any function of flow time, `weight = fn(t)`.

    A function is static to `jit`: pass the same function object on every call
    (not a new `lambda`) or each call compiles anew. Values that change between calls
    belong in a Module weight such as [`flowcorrect.PowerWeight`][].

    **Arguments:**

    - `fn`: a callable mapping a scalar time array to a scalar weight `>= 0`.
    """

    fn: Callable[[Float[Array, ""]], Any]

    def __check_init__(self):
        if not callable(self.fn):
            raise ValueError(f"`fn` must be callable as fn(t); got {type(self.fn).__name__}.")

    def __call__(self, t: Float[Array, ""], convention: AbstractConvention) -> Scalar:
        w = jnp.asarray(self.fn(t))
        if w.shape != ():
            raise ValueError(f"A weight function must return a scalar; got {shape_str(w)}.")
        return w.astype(t.dtype)


def _check_weight_value(name: str, value: Array) -> None:
    if value.shape != ():
        raise ValueError(f"`{name}` must be a scalar; got shape {shape_str(value)}.")
    v = concrete(value)
    if v is not None and not v >= 0:
        raise ValueError(
            f"`{name}` must be a number >= 0 (0 switches the correction off); got {v}."
        )


def as_weight(weight: Any) -> AbstractWeight:
    """A number becomes a [`flowcorrect.ConstantWeight`][], a function a
    [`flowcorrect.FnWeight`][]; a weight Module is kept."""
    if isinstance(weight, AbstractWeight):
        return weight
    if callable(weight):
        return FnWeight(weight)
    return ConstantWeight(weight)
