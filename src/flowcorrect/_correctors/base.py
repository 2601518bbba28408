import abc
import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Actions, ChunkEnergy, IntScalar, Key
from .._misc import accumulation_dtype

_State = TypeVar("_State")


class AbstractCorrector(eqx.Module, Generic[_State]):
    """Base class of all correctors: one step of test-time correction on one chunk.

    A corrector is stateful in the way a diffrax solver is: `init` builds the state
    before the first step, `step` maps `(actions, state)` to the next pair. Correctors
    compose by wrapping (a wrapper holds `inner` and forwards to it) and by
    [`flowcorrect.Chain`][]. All of them work on one sample: batching is `jax.vmap`
    at the boundary, which [`flowcorrect.correct`][] does for you.

    **Class attributes:**

    - `stochastic`: `True` for a corrector whose step draws random numbers from its
        `key` (as [`flowcorrect.LangevinStep`][] does); `False` by default. Set it on
        your own subclass (`stochastic: ClassVar[bool] = True`) so that a correction
        called without a key raises instead of silently reusing one fixed key.
    """

    stochastic: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, energy: ChunkEnergy, actions: Actions) -> _State:
        """The state before the first step.

        **Arguments:**

        - `energy`: the energy with its context already bound, a function of the
            chunk alone: `energy(actions) -> scalar`.
        - `actions`: the chunk entering the correction, `(horizon, action_dim)`.

        **Returns:**

        The initial state; `None` for a stateless corrector.
        """

    @abc.abstractmethod
    def step(
        self, energy: ChunkEnergy, actions: Actions, state: _State, key: Key
    ) -> tuple[Actions, _State, IntScalar]:
        """One correction step.

        **Arguments:**

        - `energy`: the energy with its context bound, `energy(actions) -> scalar`.
        - `actions`: the current chunk, `(horizon, action_dim)`.
        - `state`: the state from `init` or from the previous step.
        - `key`: a PRNG key, used by stochastic correctors and split by wrappers.

        **Returns:**

        A tuple `(actions, state, num_accepted)`: the new chunk (same shape and dtype),
        the new state, and how many elementary update steps were taken and kept (an
        integer array; rejected steps count zero).
        """


def _is_corrector(x: Any) -> bool:
    return isinstance(x, AbstractCorrector)


def nested_correctors(corrector: AbstractCorrector) -> list[AbstractCorrector]:
    """The correctors held directly by `corrector` (in any field, tuples included)."""
    found = []
    for field in dataclasses.fields(corrector):
        value = getattr(corrector, field.name, None)
        for leaf in jax.tree.leaves(value, is_leaf=_is_corrector):
            if _is_corrector(leaf):
                found.append(leaf)
    return found


def uses_key(corrector: AbstractCorrector) -> bool:
    """Whether `corrector`, or any corrector nested in it at any depth, is stochastic.

    Walks wrappers, [`flowcorrect.Chain`][] and [`flowcorrect.Repeat`][] (any field
    holding a corrector, or a tuple or list of them) and reads each one's class
    attribute `stochastic`.

    **Arguments:**

    - `corrector`: any [`flowcorrect.AbstractCorrector`][].

    **Returns:**

    `True` if the result of a correction depends on its PRNG key.
    """
    if type(corrector).stochastic:
        return True
    return any(uses_key(c) for c in nested_correctors(corrector))


def check_is_corrector(owner: str, name: str, value: Any) -> None:
    """Raises a `TypeError` naming the fix unless `value` is a corrector instance."""
    if _is_corrector(value):
        return
    if isinstance(value, type) and issubclass(value, AbstractCorrector):
        fix = f"instantiate it: {value.__name__}(...)"
    elif hasattr(value, "init") and hasattr(value, "update"):
        fix = "wrap an optax optimiser in fc.OptaxStep, e.g. fc.OptaxStep(optax.adam(1e-2))"
    elif callable(value):
        fix = (
            "a function is not a corrector; use fc.GradientStep(alpha) for a gradient "
            "step, or subclass fc.AbstractCorrector with `init` and `step`"
        )
    else:
        fix = "pass an AbstractCorrector such as fc.GradientStep(0.1)"
    raise TypeError(
        f"{owner} `{name}` must be a corrector (an fc.AbstractCorrector instance); got "
        f"{type(value).__name__}: {fix}."
    )


def scale_step(actions: Actions, proposal: Actions, scale) -> Actions:
    """`actions + scale * (proposal - actions)`, exact where the proposal is unchanged.

    Entries that `proposal` left alone come back bit-identical (`x + 0.0` would turn
    `-0.0` into `0.0`), so a wrapper never disturbs what a mask protected; a scale
    of one returns the proposal itself, not a rounded copy of it, and a scale of zero
    returns `actions` itself (even where the proposal is not finite). The arithmetic
    runs in at least float32, so a float16 difference `proposal - actions` cannot
    overflow before it is scaled down. A shrunk step is rounded towards `actions`,
    entry by entry, so that no entry moves further than the exact scaled step: in the
    subnormal range of float16 one unit in the last place can be a third of the value,
    and rounding to nearest would break a clip bound there. Where the scaled step
    underflows (subnormals flushed to zero, as on XLA's CPU runtime, in bfloat16 and
    float32 near their smallest normal number), the entry is left unchanged rather
    than moved the whole way.
    """
    acc = accumulation_dtype(actions.dtype)
    scale = jnp.asarray(scale).astype(acc)
    a = actions.astype(acc)
    delta = proposal.astype(acc) - a
    exact = a + scale * delta
    moved = exact.astype(actions.dtype)
    overshot = jnp.abs(moved.astype(acc) - a) > jnp.abs(exact - a)
    moved = jnp.where(overshot, jnp.nextafter(moved, actions), moved)
    # XLA's CPU runtime flushes subnormals to zero: near the smallest normal number the
    # scaled step (and so `exact`) can itself be flushed, and the entry would jump all
    # the way to the proposal. Measured in units of the difference, which stay normal,
    # an entry that still moves further than `scale` of its difference (beyond the
    # rounding of `a + step`, two ulps of each end) stays where it was.
    eps = jnp.finfo(acc).eps
    size = jnp.where(delta == 0, 1, jnp.abs(delta))
    m = moved.astype(acc)
    moved_by = jnp.abs(m - a) / size
    rounding = 2 * eps * (jnp.abs(a) / size + jnp.abs(m) / size)
    beyond = moved_by > scale * (1 + 4 * eps) + rounding
    moved = jnp.where(beyond, actions, moved)
    moved = jnp.where(scale == 1, proposal, moved)
    moved = jnp.where(proposal == actions, actions, moved)
    return jnp.where(scale == 0, actions, moved)
