"""The Pi0-shaped reference policy: its KV cache, padding, batching and sizes.

The cache is checked against an independent recomputation written here, in the way
openpi computes Pi0's training loss: one joint pass over [prefix; suffix] tokens with a
block attention mask, no cache. Every other property is checked against that policy's
own outputs under a change that must not matter.
"""

import dataclasses
import functools
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import flowcorrect as fc

from .helpers import tree_bitwise_equal

LAW = settings(max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "50")))

# Small, but with grouped-query attention (4 query heads on 2 key/value heads), three
# layers and a token width unlike the model width, so that a wrong head grouping, a
# layer paired with the wrong cache entry or a transposed projection shows.
CONFIG = fc.Pi0ShapedConfig.cpu(
    token_dim=24, width=32, depth=3, mlp_width=48, num_heads=4, num_kv_heads=2,
    head_dim=8, expert_width=16, expert_mlp_width=40, horizon=6, action_dim=5,
    prefix_len=12,
)  # fmt: skip
BATCH = 3


@functools.cache
def _policy(config=CONFIG, seed=0):
    policy = fc.Pi0ShapedPolicy(config, key=jax.random.key(seed))

    # Gemma's norms start at scale 0 (a factor of 1); random scales make a norm that is
    # skipped or applied to the wrong tensor visible.
    def randomise(x, key):
        return x + (0.3 * jax.random.normal(key, x.shape)).astype(x.dtype)

    norms = lambda p: (p.prefix_layers.attn_norm, p.prefix_layers.mlp_norm,  # noqa: E731
                       p.expert_layers.attn_norm, p.expert_layers.mlp_norm,
                       p.prefix_norm, p.expert_norm, p.action_in_bias, p.time_in_bias,
                       p.time_out_bias, p.action_out_bias)  # fmt: skip
    keys = jax.random.split(jax.random.key(seed + 100), len(norms(policy)))
    return eqx.tree_at(norms, policy, tuple(map(randomise, norms(policy), keys)))


def _observations(seed=1, mask=None):
    obs = fc.Pi0ShapedObservation.random(CONFIG, jax.random.key(seed), BATCH, num_padding=[0, 3, 7])
    if mask is not None:
        obs = fc.Pi0ShapedObservation(obs.tokens, jnp.asarray(mask))
    return obs


def _chunks(seed=2, batch=BATCH):
    return jax.random.normal(jax.random.key(seed), (batch, CONFIG.horizon, CONFIG.action_dim))


@eqx.filter_jit
def _run(policy, obs, x, t):
    """The velocity and energy context, compiled once per shape (the tests share it)."""
    prefix = policy.condition(obs)
    return policy.velocity(prefix, x, t), policy.energy_context(prefix)


@eqx.filter_jit
def _prefix(policy, obs):
    return policy.condition(obs)


@eqx.filter_jit
def _velocity(policy, prefix, x, t):
    return policy.velocity(prefix, x, t)


# A mask with padding in the middle and at the end, different in every row.
MIDDLE_MASK = np.ones((BATCH, CONFIG.prefix_len), bool)
MIDDLE_MASK[0, [2, 3, 11]] = False
MIDDLE_MASK[1, 5:] = False
MIDDLE_MASK[2, [0, 6, 7, 8]] = False


# ---------------------------------------------------------------------------------
# An independent, uncached recomputation (float32).


def _norm(x, scale):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)


