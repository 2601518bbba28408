"""openpi's JAX Pi0 / Pi0.5 as a flowcorrect policy: one prefix pass, velocity over its KV cache."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._conventions import AbstractConvention, OpenPI
from .._custom_types import Scalar
from .._misc import shape_str
from .._model.context import TokenContext
from .._policy import AbstractBatchedPolicy
from ._import import import_openpi

_model, _pi0 = import_openpi()
from flax import nnx  # noqa: E402  (openpi's dependency; after the check above)


class Pi0Prefix(eqx.Module):
    """What one prefix pass of Pi0 leaves for the flow steps and for the energy.

    Every array has the batch axis first, except the KV cache, whose arrays are
    `(layers, batch, prefix_len, kv_heads, head_dim)` as openpi's Gemma keeps them.

    **Arguments:**

    - `kv_cache`: the keys and values of the prefix at every layer of the VLM.
    - `prefix_mask`: `(batch, prefix_len)`, **True for a real token** (openpi's
        convention), False for padding (an absent image, prompt padding).
    - `prefix_out`: `(batch, prefix_len, width)`, the VLM's last hidden states over the
        prefix (after its final norm), which openpi's `sample_actions` discards; the
        context a learned energy reads.
    - `state`: `(batch, action_dim)`, the robot state (Pi0 embeds it in the suffix;
        Pi0.5 has it in the prompt and ignores it here).
    """

    kv_cache: tuple[
        Float[Array, "layers batch prefix_len kv_heads head_dim"],
        Float[Array, "layers batch prefix_len kv_heads head_dim"],
    ]
    prefix_mask: Bool[Array, "batch prefix_len"]
    prefix_out: Float[Array, "batch prefix_len width"]
    state: Float[Array, "batch state_dim"]


class Pi0Policy(AbstractBatchedPolicy):
    """openpi's JAX `Pi0` model (Pi0 or Pi0.5) as a [`flowcorrect.AbstractBatchedPolicy`][].

    The model is split once (`nnx.split`): its graph is static and its weights are
    traced leaves of this Module, so new weights do not recompile and a jitted
    sampler receives them as arguments, not as constants.

    - `condition(observation)` runs openpi's own preprocessing (`preprocess_observation`
      with `train=False`), `embed_prefix`, and the VLM over the prefix, keeping the
      KV cache, the prefix mask and the VLM's hidden states `prefix_out`.
    - `velocity(prefix, x_t, t)` runs `embed_suffix` and the action expert over that
      cache, exactly as one step of openpi's `sample_actions` does.
    - `energy_context(prefix)` is `fc.TokenContext(prefix_out, prefix_mask)`: the
      mask is True for real tokens in both openpi and flowcorrect, so it passes
      through unchanged.

    With no correction, Euler over `fc.OpenPI().times(num_steps)` with this policy
    reproduces `model.sample_actions(rng, observation, num_steps=..., noise=...)`
    bit for bit in float32.

    **Arguments:**

    - `model`: an `openpi.models.pi0.Pi0` (e.g. `config.create(key)` or
        `config.load(params)` of a `Pi0Config`, `pi05=False` or `True`). It is not
        modified.

    !!! example

        ```python
        from flowcorrect.openpi import Pi0Policy

        policy = Pi0Policy(model)                    # model: openpi Pi0, already loaded
        actions, info = fc.sample(policy, observation, key, placement=fc.BestOfN(8),
                                  energy=energy)
        ```
    """

    graphdef: Any = eqx.field(static=True)
    weights: Any
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: AbstractConvention

    def __init__(self, model: Any):
        if not isinstance(model, _pi0.Pi0):
            raise TypeError(
                "`model` must be openpi's JAX `openpi.models.pi0.Pi0` (Pi0 or Pi0.5, from "
                f"`Pi0Config(...).create(key)` or `.load(params)`); got {type(model).__name__}. "
                "openpi's PyTorch model and Pi0-FAST are not supported."
            )
        self.graphdef, self.weights = nnx.split(model)
        self.chunk_shape = (int(model.action_horizon), int(model.action_dim))
        self.convention = OpenPI()

    def _model(self) -> Any:
        return nnx.merge(self.graphdef, self.weights)

    def condition(self, observations: Any) -> Pi0Prefix:
        """Runs the once-per-observation part of Pi0 on a batch.

        **Arguments:**

        - `observations`: an `openpi.models.model.Observation` with a leading batch
            axis (what openpi's `Policy` hands the model after its input transforms).

        **Returns:**

        A [`flowcorrect.openpi.Pi0Prefix`][].
        """
        if not isinstance(observations, _model.Observation):
            raise TypeError(
                "`observations` must be an openpi `Observation` with a leading batch axis "
                "(build one with `openpi.models.model.Observation.from_dict`); got "
                f"{type(observations).__name__}."
            )
        if observations.state.ndim != 2:
            raise ValueError(
                "`observations.state` must be (batch, state_dim): add a leading batch axis "
                f"(`x[None]` on every array); got {shape_str(observations.state)}."
            )
        model = self._model()
        obs = _model.preprocess_observation(None, observations, train=False)
        tokens, mask, ar_mask = model.embed_prefix(obs)
        attention = _pi0.make_attn_mask(mask, ar_mask)
        positions = jnp.cumsum(mask, axis=1) - 1
        (prefix_out, _), kv_cache = model.PaliGemma.llm(
            [tokens, None], mask=attention, positions=positions
        )
        return Pi0Prefix(
            kv_cache=tuple(kv_cache), prefix_mask=mask, prefix_out=prefix_out, state=obs.state
        )

    def batch_size(self, prefix: Pi0Prefix) -> int:
        return prefix.prefix_mask.shape[0]

    def velocity(
        self,
        prefix: Pi0Prefix,
        x_t: Float[Array, "batch horizon action_dim"],
        t: Scalar,
    ) -> Float[Array, "batch horizon action_dim"]:
        """The action expert's velocity over the prefix's KV cache at flow time `t`."""
        if x_t.shape[1:] != self.chunk_shape or x_t.shape[0] != self.batch_size(prefix):
            raise ValueError(
                f"`x_t` must be (batch, horizon, action_dim) = ({self.batch_size(prefix)}, "
                f"{self.chunk_shape[0]}, {self.chunk_shape[1]}); got {shape_str(x_t)}."
            )
        model = self._model()
        batch = x_t.shape[0]
        # embed_suffix reads only the state of the observation.
        obs = _model.Observation(images={}, image_masks={}, state=prefix.state)
        tokens, mask, ar_mask, adarms_cond = model.embed_suffix(
            obs, x_t, jnp.broadcast_to(t, (batch,))
        )
        # Suffix queries see every real prefix token, and the suffix causally by blocks.
        num_suffix = tokens.shape[1]
        to_prefix = jnp.broadcast_to(
            prefix.prefix_mask[:, None, :], (batch, num_suffix, prefix.prefix_mask.shape[1])
        )
        to_suffix = _pi0.make_attn_mask(mask, ar_mask)
        attention = jnp.concatenate([to_prefix, to_suffix], axis=-1)
        num_real = jnp.sum(prefix.prefix_mask, axis=-1, keepdims=True)
        positions = num_real + jnp.cumsum(mask, axis=-1) - 1
        (_, suffix_out), _ = model.PaliGemma.llm(
            [None, tokens],
            mask=attention,
            positions=positions,
            kv_cache=prefix.kv_cache,
            adarms_cond=[None, adarms_cond],
        )
        return model.action_out_proj(suffix_out[:, -self.chunk_shape[0] :])

    def energy_context(self, prefix: Pi0Prefix) -> TokenContext:
        """`fc.TokenContext(prefix_out, prefix_mask)`, mask True for real tokens."""
        return TokenContext(prefix.prefix_out, prefix.prefix_mask)

    def repeat(self, prefix: Pi0Prefix, n: int) -> Pi0Prefix:
        """Each observation `n` times in a row; the KV cache's batch axis is its second."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"`n` must be an int >= 1; got {n!r}.")
        k, v = prefix.kv_cache
        return Pi0Prefix(
            kv_cache=(jnp.repeat(k, n, axis=1), jnp.repeat(v, n, axis=1)),
            prefix_mask=jnp.repeat(prefix.prefix_mask, n, axis=0),
            prefix_out=jnp.repeat(prefix.prefix_out, n, axis=0),
            state=jnp.repeat(prefix.state, n, axis=0),
        )



def as_pi0_policy(model: Any) -> "Pi0Policy":
    """openpi's JAX `Pi0` as a [`flowcorrect.openpi.Pi0Policy`][]; a `Pi0Policy` as is."""
    if isinstance(model, _pi0.Pi0):
        return Pi0Policy(model)
    if isinstance(model, Pi0Policy):
        return model
    raise TypeError(
        "`model` must be openpi's JAX Pi0 or a flowcorrect.openpi.Pi0Policy; got "
        f"{type(model).__name__}."
    )
