"""The extension points, used from outside the package the way a user would.

Everything here is defined in this file against the public API only: a per-sample
policy with a once-per-observation encoder, a batched policy whose cache keeps its
batch axis second (as openpi's KV cache does), placements of one's own (momentum and
prefix inpainting), an energy of one's own, and a corrector of one's own.
"""

import re
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc

H, D, OBS = 5, 3, 4


# ---------------------------------------------------------------- user policies


class MLPPolicy(fc.AbstractPolicy):
    """A per-sample policy: encodes the observation once, then a velocity MLP."""

    encoder: eqx.nn.Linear
    head: eqx.nn.MLP
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: fc.AbstractConvention
    calls: ClassVar[list] = []

    def __init__(self, key, convention=fc.OpenPI()):
        k1, k2 = jax.random.split(key)
        self.encoder = eqx.nn.Linear(OBS, 8, key=k1)
        self.head = eqx.nn.MLP(8 + H * D + 1, H * D, 32, 2, activation=jnp.tanh, key=k2)
        self.chunk_shape = (H, D)
        self.convention = convention

    def condition(self, observation):
        MLPPolicy.calls.append("condition")
        return jnp.tanh(self.encoder(observation))

    def velocity(self, cond, x_t, t):
        inp = jnp.concatenate([cond, x_t.ravel(), t[None]])
        return self.head(inp).reshape(x_t.shape)

    def energy_context(self, cond):
        return cond


class CachePolicy(fc.AbstractBatchedPolicy):
    """A batched policy whose once-per-observation cache has its batch axis second,
    `(layers, batch, tokens, width)`, like openpi's KV cache, and whose energy context
    is a separate per-observation array."""

    proj: jax.Array  # (layers, OBS, width)
    out: jax.Array  # (layers * width + D + 1, D)
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
    convention: fc.AbstractConvention = fc.OpenPI()
    calls: ClassVar[list] = []

    def condition(self, observations):
        CachePolicy.calls.append("condition")
        # observations: (batch, tokens, OBS) -> cache (layers, batch, tokens, width)
        cache = jnp.tanh(jnp.einsum("bso,low->lbsw", observations, self.proj))
        return {"cache": cache, "context": observations.mean(axis=1)}

    def batch_size(self, cond):
        return cond["cache"].shape[1]

    def velocity(self, cond, x_t, t):
        pooled = cond["cache"].mean(axis=2)  # (layers, batch, width)
        feat = jnp.moveaxis(pooled, 0, 1).reshape(x_t.shape[0], -1)  # (batch, layers*width)
        feat = jnp.broadcast_to(feat[:, None], (x_t.shape[0], H, feat.shape[-1]))
        tt = jnp.broadcast_to(t, x_t.shape[:2] + (1,))
        return jnp.tanh(jnp.concatenate([feat, x_t, tt], axis=-1) @ self.out)

    def energy_context(self, cond):
        return cond["context"]

    def repeat(self, cond, n):
        return {
            "cache": jnp.repeat(cond["cache"], n, axis=1),
            "context": jnp.repeat(cond["context"], n, axis=0),
        }


def _cache_policy(seed=0, layers=2, width=6):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return CachePolicy(
        jax.random.normal(k1, (layers, OBS, width)) / 2,
        jax.random.normal(k2, (layers * width + D + 1, D)) / 2,
    )


class TargetEnergy(fc.AbstractEnergy):
    """A user energy: distance of the chunk to a linear map of the context."""

    w: jax.Array

    def encode(self, context):
        return jnp.tanh(context @ self.w)  # (D,)

    def score(self, encoded, actions):
        return 0.5 * jnp.sum((actions - encoded[None, :]) ** 2)


# ---------------------------------------------------------------- user placements


