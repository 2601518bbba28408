"""Extra negatives for InfoNCE: perturbed expert chunks and the policy's own samples.

In-batch negatives teach an energy to tell one demonstration from another; they say
nothing about the chunks near the expert's that a policy actually produces. A pilot
here found that with in-batch and noise negatives only, the energy's low regions were
no closer to the expert's actions. The policy's own samples on the demonstration
states are the mistakes a correction must undo: give them with
[`flowcorrect.PolicyNegatives`][] or precomputed in `Batch.negatives`.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Actions, Context
from .._misc import float_array, shape_str


class AbstractNegatives(eqx.Module):
    """Makes extra negatives for one demonstration; batched by `jax.vmap` in training.

    Subclasses implement `__call__(key, context, actions)` returning a stack of
    `num_negatives` chunks shaped like `actions`.
    """

    @abc.abstractmethod
    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        """**Arguments:**

        - `key`: a PRNG key.
        - `context`: the demonstration's context (one observation).
        - `actions`: the expert chunk, `(horizon, action_dim)`.

        **Returns:**

        The negatives, `(num_negatives, horizon, action_dim)`.
        """


def _check_count(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"`{name}` must be an int >= 1; got {value!r}.")


class NoiseNegatives(AbstractNegatives):
    """The expert chunk plus Gaussian noise: `a + scale * N(0, I)`.

    **Arguments:**

    - `num`: how many negatives per demonstration.
    - `scale`: the noise's standard deviation, in action units, `> 0`. Pick it near the
        size of the policy's errors: much larger and the negatives are trivially far.
    """

    num: int = eqx.field(static=True)
    scale: Float[Array, ""]

    def __init__(self, num: int = 4, scale: Any = 0.1):
        self.num = num
        self.scale = float_array(scale)

    def __check_init__(self):
        _check_count("num", self.num)

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        noise = jax.random.normal(key, (self.num, *actions.shape), actions.dtype)
        return actions[None] + self.scale.astype(actions.dtype) * noise


class TimeShiftNegatives(AbstractNegatives):
    """The expert chunk shifted in time, held at its first or last action at the edge.

    `shift = s` gives `a'[t] = a[clip(t + s, 0, horizon - 1)]`: the plan of a moment
    later (s > 0) or earlier (s < 0). A chunk that does not change over time is its own
    shift, so pair this with other negatives on static data.

    **Arguments:**

    - `shifts`: a tuple of non-zero integer shifts, one negative each.
    """

    shifts: tuple[int, ...] = eqx.field(static=True, default=(-2, -1, 1, 2))

    def __check_init__(self):
        if not self.shifts or not all(isinstance(s, int) and s != 0 for s in self.shifts):
            raise ValueError(
                f"`shifts` must be a non-empty tuple of non-zero ints; got {self.shifts!r}."
            )

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        horizon = actions.shape[0]
        t = jnp.arange(horizon)
        idx = jnp.stack([jnp.clip(t + s, 0, horizon - 1) for s in self.shifts])
        return actions[idx]


class SwapDimNegatives(AbstractNegatives):
    """The expert chunk with two randomly chosen action dimensions swapped.

    **Arguments:**

    - `num`: how many negatives per demonstration (each swaps its own random pair).
    """

    num: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        _check_count("num", self.num)

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        dim = actions.shape[-1]
        if dim < 2:
            raise ValueError(
                f"SwapDimNegatives needs action_dim >= 2 to swap dimensions; got {dim}."
            )

        def one(k: Array) -> Array:
            ki, kj = jax.random.split(k)
            i = jax.random.randint(ki, (), 0, dim)
            # A second, different dimension: i plus a non-zero offset modulo dim.
            j = (i + jax.random.randint(kj, (), 1, dim)) % dim
            perm = jnp.arange(dim)
            perm = perm.at[i].set(j).at[j].set(i)
            return actions[:, perm]

        return jax.vmap(one)(jax.random.split(key, self.num))


class PolicyNegatives(AbstractNegatives):
    """Chunks sampled from the policy itself on the demonstration's state.

    **Arguments:**

    - `sample`: a function `sample(key, context) -> chunk` drawing one chunk
        `(horizon, action_dim)` from the (frozen) policy for one observation; e.g. a
        flow sampler on the policy's velocity field. Gradients do not flow into it.
    - `num`: how many samples per demonstration.

    When sampling the policy in the training step is too slow, sample offline and put
    the chunks in `Batch.negatives` instead.
    """

    sample: Callable[[PRNGKeyArray, Context], Actions]
    num: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        _check_count("num", self.num)
        if not callable(self.sample):
            raise ValueError(
                f"`sample` must be callable as sample(key, context); got {self.sample!r}."
            )

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        keys = jax.random.split(key, self.num)
        out = jax.vmap(lambda k: self.sample(k, context))(keys)
        if out.shape[1:] != actions.shape:
            raise ValueError(
                f"The policy sampler returned chunks of shape {shape_str(out[0])}; the "
                f"expert chunks have shape {shape_str(actions)}."
            )
        return jax.lax.stop_gradient(out.astype(actions.dtype))


def make_negatives(
    generators: tuple[AbstractNegatives, ...],
    key: PRNGKeyArray,
    contexts: Context,
    actions: Float[Array, "batch horizon action_dim"],
) -> Float[Array, "batch num_negatives horizon action_dim"] | None:
    """All generators on every demonstration of a batch, stacked along the negatives axis."""
    if not generators:
        return None
    batch = actions.shape[0]
    keys = jax.random.split(key, (len(generators), batch))
    parts = [jax.vmap(gen)(k, contexts, actions) for gen, k in zip(generators, keys, strict=True)]
    return jnp.concatenate(parts, axis=1)
