"""Tests of training-time real-time chunking: the transform, its convention, the loss
mask, the delay distributions, the inference placement and the harness policy's
per-token time.

Black, Ren, Equi, Levine (2025), arXiv 2512.05964: the first d actions of a chunk go in
clean, at a per-token flow time set to the data end of the flow, the loss is taken on the
rest. The paper writes the data end as t = 1 (its convention); openpi's is t = 0. The
expected values below are written from those definitions, not from the library.
"""

import json

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.metaworld.policy import (
    FlowMLPPolicy,
    PolicyConfig,
    load_policy,
    save_policy,
    train_policy,
    with_token_time,
)

H, A = 8, 3
CONVENTIONS = [fc.OpenPI(), fc.Reverse()]


@pytest.fixture(scope="module")
def policies():
    """A small scalar-time harness policy and its per-token-time conversion (built once:
    eager initialisation costs seconds on a busy CPU)."""
    config = PolicyConfig(obs_dim=5, action_dim=A, horizon=H, width=16, depth=3)
    plain = FlowMLPPolicy(config, np.zeros(5), np.ones(5), key=jax.random.key(0))
    return config, plain, with_token_time(plain)


def _example(conv, d, t=0.37, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    actions = jax.random.normal(k1, (H, A))
    noise = jax.random.normal(k2, (H, A))
    ex = fc.rtc.PrefixConditioning(fc.rtc.UniformDelays(H))(
        conv, actions, noise, jnp.float32(t), jax.random.key(1), delay=d
    )
    return actions, noise, ex


# ---------------------------------------------------------------- the convention, pinned
def test_clean_time_is_openpi_zero_and_reverse_one():
    # openpi: x_t = t * noise + (1 - t) * actions, so actions sit at t = 0; the paper's
    # (reverse) convention puts them at t = 1.
    assert fc.rtc.clean_time(fc.OpenPI()) == 0.0
    assert fc.rtc.clean_time(fc.Reverse()) == 1.0
    with pytest.raises(TypeError, match="convention"):
        fc.rtc.clean_time("openpi")


@pytest.mark.parametrize("conv", CONVENTIONS, ids=["openpi", "reverse"])
def test_prefix_goes_in_clean_at_the_data_end(conv):
    d, t = 3, 0.37
    actions, noise, ex = _example(conv, d, t)
    clean = 0.0 if isinstance(conv, fc.OpenPI) else 1.0
    # Times: the data end on the prefix, the example's time on the rest.
    np.testing.assert_array_equal(ex.t, np.array([clean] * d + [t] * (H - d), np.float32))
    # Inputs: exactly the actions on the prefix, the convention's mix on the rest.
    np.testing.assert_array_equal(ex.x_t[:d], actions[:d])
    mix = t * noise + (1 - t) * actions if clean == 0.0 else (1 - t) * noise + t * actions
    np.testing.assert_allclose(ex.x_t[d:], mix[d:], rtol=1e-6, atol=1e-6)
    # And at the data end the convention's own interpolation is the actions.
    np.testing.assert_allclose(conv.interpolate(noise, actions, clean), actions, atol=1e-7)
    np.testing.assert_array_equal(ex.loss_mask, np.arange(H) >= d)
    assert int(ex.delay) == d


@settings(max_examples=25)
@given(d=st.integers(0, H), rows=st.lists(st.integers(0, H - 1), min_size=1, max_size=4))
def test_loss_ignores_the_prefix_and_sees_the_postfix(d, rows):
    _, _, ex = _example(fc.OpenPI(), d)
    v = jnp.asarray(np.random.default_rng(d).normal(size=(H, A)), jnp.float32)
    base = fc.rtc.masked_flow_loss(v, ex)
    for r in rows:
        changed = fc.rtc.masked_flow_loss(v.at[r].add(10.0), ex)
        if r < d:
            assert changed == base
        else:
            assert changed > base
    # With no prefix it is the plain flow-matching mean squared error.
    if d == 0:
        np.testing.assert_allclose(base, jnp.mean((v - ex.target) ** 2), rtol=1e-6)


def test_prefix_conditioned_loss_is_plain_at_delay_zero_and_refuses_scalar_time(policies):
    _, plain, policy = policies
    obs = jax.random.normal(jax.random.key(1), (6, 5))
    chunks = jax.random.normal(jax.random.key(2), (6, H, A))
    # With every delay 0 it is the plain flow-matching loss on the same draws.
    zero = eqx.filter_jit(fc.rtc.prefix_conditioned_loss)(
        policy, obs, chunks, jax.random.key(3), fc.rtc.UniformDelays(0))

    @eqx.filter_jit
    def plain_loss(policy):
        k_noise, k_t, _ = jax.random.split(jax.random.key(3), 3)
        noise = jax.random.normal(k_noise, chunks.shape)
        t = jax.random.uniform(k_t, (6,))
        x_t = jax.vmap(fc.OpenPI().interpolate)(noise, chunks, t)
        v = jax.vmap(lambda o, x, s: policy.velocity(policy.condition(o), x, s))(obs, x_t, t)
        return jnp.mean((v - (noise - chunks)) ** 2)

    np.testing.assert_allclose(zero, plain_loss(policy), rtol=1e-5)
    with pytest.raises(TypeError, match="accepts_token_time"):
        fc.rtc.prefix_conditioned_loss(
            plain, obs, chunks, jax.random.key(3), fc.rtc.UniformDelays(2)
        )


# ---------------------------------------------------------------- delay distributions
def test_delay_distributions():
    p = np.asarray(fc.rtc.ExponentialDelays(4, rate=0.5).probabilities())
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1:] / p[:-1], np.exp(-0.5), rtol=1e-5)
    np.testing.assert_allclose(fc.rtc.UniformDelays(4, min_delay=1).probabilities(),
                               [0, 0.25, 0.25, 0.25, 0.25], atol=1e-7)
    np.testing.assert_allclose(fc.rtc.ExponentialDelays(3, rate=0).probabilities(), [0.25] * 4,
                               atol=1e-7)
    # Draws follow the probabilities (20_000 draws: 4 standard errors is under 0.015).
    dist = fc.rtc.ExponentialDelays(4, rate=0.5)
    draws = jax.vmap(dist.sample)(jax.random.split(jax.random.key(0), 20_000))
    freq = np.bincount(np.asarray(draws), minlength=5) / 20_000
    np.testing.assert_allclose(freq, p, atol=0.015)
    for bad, match in ((lambda: fc.rtc.ExponentialDelays(-1), "max_delay"),
                       (lambda: fc.rtc.ExponentialDelays(4, rate=-1.0), "rate"),
                       (lambda: fc.rtc.UniformDelays(2, min_delay=3), "min_delay"),
                       (lambda: fc.rtc.PrefixConditioning(4), "delays")):
        with pytest.raises((ValueError, TypeError), match=match):
            bad()


