"""Time conventions of flow-matching policies.

A convention says which end of flow time is noise, how the noisy sample `x_t` mixes
noise and actions, and hence what the velocity predicts and how to read the denoised
estimate off a velocity. Both conventions here are the linear (rectified-flow)
interpolation; they differ only in the direction of time, and every sign that depends
on that direction (the Euler step, the guidance term, the shift that keeps a corrected
estimate consistent) is derived from the methods below, never written twice.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import Scalar

TimeLike = Float[Array, ""] | float
# One chunk, or a batch of chunks sharing one flow time.
Actions = Float[Array, "*batch horizon action_dim"]


class AbstractConvention(eqx.Module):
    """Base class of flow-time conventions.

    A convention with noise at `noise_time` integrates from `noise_time` to
    `1 - noise_time` with the explicit Euler method, `x <- x + dt * v(x, t)`, in
    `num_steps` equal steps. The noisy sample is
    `x_t = sigma(t) * noise + progress(t) * actions`, and the velocity target is
    `d x_t / d t`.
    """

    noise_time: eqx.AbstractClassVar[float]

    @property
    def direction(self) -> float:
        """The sign of `dt`: `-1.0` when time runs from 1 (noise) to 0, `+1.0` otherwise."""
        return -1.0 if self.noise_time == 1.0 else 1.0

    def times(self, num_steps: int, dtype=jnp.float32) -> Float[Array, " num_times"]:
        """The time grid `t_0, ..., t_num_steps` of the Euler loop; step `k` goes
        from `t_k` to `t_{k+1}`.

        Times are accumulated as openpi's loop does (`t <- t + dt` in `dtype`, with
        `dt = direction / num_steps`), so the velocity sees the very same times as in a
        hand-written loop.

        **Arguments:**

        - `num_steps`: the number of Euler steps, an int `>= 1`.
        - `dtype`: the floating dtype of the samples.

        **Returns:**

        An array of shape `(num_steps + 1,)`, starting at `noise_time`.
        """
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise ValueError(f"`num_steps` must be an int >= 1; got {num_steps!r}.")
        dtype = np.dtype(dtype)
        increments = np.full(num_steps + 1, self.direction / num_steps, dtype)
        increments[0] = self.noise_time
        # `accumulate` adds left to right, one rounding per step, like openpi's loop.
        return jnp.asarray(np.add.accumulate(increments, dtype=dtype))

    @abc.abstractmethod
    def progress(self, t: TimeLike) -> Scalar:
        """How far `t` is from noise towards actions: 0 at noise, 1 at actions.

        It is the coefficient of the actions in `x_t`, so a change `delta` of the
        actions moves `x_t` by `progress(t) * delta`.
        """

    @abc.abstractmethod
    def interpolate(self, noise: Actions, actions: Actions, t: TimeLike) -> Actions:
        """The noisy sample `x_t` between `noise` and `actions`."""

    @abc.abstractmethod
    def velocity_target(self, noise: Actions, actions: Actions) -> Actions:
        """`d x_t / d t`, what a flow-matching velocity is trained to predict."""

    @abc.abstractmethod
    def denoised(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        """The denoised (clean-action) estimate read off `x_t` and the velocity `v`."""

    @abc.abstractmethod
    def noise_estimate(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        """The noise estimate read off `x_t` and the velocity `v`."""


class OpenPI(AbstractConvention):
    """openpi's convention: `t = 1` is noise, `t = 0` is actions.

    - `x_t = t * noise + (1 - t) * actions`;
    - velocity target `noise - actions`; Euler with `dt = -1 / num_steps`;
    - denoised estimate `a_hat = x_t - t * v`, noise estimate `x_t + (1 - t) * v`.
    """

    noise_time: ClassVar[float] = 1.0

    def progress(self, t: TimeLike) -> Scalar:
        return 1 - jnp.asarray(t)

    def interpolate(self, noise: Actions, actions: Actions, t: TimeLike) -> Actions:
        return t * noise + (1 - t) * actions

    def velocity_target(self, noise: Actions, actions: Actions) -> Actions:
        return noise - actions

    def denoised(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        return x - t * v

    def noise_estimate(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        return x + (1 - t) * v


class Reverse(AbstractConvention):
    """The reverse convention: `t = 0` is noise, `t = 1` is actions.

    Used by real-time chunking's reference code and by several rectified-flow ports.

    - `x_t = (1 - t) * noise + t * actions`;
    - velocity target `actions - noise`; Euler with `dt = +1 / num_steps`;
    - denoised estimate `a_hat = x_t + (1 - t) * v`, noise estimate `x_t - t * v`.
    """

    noise_time: ClassVar[float] = 0.0

    def progress(self, t: TimeLike) -> Scalar:
        return jnp.asarray(t)

    def interpolate(self, noise: Actions, actions: Actions, t: TimeLike) -> Actions:
        return (1 - t) * noise + t * actions

    def velocity_target(self, noise: Actions, actions: Actions) -> Actions:
        return actions - noise

    def denoised(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        return x + (1 - t) * v

    def noise_estimate(self, x: Actions, v: Actions, t: TimeLike) -> Actions:
        return x - t * v
