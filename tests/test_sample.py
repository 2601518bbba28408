"""Tests of the flow sampler.

Every expected value here is written from the conventions' own formulas, by hand, per
convention, and never read off the library's convention objects: a sign error in the
library cannot cancel against the same error in a test.
"""

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.testing import GaussianPolicy

from .helpers import Tanh


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure, types and shapes, and values within tolerance."""
    # `eqx.tree_equal` returns a JAX bool array for array leaves, hence `bool(...)`.
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def tree_bitwise_equal(x, y) -> bool:
    """Equal bit for bit: -0.0 != 0.0 and NaN == NaN."""
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    return len(xs) == len(ys) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
        for a, b in ((np.asarray(a), np.asarray(b)) for a, b in zip(xs, ys, strict=True))
    )


H, D = 4, 2  # one small chunk shape for the whole file: few compiles.
CONVENTIONS = [fc.OpenPI(), fc.Reverse()]
CONV_IDS = ["openpi", "reverse"]


def _is_openpi(convention) -> bool:
    return isinstance(convention, fc.OpenPI)


def _grid(convention, num_steps: int):
    """Start time and dt, as openpi writes its loop (t accumulates in float32)."""
    if _is_openpi(convention):
        return jnp.float32(1.0), jnp.float32(-1.0 / num_steps)
    return jnp.float32(0.0), jnp.float32(1.0 / num_steps)


# Hand-written conventions (DESIGN.md): openpi x_t = t*eps + (1-t)*a, v = eps - a;
# reverse x_t = (1-t)*eps + t*a, v = a - eps.
def _denoised(convention, x, v, t):
    return x - t * v if _is_openpi(convention) else x + (1 - t) * v


def _noise_estimate(convention, x, v, t):
    return x + (1 - t) * v if _is_openpi(convention) else x - t * v


def _interpolate(convention, eps, a, t):
    return t * eps + (1 - t) * a if _is_openpi(convention) else (1 - t) * eps + t * a


# ---------------------------------------------------------------- velocity fields


class PointMass(eqx.Module):
    """The exact flow-matching velocity when all data sit at `target`."""

    target: jax.Array
    openpi: bool = eqx.field(static=True)

    def __call__(self, context, x, t):
        if self.openpi:  # x = t*eps + (1-t)*a, so eps - a = (x - a) / t
            return (x - self.target) / t
        return (self.target - x) / (1 - t)  # x = (1-t)*eps + t*a, a - eps = (a - x)/(1-t)


class Gaussian(eqx.Module):
    """flowcorrect.testing.GaussianPolicy's exact velocity as a field `(context, x, t)`."""

    policy: GaussianPolicy

    def __call__(self, context, x, t):
        return self.policy.velocity(context, x, t)


class Constant(eqx.Module):
    value: jax.Array

    def __call__(self, context, x, t):
        return jnp.broadcast_to(self.value, x.shape)


class LogCosh(eqx.Module):
    """A smooth non-quadratic energy with its minimum at the context."""

    def __call__(self, context, actions):
        return jnp.sum(jnp.log(jnp.cosh(actions - context)))


class OnlyStep(fc.AbstractSchedule):
    """A user-written schedule: correct at one step only."""

    k: int

    def mask(self, num_steps):
        return jnp.arange(num_steps) == self.k


