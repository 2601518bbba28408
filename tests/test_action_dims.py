"""`fc.OnActionDims`: an energy over some action dimensions, used from outside the package
the way an openpi user would: an energy that only accepts `(horizon, 7)` chunks and a
policy whose chunks have 32 dimensions (openpi pads LIBERO's 7 to 32)."""

import os

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import flowcorrect as fc

from .helpers import tree_bitwise_equal

H, D, K = 5, 32, 7
LAW = settings(max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "100")))


class Strict7(fc.AbstractEnergy):
    """A non-convex energy of `(horizon, 7)` chunks only; it records nothing and refuses
    any other shape, so a test passing through it proves the shape it received."""

    target: jax.Array

    def encode(self, context):
        return None

    def score(self, encoded, actions):
        if actions.shape != (H, K):
            raise ValueError(f"Strict7 scores (horizon, 7) chunks; got {actions.shape}")
        diff = actions - self.target.astype(actions.dtype)
        return 0.5 * jnp.sum(diff**2) + 0.1 * jnp.sum(jnp.sin(3 * actions))


TARGET = jax.random.normal(jax.random.key(1), (H, K))
ENERGY7 = Strict7(TARGET)
ENERGY = fc.OnActionDims(ENERGY7, K)

CORRECTORS = {
    "reference": fc.reference_recipe(),
    "reference_masked": fc.reference_recipe(action_dims=K),
    "backtrack": fc.Repeat(fc.Backtrack(fc.GradientStep(0.5)), 3),
    "adam": fc.Repeat(fc.OptaxStep(optax.adam(0.05)), 3),
    "chain": fc.Chain([fc.GradientStep(0.1), fc.ClipStep(fc.GradientStep(0.3), 0.1)]),
    "langevin_masked": fc.Mask(fc.LangevinStep(0.05, 0.5), action_dims=K),
}


def test_energy_receives_only_the_selected_dims():
    actions = jax.random.normal(jax.random.key(2), (H, D))
    with pytest.raises(ValueError, match="Strict7 scores"):
        fc.correct(ENERGY7, None, actions)
    out, info = fc.correct(ENERGY, None, actions)
    assert out.shape == (H, D)
    assert float(info.energy_after) < float(info.energy_before)
    np.testing.assert_array_equal(info.energy_before, ENERGY7(None, actions[:, :K]))
    # Indices, not only a prefix: the energy receives those columns in that order.
    picked = fc.OnActionDims(ENERGY7, (0, 2, 3, 8, 9, 20, 31))
    cols = np.array([0, 2, 3, 8, 9, 20, 31])
    np.testing.assert_array_equal(picked(None, actions), ENERGY7(None, actions[:, cols]))


def test_gradient_is_exactly_zero_elsewhere():
    actions = jax.random.normal(jax.random.key(3), (H, D)) * 100
    g = jax.grad(lambda a: ENERGY(None, a))(actions)
    assert tree_bitwise_equal(g[:, K:], jnp.zeros((H, D - K)))
    assert bool(jnp.all(g[:, :K] != 0))


@pytest.mark.parametrize("name", sorted(CORRECTORS))
@LAW
@given(
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float16, jnp.bfloat16]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_other_dims_stay_bit_identical(name, data, dtype, scale):
    # Values over many magnitudes, negative zeros included, in every float dtype.
    elements = st.floats(-4, 4, width=32, allow_subnormal=False) | st.sampled_from([-0.0, 0.0])
    base = data.draw(hnp.arrays(np.float32, (2, H, D), elements=elements))
    # XLA on CPU flushes subnormal numbers to zero in arithmetic (`a - 0.0` included),
    # which no energy can prevent; the documented exception, kept out of the law.
    scaled = np.asarray(jnp.asarray(base * scale, dtype).astype(np.float32))
    tiny = float(jnp.finfo(dtype).tiny)
    actions = jnp.asarray(np.where(np.abs(scaled) < tiny, 0.0 * scaled, scaled), dtype)
    keys = jax.random.key(data.draw(st.integers(0, 2**30)))
    out, info = fc.correct(ENERGY, None, actions, corrector=CORRECTORS[name], key=keys)
    assert out.dtype == actions.dtype
    assert tree_bitwise_equal(out[..., K:], actions[..., K:])
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_selected_dims_do_move():
    actions = jax.random.normal(jax.random.key(4), (3, H, D))
    out, _ = fc.correct(ENERGY, None, actions, corrector=fc.reference_recipe())
    assert float(jnp.min(jnp.abs(out[..., :K] - actions[..., :K]).max(axis=(1, 2)))) > 1e-3


@pytest.mark.parametrize(
    ("dims", "error", "match"),
    [
        (0, ValueError, ">= 1"),
        (-3, ValueError, ">= 1"),
        (True, TypeError, "int k"),
        (2.5, TypeError, "int k"),
        ("first7", TypeError, "int k"),
        ((), ValueError, "empty"),
        ((3, 1), ValueError, "increasing"),
        ((1, 1), ValueError, "increasing"),
        ((-1, 2), ValueError, "non-negative"),
    ],
)
def test_bad_dims_are_clear_errors(dims, error, match):
    if error is TypeError:
        # jaxtyping 0.2.36 (openpi's pin) checks the field's type before __check_init__.
        match = f"{match}|parameter 'action_dims'"
    with pytest.raises(error, match=match):
        fc.OnActionDims(ENERGY7, dims)


