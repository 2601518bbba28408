"""A flow policy with Pi0's structure and random weights, for tests and benchmarks.

Physical Intelligence's Pi0 (openpi, `pi0.py` and `gemma.py`) is two Gemma-style
transformers that share their attention: a prefix model (PaliGemma's 2B Gemma) over the
embedded images and prompt, and an action expert (a 300M Gemma) over the noisy action
chunk. Layer `i` of the action expert attends to its own tokens and to the keys and
values of prefix layer `i`. The prefix does not depend on the flow time, so openpi runs
it once per observation into a KV cache and runs only the action expert at each of the
10 Euler steps.

[`flowcorrect.Pi0ShapedPolicy`][] reproduces that structure (and its costs, up to
Pi0's real sizes) without openpi: RMS norms, rotary positions counted over real tokens
only, grouped-query attention, gated-GELU MLPs, a sinusoidal flow-time embedding mixed
with the noisy actions by an MLP. What it leaves out: SigLIP and the token embedding
(the observation is already a sequence of embedded tokens) and Pi0's state token.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._conventions import AbstractConvention, OpenPI
from .._custom_types import RealLike, Scalar
from .._misc import is_int, shape_str
from .._model.context import TokenContext
from .._policy import AbstractBatchedPolicy

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Pi0ShapedConfig:
    """The sizes of a [`flowcorrect.Pi0ShapedPolicy`][].

    The defaults are Pi0's (PaliGemma's Gemma 2B as the prefix model, Gemma 300M as the
    action expert); [`flowcorrect.Pi0ShapedConfig.cpu`][] is a few-second size for
    tests. Change single sizes with `dataclasses.replace(config, depth=4)`.

    **Arguments:**

    - `token_dim`: the width of the observation's tokens (projected to `width`).
    - `width`, `depth`, `mlp_width`: the prefix model (2048, 18, 16384).
    - `num_heads`, `num_kv_heads`, `head_dim`: attention of both models (8 query heads
        sharing 1 key/value head, head dimension 256). `num_kv_heads` must divide
        `num_heads`.
    - `expert_width`, `expert_mlp_width`: the action expert (1024, 4096). Its depth is
        `depth`: expert layer `i` reads prefix layer `i`'s keys and values.
    - `horizon`, `action_dim`: the chunk (50, 32: openpi's padded actions).
    - `prefix_len`: the number of observation tokens of
        [`flowcorrect.Pi0ShapedObservation.random`][] (816: three 224px images of 256
        tokens and a 48-token prompt). The policy accepts any length.
    - `dtype`: `"bfloat16"` (Pi0's weights) or `"float32"`.
    """

    token_dim: int = 2048
    width: int = 2048
    depth: int = 18
    mlp_width: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    expert_width: int = 1024
    expert_mlp_width: int = 4096
    horizon: int = 50
    action_dim: int = 32
    prefix_len: int = 816
    # A str, not a Literal: a wrong name gets the ValueError below, which lists the choices.
    dtype: str = "bfloat16"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "dtype":
                continue
            if not (is_int(value) and value >= 1):
                raise ValueError(f"`{field.name}` must be an int >= 1; got {value!r}.")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"`num_kv_heads` ({self.num_kv_heads}) must divide `num_heads` "
                f"({self.num_heads}); Pi0 uses num_heads=8, num_kv_heads=1."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"`head_dim` must be even (rotary embeddings rotate pairs); got {self.head_dim}."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}; got {self.dtype!r}.")

    @classmethod
    def pi0(cls, **changes: Any) -> "Pi0ShapedConfig":
        """Pi0's sizes: about 1.98B prefix and 0.31B action-expert parameters, bfloat16."""
        return cls(**changes)

    @classmethod
    def cpu(cls, **changes: Any) -> "Pi0ShapedConfig":
        """A CPU size (width 64, 2 layers, 32 prefix tokens, float32) with Pi0's chunk
        `(50, 32)` and grouped-query attention (4 query heads, 1 key/value head)."""
        sizes = dict(
            token_dim=64,
            width=64,
            depth=2,
            mlp_width=256,
            num_heads=4,
            num_kv_heads=1,
            head_dim=16,
            expert_width=32,
            expert_mlp_width=128,
            prefix_len=32,
            dtype="float32",
        )
        return cls(**(sizes | changes))

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]


class Pi0ShapedObservation(eqx.Module):
    """A batch of observations for [`flowcorrect.Pi0ShapedPolicy`][]: embedded tokens
    and a mask of real tokens.

    **Arguments:**

    - `tokens`: `(batch, seq, token_dim)`.
    - `mask`: boolean `(batch, seq)`, **True for real tokens**, False for padding (as
        openpi's `prefix_mask`). Padding may sit anywhere; its values never matter.
    """

    tokens: Float[Array, "batch seq token_dim"]
    mask: Bool[Array, "batch seq"]

    def __init__(self, tokens: RealLike, mask: RealLike):
        self.tokens = jnp.asarray(tokens)
        self.mask = jnp.asarray(mask)
        # Checked here rather than in __check_init__, so that this message, not a
        # runtime type checker's, is what a wrong mask produces.
        if self.tokens.ndim != 3:
            raise ValueError(
                f"`tokens` must have shape (batch, seq, token_dim); got {shape_str(self.tokens)}."
            )
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != jnp.bool_:
            raise ValueError(
                f"`mask` must be boolean (True = real token) with shape (batch, seq) = "
                f"{self.tokens.shape[:2]} to match `tokens` {shape_str(self.tokens)}; got "
                f"{shape_str(self.mask)} of dtype {self.mask.dtype}."
            )

    @classmethod
    def random(
        cls,
        config: Pi0ShapedConfig,
        key: PRNGKeyArray,
        batch_size: int,
        *,
        num_padding: int | list[int] = 0,
    ) -> "Pi0ShapedObservation":
        """Random tokens of `config.prefix_len`, the last `num_padding` of each row
        padding (one int for every row, or one per row)."""
        pads = [num_padding] * batch_size if isinstance(num_padding, int) else list(num_padding)
        if len(pads) != batch_size or not all(0 <= p <= config.prefix_len for p in pads):
            raise ValueError(
                f"`num_padding` must be an int or {batch_size} ints in [0, "
                f"{config.prefix_len}]; got {num_padding!r}."
            )
        tokens = jax.random.normal(
            key, (batch_size, config.prefix_len, config.token_dim), config.jnp_dtype
        )
        real = config.prefix_len - jnp.asarray(pads)
        mask = jnp.arange(config.prefix_len)[None, :] < real[:, None]
        return cls(tokens, mask)


class Pi0ShapedPrefix(eqx.Module):
    """What [`flowcorrect.Pi0ShapedPolicy`][] keeps per observation.

    - `keys`, `values`: the prefix's KV cache, `(depth, batch, seq, kv_heads, head_dim)`
        (openpi's layout: layers first, batch second), rotary positions applied.
    - `mask`: `(batch, seq)`, True for real tokens.
    - `num_real`: `(batch,)`, real tokens per observation: the first action token's
        position.
    - `hidden`: `(batch, seq, width)`, the last layer's normalised hidden states
        (openpi's `prefix_out`), zero at padding: the energy's context.
    """

    keys: Array
    values: Array
    mask: Bool[Array, "batch seq"]
    num_real: Int[Array, " batch"]
    hidden: Array


class _Layer(eqx.Module):
    """One Gemma-style block's weights. The policy holds `depth` of them stacked along a
    leading axis and runs them with `lax.scan`, so compile time does not grow with
    depth."""

    attn_norm: Array  # (width,); Gemma's RMS norm scales by 1 + weight.
    q: Array  # (width, heads, head_dim)
    kv: Array  # (2, width, kv_heads, head_dim)
    out: Array  # (heads, head_dim, width)
    mlp_norm: Array  # (width,)
    gate_up: Array  # (2, width, mlp_width)
    down: Array  # (mlp_width, width)


def _layer_specs(width: int, mlp: int, c: Pi0ShapedConfig) -> dict[str, tuple]:
    """Shape (with the leading depth axis) and fan-in (None: zeros) of each layer weight."""
    h, kvh, d, n = c.num_heads, c.num_kv_heads, c.head_dim, c.depth
    return dict(
        attn_norm=((n, width), None),
        q=((n, width, h, d), width),
        kv=((n, 2, width, kvh, d), width),
        out=((n, h, d, width), h * d),
        mlp_norm=((n, width), None),
        gate_up=((n, 2, width, mlp), width),
        down=((n, mlp, width), mlp),
    )


@eqx.filter_jit
def _init_weights(c: Pi0ShapedConfig, key: PRNGKeyArray) -> dict[str, Any]:
    """Every weight of the policy: normal / sqrt(fan-in); norms and biases zero.

    One random draw sliced into all weights: a draw per shape would compile a random
    kernel per shape, which on a CPU takes longer than running the model. The draw is
    float32 whatever the dtype, so a bfloat16 policy has its float32 twin's weights,
    rounded (Pi0's size needs ~9 GB of temporary memory for it, once)."""
    we = c.expert_width
    specs: dict[str, tuple] = dict(
        embed=((c.token_dim, c.width), c.token_dim),
        prefix_norm=((c.width,), None),
        action_in=((c.action_dim, we), c.action_dim),
        action_in_bias=((we,), None),
        time_in=((2 * we, we), 2 * we),
        time_in_bias=((we,), None),
        time_out=((we, we), we),
        time_out_bias=((we,), None),
        expert_norm=((we,), None),
        action_out=((we, c.action_dim), we),
        action_out_bias=((c.action_dim,), None),
    )
    layers = dict(
        prefix_layers=_layer_specs(c.width, c.mlp_width, c),
        expert_layers=_layer_specs(we, c.expert_mlp_width, c),
    )
    for group, group_specs in layers.items():
        specs |= {f"{group}.{k}": v for k, v in group_specs.items()}
    total = sum(math.prod(shape) for shape, fan_in in specs.values() if fan_in is not None)
    flat = jax.random.normal(key, (total,), jnp.float32)
    weights, start = {}, 0
    for name, (shape, fan_in) in specs.items():
        if fan_in is None:
            weights[name] = jnp.zeros(shape, c.jnp_dtype)
        else:
            size = math.prod(shape)
            piece = flat[start : start + size].reshape(shape)
            weights[name] = (piece * (1 / math.sqrt(fan_in))).astype(c.jnp_dtype)
            start += size
    for group, group_specs in layers.items():
        weights[group] = _Layer(**{k: weights.pop(f"{group}.{k}") for k in group_specs})
    return weights


def _last(v: Array, ndim: int) -> Array:
    """`v` of shape `(n,)` as `(1, ..., 1, n)` with `ndim` axes (rank promotion is
    explicit in this package)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _rms_norm(x: Array, scale: Array) -> Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return (y * (1 + _last(scale.astype(jnp.float32), y.ndim))).astype(x.dtype)


def _rope(x: Array, positions: Array) -> Array:
    """Rotary position embedding (Su et al. 2021) in Gemma's half-split layout.
    `x`: `(batch, seq, heads, head_dim)`; `positions`: `(batch, seq)`."""
    half = x.shape[-1] // 2
    timescale = 10_000.0 ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
    radians = positions.astype(jnp.float32)[:, :, None, None] / _last(timescale, 4)
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _qkv(layer: _Layer, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    q = jnp.einsum("bsw,whd->bshd", x, layer.q)
    k, v = jnp.einsum("bsw,cwkd->cbskd", x, layer.kv)
    return _rope(q, positions), _rope(k, positions), v


def _attend(q: Array, blocks: list[tuple[Array, Array, Array]]) -> Array:
    """Grouped-query attention of `q` `(batch, seq_q, heads, head_dim)` over the
    concatenation of key/value blocks `(keys, values, mask)`, each `keys`/`values`
    `(batch, seq_k, kv_heads, head_dim)` and `mask` `(batch, seq_q, seq_k)` (True =
    may attend). The blocks are never concatenated (a step of the action expert would
    otherwise copy the whole prefix cache); only their logits are, for one softmax.
    Logits and softmax are float32, as in openpi."""
    b, t, h, d = q.shape
    kvh = blocks[0][0].shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    logits = []
    for keys, _, mask in blocks:
        lg = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
        lg = lg / math.sqrt(d)
        # A large finite negative, not -inf: a row with no key allowed (a padded
        # query of an all-padding prefix) stays finite.
        logits.append(jnp.where(mask[:, None, None, :, :], lg, -2.3819763e38))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    splits, start = [], 0
    for keys, _, _ in blocks[:-1]:
        start += keys.shape[1]
        splits.append(start)
    out = 0
    for p, (_, values, _) in zip(jnp.split(probs, splits, axis=-1), blocks):
        out = out + jnp.einsum(
            "bkgts,bskd->btkgd",
            p.astype(values.dtype),
            values,
            preferred_element_type=jnp.float32,
        )
    return out.reshape(b, t, h, d).astype(q.dtype)


def _block(layer: _Layer, h: Array, attended: Array) -> Array:
    """The residual updates around attention: output projection, then gated-GELU MLP."""
    h = h + jnp.einsum("bshd,hdw->bsw", attended, layer.out)
    x = _rms_norm(h, layer.mlp_norm)
    gate, up = jnp.einsum("bsw,cwm->cbsm", x, layer.gate_up)
    return h + jnp.einsum("bsm,mw->bsw", jax.nn.gelu(gate) * up, layer.down)


def time_embedding(t: Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Array:
    """Pi0's sine-cosine embedding of the flow time `t` (a scalar) into `dim` features,
    periods spaced geometrically from `min_period` to `max_period`."""
    fraction = jnp.linspace(0.0, 1.0, dim // 2, dtype=jnp.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.astype(jnp.float32) * 2 * math.pi / period
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)])


class Pi0ShapedPolicy(AbstractBatchedPolicy):
    """A flow policy with Pi0's structure: a prefix transformer run once per observation
    into a per-layer KV cache, and an action expert that reads that cache at every flow
    step. Random weights; its purpose is timing and testing the Pi0 code paths (KV
    cache, padding, best-of-N sharing one prefix) without openpi.

    - `prefix(observations)`: the observation tokens through `depth` prefix layers
        (bidirectional attention over real tokens); keeps each layer's keys/values and
        the last normalised hidden states.
    - `velocity(prefix, x_t, t)`: embeds the noisy chunk, mixes in the sinusoidal
        embedding of `t` (Pi0's `action_time_mlp`), then `depth` action-expert layers;
        layer `i` attends to the chunk's own tokens and to prefix layer `i`'s cached
        keys/values (real tokens only). Rotary positions continue after the last real
        prefix token, so padding changes nothing.
    - `energy_context(prefix)`: a [`flowcorrect.TokenContext`][] of the prefix's last
        hidden states (openpi's `prefix_out`) and its real-token mask.

    Flow time follows openpi ([`flowcorrect.OpenPI`][]: `t = 1` is noise).

    **Arguments:**

    - `config`: a [`flowcorrect.Pi0ShapedConfig`][], e.g. `Pi0ShapedConfig.pi0()` or
        `Pi0ShapedConfig.cpu()`.
    - `key`: a JAX PRNG key for the random weights.

    !!! example

        ```python
        config = fc.Pi0ShapedConfig.cpu()
        policy = fc.Pi0ShapedPolicy(config, key=jax.random.key(0))
        obs = fc.Pi0ShapedObservation.random(config, jax.random.key(1), 2, num_padding=4)
        actions, info = fc.sample(policy, obs, jax.random.key(2))
        ```
    """

    embed: Array  # (token_dim, width)
    prefix_layers: _Layer  # stacked: every leaf has a leading depth axis
    prefix_norm: Array  # (width,)
    action_in: Array  # (action_dim, expert_width)
    action_in_bias: Array
    time_in: Array  # (2 * expert_width, expert_width): [actions; time] -> width
    time_in_bias: Array
    time_out: Array  # (expert_width, expert_width)
    time_out_bias: Array
    expert_layers: _Layer
    expert_norm: Array
    action_out: Array  # (expert_width, action_dim)
    action_out_bias: Array
    config: Pi0ShapedConfig = eqx.field(static=True)
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: AbstractConvention

    def __init__(self, config: Pi0ShapedConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Pi0ShapedConfig):
            raise TypeError(
                "`config` must be a Pi0ShapedConfig, e.g. fc.Pi0ShapedConfig.cpu(); got "
                f"{type(config).__name__}."
            )
        for name, value in _init_weights(config, key).items():
            setattr(self, name, value)
        self.config = config
        self.chunk_shape = (config.horizon, config.action_dim)
        self.convention = OpenPI()

    def condition(self, observations: Pi0ShapedObservation) -> Pi0ShapedPrefix:
        """Runs the prefix model once over a batch of observations.

        **Arguments:**

        - `observations`: a [`flowcorrect.Pi0ShapedObservation`][].

        **Returns:**

        A [`flowcorrect.Pi0ShapedPrefix`][]: the KV cache, mask and hidden states.
        """
        if not isinstance(observations, Pi0ShapedObservation):
            raise TypeError(
                "`observations` must be a Pi0ShapedObservation(tokens, mask); got "
                f"{type(observations).__name__}."
            )
        tokens, mask = observations.tokens, observations.mask
        if tokens.shape[-1] != self.config.token_dim:
            raise ValueError(
                f"`observations.tokens` has shape {shape_str(tokens)}; this policy's "
                f"tokens are {self.config.token_dim} wide (config.token_dim)."
            )
        dtype = self.config.jnp_dtype
        # Zero the padding first: its values (NaN included) then cannot reach anything.
        tokens = jnp.where(mask[:, :, None], tokens, 0).astype(dtype)
        h = jnp.einsum("bsi,iw->bsw", tokens, self.embed)
        # Positions count real tokens only (openpi: cumsum(mask) - 1), so a padded
        # observation is the same observation as its unpadded version.
        positions = jnp.cumsum(mask, axis=1) - 1
        attn_mask = jnp.broadcast_to(mask[:, None, :], mask.shape[:1] + mask.shape[1:] * 2)

        def layer(h, params: _Layer):
            q, k, v = _qkv(params, _rms_norm(h, params.attn_norm), positions)
            h = _block(params, h, _attend(q, [(k, v, attn_mask)]))
            return h, (k, v)

        h, (keys, values) = jax.lax.scan(layer, h, self.prefix_layers)
        hidden = jnp.where(mask[:, :, None], _rms_norm(h, self.prefix_norm), 0)
        return Pi0ShapedPrefix(keys, values, mask, jnp.sum(mask, axis=1), hidden)

    def batch_size(self, prefix: Pi0ShapedPrefix) -> int:
        return prefix.mask.shape[0]

    def velocity(
        self,
        prefix: Pi0ShapedPrefix,
        x_t: Float[Array, "batch horizon action_dim"],
        t: Scalar,
    ) -> Float[Array, "batch horizon action_dim"]:
        """The action expert at flow time `t` over the cached prefix (see the class)."""
        if x_t.shape[1:] != self.chunk_shape or x_t.shape[0] != prefix.mask.shape[0]:
            raise ValueError(
                f"`x_t` must have shape (batch, horizon, action_dim) = "
                f"{(prefix.mask.shape[0], *self.chunk_shape)}; got {shape_str(x_t)}."
            )
        dtype = self.config.jnp_dtype
        b, horizon, _ = x_t.shape
        we = self.config.expert_width
        actions = jnp.einsum("bha,aw->bhw", x_t.astype(dtype), self.action_in)
        actions = actions + _last(self.action_in_bias, 3)
        t_emb = jnp.broadcast_to(time_embedding(t, we).astype(dtype), (b, horizon, we))
        h = jnp.einsum("bhc,cw->bhw", jnp.concatenate([actions, t_emb], axis=-1), self.time_in)
        h = jax.nn.swish(h + _last(self.time_in_bias, 3))
        h = jnp.einsum("bhc,cw->bhw", h, self.time_out) + _last(self.time_out_bias, 3)

        positions = prefix.num_real[:, None] + jnp.arange(horizon)[None, :]
        to_prefix = jnp.broadcast_to(prefix.mask[:, None, :], (b, horizon, prefix.mask.shape[1]))
        to_self = jnp.ones((b, horizon, horizon), bool)

        def layer(h, xs):
            params, cached_k, cached_v = xs
            q, k, v = _qkv(params, _rms_norm(h, params.attn_norm), positions)
            attended = _attend(q, [(cached_k, cached_v, to_prefix), (k, v, to_self)])
            return _block(params, h, attended), None

        h, _ = jax.lax.scan(layer, h, (self.expert_layers, prefix.keys, prefix.values))
        out = jnp.einsum("bhw,wa->bha", _rms_norm(h, self.expert_norm), self.action_out)
        return (out + _last(self.action_out_bias, 3)).astype(x_t.dtype)

    def energy_context(self, prefix: Pi0ShapedPrefix) -> TokenContext:
        return TokenContext(prefix.hidden, prefix.mask)

    def repeat(self, prefix: Pi0ShapedPrefix, n: int) -> Pi0ShapedPrefix:
        b = prefix.mask.shape[0]
        return Pi0ShapedPrefix(
            # The cache keeps openpi's layout: its batch axis is the second.
            jnp.repeat(prefix.keys, n, axis=1, total_repeat_length=b * n),
            jnp.repeat(prefix.values, n, axis=1, total_repeat_length=b * n),
            jnp.repeat(prefix.mask, n, axis=0, total_repeat_length=b * n),
            jnp.repeat(prefix.num_real, n, axis=0, total_repeat_length=b * n),
            jnp.repeat(prefix.hidden, n, axis=0, total_repeat_length=b * n),
        )

    def num_parameters(self) -> int:
        """The number of weights (works on `jax.eval_shape`'s abstract policy too)."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self) if hasattr(x, "shape"))
