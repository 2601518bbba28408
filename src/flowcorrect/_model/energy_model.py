"""The learned energy model of the reference method, split into encode and score."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._custom_types import Actions, Context, Scalar
from .base import AbstractLearnedEnergy, check_chunk
from .config import EnergyModelConfig
from .context import check_context
from .layers import CrossAttention, KeysValues, Linear, MLPResNet, sinusoidal_positions


class EncodedContext(eqx.Module):
    """What [`flowcorrect.EnergyModel.encode`][] computes once per observation.

    **Attributes:**

    - `kv`: the attention keys and values of the (pooled) context tokens plus the null
        token, and the mask of real entries (True = real).
    """

    kv: KeysValues


class EmbeddedActions(eqx.Module):
    """An action chunk embedded for attention: the residual stream and its queries."""

    x: Float[Array, "horizon hidden"]
    queries: Float[Array, "horizon heads head_dim"]


def _pool(
    h: Float[Array, "seq hidden"], mask: Bool[Array, " seq"], window: int
) -> tuple[Float[Array, "pooled hidden"], Bool[Array, " pooled"]]:
    """Masked mean over windows of `window` tokens; a window of padding only stays padding."""
    seq = h.shape[0]
    pad = (-seq) % window
    h = jnp.pad(h, ((0, pad), (0, 0)))
    mask = jnp.pad(mask, (0, pad))
    h = h.reshape(-1, window, h.shape[-1])
    m = mask.reshape(-1, window)
    count = jnp.sum(m, axis=1)
    total = jnp.sum(jnp.where(m[:, :, None], h, 0), axis=1)
    pooled = total / jnp.maximum(count, 1).astype(h.dtype)[:, None]
    return pooled, count > 0


class EnergyModel(AbstractLearnedEnergy):
    """The learned energy `E(s, a)` of the reference method, as an Equinox module.

    Context tokens go through an MLP-ResNet to the hidden width (optionally pooled) and
    give attention keys and values: that is [`flowcorrect.EnergyModel.encode`][], done
    once per observation. The action chunk goes through an MLP-ResNet, gets sinusoidal
    positions (and dropout, in training), and attends to the context in one
    cross-attention layer under the padding mask; an MLP-ResNet head gives a per-step
    energy and the energy is its mean over the horizon: that is `score` (inherited
    from [`flowcorrect.AbstractLearnedEnergy`][]), done for every chunk and correction
    step.

    It is an [`flowcorrect.AbstractLearnedEnergy`][] (so [`flowcorrect.train.fit`][],
    [`flowcorrect.train.evaluate`][] and [`flowcorrect.save_model`][] take it) and an
    ordinary energy: `model(context, actions)`, [`flowcorrect.correct`][] and
    [`flowcorrect.bind`][] work, on
    one sample (vmap for batches). The context is a [`flowcorrect.TokenContext`][]; its mask is
    True for real tokens.

    **Arguments:**

    - `config`: an [`flowcorrect.EnergyModelConfig`][].
    - `key`: a PRNG key for the initial weights.

    Like every Equinox model with dropout, a new model is in training mode: scoring
    then needs a `key`. Use `eqx.nn.inference_mode(model)` for inference;
    [`flowcorrect.train.fit`][] and [`flowcorrect.load_model`][] return models in
    inference mode already.

    !!! example

        ```python
        config = fc.EnergyModelConfig(context_dim=2048, action_dim=7)
        model = eqx.nn.inference_mode(fc.EnergyModel(config, key=jax.random.key(0)))
        context = fc.TokenContext(prefix_out[0], prefix_mask[0])   # mask: True = real
        energy = model(context, actions)                           # a scalar
        actions, info = fc.correct(model, fc.TokenContext(prefix_out, prefix_mask), chunks)
        ```
    """

    config_class: ClassVar[type[EnergyModelConfig]] = EnergyModelConfig
    config: EnergyModelConfig = eqx.field(static=True)
    context_net: MLPResNet
    action_net: MLPResNet
    dropout: eqx.nn.Dropout
    attention: CrossAttention
    head: MLPResNet
    head_out: Linear

    def __init__(self, config: EnergyModelConfig, *, key: PRNGKeyArray):
        if not isinstance(config, EnergyModelConfig):
            raise TypeError(
                "EnergyModel takes an EnergyModelConfig, e.g. "
                "EnergyModel(EnergyModelConfig(context_dim=2048, action_dim=7), key=key); "
                f"got {type(config).__name__}."
            )
        kc, ka, kt, kh, ko = jax.random.split(key, 5)
        c = config
        sn = dict(spectral_norm=c.spectral_norm, power_iterations=c.power_iterations)
        self.config = config
        self.context_net = MLPResNet(c.context_dim, c.hidden, c.context_blocks, c.width, key=kc)
        self.action_net = MLPResNet(c.action_dim, c.hidden, c.action_blocks, c.width, **sn, key=ka)
        self.dropout = eqx.nn.Dropout(c.dropout)
        self.attention = CrossAttention(c.hidden, c.num_heads, **sn, key=kt)
        # InfoNCE cannot see a constant added to every energy, so an unbounded energy
        # gets no offset parameter (it would receive exactly zero gradient and drift
        # under Adam's normalisation); the bounded one needs it to place the sigmoid.
        bounded = c.energy == "bounded"
        self.head = MLPResNet(
            c.hidden,
            c.hidden,
            c.head_blocks,
            c.width,
            project=False,
            norm_bias=False,
            **sn,
            key=kh,
        )
        self.head_out = Linear(c.hidden, 1, use_bias=bounded, **sn, key=ko)

    def encode(self, context: Context) -> EncodedContext:
        """Encodes the context of one observation: done once, reused by every score.

        **Arguments:**

        - `context`: a [`flowcorrect.TokenContext`][] with tokens `(seq, context_dim)`
            and mask `(seq,)`, True for real tokens.

        **Returns:**

        An [`flowcorrect.EncodedContext`][]: the attention keys and values.
        """
        context = check_context(context, self.config.context_dim)
        mask = context.mask
        # Zeroing padding first keeps garbage (even NaN) in padded slots out of every
        # sum, so padding cannot change the energy.
        tokens = jnp.where(mask[:, None], context.tokens, 0).astype(jnp.float32)
        h = self.context_net(tokens)
        if self.config.context_pool > 1:
            h, mask = _pool(h, mask, self.config.context_pool)
        return EncodedContext(self.attention.keys_values(h, mask))

    def embed_actions(
        self, actions: Actions, *, key: PRNGKeyArray | None = None
    ) -> EmbeddedActions:
        """Embeds one action chunk; the part of `score` that does not read the context.

        Training scores every chunk against every context in a batch, and embeds each
        chunk once for all of them with this.

        **Arguments:**

        - `actions`: one chunk, `(horizon, action_dim)`.
        - `key`: a PRNG key for dropout; needed only in training mode.

        **Returns:**

        An [`flowcorrect.EmbeddedActions`][].
        """
        check_chunk("EnergyModel", actions, None, self.config.action_dim)
        inference = self.dropout.inference
        # A plain `jax.jit` (openpi's, not `eqx.filter_jit`) traces the flag as well: it
        # cannot steer Python control flow then, so it selects between the two results.
        traced = isinstance(inference, jax.core.Tracer)
        if not traced and key is None and not inference and self.dropout.p > 0:
            raise RuntimeError(
                "This EnergyModel is in training mode (dropout on) and was called without "
                "a `key`. For inference use `model = eqx.nn.inference_mode(model)` "
                "(fc.train.fit and fc.load_model return inference-mode models); to train, "
                "pass `key=`."
            )
        x = self.action_net(actions.astype(jnp.float32))
        x = x + sinusoidal_positions(x.shape[0], x.shape[1])
        if traced:
            # Without a key no dropout can be drawn: the model scores as in inference.
            if key is not None:
                x = jnp.where(inference, x, self.dropout(x, key=key, inference=False))
        else:
            x = self.dropout(x, key=key)
        return EmbeddedActions(x, self.attention.queries(x))

    def head_values(
        self, encoded: EncodedContext, embedded: EmbeddedActions
    ) -> Float[Array, " horizon"]:
        """The head's output per step, before the bounded energy's squashing."""
        x = embedded.x + self.attention(embedded.queries, encoded.kv)
        return self.head_out(self.head(x))[:, 0]

    def step_energies(
        self, encoded: EncodedContext, embedded: EmbeddedActions
    ) -> Float[Array, " horizon"]:
        """The energy of each step of the chunk; `score` is their mean."""
        out = self.head_values(encoded, embedded)
        if self.config.energy == "bounded":
            # The reference's squashing; its slope sigmoid'(h/2) vanishes for |h| >~ 12
            # (see the model docs for where trained heads land).
            out = jax.nn.sigmoid(0.5 * out) * 2.0 + 0.1
        return out

    def score_embedded(self, encoded: EncodedContext, embedded: EmbeddedActions) -> Scalar:
        """The energy of an embedded chunk given an encoded context."""
        return jnp.mean(self.step_energies(encoded, embedded))