# ---------------------------------------------------------------- inference placement
class PrefixEcho(fc.AbstractPolicy):
    """A closed-form per-token-time flow: the data is the point mass at
    `y + mean(clean prefix rows)` on every row the policy sees at a noisy time (rows at
    the clean time are the prefix), so the sampled postfix is known exactly, and only
    if the placement hands the velocity the clean prefix at the clean time and the grid
    time on the other rows."""

    y: jax.Array
    convention: fc.AbstractConvention
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, A))
    accepts_token_time: bool = eqx.field(static=True, default=True)

    def condition(self, observation):
        return observation

    def velocity(self, cond, x_t, t):
        t = jnp.broadcast_to(t, (H,))
        clean = fc.rtc.clean_time(self.convention)
        is_prefix = (t == clean)[:, None]
        n = jnp.maximum(jnp.sum(is_prefix), 1)
        target = self.y + (jnp.sum(jnp.where(is_prefix, x_t, 0.0), axis=0) / n)[None]
        if clean == 0.0:  # v = (x - target) / t for x_t = t * noise + (1 - t) * target
            v = (x_t - target) / jnp.where(is_prefix, 1.0, t[:, None])
        else:  # v = (target - x) / (1 - t)
            v = (target - x_t) / jnp.where(is_prefix, 1.0, 1 - t[:, None])
        return jnp.where(is_prefix, 1e6, v)  # a prefix row's velocity must never be used

    def energy_context(self, cond):
        return cond