class Momentum(fc.AbstractInterleaved):
    """Heavy-ball Euler: a placement with state and no energy."""

    beta: jax.Array
    needs_energy = False

    def init(self, flow, x):
        return jnp.zeros_like(x)

    def step(self, flow, x, t, dt, index, state, keys):
        v = flow.velocity(x, t)
        m = self.beta * state + (1 - self.beta) * v
        return x + dt * m, v, m

    def info(self, flow, state):
        return jnp.sqrt(jnp.sum(state**2, axis=(1, 2)))


class Inpaint(fc.AbstractInterleaved):
    """Prefix inpainting: after each step, overwrite the first `k` actions of the
    noisy sample with the known prefix interpolated at the next time (a user's
    real-time-chunking variant), using the public convention methods."""

    known: jax.Array  # (H, D): the previous chunk, shifted
    k: int = eqx.field(static=True)
    needs_energy = False

    def init(self, flow, x):
        return None

    def step(self, flow, x, t, dt, index, state, keys):
        v = flow.velocity(x, t)
        x_next = x + dt * v
        eps_hat = flow.convention.noise_estimate(x, v, t)
        pinned = flow.convention.interpolate(eps_hat, self.known[None], t + dt)
        rows = (jnp.arange(H) < self.k)[None, :, None]
        return jnp.where(rows, pinned, x_next), v, None

    def info(self, flow, state):
        return None


class HalfStep(fc.AbstractCorrector):
    """A user corrector: half a gradient step, stateless."""

    def init(self, energy, actions):
        return None

    def step(self, energy, actions, state, key):
        return actions - 0.5 * jax.grad(energy)(actions), None, jnp.asarray(1, jnp.int32)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