def _rotate(x, pos):
    # x (b, s, h, d); rotates the pairs (x[i], x[i + d/2]) by pos / 10000^(2i/d).
    d = x.shape[-1]
    angle = pos[:, :, None, None] / 10000.0 ** (np.arange(d // 2) * 2 / d)
    lo, hi = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate(
        [lo * np.cos(angle) - hi * np.sin(angle), hi * np.cos(angle) + lo * np.sin(angle)], -1
    )


def _gelu(x):
    return np.asarray(jax.nn.gelu(jnp.asarray(x)))


def _full_pass(policy, obs, x_t, t):
    """openpi's cacheless path: prefix and suffix tokens through each layer together,
    each through its own model's weights, with one attention over all of them."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), policy)
    c = policy.config
    mask = np.asarray(obs.mask)
    tokens = np.where(mask[..., None], np.asarray(obs.tokens, np.float64), 0)
    b, s = mask.shape
    h = c.horizon
    hp = tokens @ p.embed
    emb = np.asarray(fc._policies.pi0_shaped.time_embedding(jnp.asarray(t), c.expert_width))
    a = np.asarray(x_t, np.float64) @ p.action_in + p.action_in_bias
    mixed = np.concatenate([a, np.broadcast_to(emb, a.shape)], -1) @ p.time_in + p.time_in_bias
    he = (mixed / (1 + np.exp(-mixed))) @ p.time_out + p.time_out_bias
    pos = np.concatenate(
        [np.cumsum(mask, 1) - 1, mask.sum(1)[:, None] + np.arange(h)[None]], axis=1
    ).astype(np.float64)
    key_real = np.concatenate([mask, np.ones((b, h), bool)], 1)
    query_in_prefix = np.arange(s + h) < s
    # Prefix tokens see real prefix tokens; suffix tokens see real prefix tokens and
    # every suffix token.
    allowed = key_real[:, None, :] & ~(query_in_prefix[:, None] & ~query_in_prefix[None, :])
    group = c.num_heads // c.num_kv_heads
    for i in range(c.depth):
        lp = jax.tree.map(lambda w: w[i], p.prefix_layers)
        le = jax.tree.map(lambda w: w[i], p.expert_layers)
        xp, xe = _norm(hp, lp.attn_norm), _norm(he, le.attn_norm)
        q = np.concatenate([np.einsum("bsw,whd->bshd", xp, lp.q),
                            np.einsum("bsw,whd->bshd", xe, le.q)], 1)  # fmt: skip
        k = np.concatenate([np.einsum("bsw,wkd->bskd", xp, lp.kv[0]),
                            np.einsum("bsw,wkd->bskd", xe, le.kv[0])], 1)  # fmt: skip
        v = np.concatenate([np.einsum("bsw,wkd->bskd", xp, lp.kv[1]),
                            np.einsum("bsw,wkd->bskd", xe, le.kv[1])], 1)  # fmt: skip
        q, k = _rotate(q, pos), _rotate(k, pos)
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
        logits = np.where(allowed[:, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", probs, v)
        new = []
        for hh, oo, lw in ((hp, o[:, :s], lp), (he, o[:, s:], le)):
            hh = hh + np.einsum("bshd,hdw->bsw", oo, lw.out)
            xx = _norm(hh, lw.mlp_norm)
            hh = hh + (_gelu(xx @ lw.gate_up[0]) * (xx @ lw.gate_up[1])) @ lw.down
            new.append(hh)
        hp, he = new
    velocity = _norm(he, p.expert_norm) @ p.action_out + p.action_out_bias
    context = np.where(mask[..., None], _norm(hp, p.prefix_norm), 0)
    return velocity, context


@pytest.mark.parametrize("mask", [None, MIDDLE_MASK], ids=["end-padding", "middle-padding"])
@pytest.mark.parametrize("t", [1.0, 0.37, 0.0])
def test_cached_velocity_equals_full_pass(mask, t):
    policy, obs, x = _policy(), _observations(mask=mask), _chunks()
    prefix = _prefix(policy, obs)
    got = _velocity(policy, prefix, x, jnp.asarray(t))
    want_v, want_context = _full_pass(policy, obs, x, t)
    assert np.abs(want_v).mean() > 0.1  # not a trivially small field
    np.testing.assert_allclose(got, want_v, rtol=2e-5, atol=2e-5)
    context = policy.energy_context(prefix)
    assert isinstance(context, fc.TokenContext)
    np.testing.assert_array_equal(context.mask, obs.mask)
    np.testing.assert_allclose(context.tokens, want_context, rtol=2e-5, atol=2e-5)


def test_batched_equals_per_observation():
    policy, obs, x = _policy(), _observations(mask=MIDDLE_MASK), _chunks()
    t = jnp.asarray(0.6)
    prefix = _prefix(policy, obs)
    batched = _velocity(policy, prefix, x, t)
    context = policy.energy_context(prefix)
    for i in range(BATCH):
        one = jax.tree.map(lambda a, i=i: a[i : i + 1], obs)
        prefix_one = _prefix(policy, one)
        np.testing.assert_allclose(
            _velocity(policy, prefix_one, x[i : i + 1], t)[0], batched[i], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            policy.energy_context(prefix_one).tokens[0], context.tokens[i], rtol=1e-5, atol=1e-5
        )
    # The rows differ (each read its own observation): the check above is not vacuous.
    assert float(jnp.abs(batched[0] - batched[1]).max()) > 1e-2


EXTREME = st.sampled_from([0.0, 1e30, -1e30, 3e38, np.inf, -np.inf, np.nan, 7.0])


@LAW
@given(
    mask=st.lists(st.booleans(), min_size=BATCH * CONFIG.prefix_len,
                  max_size=BATCH * CONFIG.prefix_len),
    fill=EXTREME,
)  # fmt: skip
def test_padded_tokens_change_nothing(mask, fill):
    """Whatever sits at padded positions (NaN, inf, huge), the velocity and the energy
    context are bit for bit those with zeros there; a row that is all padding gives a
    finite result."""
    policy, x, t = _policy(), _chunks(), jnp.asarray(0.4)
    mask = np.asarray(mask).reshape(BATCH, CONFIG.prefix_len)
    clean = _observations(mask=mask)
    clean = fc.Pi0ShapedObservation(jnp.where(clean.mask[..., None], clean.tokens, 0), clean.mask)
    dirty = fc.Pi0ShapedObservation(
        jnp.where(clean.mask[..., None], clean.tokens, jnp.float32(fill)), clean.mask
    )
    want = _run(policy, clean, x, t)
    got = _run(policy, dirty, x, t)
    assert tree_bitwise_equal(got, want)
    assert bool(jnp.isfinite(got[0]).all()) and bool(jnp.isfinite(got[1].tokens).all())
    assert not bool(jnp.any(got[1].tokens[~mask]))  # padding is zero in the context


def test_padding_equals_truncation():
    """A padded observation behaves as the same observation without its padding."""
    policy, x, t = _policy(), _chunks(), jnp.asarray(0.8)
    obs = _observations(mask=MIDDLE_MASK)
    prefix = _prefix(policy, obs)
    padded = _velocity(policy, prefix, x, t)
    for i in range(BATCH):
        real = MIDDLE_MASK[i]
        short = fc.Pi0ShapedObservation(
            obs.tokens[i : i + 1, real], jnp.ones((1, real.sum()), bool)
        )
        short_prefix = _prefix(policy, short)
        np.testing.assert_allclose(
            _velocity(policy, short_prefix, x[i : i + 1], t)[0], padded[i], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            policy.energy_context(short_prefix).tokens[0],
            policy.energy_context(prefix).tokens[i, real], rtol=1e-5, atol=1e-5,
        )  # fmt: skip


@pytest.mark.parametrize("n", [1, 4])
def test_repeat_is_observation_major(n):
    policy, obs = _policy(), _observations(mask=MIDDLE_MASK)
    prefix = _prefix(policy, obs)
    repeated = policy.repeat(prefix, n)
    assert policy.batch_size(repeated) == BATCH * n
    for row in range(BATCH * n):
        b = row // n
        assert tree_bitwise_equal(repeated.keys[:, row], prefix.keys[:, b])
        assert tree_bitwise_equal(repeated.values[:, row], prefix.values[:, b])
        for name in ("mask", "num_real", "hidden"):
            assert tree_bitwise_equal(getattr(repeated, name)[row], getattr(prefix, name)[b])
    # And the velocity of each candidate is that of its own observation.
    x = jnp.repeat(_chunks(), n, axis=0)
    t = jnp.asarray(0.3)
    np.testing.assert_allclose(
        _velocity(policy, repeated, x, t)[::n], _velocity(policy, prefix, x[::n], t),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_bfloat16_runs_finite_and_close_to_float32():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    # The same random draws, rounded to bfloat16.
    policy32, policy16 = _policy(), _policy(config)
    obs, x, t = _observations(), _chunks(), jnp.asarray(0.5)
    v16 = _velocity(policy16, _prefix(policy16, obs), x, t)
    v32 = _velocity(policy32, _prefix(policy32, obs), x, t)
    assert v16.dtype == x.dtype  # the velocity comes back in the chunk's dtype
    assert bool(jnp.isfinite(v16).all())
    assert _prefix(policy16, obs).keys.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32))
    assert 0 < rel < 0.1, rel
    assert {x.dtype for x in jax.tree.leaves(policy16)} == {jnp.dtype(jnp.bfloat16)}


def test_weights_are_traced_not_baked_in():
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def velocity(policy, obs, x, t):
        return policy.velocity(policy.condition(obs), x, t)

    policy, obs, x = _policy(), _observations(), _chunks()
    first = velocity(policy, obs, x, jnp.asarray(0.5))
    changed = eqx.tree_at(lambda p: p.expert_layers.down, policy,
                          policy.expert_layers.down * 1.5)  # fmt: skip
    changed = eqx.tree_at(lambda p: p.embed, changed, changed.embed + 0.1)
    second = velocity(changed, obs, x, jnp.asarray(0.7))
    assert float(jnp.abs(first - second).max()) > 1e-3


def test_layers_are_stacked_and_scanned():
    policy = _policy()
    assert policy.prefix_layers.q.shape == (3, 32, 4, 8)
    assert policy.expert_layers.kv.shape == (3, 2, 16, 2, 8)
    obs, x, t = _observations(), _chunks(), jnp.asarray(0.5)

    def num_equations(depth):
        p = fc.Pi0ShapedPolicy(dataclasses.replace(CONFIG, depth=depth), key=jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda p, o: p.velocity(p.condition(o), x, t))(p, obs)
        return len(jaxpr.jaxpr.eqns)

    # One layer body in a scan, not `depth` copies: the program does not grow with depth.
    assert num_equations(1) == num_equations(7)


def test_pi0_preset_sizes():
    """Pi0's preset, never allocated: parameter counts from `jax.eval_shape`."""
    config = fc.Pi0ShapedConfig.pi0()
    assert (config.width, config.depth, config.mlp_width) == (2048, 18, 16384)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 1, 256)
    assert (config.expert_width, config.horizon, config.action_dim) == (1024, 50, 32)
    policy = jax.eval_shape(lambda k: fc.Pi0ShapedPolicy(config, key=k), jax.random.key(0))
    assert policy.chunk_shape == (50, 32)
    prefix_params = sum(math.prod(x.shape) for x in jax.tree.leaves(policy.prefix_layers))
    expert_params = sum(math.prod(x.shape) for x in jax.tree.leaves(policy.expert_layers))
    # Gemma 2B without its 257k x 2048 token embedding: 1.98B; Gemma 300M: 311M.
    assert prefix_params == pytest.approx(1.98e9, rel=0.02)
    assert expert_params == pytest.approx(3.11e8, rel=0.02)
    assert policy.num_parameters() == pytest.approx(2.30e9, rel=0.02)
    assert {x.dtype for x in jax.tree.leaves(policy)} == {jnp.dtype(jnp.bfloat16)}
    obs = jax.eval_shape(lambda k: fc.Pi0ShapedObservation.random(config, k, 2), jax.random.key(0))
    prefix = jax.eval_shape(lambda p, o: p.condition(o), policy, obs)
    assert prefix.keys.shape == (18, 2, 816, 1, 256)
    assert prefix.hidden.shape == (2, 816, 2048)
    v = jax.eval_shape(lambda p, pre, x, t: p.velocity(pre, x, t), policy, prefix,
                       jax.ShapeDtypeStruct((2, 50, 32), jnp.float32),
                       jax.ShapeDtypeStruct((), jnp.float32))  # fmt: skip
    assert (v.shape, v.dtype) == ((2, 50, 32), jnp.float32)


def test_cpu_preset_is_small():
    policy = fc.Pi0ShapedPolicy(fc.Pi0ShapedConfig.cpu(), key=jax.random.key(0))
    assert policy.chunk_shape == (50, 32)
    assert policy.num_parameters() < 300_000
    assert isinstance(policy, fc.AbstractBatchedPolicy)
    assert isinstance(policy.convention, fc.OpenPI)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (dict(depth=0), "depth"),
        (dict(head_dim=7), "head_dim"),
        (dict(dtype="float16"), "dtype"),
        (dict(width=0), "width"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        fc.Pi0ShapedConfig.cpu(**changes)


def test_input_errors():
    policy, obs = _policy(), _observations()
    with pytest.raises(ValueError, match="token_dim"):
        policy.condition(fc.Pi0ShapedObservation(obs.tokens[..., :5], obs.mask))
    with pytest.raises(ValueError, match="mask"):
        fc.Pi0ShapedObservation(obs.tokens, obs.mask[:, :4])
    with pytest.raises(TypeError, match="Pi0ShapedObservation"):
        policy.condition(obs.tokens)
    with pytest.raises(ValueError, match="x_t"):
        policy.velocity(policy.condition(obs), _chunks()[:, :3], jnp.asarray(0.5))
    with pytest.raises(ValueError, match="num_padding"):
        fc.Pi0ShapedObservation.random(CONFIG, jax.random.key(0), 2, num_padding=[1])


def test_through_fc_sample():
    """The policy through the public sampler: without correction `fc.sample` is openpi's
    Euler loop written by hand over one prefix pass; best-of-N shares that prefix."""
    policy, obs = _policy(), _observations(mask=MIDDLE_MASK)
    noise = _chunks(seed=7)
    actions, _ = fc.sample(policy, obs, jax.random.key(0), noise=noise)
    prefix, x = _prefix(policy, obs), noise
    for i in range(10):
        x = x - 0.1 * _velocity(policy, prefix, x, jnp.asarray(1.0 - i / 10))
    # Ten float32 steps, fused differently inside one compiled function: a few ulps of
    # each step's velocity (|v| ~ 3) add up to ~4e-5.
    np.testing.assert_allclose(actions, x, rtol=1e-4, atol=1e-4)

    energy = lambda context, a: jnp.mean(a**2) + 0 * jnp.sum(context.tokens)  # noqa: E731
    best, info = fc.sample(policy, obs, jax.random.key(1), placement=fc.BestOfN(3), energy=energy)
    assert best.shape == (BATCH, CONFIG.horizon, CONFIG.action_dim)
    assert bool(jnp.isfinite(best).all())
