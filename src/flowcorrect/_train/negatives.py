"""Extra negatives for InfoNCE: perturbed expert chunks and the policy's own samples.

In-batch negatives teach an energy to tell one demonstration from another; they say
nothing about the chunks near the expert's that a policy actually produces. A pilot
here found that with in-batch and noise negatives only, the energy's low regions were
no closer to the expert's actions. The policy's own samples on the demonstration
states are the mistakes a correction must undo: draw them beforehand with
[`flowcorrect.train.policy_negatives`][] into `Batch.negatives`, or in the training step with
[`flowcorrect.train.PolicyNegatives`][], which reads the policy's input from
`Batch.observation`.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Key, PRNGKeyArray

from .._custom_types import Actions, Context, RealLike
from .._misc import float_array, shape_str


class AbstractNegatives(eqx.Module):
    """Makes extra negatives for one demonstration; batched by `jax.vmap` in training.

    Subclasses implement `__call__(key, context, actions, observation)` returning a
    stack of `num_negatives` chunks shaped like `actions`.
    """

    @abc.abstractmethod
    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions, observation: Any = None
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        """**Arguments:**

        - `key`: a PRNG key.
        - `context`: the demonstration's context for the energy (one observation).
        - `actions`: the expert chunk, `(horizon, action_dim)`.
        - `observation`: the policy's input for the same state, from
            `Batch.observation` (`None` when the batch has none).

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

    def __init__(self, num: int = 4, scale: RealLike = 0.1):
        self.num = num
        self.scale = float_array(scale)

    def __check_init__(self):
        _check_count("num", self.num)

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions, observation: Any = None
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
        self, key: PRNGKeyArray, context: Context, actions: Actions, observation: Any = None
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
        self, key: PRNGKeyArray, context: Context, actions: Actions, observation: Any = None
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


def _sample_stack(
    sample: Callable[[PRNGKeyArray, Any], Actions], key: PRNGKeyArray, observation: Any, num: int
) -> Float[Array, "num horizon action_dim"]:
    out = jax.vmap(lambda k: sample(k, observation))(jax.random.split(key, num))
    if not (hasattr(out, "ndim") and out.ndim == 3):
        raise ValueError(
            "The policy sampler must return ONE chunk (horizon, action_dim) for one "
            f"observation; vmapped over {num} keys it gave {shape_str(out)}."
        )
    return out


class PolicyNegatives(AbstractNegatives):
    """Chunks sampled from the policy itself on the demonstration's state, in each step.

    The policy reads its own input, not the energy's context: give it in
    `Batch(context, actions, observation=...)` (for openpi: images and text in
    `observation`, prefix tokens in `context`). A batch without `observation` is an
    error, unless the policy and the energy read the same thing: then pass
    `observation=context`.

    **Arguments:**

    - `sample`: a function `sample(key, observation) -> chunk` drawing one chunk
        `(horizon, action_dim)` from the (frozen) policy for one observation. With
        [`flowcorrect.sample`][]: `lambda k, o: fc.sample(policy, o, k)[0]`.
        Gradients do not flow into it.
    - `num`: how many samples per demonstration.

    Sampling the policy in every training step costs a full flow integration per
    negative; [`flowcorrect.train.policy_negatives`][] draws them once, beforehand, into
    `Batch.negatives` instead.
    """

    sample: Callable[[PRNGKeyArray, Any], Actions]
    num: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        _check_count("num", self.num)
        if not callable(self.sample):
            raise ValueError(
                f"`sample` must be callable as sample(key, observation); got {self.sample!r}."
            )

    def __call__(
        self, key: PRNGKeyArray, context: Context, actions: Actions, observation: Any = None
    ) -> Float[Array, "num_negatives horizon action_dim"]:
        if observation is None:
            raise ValueError(
                "PolicyNegatives samples the policy on `Batch.observation`, the policy's own "
                "input, and this batch has none. Build the batches with "
                "fc.train.Batch(context, actions, observation=policy_inputs) (or "
                "observation=context if the policy reads the energy's context), or draw "
                "the negatives beforehand with fc.train.policy_negatives into Batch.negatives."
            )
        out = _sample_stack(self.sample, key, observation, self.num)
        if out.shape[1:] != actions.shape:
            raise ValueError(
                f"The policy sampler returned chunks of shape {shape_str(out[0])}; the "
                f"expert chunks have shape {shape_str(actions)}."
            )
        return jax.lax.stop_gradient(out.astype(actions.dtype))


