"""A small learned energy over a state vector, for policies without a vision-language model."""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Actions, Context, Scalar
from .._misc import is_int, shape_str
from .base import AbstractLearnedEnergy, LearnedEnergyConfig, check_chunk
from .layers import LayerNorm, Linear


@dataclasses.dataclass(frozen=True)
class MLPEnergyConfig(LearnedEnergyConfig):
    """The architecture of an [`flowcorrect.MLPEnergy`][], serialisable to JSON.

    **Arguments:**

    - `obs_dim`: the length of the observation vector (39 for Meta-World's state).
    - `action_dim`: the action dimension of a chunk (4 for Meta-World).
    - `horizon`: the number of steps in a chunk: the chunk is read as one flat vector,
        so the model is built for one horizon.
    - `hidden`: the width of every hidden layer. Default 256.
    - `depth`: hidden layers after the first, joint one. Default 2.
    - `spectral_norm`: spectrally normalise the layers between the actions and the
        energy (the action projection, the hidden layers and the output). Default off.
    - `power_iterations`: power-iteration steps (>= 1) per spectral norm. Default 5.
    """

    obs_dim: int
    action_dim: int
    horizon: int
    hidden: int = 256
    depth: int = 2
    spectral_norm: bool = False
    power_iterations: int = 5

    def __post_init__(self):
        for name in ("obs_dim", "action_dim", "horizon", "hidden", "power_iterations"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"`{name}` must be an int >= 1; got {value!r}.")
        if not (
            is_int(self.depth) and self.depth >= 0
        ):
            raise ValueError(f"`depth` must be an int >= 0; got {self.depth!r}.")
        if not isinstance(self.spectral_norm, bool):
            raise ValueError(f"`spectral_norm` must be a bool; got {self.spectral_norm!r}.")


class MLPEnergy(AbstractLearnedEnergy):
    """A learned energy `E(s, a)` over a state vector: an MLP on `[s, a]`, split for speed.

    The first layer of an MLP on the concatenation `[s, flatten(a)]` is
    `W_s s + W_a a + b`, so it splits exactly: `encode(s) = LayerNorm(s) @ W_s.T + b`
    once per observation, `embed_actions(a) = flatten(a) @ W_a.T` once per chunk, and
    only the sum, `depth` hidden layers (GELU) and a linear read-out run per pair. That
    makes InfoNCE over `B x B` pairs cost one small MLP per pair.

    For Meta-World-style state vectors (the common case for a policy without a VLM):

    ```python
    config = fc.MLPEnergyConfig(obs_dim=39, action_dim=4, horizon=8, hidden=256)
    model = fc.MLPEnergy(config, key=jax.random.key(0))   # 150,350 parameters
    energy = model(observation, chunk)                    # (39,), (8, 4) -> scalar
    ```

    **Arguments:**

    - `config`: an [`flowcorrect.MLPEnergyConfig`][].
    - `key`: a PRNG key for the initial weights.

    The context of one observation is its state vector, shape `(obs_dim,)`; there is
    no dropout, so no key is needed to score.
    """

    config_class: ClassVar[type[MLPEnergyConfig]] = MLPEnergyConfig
    config: MLPEnergyConfig = eqx.field(static=True)
    obs_norm: LayerNorm
    obs_in: Linear
    action_in: Linear
    layers: tuple[Linear, ...]
    out: Linear

    def __init__(self, config: MLPEnergyConfig, *, key: PRNGKeyArray):
        if not isinstance(config, MLPEnergyConfig):
            raise TypeError(
                "MLPEnergy takes an MLPEnergyConfig, e.g. "
                "MLPEnergy(MLPEnergyConfig(obs_dim=39, action_dim=4, horizon=8), key=key); "
                f"got {type(config).__name__}."
            )
        c = config
        sn = dict(spectral_norm=c.spectral_norm, power_iterations=c.power_iterations)
        ko, ka, kout, *kl = jax.random.split(key, 3 + c.depth)
        self.config = config
        # Raw state vectors mix units (positions, velocities, gripper); normalising them
        # once per observation costs nothing per pair.
        self.obs_norm = LayerNorm(c.obs_dim)
        self.obs_in = Linear(c.obs_dim, c.hidden, key=ko)
        self.action_in = Linear(c.horizon * c.action_dim, c.hidden, use_bias=False, **sn, key=ka)
        self.layers = tuple(Linear(c.hidden, c.hidden, **sn, key=k) for k in kl)
        # No output bias: InfoNCE cannot see a constant added to every energy, so it
        # would get no gradient.
        self.out = Linear(c.hidden, 1, use_bias=False, **sn, key=kout)

    # `context` is annotated loosely so that a wrong shape gets the message below, not a
    # runtime type checker's.
    def encode(self, context: Context) -> Float[Array, " hidden"]:
        """The observation's part of the first layer, once per observation.

        **Arguments:**

        - `context`: one state vector, `(obs_dim,)`.

        **Returns:**

        A `(hidden,)` vector.
        """
        shape = getattr(context, "shape", None)
        if shape != (self.config.obs_dim,):
            hint = ""
            if shape is not None and len(shape) == 2 and shape[-1] == self.config.obs_dim:
                hint = " That is a batch: encode one observation at a time (jax.vmap)."
            raise ValueError(
                "MLPEnergy reads ONE observation vector of shape "
                f"({self.config.obs_dim},); got {shape_str(context)}.{hint}"
            )
        if not jnp.issubdtype(context.dtype, jnp.floating):
            raise ValueError(
                f"MLPEnergy: observations must be floating point; got {context.dtype}."
            )
        return self.obs_in(self.obs_norm(context.astype(jnp.float32)))

    def embed_actions(
        self, actions: Actions, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " hidden"]:
        """The chunk's part of the first layer, once per chunk; `key` is unused."""
        c = self.config
        check_chunk("MLPEnergy", actions, c.horizon, c.action_dim)
        return self.action_in(actions.astype(jnp.float32).reshape(-1))

    def score_embedded(
        self, encoded: Float[Array, " hidden"], embedded: Float[Array, " hidden"]
    ) -> Scalar:
        """The energy of one (observation, chunk) pair from their parts of the first layer."""
        x = jax.nn.gelu(encoded + embedded)
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.out(x)[0]