def test_user_placement_momentum_runs_under_jit_vmap_and_both_conventions(convention):
    policy = MLPPolicy(jax.random.key(0), convention)
    obs = jax.random.normal(jax.random.key(1), (3, OBS))
    noise = jax.random.normal(jax.random.key(2), (3, H, D))
    # beta = 0 is the plain Euler step bit for bit.
    plain, _ = fc.sample(policy, obs, noise=noise)
    same, info = fc.sample(policy, obs, noise=noise, placement=Momentum(jnp.float32(0.0)))
    assert np.asarray(same).tobytes() == np.asarray(plain).tobytes()
    assert info.placement.placement.shape == (3,)
    # beta > 0 is the heavy-ball recursion, written here by hand.
    beta = 0.6
    out, _ = fc.sample(policy, obs, noise=noise, placement=Momentum(jnp.float32(beta)))
    grid = np.asarray(convention.times(10))
    dt = np.float32(convention.direction / 10)
    expected = []
    for i in range(3):
        cond = policy.condition(obs[i])
        x, m = noise[i], jnp.zeros((H, D))
        for t in grid[:-1]:
            v = policy.velocity(cond, x, jnp.float32(t))
            m = beta * m + (1 - beta) * v
            x = x + dt * m
        expected.append(x)
    np.testing.assert_allclose(out, np.stack(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, plain, atol=1e-3)
    # jax.vmap over the whole call, and jit around it, give the same chunks.
    vmapped = jax.vmap(
        lambda o, n: fc.sample(policy, o, noise=n, placement=Momentum(jnp.float32(beta)))[0]
    )(obs, noise)
    np.testing.assert_allclose(vmapped, out, rtol=1e-5, atol=1e-6)


def test_user_placement_inpainting_pins_the_known_prefix():
    policy = MLPPolicy(jax.random.key(3))
    obs = jax.random.normal(jax.random.key(4), (OBS,))
    known = jnp.linspace(-1, 1, H * D).reshape(H, D)
    out, _ = fc.sample(policy, obs, jax.random.key(5), placement=Inpaint(known, 2))
    # At the last step the interpolation lands on the known actions exactly.
    np.testing.assert_allclose(out[:2], known[:2], atol=1e-6)
    plain, _ = fc.sample(policy, obs, jax.random.key(5))
    assert not np.allclose(out[2:], plain[2:], atol=1e-4)  # the free part responded


def test_user_placement_inside_best_of_n_and_post_hoc():
    policy = MLPPolicy(jax.random.key(6))
    obs = jax.random.normal(jax.random.key(7), (2, OBS))
    energy = TargetEnergy(jax.random.normal(jax.random.key(8), (8, D)))
    placement = fc.PostHoc(HalfStep(), inner=fc.BestOfN(4, Momentum(jnp.float32(0.3))))
    out, info = fc.sample(
        policy, obs, jax.random.key(9), batch_size=2, energy=energy, placement=placement
    )
    best = info.placement.inner
    assert best.candidate_energy.shape == (2, 4) and best.selected.shape == (2,)
    assert best.inner.placement.shape == (2,)  # Momentum's own info, of the chosen one
    chosen = jnp.min(best.candidate_energy, axis=1)
    np.testing.assert_allclose(info.placement.correction.energy_before, chosen, rtol=1e-5)
    # Half a gradient step on 0.5 * ||a - c||^2 halves the distance: energy / 4.
    np.testing.assert_allclose(info.final_energy, chosen / 4, rtol=1e-4)


class Reversed(fc.AbstractPlacement):
    """A whole-sample placement of one's own that reads no energy: the plain flow, then
    the chunk's rows in reverse order."""

    needs_energy = False

    def noise_shape(self, chunk_shape):
        return tuple(chunk_shape)

    def sample(self, flow, noise, keys):
        x, _, _ = fc.integrate(flow, fc.Plain(), noise, keys)
        return x[:, ::-1], None


class Needy(fc.AbstractPlacement):
    """A placement of one's own that reads the energy (declares it, and uses it)."""

    needs_energy = True

    def noise_shape(self, chunk_shape):
        return tuple(chunk_shape)

    def sample(self, flow, noise, keys):
        x, _, _ = fc.integrate(flow, fc.Plain(), noise, keys)
        return x, flow.energies(x)


def test_user_placement_without_energy_is_accepted_and_one_needing_it_refused():
    policy = MLPPolicy(jax.random.key(20))
    obs = jax.random.normal(jax.random.key(21), (2, OBS))
    noise = jax.random.normal(jax.random.key(22), (2, H, D))
    plain, _ = fc.sample(policy, obs, noise=noise)
    out, info = fc.sample(policy, obs, noise=noise, placement=Reversed())
    assert np.asarray(out).tobytes() == np.asarray(plain[:, ::-1]).tobytes()
    assert info.final_energy is None
    with pytest.raises(ValueError, match=r"The Needy placement needs an energy: pass energy="):
        fc.sample(policy, obs, noise=noise, placement=Needy())
    # Wrappers derive it from their parts, whoever wrote the parts.
    assert not fc.BestOfN(3, Reversed(), select=fc.Medoid()).needs_energy
    assert fc.BestOfN(3, Needy(), select=fc.Medoid()).needs_energy
    assert fc.BestOfN(3, Reversed()).needs_energy  # ByEnergy ranks by the energy
    assert not fc.Project(fc.constraints.Box(-1.0, 1.0), Reversed()).needs_energy
    assert fc.Project(fc.constraints.Box(-1.0, 1.0), Needy()).needs_energy
    assert fc.PostHoc(fc.reference_recipe(), Reversed()).needs_energy
    with pytest.raises(ValueError, match=r"The BestOfN placement needs an energy"):
        fc.sample(policy, obs, noise=noise[:, None].repeat(3, axis=1),
                  placement=fc.BestOfN(3, Needy(), select=fc.Medoid()))
    out, _ = fc.sample(policy, obs, noise=noise[:, None].repeat(3, axis=1),
                       placement=fc.BestOfN(3, Reversed(), select=fc.Medoid()))
    assert np.asarray(out).tobytes() == np.asarray(plain[:, ::-1]).tobytes()


def test_a_placement_must_declare_whether_it_needs_an_energy():
    class Undeclared(fc.AbstractPlacement):
        def noise_shape(self, chunk_shape):
            return tuple(chunk_shape)

        def sample(self, flow, noise, keys):
            return noise, None

    with pytest.raises(TypeError, match="needs_energy"):
        Undeclared()


def test_server_dispatch_asks_the_placement_whether_it_needs_an_energy():
    # The openpi server's check of its default placement, without openpi: it reads
    # `needs_energy`, so a user's energy-free placement and real-time chunking are
    # served without an energy.
    from flowcorrect.openpi._requests import check_served_placement

    rtc = fc.RealTimeChunking(jnp.zeros((3, D)), 1, 2)
    for placement in (None, Reversed(), rtc, fc.BestOfN(3, select=fc.Medoid())):
        check_served_placement(placement, has_energy=False)
    for placement in (Needy(), fc.PostHoc(), fc.BestOfN(3, Reversed())):
        check_served_placement(placement, has_energy=True)
        name = type(placement).__name__
        with pytest.raises(ValueError, match=rf"{name} cannot run on this server without an "
                                             r"energy.*needs_energy"):
            check_served_placement(placement, has_energy=False)


def test_user_policy_prefix_runs_once_per_call_for_every_placement():
    energy = TargetEnergy(jax.random.normal(jax.random.key(10), (OBS, D)))
    obs = jax.random.normal(jax.random.key(11), (2, 3, OBS))  # (batch, tokens, OBS)
    placements = [
        None,
        fc.PostHoc(),
        fc.Denoised(fc.reference_recipe(), fc.LastSteps(3)),
        fc.Guided(fc.LastSteps(3)),
        fc.BestOfN(8),
        fc.BestOfN(8, rank_at=3),
        fc.PostHoc(inner=fc.BestOfN(4, fc.Guided(weight=2.0))),
    ]
    for placement in placements:
        CachePolicy.calls.clear()
        kwargs = {} if placement is None else dict(energy=energy, placement=placement)
        out, _ = fc.sample(_cache_policy(), obs, jax.random.key(0), **kwargs)
        assert out.shape == (2, H, D)
        # Traced once into the one compiled function: one prefix pass per call.
        assert CachePolicy.calls == ["condition"], (placement, CachePolicy.calls)


def test_batched_policy_best_of_n_matches_its_candidates():
    policy, energy = _cache_policy(1), TargetEnergy(jax.random.normal(jax.random.key(12), (OBS, D)))
    obs = jax.random.normal(jax.random.key(13), (3, 2, OBS))
    noise = jax.random.normal(jax.random.key(14), (3, 4, H, D))
    out, info = fc.sample(policy, obs, noise=noise, energy=energy, placement=fc.BestOfN(4))
    for b in range(3):
        for j in range(4):
            cand, cinfo = fc.sample(
                policy, obs[b : b + 1], noise=noise[b : b + 1, j], energy=energy,
                placement=fc.Plain(),
            )
            np.testing.assert_allclose(
                info.placement.candidate_energy[b, j], cinfo.final_energy[0], rtol=1e-5
            )
        chosen = int(info.placement.selected[b])
        cand, _ = fc.sample(policy, obs[b : b + 1], noise=noise[b : b + 1, chosen])
        np.testing.assert_allclose(out[b], cand[0], rtol=1e-5, atol=1e-6)
        assert chosen == int(np.argmin(info.placement.candidate_energy[b]))


def test_batched_policy_guidance_equals_per_observation_guidance():
    # The batched VJP must give each sample its own gradient.
    policy, energy = _cache_policy(2), TargetEnergy(jax.random.normal(jax.random.key(15), (OBS, D)))
    obs = jax.random.normal(jax.random.key(16), (3, 2, OBS))
    noise = jax.random.normal(jax.random.key(17), (3, H, D))
    placement = fc.Guided(weight=3.0, cap=None)
    out, _ = fc.sample(policy, obs, noise=noise, energy=energy, placement=placement)
    for b in range(3):
        one, _ = fc.sample(
            policy, obs[b : b + 1], noise=noise[b : b + 1], energy=energy, placement=placement
        )
        np.testing.assert_allclose(out[b], one[0], rtol=1e-5, atol=1e-6)
    plain, _ = fc.sample(policy, obs, noise=noise)
    assert not np.allclose(out, plain, atol=1e-3)


def test_policy_weights_are_traced_not_baked_in():
    obs = jax.random.normal(jax.random.key(18), (OBS,))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(policy, key, scale):
        return fc.sample(policy, obs, key, noise_scale=scale)[0]

    keys = [jax.random.key(s) for s in range(3)]
    outs = [run(MLPPolicy(k), k, jnp.float32(0.5 + i)) for i, k in enumerate(keys)]
    assert not np.allclose(outs[0], outs[1])
    # And the weights are arguments of the compiled function, not constants in it.
    policy = MLPPolicy(jax.random.key(0))
    lowered = eqx.filter_jit(lambda p: fc.sample(p, obs, jax.random.key(0))[0]).lower(policy)
    text = lowered.as_text()
    assert "tensor<8x4xf32>" in text  # the encoder's weight is an argument...
    assert re.search(r"constant dense<[^>]*> : tensor<8x4xf32>", text) is None  # ...not a constant


def test_noise_scale_scales_the_initial_noise():
    policy = MLPPolicy(jax.random.key(19))
    obs = jax.random.normal(jax.random.key(20), (OBS,))
    noise = jax.random.normal(jax.random.key(21), (H, D))
    half, _ = fc.sample(policy, obs, noise=noise, noise_scale=0.5)
    given, _ = fc.sample(policy, obs, noise=0.5 * noise)
    np.testing.assert_array_equal(half, given)
    # At scale zero every key gives the same chunk.
    a, _ = fc.sample(policy, obs, jax.random.key(1), noise_scale=0.0)
    b, _ = fc.sample(policy, obs, jax.random.key(2), noise_scale=0.0)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- one energy path


def test_bound_energy_is_an_energy_everywhere():
    target = jnp.linspace(-1, 1, H * D).reshape(H, D)
    actions = target + 0.5
    bound = fc.bind(fc.SquaredDistance(), target)
    assert isinstance(bound, fc.AbstractEnergy)
    np.testing.assert_allclose(bound(None, actions), 0.5 * 0.25 * H * D, rtol=1e-6)
    out, info = fc.correct(bound, None, actions, corrector=fc.GradientStep(1.0))
    np.testing.assert_allclose(out, target, atol=1e-6)
    # A plain function is converted at the boundary, with its context bound too.
    fn = lambda c, a: jnp.sum((a - c) ** 2)  # noqa: E731
    out2, _ = fc.correct(fc.bind(fn, target), None, actions, corrector=fc.GradientStep(0.5))
    np.testing.assert_allclose(out2, target, atol=1e-6)
    # In the sampler, a bound energy ignores the policy's context.
    policy = MLPPolicy(jax.random.key(22))
    obs = jax.random.normal(jax.random.key(23), (OBS,))
    _, sinfo = fc.sample(policy, obs, jax.random.key(0), energy=bound, placement=fc.BestOfN(4))
    assert sinfo.final_energy.shape == ()
    with pytest.raises(TypeError, match="callable"):
        fc.correct(3.0, None, actions)


def test_stochastic_corrector_needs_a_key():
    target = jnp.zeros((H, D))
    langevin = fc.Repeat(fc.ClipStep(fc.LangevinStep(0.1, 1.0), 0.5), num_steps=2)
    with pytest.raises(ValueError, match="stochastic.*key"):
        fc.correct(fc.SquaredDistance(), target, target + 1, corrector=langevin)
    a, _ = fc.correct(fc.SquaredDistance(), target, target + 1, corrector=langevin,
                      key=jax.random.key(0))
    b, _ = fc.correct(fc.SquaredDistance(), target, target + 1, corrector=langevin,
                      key=jax.random.key(1))
    assert not np.allclose(a, b)
    # A deterministic corrector does not need one.
    fc.correct(fc.SquaredDistance(), target, target + 1, corrector=fc.reference_recipe())


# ---------------------------------------------------------------- robustness ----------


class IgnoresLastDim(eqx.Module):
    """An energy that reads the first dims only (openpi's padded dims are ignored)."""

    def __call__(self, context, actions):
        return jnp.sum(actions[:, :-1] ** 2)


class NanInLastDim(fc.AbstractPolicy):
    """A policy whose chunks hold NaN in the ignored dim for some noises."""

    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
    convention: fc.AbstractConvention = fc.OpenPI()

    def condition(self, observation):
        return None

    def velocity(self, cond, x_t, t):
        # Denoises towards zero, except that a sample whose first noise entry is
        # negative ends with NaN in its last dim.
        bad = x_t[0, 0] < 0
        v = x_t / jnp.maximum(t, 1e-3)
        return v.at[:, -1].set(jnp.where(bad & (t < 0.15), jnp.nan, v[:, -1]))

    def energy_context(self, cond):
        return cond


def test_best_of_n_never_picks_a_candidate_with_nan_even_at_lower_energy():
    noise = jnp.stack([jnp.full((H, D), -0.1), jnp.full((H, D), 2.0)])  # NaN one is closer
    out, info = fc.sample(
        NanInLastDim(), None, noise=noise, energy=IgnoresLastDim(), placement=fc.BestOfN(2)
    )
    assert int(info.placement.selected) == 1
    assert bool(jnp.all(jnp.isfinite(out)))
    assert np.isinf(info.placement.candidate_energy[0])
    # When every candidate holds NaN, the sampler says so and falls back to the plain
    # chunk, which here is NaN too: flowcorrect never hides a policy's own NaN.
    noise = jnp.stack([jnp.full((H, D), -0.1), jnp.full((H, D), -0.2)])
    out, info = fc.sample(
        NanInLastDim(), None, noise=noise, energy=IgnoresLastDim(), placement=fc.BestOfN(2)
    )
    assert bool(info.fell_back)


def test_guided_cap_holds_in_float16_at_large_magnitudes():
    # ||v|| and ||added|| near 1e3 square to 1e6, past float16's 65504: the cap must
    # still bound the guidance (it was skipped when the norms overflowed to inf).
    class Const(fc.AbstractPolicy):
        chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
        convention: fc.AbstractConvention = fc.OpenPI()

        def condition(self, observation):
            return None

        def velocity(self, cond, x_t, t):
            return jnp.full_like(x_t, 200.0)

        def energy_context(self, cond):
            return cond

    # a_hat = x - t * v = -190 per entry; the energy (12000) stays finite in float16,
    # its gradient (-40 per entry) times the weight is ~1550 in norm, capped to ~387.
    target = jnp.full((H, D), -150.0, jnp.float16)
    noise = jnp.full((H, D), 10.0, jnp.float16)
    plain, _ = fc.sample(Const(), None, noise=noise, num_steps=1)
    out, info = fc.sample(
        Const(), None, noise=noise, num_steps=1, energy=fc.bind(fc.SquaredDistance(), target),
        placement=fc.Guided(weight=10.0, cap=0.5),
    )
    moved = float(jnp.linalg.norm((out - plain).astype(jnp.float32)))
    v_norm = 200.0 * np.sqrt(H * D)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    assert int(info.placement.placement.num_applied) == 1
    assert moved <= 0.5 * v_norm * 1.01 and moved >= 0.5 * v_norm * 0.95