@pytest.mark.parametrize("conv", CONVENTIONS, ids=["openpi", "reverse"])
def test_prefix_conditioned_sampling_is_exact_on_a_closed_form_flow(conv):
    y = jax.random.normal(jax.random.key(0), (H, A))
    policy = PrefixEcho(y, conv)
    left = jax.random.normal(jax.random.key(1), (5, A))
    d = 3
    a, info = fc.sample(policy, jnp.zeros(1), jax.random.key(2),
                        placement=fc.rtc.PrefixConditioned(left, d))
    assert not bool(info.fell_back.any())
    np.testing.assert_array_equal(a[:d], left[:d])  # the committed actions, exactly
    np.testing.assert_allclose(a[d:], (y + left[:d].mean(0)[None])[d:], rtol=1e-4, atol=1e-4)
    # A new delay is data: no recompile; d = 0 is plain sampling, bit for bit.
    b, _ = fc.sample(policy, jnp.zeros(1), jax.random.key(2),
                     placement=fc.rtc.PrefixConditioned(left, 0))
    c, _ = fc.sample(policy, jnp.zeros(1), jax.random.key(2))
    np.testing.assert_array_equal(b, c)


def test_prefix_conditioned_costs_what_plain_sampling_costs_and_refuses_scalar_time(policies):
    _, plain, policy = policies
    obs = jnp.ones(5)
    left = jnp.ones((4, A))

    def count(placement):
        jaxpr = jax.make_jaxpr(lambda o: fc.sample(policy, o, jax.random.key(0),
                                                   placement=placement)[0])(obs)
        text = str(jaxpr)
        return text.count("dot_general"), text.count("transpose")

    class PlainStep(fc.Plain):
        # The plain step as a placement of one's own: sampled with the fallback's plain
        # flow, which `fc.Plain()` itself, being its own fallback, does not carry.
        pass

    # One velocity per step, no VJP: the program of plain sampling through a placement,
    # unlike inference-time RTC's VJP.
    plain_count = count(PlainStep())
    assert plain_count[0] > count(fc.Plain())[0] > 0
    assert count(fc.rtc.PrefixConditioned(left, 2)) == plain_count
    guided = count(fc.RealTimeChunking(left, 2, 4))
    assert guided[0] > plain_count[0]
    with pytest.raises(TypeError, match="accepts_token_time"):
        fc.sample(plain, obs, jax.random.key(0), placement=fc.rtc.PrefixConditioned(left, 2))
    with pytest.raises(ValueError, match="exceeds the 4 actions left"):
        fc.rtc.PrefixConditioned(left, 5)
    with pytest.raises(ValueError, match="action_dim"):
        fc.sample(policy, obs, jax.random.key(0),
                  placement=fc.rtc.PrefixConditioned(jnp.ones((4, 2)), 1))


@pytest.mark.parametrize("conv", CONVENTIONS, ids=["openpi", "reverse"])
def test_both_together_is_prefix_conditioning_without_guidance(conv):
    y = jax.random.normal(jax.random.key(0), (H, A))
    policy = PrefixEcho(y, conv)  # its velocity on the prefix rows is 1e6: never to be used
    left = jax.random.normal(jax.random.key(1), (6, A))
    d, s = 3, 2
    trt, _ = fc.sample(policy, jnp.zeros(1), jax.random.key(2),
                       placement=fc.rtc.PrefixConditioned(left, d))
    for beta in (0.0, 5.0):
        both, info = fc.sample(policy, jnp.zeros(1), jax.random.key(2),
                               placement=fc.rtc.PrefixConditionedRTC(left, d, s,
                                                                     max_guidance_weight=beta))
        assert not bool(info.fell_back.any())
        np.testing.assert_array_equal(both[:d], left[:d])
        # This flow's denoised estimate does not depend on the sample, so guidance has
        # nothing to act through: both are the prefix-conditioned chunk.
        np.testing.assert_allclose(both, trt, rtol=1e-5, atol=1e-5)


def test_both_together_guides_the_rest_of_the_overlap(policies):
    _, plain, policy = policies
    d, s = 2, 3
    obs = jax.random.normal(jax.random.key(3), (16, 5))
    left = jax.random.normal(jax.random.key(4), (16, H - s, A))
    key = jax.random.key(5)
    noise = jax.random.normal(key, (16, H, A))
    trt, _ = fc.sample(policy, obs, noise=noise, placement=fc.rtc.PrefixConditioned(left, d))
    both, info = fc.sample(policy, obs, noise=noise, placement=fc.rtc.PrefixConditionedRTC(
        left, d, s, max_guidance_weight=5.0))
    assert not bool(info.fell_back.any()) and bool(jnp.all(jnp.isfinite(both)))
    np.testing.assert_array_equal(both[:, :d], left[:, :d])  # committed, exactly
    rest = slice(d, H - s)  # the overlap after the committed rows

    def gap(a):
        return float(jnp.mean(jnp.linalg.norm(a[:, rest] - left[:, rest], axis=-1)))

    assert gap(both) < 0.8 * gap(trt), (gap(both), gap(trt))
    # Guided on every flow step, none skipped for a non-finite guidance.
    np.testing.assert_array_equal(info.placement.guidance.num_applied, 10)
    np.testing.assert_array_equal(info.placement.guidance.num_skipped, 0)
    with pytest.raises(TypeError, match="accepts_token_time"):
        fc.sample(plain, obs, noise=noise, placement=fc.rtc.PrefixConditionedRTC(left, d, s))


