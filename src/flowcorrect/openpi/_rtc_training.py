"""Training-time real-time chunking for openpi's Pi0, through openpi's own model code.

Pi0's action expert embeds the flow time *per action token*: `embed_suffix` repeats one
sine-cosine time embedding over the horizon, concatenates it to each action token and
mixes the two with `action_time_mlp_in` / `action_time_mlp_out`. A time per token is
therefore the same computation with a different time on each row, and needs no change
to openpi: [`Pi0TokenTimePolicy`][] runs openpi's own modules of the model
(`state_proj`, `action_in_proj`, `posemb_sincos`, the two time MLPs, the Gemma stack and
`action_out_proj`), with the per-token times in place of the repeated one, and
[`pi0_prefix_conditioned_loss`][] is openpi's `compute_loss` with the transform of
[`flowcorrect.rtc.PrefixConditioning`][]: the first `d` actions clean at `t = 0` (openpi's data
end: its `x_t = t * noise + (1 - t) * actions`), the loss on the rest.

**Pi0.5.** Pi0.5 conditions on time by adaRMS: `time_mlp_in` / `time_mlp_out` give one
conditioning vector per *sample*, and openpi's `gemma.RMSNorm` broadcasts it over the
tokens with `modulation[:, None, :]`. A per-position condition `(batch, tokens, width)`
does not pass through that line, so training-time RTC for Pi0.5 needs a change to
openpi's RMSNorm (accept `(b, s, d)` conditions), which this module does not make: it
refuses a Pi0.5 model. The cost of that change: each of the action expert's
`2 * depth + 1` adaRMS norms computes its `width -> 3 * width` modulation per token
instead of per sample (for Pi0.5's expert, width 1024 and 18 layers, about
`37 * 3 * 1024^2 ≈ 116M` multiply-adds per token, against roughly 300M per token for
the expert's own layers: about +40% of the expert's FLOPs at every flow step), or next
to nothing if the modulation is computed for the two distinct times (the clean prefix
and the postfix) and gathered per token.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._conventions import AbstractConvention
from .._custom_types import Scalar
from .._misc import shape_str
from .._model.context import TokenContext
from .._policy import AbstractBatchedPolicy
from .._rtc_training import AbstractDelays, PrefixConditioning
from ._import import import_openpi
from ._pi0 import Pi0Policy, Pi0Prefix, as_pi0_policy

_model, _pi0 = import_openpi()
from flax import nnx  # noqa: E402  (openpi's dependency; after the check above)


def _refuse_pi05(model: Any) -> None:
    if model.pi05:
        raise NotImplementedError(
            "Training-time RTC needs a flow time per action token. Pi0.5 conditions on time "
            "by adaRMS, one vector per sample, and openpi's gemma.RMSNorm broadcasts it with "
            "`modulation[:, None, :]`; per-position conditioning needs that line changed in "
            "openpi (see flowcorrect.openpi._rtc_training's docstring for the cost). Use "
            "Pi0 (pi05=False), or inference-time fc.RealTimeChunking for Pi0.5."
        )


def embed_suffix_token_time(
    model: Any, state: Array, noisy_actions: Array, times: Float[Array, "batch horizon"]
) -> tuple[Array, Array, Array]:
    """openpi's `Pi0.embed_suffix` with one flow time per action token.

    The same modules and the same order of operations as openpi's (Pi0, not Pi0.5):
    the state token, `action_in_proj`, the sine-cosine embedding of each token's time,
    `action_time_mlp_in`, swish, `action_time_mlp_out`. With all times equal it is
    openpi's `embed_suffix`.

    **Returns:** `(tokens, input_mask, ar_mask)` as openpi's (`adarms_cond` is `None`).
    """
    _refuse_pi05(model)
    batch, horizon = noisy_actions.shape[:2]
    state_token = model.state_proj(state)[:, None, :]
    action_tokens = model.action_in_proj(noisy_actions)
    width = model.action_in_proj.out_features
    time_emb = _pi0.posemb_sincos(times.reshape(-1), width, min_period=4e-3, max_period=4.0)
    time_tokens = time_emb.reshape(batch, horizon, width)
    x = jnp.concatenate([action_tokens, time_tokens.astype(action_tokens.dtype)], axis=-1)
    x = model.action_time_mlp_out(nnx.swish(model.action_time_mlp_in(x)))
    tokens = jnp.concatenate([state_token, x], axis=1)
    input_mask = jnp.ones(tokens.shape[:2], dtype=jnp.bool_)
    ar_mask = jnp.array([True, True] + [False] * (horizon - 1))
    return tokens, input_mask, ar_mask


def _batch_times(t: Any, batch: int, horizon: int) -> Float[Array, "batch horizon"]:
    t = jnp.asarray(t)
    if t.shape not in ((), (horizon,), (batch, horizon)):
        raise ValueError(
            f"`t` must be a scalar, one time per action token ({horizon},), or "
            f"({batch}, {horizon}); got {shape_str(t)}."
        )
    return jnp.broadcast_to(t, (batch, horizon))


class Pi0TokenTimePolicy(AbstractBatchedPolicy):
    """openpi's Pi0 as a policy whose velocity takes a flow time per action token.

    The prefix pass, the energy's context and best-of-N repetition are those of
    [`flowcorrect.openpi.Pi0Policy`][] (`inner`); the velocity runs the action expert
    over the KV cache with [`embed_suffix_token_time`][]. `t` may be a scalar (then it
    is openpi's velocity), `(horizon,)` or `(batch, horizon)`. Use it with
    [`flowcorrect.rtc.PrefixConditioned`][] for a Pi0 fine-tuned with
    [`pi0_prefix_conditioned_loss`][]. Pi0.5 is refused (see the module's docstring).

    **Arguments:**

    - `model`: an `openpi.models.pi0.Pi0` with `pi05=False`, or a `Pi0Policy` of one.
    """

    inner: Pi0Policy
    accepts_token_time: bool = eqx.field(static=True, default=True)

    def __init__(self, model: Any):
        self.inner = as_pi0_policy(model)
        _refuse_pi05(self.inner._model())

    @property
    def chunk_shape(self) -> tuple[int, int]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.chunk_shape

    @property
    def convention(self) -> AbstractConvention:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.convention

    def condition(self, observations: Any) -> Pi0Prefix:
        return self.inner.condition(observations)

    def batch_size(self, prefix: Pi0Prefix) -> int:
        return self.inner.batch_size(prefix)

    def energy_context(self, prefix: Pi0Prefix) -> TokenContext:
        return self.inner.energy_context(prefix)

    def repeat(self, prefix: Pi0Prefix, n: int) -> Pi0Prefix:
        return self.inner.repeat(prefix, n)

    def velocity(
        self,
        prefix: Pi0Prefix,
        x_t: Float[Array, "batch horizon action_dim"],
        t: Scalar | Float[Array, " horizon"] | Float[Array, "batch horizon"],
    ) -> Float[Array, "batch horizon action_dim"]:
        """The action expert's velocity over the prefix's KV cache, a time per token."""
        horizon = self.chunk_shape[0]
        batch = self.batch_size(prefix)
        if x_t.shape != (batch, *self.chunk_shape):
            raise ValueError(
                f"`x_t` must be (batch, horizon, action_dim) = ({batch}, {horizon}, "
                f"{self.chunk_shape[1]}); got {shape_str(x_t)}."
            )
        model = self.inner._model()
        times = _batch_times(t, batch, horizon)
        tokens, mask, ar_mask = embed_suffix_token_time(model, prefix.state, x_t, times)
        # As in Pi0Policy.velocity: suffix queries see every real prefix token, and the
        # suffix causally by blocks.
        num_suffix = tokens.shape[1]
        to_prefix = jnp.broadcast_to(
            prefix.prefix_mask[:, None, :], (batch, num_suffix, prefix.prefix_mask.shape[1])
        )
        to_suffix = _pi0.make_attn_mask(mask, ar_mask)
        attention = jnp.concatenate([to_prefix, to_suffix], axis=-1)
        num_real = jnp.sum(prefix.prefix_mask, axis=-1, keepdims=True)
        positions = num_real + jnp.cumsum(mask, axis=-1) - 1
        (_, suffix_out), _ = model.PaliGemma.llm(
            [None, tokens], mask=attention, positions=positions, kv_cache=prefix.kv_cache,
            adarms_cond=[None, None],
        )
        return model.action_out_proj(suffix_out[:, -horizon:])


def pi0_prefix_conditioned_loss(
    model: Any,
    rng: Any,
    observation: Any,
    actions: Float[Array, "batch horizon action_dim"],
    delays: AbstractDelays,
    *,
    train: bool = False,
) -> Float[Array, "batch horizon"]:
    """openpi's `Pi0.compute_loss` with training-time real-time chunking.

    The same preprocessing, noise and flow-time distribution as openpi's (`beta(1.5, 1)
    * 0.999 + 0.001`) and one forward pass of prefix and suffix; per example a delay `d`
    from `delays`, the first `d` actions clean at `t = 0` (openpi's data end), the loss
    on the other rows only. Returned per token like openpi's, `(batch, horizon)`, with
    the prefix rows 0 and the rest scaled so that the plain mean openpi's training loop
    takes (`jnp.mean(loss)`) is the mean over postfix tokens.

    **Fine-tuning recipe.** In openpi's `scripts/train.py`, the train step's
    `model.compute_loss(rng, observation, actions, train=True)` becomes
    `pi0_prefix_conditioned_loss(model, rng, observation, actions,
    fc.rtc.ExponentialDelays(max_delay), train=True)`; start from the trained checkpoint
    (its weights load unchanged: the architecture is the same) and serve the result with
    [`Pi0TokenTimePolicy`][] and [`flowcorrect.rtc.PrefixConditioned`][].
    """
    _refuse_pi05(model)
    if not isinstance(delays, AbstractDelays):
        raise TypeError(
            "`delays` must be a delay distribution such as fc.rtc.ExponentialDelays(4); got "
            f"{type(delays).__name__}."
        )
    preprocess_rng, noise_rng, time_rng, delay_rng = jax.random.split(rng, 4)
    observation = _model.preprocess_observation(preprocess_rng, observation, train=train)
    batch, horizon = actions.shape[:2]
    noise = jax.random.normal(noise_rng, actions.shape)
    time = jax.random.beta(time_rng, 1.5, 1, (batch,)) * 0.999 + 0.001
    transform = PrefixConditioning(delays)
    conv = as_pi0_policy(model).convention
    ex = jax.vmap(lambda a, n, s, k: transform(conv, a, n, s, k))(
        actions, noise, time.astype(actions.dtype), jax.random.split(delay_rng, batch)
    )
    prefix_tokens, prefix_mask, prefix_ar_mask = model.embed_prefix(observation)
    suffix_tokens, suffix_mask, suffix_ar_mask = embed_suffix_token_time(
        model, observation.state, ex.x_t, ex.t
    )
    input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
    ar_mask = jnp.concatenate([prefix_ar_mask, suffix_ar_mask], axis=0)
    attn_mask = _pi0.make_attn_mask(input_mask, ar_mask)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    (_, suffix_out), _ = model.PaliGemma.llm(
        [prefix_tokens, suffix_tokens], mask=attn_mask, positions=positions,
        adarms_cond=[None, None],
    )
    v_t = model.action_out_proj(suffix_out[:, -horizon:])
    per_token = jnp.mean(jnp.square(v_t - ex.target), axis=-1)
    m = ex.loss_mask.astype(per_token.dtype)
    return per_token * m * (m.size / jnp.maximum(jnp.sum(m), 1.0))


__all__ = ["Pi0TokenTimePolicy", "embed_suffix_token_time", "pi0_prefix_conditioned_loss"]