def test_more_dims_than_the_chunk_has():
    small = jnp.ones((H, 6))
    with pytest.raises(ValueError, match=r"first 7 action dimensions.*only 6.*action_dims <= 6"):
        fc.correct(ENERGY, None, small)
    with pytest.raises(ValueError, match=r"dimension 40.*only 32"):
        fc.correct(fc.OnActionDims(ENERGY7, (0, 1, 2, 3, 4, 5, 40)), None, jnp.ones((H, D)))
    # A batch where one chunk belongs: the runtime type checker of the test run raises
    # first (its message differs between jaxtyping versions); without it, ours does.
    with pytest.raises((ValueError, TypeError)):
        ENERGY(None, jnp.ones((2, H, D)))


def test_wraps_any_callable_and_crosses_plain_jit():
    fn = lambda ctx, a: jnp.sum((a - ctx) ** 2)  # noqa: E731
    a = jax.random.normal(jax.random.key(9), (H, D))
    ctx = jnp.broadcast_to(jnp.arange(3.0), (H, 3))
    np.testing.assert_allclose(fc.OnActionDims(fn, 3)(ctx, a), fn(ctx, a[:, :3]))
    # openpi's Policy jits with jax.jit, not eqx.filter_jit: the dims are static and a
    # Module energy's arrays are leaves.
    energy = fc.OnActionDims(fc.SquaredDistance(weight=2.0), (1, 4))
    target = ctx[:, :2]
    value = jax.jit(lambda e, c, a: e(c, a))(energy, target, a)
    np.testing.assert_allclose(value, jnp.sum((a[:, np.array([1, 4])] - target) ** 2), rtol=1e-6)


# -- with the flow sampler: a 32-dim policy whose answer is known in closed form --

A_STAR = jax.random.normal(jax.random.key(5), (H, D))
COUPLE = jax.random.normal(jax.random.key(6), (D, D)) * 0.05


def velocity(obs, x, t):
    # The flow to the point a* in openpi's convention (v = (x - a*) / t), plus a term
    # that couples the dimensions, as a real action expert does.
    return (x - obs) / t + jnp.tanh(x) @ COUPLE


POLICY = fc.VelocityPolicy(velocity, (H, D))
B = 3
OBS = jnp.broadcast_to(A_STAR, (B, H, D))


def _sample(placement, n=None):
    shape = (B, H, D) if n is None else (B, n, H, D)
    noise = jax.random.normal(jax.random.key(7), shape)
    if placement is None:
        return fc.sample(POLICY, OBS, jax.random.key(8), noise=noise)
    return fc.sample(POLICY, OBS, jax.random.key(8), noise=noise, placement=placement,
                     energy=ENERGY, track_uncorrected=True)


@pytest.mark.parametrize(
    "placement",
    [
        fc.PostHoc(fc.reference_recipe()),
        fc.Denoised(fc.reference_recipe(), schedule=fc.LastSteps(1)),
    ],
    ids=["posthoc", "denoised_last"],
)
def test_placements_leave_other_dims_as_the_plain_flow(placement):
    out, info = _sample(placement)
    plain = info.uncorrected   # the plain flow from the same noise, in the same program
    np.testing.assert_allclose(plain, _sample(None)[0], rtol=1e-6, atol=1e-6)
    assert not bool(jnp.any(info.fell_back))
    if isinstance(placement, fc.PostHoc):
        assert tree_bitwise_equal(out[..., K:], plain[..., K:])
    else:
        # The denoised shift of the other dims is exactly zero, but the placement's
        # Euler loop and the plain one are compiled apart (XLA fuses them differently):
        # they agree to float32 rounding only.
        np.testing.assert_allclose(out[..., K:], plain[..., K:], rtol=2e-6, atol=1e-6)
    assert float(jnp.abs(out[..., :K] - plain[..., :K]).max()) > 1e-4
    e = jax.vmap(lambda a: ENERGY(None, a))
    assert bool(jnp.all(e(out) < e(plain)))


def test_denoised_every_step_shifts_only_selected_dims():
    # The correction moves only the 7 dims at each step; the coupled velocity then
    # carries the change to the others, so they differ from the plain flow's.
    plain, _ = _sample(None)
    out, info = _sample(fc.Denoised(fc.reference_recipe()))
    assert not bool(jnp.any(info.fell_back))
    e = jax.vmap(lambda a: ENERGY(None, a))
    assert bool(jnp.all(e(out) < e(plain)))


def test_guided_and_best_of_n_score_the_selected_dims():
    plain, _ = _sample(None)
    e = jax.vmap(lambda a: ENERGY(None, a))
    guided, info = _sample(fc.Guided(schedule=fc.LastSteps(3), weight=2.0))
    assert not bool(jnp.any(info.fell_back))
    assert bool(jnp.all(e(guided) < e(plain)))
    best, info = _sample(fc.BestOfN(6), n=6)
    chosen = info.placement.candidate_energy.min(axis=1)
    np.testing.assert_allclose(e(best), chosen, rtol=1e-6)
