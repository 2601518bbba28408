"""Correctors that propose an update from the energy's gradient."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from .._custom_types import Actions, ChunkEnergy, IntScalar, Key, RealLike
from .._misc import concrete, scalar_float
from .base import AbstractCorrector


def _check_nonneg(owner: str, name: str, value: Array, example: str) -> None:
    v = concrete(value)
    if v is not None and not (np.isfinite(v) and v >= 0):
        raise ValueError(
            f"{owner} `{name}` must be a finite number >= 0; got {v}. "
            f"Pass e.g. {owner}({name}={example})."
        )


def _grad(energy: ChunkEnergy, actions: Actions) -> Actions:
    return jax.grad(energy)(actions)


class GradientStep(AbstractCorrector[None]):
    """A plain gradient step on the energy: `a <- a - alpha * grad_a E(s, a)`.

    **Arguments:**

    - `alpha`: the step size, `>= 0`. Stored as an array: changing it does not
        recompile [`flowcorrect.correct`][].
    """

    alpha: Float[Array, ""]

    def __init__(self, alpha: RealLike = 0.1):
        self.alpha = scalar_float("GradientStep", "alpha", alpha, "0.1")

    def __check_init__(self):
        _check_nonneg("GradientStep", "alpha", self.alpha, "0.1")

    def init(self, energy: ChunkEnergy, actions: Actions) -> None:
        return None

    def step(
        self, energy: ChunkEnergy, actions: Actions, state: None, key: Key
    ) -> tuple[Actions, None, IntScalar]:
        g = _grad(energy, actions)
        new = actions - self.alpha.astype(actions.dtype) * g
        return new.astype(actions.dtype), None, jnp.asarray(1, jnp.int32)


class LangevinStep(AbstractCorrector[None]):
    """An unadjusted Langevin step: `a <- a - alpha * grad E + sqrt(2 alpha T) * xi`.

    With `xi ~ N(0, I)` drawn from the step's key (reproducible for a given key). At
    `temperature = 0` this is [`flowcorrect.GradientStep`][]; for small `alpha` its
    iterates sample from `exp(-E / T)` (Roberts and Tweedie, 1996).

    **Arguments:**

    - `alpha`: the step size, `>= 0`.
    - `temperature`: the temperature `T`, `>= 0`.
    """

    stochastic: ClassVar[bool] = True

    alpha: Float[Array, ""]
    temperature: Float[Array, ""]

    def __init__(self, alpha: RealLike = 0.1, temperature: RealLike = 1e-3):
        self.alpha = scalar_float("LangevinStep", "alpha", alpha, "0.1")
        self.temperature = scalar_float("LangevinStep", "temperature", temperature, "1e-3")

    def __check_init__(self):
        _check_nonneg("LangevinStep", "alpha", self.alpha, "0.1")
        _check_nonneg("LangevinStep", "temperature", self.temperature, "1e-3")

    def init(self, energy: ChunkEnergy, actions: Actions) -> None:
        return None

    def step(
        self, energy: ChunkEnergy, actions: Actions, state: None, key: Key
    ) -> tuple[Actions, None, IntScalar]:
        g = _grad(energy, actions)
        alpha = self.alpha.astype(actions.dtype)
        noise = jax.random.normal(key, actions.shape, actions.dtype)
        scale = jnp.sqrt(2 * alpha * self.temperature.astype(actions.dtype))
        new = actions - alpha * g + scale * noise
        return new.astype(actions.dtype), None, jnp.asarray(1, jnp.int32)


class OptaxStep(AbstractCorrector[PyTree]):
    """An update rule taken from optax: any `optax.GradientTransformation`.

    The gradient of the energy is fed to the optimiser and its update applied;
    the optimiser state (Adam's moments, momentum, ...) is carried across steps.

    **Arguments:**

    - `optimizer`: e.g. `optax.sgd(0.1)` or `optax.adam(1e-2)`. Its hyperparameters
        are baked into its functions, so a new optimiser recompiles; wrap it in
        `optax.inject_hyperparams` to change them without recompiling.

    !!! example

        ```python
        corrector = fc.Repeat(fc.OptaxStep(optax.adam(1e-2)), num_steps=10)
        ```
    """

    optimizer: optax.GradientTransformation

    def __init__(self, optimizer: optax.GradientTransformation):
        # `Any`: __check_init__'s message names the fix, a type checker's would not.
        self.optimizer = optimizer

    def __check_init__(self):
        if isinstance(self.optimizer, AbstractCorrector):
            raise ValueError(
                "OptaxStep `optimizer` must be an optax optimiser, not a corrector; use "
                f"the {type(self.optimizer).__name__} directly, without OptaxStep."
            )
        if not (hasattr(self.optimizer, "init") and hasattr(self.optimizer, "update")):
            called = " (call the factory: optax.adam(1e-2), not optax.adam)" if callable(
                self.optimizer
            ) else ""
            raise ValueError(
                "OptaxStep `optimizer` must be an optax.GradientTransformation (with init "
                f"and update), e.g. optax.sgd(0.1); got {type(self.optimizer).__name__}"
                f"{called}."
            )

    def init(self, energy: ChunkEnergy, actions: Actions) -> PyTree:
        return self.optimizer.init(actions)

    def step(
        self, energy: ChunkEnergy, actions: Actions, state: PyTree, key: Key
    ) -> tuple[Actions, PyTree, IntScalar]:
        g = _grad(energy, actions)
        updates, state = self.optimizer.update(g, state, actions)
        new = optax.apply_updates(actions, updates)
        return new.astype(actions.dtype), state, jnp.asarray(1, jnp.int32)

