"""Policies: the seam between a flow-matching model and the sampler.

A flow-matching policy does two kinds of work for one observation: some once (openpi's
Pi0 runs SigLIP and the VLM over images and text into a KV cache), and some at every
flow step (the action expert over that cache). The first is the policy's `condition`
(what the flow is conditioned on; openpi calls its own the prefix pass), the second its
`velocity`. [`flowcorrect.sample`][] calls `condition` once, inside its compiled
function, and `velocity` at every Euler step; best-of-N candidates share one
conditioning. The energy reads its context from the same once-per-
observation pass, so nothing is computed twice.

Two base classes, by who does the batching:

- [`flowcorrect.AbstractPolicy`][]: written for one observation and one chunk;
  `fc.sample` batches it with `jax.vmap` (the usual case for a policy of your own).
- [`flowcorrect.AbstractBatchedPolicy`][]: the model runs on a batch itself (openpi's
  `Pi0` takes `(batch, ...)` observations and keeps its KV cache as
  `(layers, batch, ...)`); `fc.sample` calls it on the whole batch.

The weights of a policy are Module leaves: `fc.sample` traces them, so a
3B-parameter model is an argument of the compiled function, never a constant baked
into it, and new weights do not recompile.
"""

import abc
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, PyTree

from ._conventions import AbstractConvention, OpenPI
from ._custom_types import Actions, Context, Scalar
from ._misc import is_int, shape_str

Conditioning = PyTree[Any]
Observation = PyTree[Any]


_RENAMED = (
    "`prefix` is now `condition` (the once-per-observation pass; `prefix` is kept for "
    "one release)"
)


def _alias_old_prefix(cls: type) -> None:
    # A subclass written against the old name defines `prefix`: it becomes `condition`,
    # so that the class is concrete and the sampler finds its pass.
    if "prefix" in cls.__dict__ and "condition" not in cls.__dict__:
        warnings.warn(
            f"{cls.__name__}.prefix: {_RENAMED}; rename the method to `condition`.",
            DeprecationWarning,
            stacklevel=4,
        )
        cls.condition = cls.__dict__["prefix"]  # type: ignore[attr-defined]


def _old_prefix(policy: Any, observation: Any) -> Any:
    warnings.warn(
        f"{type(policy).__name__}.prefix(...): {_RENAMED}; call `condition`.",
        DeprecationWarning,
        stacklevel=3,
    )
    return policy.condition(observation)


class AbstractPolicy(eqx.Module):
    """A flow policy written for one observation and one action chunk.

    Subclasses implement three methods and set two fields:

    - `chunk_shape`: `(horizon, action_dim)` of the chunks it produces (a tuple of
        ints; mark the field `eqx.field(static=True)`).
    - `convention`: its flow-time convention, [`flowcorrect.OpenPI`][] (`t = 1` is
        noise, as in openpi) or [`flowcorrect.Reverse`][].

    [`flowcorrect.sample`][] vmaps the methods over a batch: write them for one sample.

    !!! example

        ```python
        class MyPolicy(fc.AbstractPolicy):
            encoder: eqx.nn.MLP
            head: eqx.nn.MLP
            chunk_shape: tuple[int, int] = eqx.field(static=True, default=(16, 4))
            convention: fc.AbstractConvention = fc.OpenPI()

            def condition(self, observation):
                return self.encoder(observation)        # once per observation

            def velocity(self, cond, x_t, t):
                inp = jnp.concatenate([cond, x_t.ravel(), t[None]])
                return self.head(inp).reshape(x_t.shape)

            def energy_context(self, cond):
                return cond                             # what the energy reads
        ```
    """

    chunk_shape: eqx.AbstractVar[tuple[int, int]]
    convention: eqx.AbstractVar[AbstractConvention]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _alias_old_prefix(cls)

    def prefix(self, observation: Observation) -> Conditioning:
        """Deprecated: [`condition`][flowcorrect.AbstractPolicy.condition]."""
        return _old_prefix(self, observation)

    @abc.abstractmethod
    def condition(self, observation: Observation) -> Conditioning:
        """The work done once per observation (the expensive part of the policy).

        **Arguments:**

        - `observation`: one observation, any pytree.

        **Returns:**

        Whatever `velocity` and `energy_context` need, any pytree.
        """

    @abc.abstractmethod
    def velocity(self, cond: Conditioning, x_t: Actions, t: Scalar) -> Actions:
        """The flow's velocity at a noisy chunk.

        **Arguments:**

        - `cond`: what `condition` returned for this observation.
        - `x_t`: the noisy chunk, `(horizon, action_dim)`.
        - `t`: the flow time, a scalar array in `x_t`'s dtype.

        **Returns:**

        The velocity, an array of the shape of `x_t`.
        """

    @abc.abstractmethod
    def energy_context(self, cond: Conditioning) -> Context:
        """The context an energy reads for this observation (for a learned energy over
        a VLM, its hidden states and mask), taken from the same `condition` pass."""