# ---------------------------------------------------------------- the harness policy
def test_with_token_time_keeps_the_velocity_at_equal_times(tmp_path, policies):
    config, plain, tok = policies
    assert tok.accepts_token_time and not plain.accepts_token_time
    obs = jax.random.normal(jax.random.key(1), (5,))
    x = jax.random.normal(jax.random.key(2), (H, A))
    pre = plain.condition(obs)
    for t in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(tok.velocity(pre, x, jnp.float32(t)),
                                   plain.velocity(pre, x, jnp.float32(t)), atol=1e-5)
        np.testing.assert_array_equal(tok.velocity(pre, x, jnp.full(H, t, jnp.float32)),
                                      tok.velocity(pre, x, jnp.float32(t)))
    mixed = jnp.where(jnp.arange(H) < 2, 0.0, 0.6).astype(jnp.float32)
    assert not np.allclose(tok.velocity(pre, x, mixed), tok.velocity(pre, x, jnp.float32(0.6)))
    with pytest.raises(ValueError, match="one flow time per chunk"):
        plain.velocity(pre, x, mixed)
    save_policy(tmp_path / "p", tok, config)
    loaded, _ = load_policy(tmp_path / "p")
    assert loaded.accepts_token_time
    np.testing.assert_array_equal(loaded.velocity(pre, x, mixed), tok.velocity(pre, x, mixed))
    # The one model format: named .npz weights and a checksummed config, so an edited
    # config or a file of another kind is refused rather than loaded.
    assert {f.name for f in (tmp_path / "p").iterdir()} == {"config.json", "weights.npz"}
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    meta["config"]["horizon"] += 1
    (tmp_path / "p" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(fc.ModelFileError, match="checksum"):
        load_policy(tmp_path / "p")
    with pytest.raises(fc.ModelFileError, match="not a 'flowcorrect.metaworld"):
        load_policy(fc.save_model(fc.MLPEnergy(fc.MLPEnergyConfig(
            obs_dim=3, action_dim=2, horizon=4), key=jax.random.key(0)), tmp_path / "e"))


@pytest.mark.slow  # about 10 s; the parts are covered cheaply above
def test_fine_tuning_with_the_transform_learns_to_continue_the_prefix():
    # Chunks are ramps a_i = s * (i + 1) * e with a random slope s the observation does
    # not reveal: only the committed prefix tells the slope. A policy fine-tuned with the
    # transform continues the given prefix; the plain one cannot.
    rng = np.random.default_rng(0)
    n = 512
    slope = rng.normal(size=(n, 1, 1)).astype(np.float32)
    chunks = slope * np.arange(1, H + 1, dtype=np.float32)[None, :, None] * np.ones(A) / H
    obs = np.zeros((n, 5), np.float32)
    config = PolicyConfig(obs_dim=5, action_dim=A, horizon=H, width=64, depth=2, steps=300,
                          batch_size=128, learning_rate=3e-3)
    plain, _ = train_policy(obs, chunks, config, progress=False)
    tuned, losses = train_policy(obs, chunks, config, progress=False, init=plain,
                                 rtc=fc.rtc.UniformDelays(3, min_delay=2))
    assert tuned.accepts_token_time and len(losses) == 3
    test = np.array([-1.5, 1.5], np.float32)[:, None, None] * chunks[0] / slope[0]
    errs = {}
    for name, pol, place in (("tuned", tuned, True), ("plain", plain, False)):
        out = []
        for c in test:
            placement = fc.rtc.PrefixConditioned(jnp.asarray(c), 2) if place else fc.Plain()
            a, _ = fc.sample(pol, jnp.zeros(5), jax.random.key(0), placement=placement)
            out.append(np.abs(np.asarray(a)[2:] - c[2:]).mean())
        errs[name] = float(np.mean(out))
    assert errs["tuned"] < 0.5 * errs["plain"], errs
