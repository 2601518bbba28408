import abc
from typing import Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Actions, ChunkEnergy, IntScalar, Key

_State = TypeVar("_State")


class AbstractCorrector(eqx.Module, Generic[_State]):
    """Base class of all correctors: one step of test-time correction on one chunk.

    A corrector is stateful in the way a diffrax solver is: `init` builds the state
    before the first step, `step` maps `(actions, state)` to the next pair. Correctors
    compose by wrapping (a wrapper holds `inner` and forwards to it) and by
    [`flowcorrect.Chain`][]. All of them work on one sample: batching is `jax.vmap`
    at the boundary, which [`flowcorrect.correct`][] does for you.
    """

    @abc.abstractmethod
    def init(self, energy: ChunkEnergy, actions: Actions) -> _State:
        """The state before the first step.

        **Arguments:**

        - `energy`: the energy with its context already encoded, a function of the
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

        - `energy`: the energy with its context fixed.
        - `actions`: the current chunk, `(horizon, action_dim)`.
        - `state`: the state from `init` or from the previous step.
        - `key`: a PRNG key, used by stochastic correctors and split by wrappers.

        **Returns:**

        A tuple `(actions, state, num_accepted)`: the new chunk (same shape and dtype),
        the new state, and how many elementary update steps were taken and kept (an
        integer array; rejected steps count zero).
        """


def scale_step(actions: Actions, proposal: Actions, scale) -> Actions:
    """`actions + scale * (proposal - actions)`, exact where the proposal is unchanged.

    Entries that `proposal` left alone come back bit-identical (`x + 0.0` would turn
    `-0.0` into `0.0`), so a wrapper never disturbs what a mask protected, and a scale
    of one returns the proposal itself, not a rounded copy of it.
    """
    scale = jnp.asarray(scale, actions.dtype)
    moved = actions + scale * (proposal - actions)
    moved = jnp.where(scale == 1, proposal, moved)
    return jnp.where(proposal == actions, actions, moved)


def uses_key(corrector: AbstractCorrector) -> bool:
    """Whether `corrector` or any corrector nested in it draws random numbers."""
    if getattr(corrector, "stochastic", False):
        return True
    children = jax.tree_util.tree_leaves(
        corrector,
        is_leaf=lambda x: x is not corrector and isinstance(x, AbstractCorrector),
    )
    return any(
        uses_key(c) for c in children if isinstance(c, AbstractCorrector) and c is not corrector
    )
