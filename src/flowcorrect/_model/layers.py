"""Layers of the energy model. They act on the last axis, so any leading axes broadcast."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray


def _along_last(v: Array, x: Array) -> Array:
    """`v` shaped to broadcast along the last axis of `x` (explicitly: rank promotion
    is an error in our tests)."""
    return v.astype(x.dtype).reshape((1,) * (x.ndim - 1) + v.shape)


def _power_start(n: int) -> np.ndarray:
    # A fixed start vector, so the spectral norm is a pure function of the weight: no
    # power-iteration state to carry, checkpoint or keep in sync across devices.
    v = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    return v / np.linalg.norm(v)


class Linear(eqx.Module):
    """`y = x @ W.T + b`, optionally spectrally normalised (Miyato et al., 2018).

    With `spectral_norm=True` the weight used is `W / sigma(W)`, where `sigma` is
    estimated by `power_iterations` steps of power iteration from a fixed start vector,
    with the singular vectors held constant under differentiation (as in the paper).
    """

    weight: Float[Array, "out_size in_size"]
    bias: Float[Array, " out_size"] | None
    spectral_norm: bool = eqx.field(static=True)
    power_iterations: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        use_bias: bool = True,
        spectral_norm: bool = False,
        power_iterations: int = 5,
        key: PRNGKeyArray,
    ):
        lim = 1 / math.sqrt(in_size)
        wkey, bkey = jax.random.split(key)
        self.weight = jax.random.uniform(wkey, (out_size, in_size), minval=-lim, maxval=lim)
        self.bias = (
            jax.random.uniform(bkey, (out_size,), minval=-lim, maxval=lim) if use_bias else None
        )
        self.spectral_norm = spectral_norm
        self.power_iterations = power_iterations

    def effective_weight(self) -> Float[Array, "out_size in_size"]:
        if not self.spectral_norm:
            return self.weight
        w = jax.lax.stop_gradient(self.weight)
        u = jnp.asarray(_power_start(w.shape[0]), w.dtype)
        v = jnp.zeros(w.shape[1], w.dtype)
        eps = jnp.asarray(1e-12, w.dtype)

        def iterate(_: Any, uv: tuple[Array, Array]) -> tuple[Array, Array]:
            u, _ = uv
            v = w.T @ u
            v = v / (jnp.linalg.norm(v) + eps)
            u = w @ v
            return u / (jnp.linalg.norm(u) + eps), v

        u, v = jax.lax.fori_loop(0, self.power_iterations, iterate, (u, v))
        sigma = u @ self.weight @ v
        return self.weight / jnp.maximum(sigma, eps)

    def __call__(self, x: Float[Array, "*batch in_size"]) -> Float[Array, "*batch out_size"]:
        y = x @ self.effective_weight().astype(x.dtype).T
        return y if self.bias is None else y + _along_last(self.bias, y)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis with a learned gain and (optional) offset."""

    weight: Float[Array, " size"]
    bias: Float[Array, " size"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, size: int, eps: float = 1e-5, *, use_bias: bool = True):
        self.weight = jnp.ones(size)
        self.bias = jnp.zeros(size) if use_bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch size"]) -> Float[Array, "*batch size"]:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * _along_last(self.weight, x)
        return y if self.bias is None else y + _along_last(self.bias, y)


class ResBlock(eqx.Module):
    """A pre-norm residual MLP block: `x + W2 gelu(W1 norm(x))`."""

    norm: LayerNorm
    fc1: Linear
    fc2: Linear

    def __init__(
        self,
        size: int,
        width: int,
        *,
        spectral_norm: bool,
        power_iterations: int = 5,
        key: PRNGKeyArray,
    ):
        k1, k2 = jax.random.split(key)
        sn = dict(spectral_norm=spectral_norm, power_iterations=power_iterations)
        self.norm = LayerNorm(size)
        self.fc1 = Linear(size, width, **sn, key=k1)
        self.fc2 = Linear(width, size, **sn, key=k2)

    def __call__(self, x: Float[Array, "*batch size"]) -> Float[Array, "*batch size"]:
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