@eqx.filter_jit
def _policy_negatives(
    sample: Callable[[PRNGKeyArray, Any], Actions],
    observations: Any,
    keys: Key[Array, " batch"],
    num: int,
    batch_size: int | None,
) -> Array:
    def one(args: tuple[Any, PRNGKeyArray]) -> Array:
        observation, k = args
        return _sample_stack(sample, k, observation, num)

    return jax.lax.map(one, (observations, keys), batch_size=batch_size)


def policy_negatives(
    sample: Callable[[PRNGKeyArray, Any], Actions],
    observations: Any,
    num: int,
    key: PRNGKeyArray,
    *,
    batch_size: int | None = None,
) -> Float[Array, "batch num horizon action_dim"]:
    """Draws `num` chunks from the policy for every observation, beforehand.

    The result goes into `Batch.negatives` (or `evaluate`'s `policy_samples`): the
    policy's own mistakes are the negatives a correction has to learn to undo, and
    drawing them once keeps the flow integration out of every training step.

    **Arguments:**

    - `sample`: a function `sample(key, observation) -> chunk`, one chunk
        `(horizon, action_dim)` for ONE observation (it is vmapped over `num` keys and
        mapped over the observations). With [`flowcorrect.sample`][]:
        `lambda k, o: fc.sample(policy, o, k)[0]`.
    - `observations`: the policy's inputs, a pytree with a leading batch axis `B`.
    - `num`: samples per observation, an int >= 1.
    - `key`: a PRNG key; observation `i` uses `jax.random.split(key, B)[i]`.
    - `batch_size`: observations sampled together (memory); `None` = all at once.

    **Returns:**

    The chunks, `(B, num, horizon, action_dim)`.

    !!! example

        ```python
        negatives = fc.train.policy_negatives(lambda k, o: fc.sample(policy, o, k)[0],
                                        observations, 8, jax.random.key(0))
        data = fc.train.ShuffledBatches(fc.train.Batch(contexts, actions, negatives), 64)
        ```
    """
    _check_count("num", num)
    if not callable(sample):
        raise TypeError(f"`sample` must be callable as sample(key, observation); got {sample!r}.")
    if batch_size is not None:
        _check_count("batch_size", batch_size)
    sizes = {getattr(x, "shape", (None,))[:1] for x in jax.tree.leaves(observations)}
    if len(sizes) != 1 or (None,) in sizes or () in sizes:
        raise ValueError(
            "`observations` must be a pytree of arrays with one common leading batch axis; "
            f"got leading shapes {sorted(map(str, sizes))}."
        )
    (batch,) = sizes.pop()
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    observations = jax.tree.map(jnp.asarray, observations)
    return _policy_negatives(sample, observations, jax.random.split(key, batch), num, batch_size)


def make_negatives(
    generators: tuple[AbstractNegatives, ...],
    key: PRNGKeyArray,
    contexts: Context,
    actions: Float[Array, "batch horizon action_dim"],
    observations: Any = None,
) -> Float[Array, "batch num_negatives horizon action_dim"] | None:
    """All generators on every demonstration of a batch, stacked along the negatives axis."""
    if not generators:
        return None
    batch = actions.shape[0]
    keys = jax.random.split(key, (len(generators), batch))
    parts = [
        jax.vmap(gen, in_axes=(0, 0, 0, None if observations is None else 0))(
            k, contexts, actions, observations
        )
        for gen, k in zip(generators, keys, strict=True)
    ]
    return jnp.concatenate(parts, axis=1)