def _tanh_field(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = 8
    return Tanh(
        jax.random.normal(k[0], (D, hidden)) / 2,
        jax.random.normal(k[1], (hidden, D)) / 2,
        jax.random.normal(k[2], (hidden,)),
    )


def _gaussian(convention, mean=0.5, std=0.7):
    return Gaussian(GaussianPolicy(jnp.full((H, D), mean, jnp.float32), std, convention))


def _noise(seed=0, shape=(H, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _euler_loop(velocity, context, noise, convention, num_steps):
    """The plain Euler loop as one would write it by hand (eager, float32)."""
    t, dt = _grid(convention, num_steps)
    x = noise
    for _ in range(num_steps):
        x = x + dt * velocity(context, x, t)
        t = t + dt
    return x


@eqx.filter_jit
def _euler_scan(velocity, context, noise, convention, num_steps):
    t, dt = _grid(convention, num_steps)

    def body(carry, _):
        x, t = carry
        return (x + dt * velocity(context, x, t), t + dt), None

    (x, _), _ = jax.lax.scan(body, (noise, t), None, length=num_steps)
    return x


def _sq(target):
    return fc.SquaredDistance(jnp.asarray(target, jnp.float32))


class TwoContexts(fc.AbstractPolicy):
    """A user-written policy whose energy reads another context than its velocity.

    The observation is a pair `(velocity_context, energy_context)`; this is how a
    policy hands the energy what it read in its once-per-observation pass.
    """

    fn: object
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: fc.AbstractConvention

    def condition(self, observation):
        return observation

    def velocity(self, cond, x_t, t):
        return self.fn(cond[0], x_t, t)

    def energy_context(self, cond):
        return cond[1]


def _policy(velocity, convention=fc.OpenPI(), chunk_shape=(H, D), two=False):
    if two:
        return TwoContexts(velocity, chunk_shape, convention)
    return fc.VelocityPolicy(velocity, chunk_shape, convention)


def _sample(velocity, context, key=None, *, convention=fc.OpenPI(), energy_context=None, **kw):
    """`fc.sample` on a bare velocity field, as the tests of the first wave wrote it."""
    if energy_context is not None:
        return fc.sample(
            _policy(velocity, convention, two=True), (context, energy_context), key, **kw
        )
    return fc.sample(_policy(velocity, convention), context, key, **kw)


def _counts(info):
    counts = info.placement.placement
    return int(counts.num_applied), int(counts.num_skipped)


floats = st.floats(-2.0, 2.0, width=32)
chunks = hnp.arrays(np.float32, (H, D), elements=floats)


# ---------------------------------------------------------------- conventions


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@settings(max_examples=30)
@given(eps=chunks, a=chunks, t=st.floats(0.0, 1.0, width=32))
def test_convention_estimates_invert_the_interpolation(convention, eps, a, t):
    eps, a, t = jnp.asarray(eps), jnp.asarray(a), jnp.float32(t)
    x = _interpolate(convention, eps, a, t)
    v = eps - a if _is_openpi(convention) else a - eps
    assert tree_allclose(convention.interpolate(eps, a, t), x)
    assert tree_allclose(convention.velocity_target(eps, a), v)
    assert tree_allclose(convention.denoised(x, v, t), jnp.asarray(a), atol=1e-5)
    assert tree_allclose(convention.noise_estimate(x, v, t), jnp.asarray(eps), atol=1e-5)
    # progress is the coefficient of the actions in x_t
    da = jnp.ones((H, D), jnp.float32)
    moved = _interpolate(convention, eps, a + da, t) - x
    assert tree_allclose(moved, convention.progress(t) * da, atol=1e-5)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_convention_time_grid(convention):
    grid = np.asarray(convention.times(10))
    t, dt = _grid(convention, 10)
    expected = [t]
    for _ in range(10):
        expected.append(expected[-1] + dt)
    assert grid.tobytes() == np.asarray(expected, np.float32).tobytes()
    assert grid[0] == (1.0 if _is_openpi(convention) else 0.0)
    assert convention.direction == (-1.0 if _is_openpi(convention) else 1.0)
    assert float(convention.progress(jnp.asarray(grid[0]))) == 0.0
    assert abs(float(convention.progress(jnp.asarray(grid[-1]))) - 1.0) < 1e-6


def test_schedules():
    assert np.asarray(fc.EveryStep().mask(5)).tolist() == [True] * 5
    assert np.nonzero(fc.LastSteps(3).mask(10))[0].tolist() == [7, 8, 9]
    assert np.asarray(fc.LastSteps(12).mask(10)).all()
    assert np.nonzero(fc.EveryNth(3).mask(10))[0].tolist() == [0, 3, 6, 9]
    assert np.nonzero(fc.EveryNth(4).mask(10))[0].tolist() == [1, 5, 9]
    assert np.asarray(fc.EveryNth(1).mask(4)).all()
    for bad in (lambda: fc.LastSteps(0), lambda: fc.EveryNth(0), lambda: fc.Guided(cap=0.0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match=">= 0"):
        fc.Denoised(weight=-1.0)


def test_weights():
    openpi, reverse = fc.OpenPI(), fc.Reverse()
    w = fc.PowerWeight(2.0, 1.0)
    # Near the actions the weight is `scale` in both conventions; at the noise it is 0.
    assert float(w(jnp.float32(0.0), openpi)) == 2.0
    assert float(w(jnp.float32(1.0), reverse)) == 2.0
    assert float(w(jnp.float32(1.0), openpi)) == 0.0
    assert abs(float(w(jnp.float32(0.25), openpi)) - 1.5) < 1e-6
    assert float(fc.Denoised(weight=lambda t: 3 * t).weight(jnp.float32(0.5), openpi)) == 1.5
    assert float(fc.Guided(weight=0.3).weight(jnp.float32(0.5), reverse)) == np.float32(0.3)


# ---------------------------------------------------------------- the plain sampler


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_plain_sampler_is_the_euler_loop(convention):
    velocity, context, noise = _tanh_field(), jnp.linspace(-1, 1, 8), _noise(1)
    out, info = _sample(velocity, context, noise=noise, convention=convention)
    assert tree_bitwise_equal(out, _euler_scan(velocity, context, noise, convention, 10))
    assert tree_allclose(out, _euler_loop(velocity, context, noise, convention, 10))
    assert info.final_energy is None and not bool(info.fell_back)
    # Drawing the noise from a key is the same as giving it.
    key = jax.random.key(3)
    drawn, _ = _sample(velocity, context, key, convention=convention)
    noise_key, _ = jax.random.split(key)
    given_noise, _ = _sample(
        velocity, context, noise=jax.random.normal(noise_key, (H, D)), convention=convention
    )
    assert tree_bitwise_equal(drawn, given_noise)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_point_mass_target_is_reached(convention, num_steps):
    target = jnp.arange(H * D, dtype=jnp.float32).reshape(H, D) / 4 - 1
    velocity = PointMass(target, _is_openpi(convention))
    out, _ = _sample(
        velocity,
        None,
        jax.random.key(num_steps),
        num_steps=num_steps,
        convention=convention,
    )
    assert tree_allclose(out, target, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@settings(max_examples=15)
@given(
    mean=st.floats(-2.0, 2.0, width=32),
    std=st.floats(0.25, 2.0, width=32),
    seed=st.integers(0, 2**16),
)
def test_gaussian_flow_matches_the_analytic_map(convention, mean, std, seed):
    # From N(0, 1) to N(mean, std**2) per entry, the flow map is eps -> mean + std*eps.
    velocity = _gaussian(convention, mean, std)
    noise = _noise(seed)
    expected = mean + std * noise
    out, _ = _sample(velocity, None, noise=noise, num_steps=1000, convention=convention)
    # Euler's error is O(1/num_steps): at 1000 steps about 2e-3 * (1 + |mean| + std)
    # over these ranges; a wrong sign or time direction is off by O(1).
    assert tree_allclose(out, expected, rtol=0, atol=1e-2 * (1 + abs(mean) + std))


# ---------------------------------------------------------------- zero weight


ZERO_WEIGHT = [
    fc.Denoised(fc.GradientStep(0.5), weight=0.0),
    fc.Denoised(fc.GradientStep(0.5), fc.LastSteps(3), fc.PowerWeight(0.0, 2.0)),
    fc.Guided(weight=0.0, cap=None),
    fc.Guided(fc.EveryNth(2), fc.ConstantWeight(0.0)),
]


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("placement", ZERO_WEIGHT, ids=lambda p: type(p).__name__)
def test_zero_weight_is_the_plain_sampler_bit_for_bit(convention, placement):
    velocity, context, noise = _tanh_field(), jnp.linspace(-1, 1, 8), _noise(2)
    plain, _ = _sample(velocity, context, noise=noise, convention=convention)
    out, info = _sample(
        velocity,
        context,
        noise=noise,
        convention=convention,
        energy=_sq(jnp.ones((H, D))),
        placement=placement,
        track_uncorrected=True,
    )
    assert tree_bitwise_equal(out, plain)
    assert tree_bitwise_equal(info.uncorrected, plain)
    assert _counts(info) == (0, 0)
    assert float(info.delta_norm) == 0.0


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_post_hoc_with_no_steps_is_the_plain_sampler(convention):
    velocity, context, noise = _tanh_field(), jnp.linspace(-1, 1, 8), _noise(2)
    plain, _ = _sample(velocity, context, noise=noise, convention=convention)
    out, info = _sample(
        velocity,
        context,
        noise=noise,
        convention=convention,
        energy=_sq(jnp.ones((H, D))),
        placement=fc.PostHoc(fc.Repeat(fc.GradientStep(0.5), num_steps=0)),
    )
    assert tree_bitwise_equal(out, plain)
    assert int(info.placement.correction.num_accepted) == 0


# ---------------------------------------------------------------- signs: quadratic energy


def _monotone_case(convention, placement_for, weights, target, seed, corrector):
    """Final energies for growing weights; checks they fall and move towards the target."""
    velocity, noise = _gaussian(convention), _noise(seed)
    energy = _sq(target)
    energies, distances = [], []
    for w in weights:
        out, info = _sample(
            velocity,
            None,
            noise=noise,
            convention=convention,
            energy=energy,
            placement=placement_for(w, corrector(w)),
            track_uncorrected=True,
        )
        assert not bool(info.fell_back)
        energies.append(float(energy(None, out)))
        assert abs(energies[-1] - float(info.final_energy)) <= 1e-5 * (1 + energies[-1])
        distances.append(float(jnp.linalg.norm(out - target)))
    plain_distance = float(jnp.linalg.norm(info.uncorrected - target))
    assert distances[0] == pytest.approx(plain_distance, rel=1e-6, abs=1e-6)
    assert all(d < plain_distance for d in distances[1:]), distances
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False)), energies


WEIGHTED_PLACEMENTS = {
    "post-hoc": (lambda w, c: fc.PostHoc(c), lambda w: fc.GradientStep(w)),
    "denoised-every": (lambda w, c: fc.Denoised(c, weight=w), lambda w: fc.GradientStep(0.5)),
    "denoised-last3": (
        lambda w, c: fc.Denoised(c, fc.LastSteps(3), weight=w),
        lambda w: fc.GradientStep(0.5),
    ),
    "denoised-nth-ramp": (
        lambda w, c: fc.Denoised(c, fc.EveryNth(2), weight=fc.PowerWeight(w, 1.0)),
        lambda w: fc.reference_recipe(num_steps=2, alpha=0.5, clip_frac=0.5),
    ),
    "guided-every": (lambda w, c: fc.Guided(weight=w, cap=None), lambda w: None),
    "guided-last3-ramp": (
        lambda w, c: fc.Guided(fc.LastSteps(3), weight=fc.PowerWeight(w, 1.0), cap=None),
        lambda w: None,
    ),
}
WEIGHT_GRIDS = {
    "post-hoc": [0.0, 0.25, 0.5, 0.75],
    "guided-every": [0.0, 0.5, 1.0, 2.0],
    "guided-last3-ramp": [0.0, 1.0, 2.0, 4.0],
}


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("name", list(WEIGHTED_PLACEMENTS))
@settings(max_examples=8)
@given(target=chunks, seed=st.integers(0, 2**16))
def test_quadratic_energy_falls_as_the_weight_grows(convention, name, target, seed):
    placement_for, corrector = WEIGHTED_PLACEMENTS[name]
    weights = WEIGHT_GRIDS.get(name, [0.0, 0.25, 0.5, 1.0])
    _monotone_case(convention, placement_for, weights, jnp.asarray(target), seed, corrector)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@settings(max_examples=8)
@given(target=chunks, seed=st.integers(0, 2**16))
def test_best_of_n_keeps_the_lowest_energy_then_corrects(convention, target, seed):
    velocity, noise, energy = _gaussian(convention), _noise(seed, (4, H, D)), _sq(target)
    candidates = [
        _sample(velocity, None, noise=noise[i], convention=convention)[0] for i in range(4)
    ]
    scores = [float(energy(None, c)) for c in candidates]
    out, info = _sample(
        velocity,
        None,
        noise=noise,
        convention=convention,
        energy=energy,
        placement=fc.BestOfN(4),
    )
    selected = int(info.placement.selected)
    assert selected == int(np.argmin(scores))
    assert tree_allclose(out, candidates[selected], atol=1e-6)
    scored = info.placement.candidate_energy
    assert tree_allclose(scored, jnp.asarray(scores), rtol=1e-5, atol=1e-6)
    assert float(info.final_energy) == pytest.approx(min(scores), rel=1e-5, abs=1e-6)
    # Then a post-hoc step on the chosen chunk: more step, lower energy.
    energies = []
    for alpha in [0.0, 0.25, 0.5, 0.75]:
        corrected, info = _sample(
            velocity,
            None,
            noise=noise,
            convention=convention,
            energy=energy,
            placement=fc.PostHoc(fc.GradientStep(alpha), inner=fc.BestOfN(4)),
        )
        assert int(info.placement.inner.selected) == selected
        energies.append(float(energy(None, corrected)))
    assert energies[0] == pytest.approx(min(scores), rel=1e-5, abs=1e-6)
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False)), energies


# ---------------------------------------------------------------- the denoised shift


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize(
    "schedule", [fc.EveryStep(), fc.LastSteps(2), fc.EveryNth(3)], ids=lambda s: type(s).__name__
)
def test_denoised_correction_on_a_point_mass(convention, schedule):
    # The point-mass flow forgets every shift of x_t (its denoised estimate is always
    # the target), so only the last correction survives, and it must land in full.
    a_star = jnp.linspace(-1, 1, H * D).reshape(H, D)
    target = jnp.full((H, D), 2.0)
    alpha, w = 0.25, 0.5
    out, info = _sample(
        PointMass(a_star, _is_openpi(convention)),
        None,
        noise=_noise(4),
        num_steps=6,
        convention=convention,
        energy=_sq(target),
        placement=fc.Denoised(fc.GradientStep(alpha), schedule, w),
        step_energies=True,
    )
    assert tree_allclose(out, a_star + w * alpha * (target - a_star), atol=1e-5)
    assert _counts(info)[0] == int(np.sum(schedule.mask(6)))
    e_star = float(_sq(target)(None, a_star))
    assert tree_allclose(info.placement.step_energy, jnp.full(6, e_star), rtol=1e-5)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("k", [0, 2])
def test_denoised_shift_keeps_the_noise_estimate(convention, k):
    # At step k, DESIGN.md's rule: a_hat -> a_hat + delta with eps_hat fixed, i.e.
    # openpi: x -> x + (1-t)*delta, v -> v - delta; reverse: x -> x + t*delta, v -> v + delta.
    velocity, context, noise = _tanh_field(1), jnp.linspace(-1, 1, 8), _noise(6)
    target, alpha, w, num_steps = jnp.full((H, D), 1.5), 0.3, 0.8, 4
    out, info = _sample(
        velocity,
        context,
        noise=noise,
        num_steps=num_steps,
        convention=convention,
        energy=_sq(target),
        placement=fc.Denoised(fc.GradientStep(alpha), OnlyStep(k), w),
    )
    t, dt = _grid(convention, num_steps)
    x = noise
    for step in range(num_steps):
        v = velocity(context, x, t)
        if step == k:
            a_hat = _denoised(convention, x, v, t)
            eps_hat = _noise_estimate(convention, x, v, t)
            delta = w * (-alpha) * (a_hat - target)
            if _is_openpi(convention):
                x, v = x + (1 - t) * delta, v - delta
            else:
                x, v = x + t * delta, v + delta
            assert tree_allclose(_noise_estimate(convention, x, v, t), eps_hat, atol=1e-5)
            assert tree_allclose(_denoised(convention, x, v, t), a_hat + delta, atol=1e-5)
        x = x + dt * v
        t = t + dt
    assert tree_allclose(out, x, atol=1e-5)
    assert _counts(info)[0] == 1


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("num_steps", [1, 4])
def test_guided_gradient_matches_finite_differences(convention, num_steps):
    velocity, context, noise = _tanh_field(2), jnp.linspace(-1, 1, 8), _noise(7)
    energy = LogCosh()
    energy_context = jnp.full((H, D), 0.4)
    w = 0.7
    kwargs = dict(
        noise=noise,
        num_steps=num_steps,
        convention=convention,
        energy=energy,
        energy_context=energy_context,
    )
    plain, _ = _sample(velocity, context, placement=fc.Guided(weight=0.0), **kwargs)
    guided, info = _sample(
        velocity, context, placement=fc.Guided(fc.LastSteps(1), w, cap=None), **kwargs
    )
    assert _counts(info)[0] == 1
    # The state before the last step, and its time, by hand.
    t, dt = _grid(convention, num_steps)
    x = noise
    for _ in range(num_steps - 1):
        x = x + dt * velocity(context, x, t)
        t = t + dt
    # Last step: plain = x + dt*v, guided = x + dt*(v + s*w*g) with s = +1 for openpi
    # (dt < 0) and s = -1 for reverse (dt > 0), so that the step goes downhill.
    s = 1.0 if _is_openpi(convention) else -1.0
    g_sampler = (guided - plain) / (dt * s * w)

    def f(x):
        return energy(energy_context, _denoised(convention, x, velocity(context, x, t), t))

    h = 1e-2
    g_fd = np.zeros((H, D), np.float32)
    for i in range(H):
        for j in range(D):
            e = jnp.zeros((H, D)).at[i, j].set(h)
            g_fd[i, j] = (f(x + e) - f(x - e)) / (2 * h)
    assert float(jnp.linalg.norm(g_sampler)) > 0.1  # not trivially zero
    assert tree_allclose(g_sampler, jnp.asarray(g_fd), rtol=2e-2, atol=2e-3)
    # Going downhill: the guided chunk's estimate has lower energy than the plain one.
    assert float(energy(energy_context, guided)) < float(energy(energy_context, plain))


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_guided_cap_bounds_the_added_velocity(convention):
    # A constant field has zero Jacobian, so the added term is w * grad E(a_hat) and one
    # Euler step of size |dt| = 1 shows it exactly.
    value = jnp.asarray([[0.5, -0.25]], jnp.float32)
    velocity, noise, target = Constant(value), _noise(8), jnp.full((H, D), 3.0)
    v_norm = float(jnp.linalg.norm(jnp.broadcast_to(value, (H, D))))
    plain, _ = _sample(velocity, None, noise=noise, num_steps=1, convention=convention)
    a_hat = _denoised(
        convention, noise, jnp.broadcast_to(value, (H, D)), 1.0 if _is_openpi(convention) else 0.0
    )
    grad_norm = float(jnp.linalg.norm(a_hat - target))
    w = 0.5  # one step of size 1 with w = 1 would land on the target exactly
    for cap, expected in [(None, w * grad_norm), (0.5, 0.5 * v_norm), (100.0, w * grad_norm)]:
        out, _ = _sample(
            velocity,
            None,
            noise=noise,
            num_steps=1,
            convention=convention,
            energy=_sq(target),
            placement=fc.Guided(weight=w, cap=cap),
        )
        assert float(jnp.linalg.norm(out - plain)) == pytest.approx(expected, rel=1e-5)
        assert float(jnp.linalg.norm(out - target)) < float(jnp.linalg.norm(plain - target))


# ---------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_step_energies_and_uncorrected_chunk(convention):
    velocity, noise, target = _gaussian(convention), _noise(9), jnp.full((H, D), 1.0)
    energy = _sq(target)
    plain, _ = _sample(velocity, None, noise=noise, convention=convention)
    out, info = _sample(
        velocity,
        None,
        noise=noise,
        convention=convention,
        energy=energy,
        placement=fc.Denoised(fc.GradientStep(0.5), fc.LastSteps(3), 1.0),
        step_energies=True,
        track_uncorrected=True,
    )
    assert tree_allclose(info.uncorrected, plain, atol=1e-6)
    assert float(info.delta_norm) == pytest.approx(float(jnp.linalg.norm(out - plain)), rel=1e-5)
    assert float(info.uncorrected_energy) == pytest.approx(float(energy(None, plain)), rel=1e-5)
    assert float(info.final_energy) < float(info.uncorrected_energy)
    assert _counts(info)[0] == 3
    # The energy of each step's denoised estimate, along the corrected path, by hand.
    t, dt = _grid(convention, 10)
    x, expected = noise, []
    for step in range(10):
        v = velocity(None, x, t)
        a_hat = _denoised(convention, x, v, t)
        expected.append(float(energy(None, a_hat)))
        x = x + dt * v
        if step >= 7:
            delta = -0.5 * (a_hat - target)
            x = x + (1 - (t + dt) if _is_openpi(convention) else t + dt) * delta
        t = t + dt
    expected = jnp.asarray(expected)
    assert tree_allclose(info.placement.step_energy, expected, rtol=1e-4, atol=1e-5)
    assert tree_allclose(out, x, atol=1e-5)
    # Switching the extras off drops them and changes nothing else.
    out2, info2 = _sample(
        velocity,
        None,
        noise=noise,
        convention=convention,
        energy=energy,
        placement=fc.Denoised(fc.GradientStep(0.5), fc.LastSteps(3), 1.0),
    )
    assert info2.placement.step_energy is None and info2.uncorrected is None
    assert tree_bitwise_equal(out2, out)


def test_an_energy_without_a_placement_is_an_error_and_post_hoc_is_the_reference():
    velocity, noise, target = _gaussian(fc.OpenPI()), _noise(10), jnp.full((H, D), 1.0)
    # The reference's post-hoc recipe lowered task success in every closed-loop test
    # here: nobody gets it by accident.
    with pytest.raises(ValueError, match="without a `placement`.*BestOfN.*Guided.*PostHoc"):
        _sample(velocity, None, noise=noise, energy=_sq(target))
    out, info = _sample(velocity, None, noise=noise, energy=_sq(target), placement=fc.PostHoc())
    plain, _ = _sample(velocity, None, noise=noise)
    expected, _ = fc.correct(_sq(target), None, plain)
    assert tree_allclose(out, expected, atol=1e-6)
    assert int(info.placement.correction.num_accepted) == 3



def test_plain_is_the_default_none_is_its_deprecated_spelling_and_plain_with_an_energy_scores():
    velocity, noise, target = _gaussian(fc.OpenPI()), _noise(11, (3, H, D)), jnp.full((H, D), 1.0)
    default, info = _sample(velocity, None, noise=noise)
    explicit, _ = _sample(velocity, None, noise=noise, placement=fc.Plain())
    assert tree_bitwise_equal(default, explicit)
    assert not bool(jnp.any(info.fell_back)) and info.final_energy is None
    with pytest.warns(DeprecationWarning, match=r"placement=None.*fc\.Plain\(\)"):
        old, _ = _sample(velocity, None, noise=noise, placement=None)
    assert tree_bitwise_equal(old, default)
    # Chosen explicitly, Plain with an energy scores the plain chunks and moves nothing.
    scored, info = _sample(velocity, None, noise=noise, energy=_sq(target),
                           placement=fc.Plain(), track_uncorrected=True)
    assert tree_bitwise_equal(scored, default)
    expected = jax.vmap(lambda a: 0.5 * jnp.sum((a - target) ** 2))(default)
    assert tree_allclose(info.final_energy, expected, rtol=1e-6)
    assert tree_allclose(info.uncorrected_energy, expected, rtol=1e-6)
    assert bool(jnp.all(info.delta_norm == 0))


def test_a_plain_chunk_that_is_not_finite_is_reported():
    # One sample's noise is inf: its chunk is not finite, and nothing is safer than the
    # plain chunk, so it is kept and reported; the others are untouched.
    velocity, noise = _gaussian(fc.OpenPI()), _noise(12, (3, H, D))
    bad = noise.at[1, 0, 0].set(jnp.inf)
    out, info = _sample(velocity, None, noise=bad)
    clean, _ = _sample(velocity, None, noise=noise)
    assert info.fell_back.tolist() == [False, True, False]
    assert tree_bitwise_equal(out[::2], clean[::2])
    assert not bool(jnp.all(jnp.isfinite(out[1])))

# ---------------------------------------------------------------- safety


class Fragile(eqx.Module):
    """The Gaussian field, but NaN once the sample leaves a box (a policy off its data)."""

    inner: Gaussian

    def __call__(self, context, x, t):
        v = self.inner(context, x, t)
        return jnp.where(jnp.max(jnp.abs(x)) > 6.0, jnp.nan, v)


class NanEnergy(eqx.Module):
    def __call__(self, context, actions):
        return jnp.sum(actions**2) * jnp.nan


class NanGradient(eqx.Module):
    """A finite energy whose gradient is NaN (JAX's `where` trap: 0 * NaN)."""

    def __call__(self, context, actions):
        return jnp.sum(jnp.where(True, actions**2, jnp.sqrt(-(actions**2) - 1)))


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_non_finite_never_reaches_the_robot(convention):
    velocity, noise = Fragile(_gaussian(convention)), _noise(11)
    plain, _ = _sample(velocity, None, noise=noise, convention=convention)
    assert bool(jnp.all(jnp.isfinite(plain)))
    # Guidance strong enough to push the sample out of the policy's box: the policy
    # returns NaN, and the sampler falls back to the uncorrected chunk.
    out, info = _sample(
        velocity,
        None,
        noise=noise,
        convention=convention,
        energy=_sq(jnp.full((H, D), 50.0)),
        placement=fc.Guided(weight=200.0, cap=None),
    )
    assert bool(info.fell_back)
    assert tree_bitwise_equal(out, plain)
    # A NaN energy, or a finite one with a NaN gradient: every correction is skipped.
    step = fc.GradientStep(0.1)
    placements = (
        fc.Denoised(step),
        fc.Guided(),
        fc.PostHoc(step),
        fc.PostHoc(step, inner=fc.BestOfN(2)),
    )
    for energy in (NanEnergy(), NanGradient()):
        assert bool(jnp.isfinite(energy(None, plain)) == isinstance(energy, NanGradient))
        for placement in placements:
            name = f"{type(energy).__name__} {type(placement).__name__}"
            nz = _noise(11, placement.noise_shape((H, D)))
            out, info = _sample(
                velocity,
                None,
                noise=nz,
                convention=convention,
                energy=energy,
                placement=placement,
            )
            assert bool(jnp.all(jnp.isfinite(out))), name
            if isinstance(placement, fc.AbstractInterleaved):
                assert _counts(info) == (0, 10), name
                assert tree_allclose(out, plain, atol=1e-6), name
            else:
                assert bool(info.placement.correction.fell_back), name
                assert int(info.placement.correction.num_accepted) == 0, name


# ---------------------------------------------------------------- batching and compiles


@pytest.mark.parametrize(
    "placement",
    [
        fc.Guided(fc.LastSteps(3), 0.5),
        fc.Denoised(fc.reference_recipe(), fc.EveryNth(2), 0.5),
        fc.BestOfN(3),
        fc.BestOfN(3, rank_at=4),
        fc.PostHoc(fc.reference_recipe(), inner=fc.BestOfN(2, fc.Guided(weight=0.5))),
    ],
    ids=lambda p: type(p).__name__,
)
def test_batch_equals_per_sample(placement):
    batch = 3
    velocity = _tanh_field(3)
    context = jax.random.normal(jax.random.key(12), (batch, 8))
    energy_context = jax.random.normal(jax.random.key(13), (batch, H, D))
    key = jax.random.key(14)
    kwargs = dict(energy=LogCosh(), placement=placement, track_uncorrected=True)
    out, info = _sample(
        velocity,
        context,
        key,
        batch_size=batch,
        energy_context=energy_context,
        **kwargs,
    )
    assert out.shape == (batch, H, D) and info.final_energy.shape == (batch,)
    keys = jax.random.split(key, batch)
    for i in range(batch):
        one, one_info = _sample(
            velocity,
            context[i],
            keys[i],
            energy_context=energy_context[i],
            **kwargs,
        )
        assert tree_allclose(out[i], one, rtol=1e-5, atol=1e-6)
        assert tree_allclose(jax.tree.map(lambda a: a[i], info), one_info, rtol=1e-5, atol=1e-5)


def test_batch_needs_a_batched_context():
    velocity = _tanh_field()
    with pytest.raises(ValueError, match="leading batch axis"):
        _sample(velocity, jnp.zeros(8), noise=_noise(0, (3, H, D)))


def test_new_values_do_not_recompile():
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(velocity, context, noise, energy, placement, corrector):
        return _sample(
            velocity,
            context,
            noise=noise,
            energy=energy,
            placement=fc.PostHoc(corrector, inner=placement),
            convention=fc.Reverse(),
        )

    counted = eqx.debug.assert_max_traces(_tanh_field(0), max_traces=None)
    traces = None
    for seed in range(3):
        velocity = _tanh_field(seed)
        args = (
            velocity,
            jnp.linspace(-1, 1, 8) * seed,
            _noise(seed),
            _sq(jnp.full((H, D), float(seed))),
            fc.Guided(fc.LastSteps(seed + 1), fc.PowerWeight(0.5 * seed, seed), cap=1.0 + seed),
            fc.reference_recipe(alpha=0.1 * seed, clip_frac=0.1 + seed),
        )
        run(*args)
        # `sample` itself, called directly, also compiles once for new values.
        placement = fc.Denoised(args[5], fc.EveryNth(seed + 1), weight=0.2 * seed)
        counted = eqx.tree_at(lambda v: v.__wrapped__, counted, velocity)
        _sample(counted, args[1], noise=args[2], energy=args[3], placement=placement)
        n = eqx.debug.get_num_traces(counted)
        assert traces is None or n == traces
        traces = n


# ---------------------------------------------------------------- errors


def test_clear_errors():
    velocity, noise = _tanh_field(), _noise(0)
    ctx = jnp.zeros(8)
    with pytest.raises(ValueError, match="key"):
        _sample(velocity, ctx)
    with pytest.raises(ValueError, match="chunk_shape"):
        fc.VelocityPolicy(velocity, (H, 0))
    with pytest.raises(ValueError, match=r"`noise` must have shape \(4, 2\)"):
        _sample(velocity, ctx, noise=jnp.zeros((H + 1, D)))
    with pytest.raises(TypeError, match="`noise` must be a JAX or NumPy array.*list"):
        _sample(velocity, ctx, noise=[[0.0] * D] * H)
    with pytest.raises(ValueError, match="Guided placement needs an energy"):
        _sample(velocity, ctx, noise=noise, placement=fc.Guided())
    with pytest.raises(ValueError, match=r"\(2, 4, 2\)"):
        _sample(
            velocity,
            ctx,
            noise=_noise(0, (3, H, D)),
            energy=_sq(noise),
            placement=fc.BestOfN(2),
        )
    with pytest.raises(ValueError, match="velocity must return"):
        _sample(lambda c, x, t: x[0], ctx, noise=noise)
    with pytest.raises(TypeError, match="VelocityPolicy"):
        fc.sample(velocity, ctx, noise=noise)
    with pytest.raises(TypeError, match="placement"):
        fc.BestOfN(2, inner=fc.GradientStep())
    # jaxtyping 0.2.36 (openpi's pin) checks the field's type before our check runs.
    with pytest.raises(TypeError, match="OptaxStep|AbstractCorrector"):
        import optax

        fc.PostHoc(optax.sgd(0.1))


# ---------------------------------------------------------------- info.step_energy


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_step_energy_is_one_field_whatever_the_placement(convention):
    # On the point-mass flow the denoised estimate is the target at every step, for
    # every placement (guidance has no gradient through it), so every placement's step
    # energies are E(a_star) at every step; `info.step_energy` finds them at any depth.
    a_star = jnp.linspace(-1, 1, H * D).reshape(H, D)
    target = jnp.full((H, D), 2.0)
    e_star = float(_sq(target)(None, a_star))
    steps, batch = 5, 2
    box = fc.constraints.Box(-10.0, 10.0)
    deep = {
        "plain": (fc.Plain(), lambda p: p.step_energy),
        "guided": (fc.Guided(), lambda p: p.step_energy),
        "post_hoc": (fc.PostHoc(fc.GradientStep(0.1), fc.Guided()),
                     lambda p: p.inner.step_energy),
        "best_of_n": (fc.BestOfN(3, fc.Denoised(fc.GradientStep(0.1))),
                      lambda p: p.inner.step_energy),
        "best_of_n_rank_at": (fc.BestOfN(3, rank_at=2), lambda p: p.step_energy),
        "project": (fc.Project(box, fc.PostHoc(fc.GradientStep(0.1))),
                    lambda p: p.inner.inner.step_energy),
    }
    policy = _policy(PointMass(a_star, _is_openpi(convention)), convention)
    for name, (placement, path) in deep.items():
        kw = dict(batch_size=batch, num_steps=steps, energy=_sq(target), placement=placement)
        _, info = fc.sample(policy, None, jax.random.key(1), step_energies=True, **kw)
        assert info.step_energy.shape == (batch, steps), name
        assert tree_bitwise_equal(info.step_energy, path(info.placement)), name
        assert tree_allclose(info.step_energy, jnp.full((batch, steps), e_star), rtol=1e-5), name
        _, off = fc.sample(policy, None, jax.random.key(1), **kw)
        assert off.step_energy is None, name
    # Real-time chunking reports its own energy's; one observation has no batch axis.
    rtc = fc.RealTimeChunking(jnp.zeros((2, D)), 1, 2)
    _, info = fc.sample(policy, None, jax.random.key(2), num_steps=steps, placement=rtc,
                        step_energies=True)
    assert info.step_energy.shape == (steps,)
    assert tree_bitwise_equal(info.step_energy, info.placement.step_energy)
    assert bool(jnp.all(info.step_energy > 0))


def test_step_energy_of_the_wrong_shape_is_refused():
    class Odd(fc.AbstractPlacement):
        needs_energy = False

        def noise_shape(self, chunk_shape):
            return tuple(chunk_shape)

        def sample(self, flow, noise, keys):
            x, _, _ = fc.integrate(flow, fc.Plain(), noise, keys)
            return x, fc.InterleavedInfo(jnp.zeros((flow.batch_size, 3)), None)

    policy = _policy(Constant(jnp.zeros((H, D))), fc.OpenPI())
    with pytest.raises(ValueError, match=r"Odd.*`step_energy` has shape \(1, 3\).*\(1, 10\)"):
        fc.sample(policy, None, jax.random.key(0), placement=Odd())