class MLPResNet(eqx.Module):
    """An input projection (or none), residual MLP blocks and a final layer norm.

    `norm_bias=False` drops the final norm's offset: before a linear read-out whose
    loss ignores a constant shift (InfoNCE), that offset would get no gradient.
    """

    proj: Linear | None
    blocks: tuple[ResBlock, ...]
    norm: LayerNorm

    def __init__(
        self,
        in_size: int,
        size: int,
        num_blocks: int,
        width: int,
        *,
        project: bool = True,
        norm_bias: bool = True,
        spectral_norm: bool = False,
        power_iterations: int = 5,
        key: PRNGKeyArray,
    ):
        pkey, *bkeys = jax.random.split(key, num_blocks + 1)
        sn = dict(spectral_norm=spectral_norm, power_iterations=power_iterations)
        self.proj = Linear(in_size, size, **sn, key=pkey) if project else None
        self.blocks = tuple(ResBlock(size, width, **sn, key=k) for k in bkeys)
        self.norm = LayerNorm(size, use_bias=norm_bias)

    def __call__(self, x: Float[Array, "*batch in_size"]) -> Float[Array, "*batch size"]:
        if self.proj is not None:
            x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def sinusoidal_positions(length: int, size: int) -> Float[Array, "length size"]:
    """Sine and cosine positions of Vaswani et al. (2017), sines in the first half."""
    half = size // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / max(half, 1))
    angles = np.arange(length)[:, None] * freqs[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    if table.shape[-1] < size:
        table = np.pad(table, ((0, 0), (0, size - table.shape[-1])))
    return jnp.asarray(table, dtype=jnp.float32)


class KeysValues(eqx.Module):
    """Attention keys and values of one context, with a mask of real entries."""

    keys: Float[Array, "seq heads head_dim"]
    values: Float[Array, "seq heads head_dim"]
    mask: Bool[Array, " seq"]


class CrossAttention(eqx.Module):
    """Multi-head cross-attention from action steps to context tokens, with a null token.

    A learned key/value pair that is always attended ("null token") is appended to
    every context. Softmax weights are therefore always over at least one real entry:
    a context that is all padding attends only to the null token, giving a finite,
    defined output, with no Python branch on the (traced) mask.
    """

    num_heads: int = eqx.field(static=True)
    query_norm: LayerNorm
    context_norm: LayerNorm
    query: Linear
    key: Linear
    value: Linear
    output: Linear
    null_key: Float[Array, " size"]
    null_value: Float[Array, " size"]

    def __init__(
        self,
        size: int,
        num_heads: int,
        *,
        spectral_norm: bool,
        power_iterations: int = 5,
        key: PRNGKeyArray,
    ):
        kq, kk, kv, ko = jax.random.split(key, 4)
        sn = dict(spectral_norm=spectral_norm, power_iterations=power_iterations)
        self.num_heads = num_heads
        self.query_norm = LayerNorm(size)
        self.context_norm = LayerNorm(size)
        # Queries and the output lie on the path from the actions to the energy, so they
        # are the ones that spectral normalisation has to constrain.
        self.query = Linear(size, size, **sn, key=kq)
        self.key = Linear(size, size, key=kk)
        self.value = Linear(size, size, key=kv)
        self.output = Linear(size, size, **sn, key=ko)
        self.null_key = jnp.zeros(size)
        self.null_value = jnp.zeros(size)

    def _heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

    def keys_values(
        self, context: Float[Array, "seq size"], mask: Bool[Array, " seq"]
    ) -> KeysValues:
        """The keys and values of one encoded context, null token last."""
        c = self.context_norm(context)
        keys = jnp.concatenate([self.key(c), self.null_key.astype(c.dtype)[None]], axis=0)
        values = jnp.concatenate([self.value(c), self.null_value.astype(c.dtype)[None]], axis=0)
        mask = jnp.concatenate([mask, jnp.ones((1,), bool)])
        return KeysValues(self._heads(keys), self._heads(values), mask)

    def queries(self, x: Float[Array, "horizon size"]) -> Float[Array, "horizon heads head_dim"]:
        return self._heads(self.query(self.query_norm(x)))

    def __call__(
        self, queries: Float[Array, "horizon heads head_dim"], kv: KeysValues
    ) -> Float[Array, "horizon size"]:
        scale = 1 / math.sqrt(queries.shape[-1])
        logits = jnp.einsum("thd,shd->hts", queries, kv.keys.astype(queries.dtype)) * scale
        # Masked entries get exactly zero weight: the null token keeps every row finite.
        logits = jnp.where(kv.mask[None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("hts,shd->thd", weights, kv.values.astype(queries.dtype))
        return self.output(out.reshape(out.shape[0], -1))