class AbstractBatchedPolicy(eqx.Module):
    """A flow policy whose model runs on a batch itself (openpi's Pi0 and Pi0.5).

    Like [`flowcorrect.AbstractPolicy`][], with batched methods and two more: the batch
    size of a conditioning, and how to repeat one for best-of-N candidates (where the
    batch axis of each array is, which only the policy knows: openpi's KV cache has it
    second).
    """

    chunk_shape: eqx.AbstractVar[tuple[int, int]]
    convention: eqx.AbstractVar[AbstractConvention]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _alias_old_prefix(cls)

    def prefix(self, observation: Observation) -> Conditioning:
        """Deprecated: [`condition`][flowcorrect.AbstractBatchedPolicy.condition]."""
        return _old_prefix(self, observation)

    @abc.abstractmethod
    def condition(self, observations: Observation) -> Conditioning:
        """The once-per-observation work on a batch of observations."""

    @abc.abstractmethod
    def batch_size(self, cond: Conditioning) -> int:
        """How many observations `cond` holds (a Python int, read from shapes)."""

    @abc.abstractmethod
    def velocity(
        self, cond: Conditioning, x_t: Float[Array, "batch horizon action_dim"], t: Scalar
    ) -> Float[Array, "batch horizon action_dim"]:
        """The velocity of every chunk of the batch at flow time `t` (one scalar for the
        whole batch). Samples must not interact: the velocity of one chunk may depend
        on its own observation and chunk only (the guided placements rely on it)."""

    @abc.abstractmethod
    def energy_context(self, cond: Conditioning) -> Context:
        """The energy's context for every observation: a pytree whose every array has
        a leading batch axis."""

    @abc.abstractmethod
    def repeat(self, cond: Conditioning, n: int) -> Conditioning:
        """The conditioning of a batch of `batch * n` in which each observation appears `n`
        times in a row (observation-major: rows `b * n ... b * n + n - 1` are
        observation `b`), for best-of-N candidates sharing one `condition` pass."""


class VelocityPolicy(AbstractPolicy):
    """Makes a policy of a bare velocity function `velocity(observation, x_t, t)`.

    The observation is passed to the velocity unchanged, and it is also the energy's
    context.

    **Arguments:**

    - `velocity`: a callable `velocity(observation, x_t, t) -> array of x_t's shape`,
        for one sample. An `eqx.Module` (its arrays are traced) or a function (static:
        pass the same object on every call, or each call compiles anew).
    - `chunk_shape`: `(horizon, action_dim)`.
    - `convention`: defaults to [`flowcorrect.OpenPI`][] (`t = 1` is noise).
    """

    fn: Callable[[Context, Actions, Scalar], Actions]
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: AbstractConvention

    def __init__(
        self,
        velocity: Callable[[Context, Actions, Scalar], Actions],
        chunk_shape: tuple[int, int],
        convention: AbstractConvention = OpenPI(),
    ):
        self.fn = velocity
        self.chunk_shape = check_chunk_shape(chunk_shape)
        self.convention = convention

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "`velocity` must be callable as velocity(observation, x_t, t); got "
                f"{type(self.fn).__name__}."
            )
        check_convention(self.convention)

    def condition(self, observation: Observation) -> Conditioning:
        return observation

    def velocity(self, cond: Conditioning, x_t: Actions, t: Scalar) -> Any:
        # Checked here, with a message that says what is wrong, rather than by the
        # return annotation: `fn` is anybody's function.
        return check_velocity_output(self.fn(cond, x_t, t), x_t)

    def energy_context(self, cond: Conditioning) -> Context:
        return cond


def check_chunk_shape(chunk_shape: Any) -> tuple[int, int]:
    try:
        out = tuple(chunk_shape)
    except TypeError:
        out = ()
    if len(out) != 2 or not all(is_int(n) and n >= 1
                                for n in out):
        raise ValueError(
            f"`chunk_shape` must be (horizon, action_dim), two ints >= 1; got {chunk_shape!r}."
        )
    return out  # type: ignore[return-value]


def check_convention(convention: Any) -> None:
    if not isinstance(convention, AbstractConvention):
        raise TypeError(
            "`convention` must be fc.OpenPI() (t = 1 is noise) or fc.Reverse() (t = 0 is "
            f"noise); got {type(convention).__name__}."
        )


def check_velocity_output(out: Any, x: Array) -> Array:
    if getattr(out, "shape", None) != x.shape:
        raise ValueError(
            f"The policy's velocity must return an array of the sample's shape "
            f"{shape_str(x)}; got {shape_str(out)}."
        )
    return out.astype(x.dtype)
