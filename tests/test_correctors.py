"""Laws every corrector obeys, checked with hypothesis over every concrete corrector.

A new corrector is added to `CORRECTORS` below and is then held to every law;
`test_every_corrector_is_registered` fails until it is.
"""

import dataclasses
import functools
import os
from collections.abc import Callable

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.testing import action_chunks, check_corrector

from .helpers import enable_x64, tree_bitwise_equal

KEY = jax.random.key(0)

SHAPES = ((4, 3), (6, 2))
# FLOWCORRECT_LAW_EXAMPLES lowers the count for quick local runs; CI uses the default:
# 100 examples per law and corrector, each law run for each of the 18 correctors (1,800
# examples a law), a quarter of the suite's time.
LAW = settings(max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "100")))


class Wavy(fc.AbstractEnergy):
    """A non-convex energy with strong, varying curvature: a quadratic bowl plus ripples."""

    freq: jax.Array = dataclasses.field(default_factory=lambda: jnp.array(3.0))

    def encode(self, context):
        return context

    def score(self, encoded, actions):
        return 0.5 * jnp.sum((actions - encoded) ** 2) + jnp.sum(jnp.sin(self.freq * actions))


class Singular(fc.AbstractEnergy):
    """Finite for `a[0, 0] >= 0`, NaN below and an infinite gradient at 0."""

    def encode(self, context):
        return context

    def score(self, encoded, actions):
        return 0.5 * jnp.sum((actions - encoded) ** 2) + jnp.sqrt(actions[0, 0])


ENERGY = fc.SumEnergy([fc.SquaredDistance(weight=3.0), Wavy()])


@functools.cache
def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    # One instance per learning rate: a new optax object is new static data and would
    # recompile, which is the documented behaviour, not what these laws are about.
    return {"sgd": optax.sgd, "adam": optax.adam}[name](lr)


def _alternating(n: int) -> jax.Array:
    return jnp.arange(n) % 2 == 0


# name -> (factory(alpha, shape), whether alpha = 0 makes the corrector the identity)
CORRECTORS: dict[str, tuple[Callable[[float, tuple[int, int]], fc.AbstractCorrector], bool]] = {
    "GradientStep": (lambda a, s: fc.GradientStep(a), True),
    "LangevinStep": (lambda a, s: fc.LangevinStep(a, temperature=0.05), True),
    "OptaxStep-sgd": (lambda a, s: fc.OptaxStep(_optimizer("sgd", a)), True),
    "OptaxStep-adam": (lambda a, s: fc.OptaxStep(_optimizer("adam", a)), True),
    "ClipStep-current": (lambda a, s: fc.ClipStep(fc.GradientStep(a), 0.2), True),
    "ClipStep-initial": (
        lambda a, s: fc.ClipStep(fc.GradientStep(a), 0.3, relative_to="initial"),
        True,
    ),
    "Mask-horizon-first": (lambda a, s: fc.Mask(fc.GradientStep(a), horizon=2), True),
    "Mask-horizon-mask": (
        lambda a, s: fc.Mask(fc.GradientStep(a), horizon=_alternating(s[0])),
        True,
    ),
    "Mask-dims-first": (lambda a, s: fc.Mask(fc.GradientStep(a), action_dims=1), True),
    "Mask-dims-mask": (
        lambda a, s: fc.Mask(fc.LangevinStep(a, 0.05), action_dims=_alternating(s[1])),
        True,
    ),
    "Mask-both": (
        lambda a, s: fc.Mask(
            fc.OptaxStep(_optimizer("sgd", a)), horizon=_alternating(s[0]), action_dims=1
        ),
        True,
    ),
    "Backtrack": (lambda a, s: fc.Backtrack(fc.GradientStep(a), max_halvings=3), True),
    "ProjectBounds": (lambda a, s: fc.ProjectBounds(-3.0, 3.0), False),
    "Repeat": (lambda a, s: fc.Repeat(fc.GradientStep(a), num_steps=3), True),
    "Chain": (
        lambda a, s: fc.Chain(fc.GradientStep(a), fc.LangevinStep(a, 0.05)),
        True,
    ),
    "Chain-project": (
        lambda a, s: fc.Chain(fc.OptaxStep(_optimizer("adam", a)), fc.ProjectBounds(-9.0, 9.0)),
        False,
    ),
    "reference_recipe": (lambda a, s: fc.reference_recipe(3, a, 0.2), True),
    "reference_recipe-masked": (
        lambda a, s: fc.reference_recipe(2, a, 0.2, first_only=True, action_dims=1),
        True,
    ),
}
NAMES = sorted(CORRECTORS)
ALPHAS = st.sampled_from([0.01, 0.1, 0.3])


def _classes(c) -> set[type]:
    found = {type(c)}
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, fc.AbstractCorrector):
                found |= _classes(v)
    return found


def test_every_corrector_is_registered():
    exported = {
        v
        for v in vars(fc).values()
        if isinstance(v, type)
        and issubclass(v, fc.AbstractCorrector)
        and not getattr(v, "__abstractmethods__", None)
    }
    covered = set().union(*(_classes(make(0.1, (4, 3))) for make, _ in CORRECTORS.values()))
    assert exported - covered == set(), "add these correctors to CORRECTORS"


def _context_and_actions(shape):
    # XLA flushes subnormal floats to zero in arithmetic; no robot action is subnormal.
    elements = st.floats(-4, 4, width=32, allow_subnormal=False)
    arr = hnp.arrays(np.float32, shape, elements=elements).map(jnp.asarray)
    return st.tuples(st.just(shape), arr, arr)


cases = st.sampled_from(SHAPES).flatmap(_context_and_actions)


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=ALPHAS, clip_frac=st.floats(0.01, 0.5), seed=st.integers(0, 2**30))
def test_clip_bounds_every_step(name, case, alpha, clip_frac, seed):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector = fc.ClipStep(make(alpha, shape), clip_frac)
    out, info = fc.correct(ENERGY, target, actions, corrector=corrector, key=jax.random.key(seed))
    step = float(jnp.linalg.norm(out - actions))
    bound = clip_frac * float(jnp.linalg.norm(actions))
    # Up to the float32 rounding of a + step, entry by entry.
    assert step <= bound * (1 + 1e-5) + 1e-6 * (1 + float(jnp.linalg.norm(actions)))
    assert float(info.delta_norm) == pytest.approx(step, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=ALPHAS, clip_frac=st.floats(0.01, 0.5))
def test_clip_relative_to_initial_bounds_total(name, case, alpha, clip_frac):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    inner = fc.ClipStep(make(alpha, shape), clip_frac, relative_to="initial")
    out, _ = fc.correct(ENERGY, target, actions, corrector=fc.Repeat(inner, num_steps=3), key=KEY)
    norm = float(jnp.linalg.norm(actions))
    assert float(jnp.linalg.norm(out - actions)) <= 3 * clip_frac * norm * (1 + 1e-5) + 1e-5 * (
        1 + norm
    )


def _masks(shape):
    horizon = hnp.arrays(bool, shape[0]).filter(lambda m: m.any())
    dims = hnp.arrays(bool, shape[1]).filter(lambda m: m.any())
    return st.tuples(horizon, dims)


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(data=st.data(), alpha=ALPHAS)
def test_masked_entries_stay_bit_identical(name, data, alpha):
    shape, target, actions = data.draw(cases)
    hmask, dmask = data.draw(_masks(shape))
    make, _ = CORRECTORS[name]
    inner = fc.Mask(make(alpha, shape), horizon=hmask, action_dims=dmask)
    out, _ = fc.correct(ENERGY, target, actions, corrector=fc.Repeat(inner, num_steps=3), key=KEY)
    frozen = ~(hmask[:, None] & dmask[None, :])
    assert tree_bitwise_equal(out[frozen], actions[frozen])


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=ALPHAS)
def test_zero_steps_is_identity(name, case, alpha):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector = fc.Repeat(make(alpha, shape), num_steps=0)
    out, info = fc.correct(ENERGY, target, actions, corrector=corrector, key=KEY)
    assert tree_bitwise_equal(out, actions)
    assert int(info.num_accepted) == 0
    assert float(info.energy_after) == float(info.energy_before)


@pytest.mark.parametrize("name", [n for n in NAMES if CORRECTORS[n][1]])
@LAW
@given(case=cases, seed=st.integers(0, 2**30))
def test_zero_alpha_is_identity(name, case, seed):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    out, info = fc.correct(
        ENERGY, target, actions, corrector=make(0.0, shape), key=jax.random.key(seed)
    )
    np.testing.assert_array_equal(out, actions)
    assert float(info.delta_norm) == 0.0


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=st.sampled_from([0.3, 1.0, 3.0]), seed=st.integers(0, 2**30))
def test_backtracking_never_raises_the_energy(name, case, alpha, seed):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector = fc.Repeat(fc.Backtrack(make(alpha, shape), max_halvings=2), num_steps=3)
    out, info = fc.correct(Wavy(), target, actions, corrector=corrector, key=jax.random.key(seed))
    before, after = float(info.energy_before), float(info.energy_after)
    assert after <= before + 1e-6 * (1 + abs(before))


@jax.jit
def _descend(alpha, weight, target, actions):
    def energy(a):
        return fc.SquaredDistance(weight=weight)(target, a)

    step = fc.GradientStep(alpha)

    def body(a, key):
        a, _, _ = step.step(energy, a, None, key)
        return a, energy(a)

    keys = jax.random.split(jax.random.key(0), 300)
    final, energies = jax.lax.scan(body, actions, keys)
    return final, jnp.concatenate([energy(actions)[None], energies])


@LAW
@given(data=st.data(), frac=st.floats(0.05, 0.95))
def test_gradient_steps_on_convex_quadratic_descend_and_converge(data, frac):
    shape, target, actions = data.draw(cases)
    weight = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0.5, 2.0, width=32)))
    lipschitz = float(weight.max())
    alpha = frac * 2 / lipschitz  # alpha < 2 / L
    final, energies = _descend(jnp.float32(alpha), jnp.asarray(weight), target, actions)
    energies = np.asarray(energies)
    assert np.all(energies[1:] <= energies[:-1] * (1 + 1e-6) + 1e-10)
    start = float(jnp.linalg.norm(actions - target))
    assert float(jnp.linalg.norm(final - target)) <= 1e-3 * (1 + start)


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(data=st.data(), alpha=ALPHAS, seed=st.integers(0, 2**30))
def test_batch_equals_per_sample(name, data, alpha, seed):
    shape = data.draw(st.sampled_from(SHAPES))
    batch = data.draw(action_chunks(((3, *shape),), min_value=-4, max_value=4))
    targets = data.draw(action_chunks(((3, *shape),), min_value=-4, max_value=4))
    make, _ = CORRECTORS[name]
    corrector, key = make(alpha, shape), jax.random.key(seed)
    out, info = fc.correct(ENERGY, targets, batch, corrector=corrector, key=key)
    for i, k in enumerate(jax.random.split(key, 3)):
        single, single_info = fc.correct(ENERGY, targets[i], batch[i], corrector=corrector, key=k)
        np.testing.assert_allclose(out[i], single, rtol=1e-5, atol=1e-5)
        assert bool(info.fell_back[i]) == bool(single_info.fell_back)


# Eager evaluation costs about 0.1 s an example per corrector; what it checks (a
# trace-time Python value baked into the compiled result) shows on any input, so a
# fifth of the examples.
EAGER_LAW = settings(max_examples=max(4, LAW.max_examples // 5))


@pytest.mark.parametrize("name", NAMES)
@EAGER_LAW
@given(case=cases, alpha=ALPHAS, seed=st.integers(0, 2**30))
def test_jit_equals_no_jit(name, case, alpha, seed):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector, key = make(alpha, shape), jax.random.key(seed)
    out, info = fc.correct(ENERGY, target, actions, corrector=corrector, key=key)
    with jax.disable_jit():
        eager, eager_info = fc.correct(ENERGY, target, actions, corrector=corrector, key=key)
    np.testing.assert_allclose(out, eager, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(info.energy_after, eager_info.energy_after, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=ALPHAS, seed=st.integers(0, 2**30))
def test_non_finite_energy_never_gives_non_finite_actions(name, case, alpha, seed):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector = make(alpha, shape)
    out, info = fc.correct(Singular(), target, actions, corrector=corrector,
                           key=jax.random.key(seed))
    assert bool(jnp.all(jnp.isfinite(out)))
    # On fallback the reported energy is the incoming one, which may be the NaN.
    assert bool(info.fell_back) or bool(jnp.isfinite(info.energy_after))
    if not bool(jnp.isfinite(info.energy_before)):
        assert bool(info.fell_back)
        assert tree_bitwise_equal(out, actions)


@pytest.mark.parametrize("name", NAMES)
def test_check_corrector_passes(name):
    """The users' checker (finite, jit, batch, no recompiles) on every corrector."""
    shape = (5, 3)
    target = jax.random.normal(jax.random.key(1), shape)
    actions = jax.random.normal(jax.random.key(2), shape)
    make, _ = CORRECTORS[name]
    check_corrector(make(0.1, shape), ENERGY, target, actions)


def test_check_corrector_catches_a_python_float_hyperparameter():
    class PythonFloatStep(fc.AbstractCorrector):
        alpha: float  # a Python float is static under jit: every new value recompiles

        def init(self, energy, actions):
            return None

        def step(self, energy, actions, state, key):
            return actions - self.alpha * jax.grad(energy)(actions), None, jnp.asarray(1)

    target = jax.random.normal(jax.random.key(1), (5, 3))
    actions = jax.random.normal(jax.random.key(2), (5, 3))
    with pytest.raises(AssertionError, match="recompile"):
        check_corrector(PythonFloatStep(0.1), ENERGY, target, actions)
    check_corrector(fc.GradientStep(0.1), ENERGY, target, actions)


def test_check_corrector_catches_trace_time_state():
    traces = []

    class TraceCountingStep(fc.AbstractCorrector):
        """Bakes a trace-time Python counter into the result: jit and batch disagree."""

        def init(self, energy, actions):
            return None

        def step(self, energy, actions, state, key):
            traces.append(None)
            return actions + 0.01 * len(traces), None, jnp.asarray(1)

    target = jax.random.normal(jax.random.key(1), (5, 3))
    actions = jax.random.normal(jax.random.key(2), (5, 3))
    with pytest.raises(AssertionError, match="jit|batch"):
        check_corrector(TraceCountingStep(), ENERGY, target, actions)


# --- norms that cannot overflow ---------------------------------------------------

DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
# log10 of the largest magnitude drawn per dtype: up to about 1/100 of the dtype's max,
# so a chunk's norm overflows a naive sum of squares but not the chunk itself.
MAX_EXP = {"float16": 2.5, "bfloat16": 35.0, "float32": 35.0}


def _extreme_chunk(draw, dtype_name, shape):
    base = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    exponent = draw(st.floats(-3, MAX_EXP[dtype_name]))
    return jnp.asarray(base * np.float32(10.0**exponent)).astype(DTYPES[dtype_name])


@LAW
@given(data=st.data(), dtype_name=st.sampled_from(sorted(DTYPES)))
def test_safe_norm_matches_float64_at_extreme_magnitudes(data, dtype_name):
    from flowcorrect._misc import safe_norm

    shape = data.draw(st.sampled_from([(50, 32), (4, 3)]))
    x = _extreme_chunk(data.draw, dtype_name, shape)
    got = safe_norm(x)
    assert got.dtype == jnp.float32
    # XLA flushes float32 subnormals to zero (a bfloat16 entry of 1.2e-39 counts as
    # 0), so the reference flushes them too.
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    x32 = np.where(np.abs(x32) < np.finfo(np.float32).tiny, 0.0, x32)
    want = np.linalg.norm(x32)
    assert bool(jnp.isfinite(got))
    # The squares are summed in float32: XLA's CPU reduction may add them one after
    # another, whose rounding error is bounded by (n - 1) * eps of the sum (half that
    # for the norm), plus a few roundings per element (a fixed 1e-5 failed on a 50 x 32
    # bfloat16 chunk at 1.18e-5, well inside that bound).
    rtol = (x.size + 4) * np.finfo(np.float32).eps
    np.testing.assert_allclose(float(got), want, rtol=rtol, atol=0)


def test_safe_norm_non_finite_and_float64():
    from flowcorrect._misc import safe_norm

    x = jnp.ones((3, 2), jnp.float16)
    assert float(safe_norm(x.at[1, 1].set(jnp.inf))) == np.inf
    assert np.isnan(float(safe_norm(x.at[1, 1].set(jnp.nan).at[0, 0].set(jnp.inf))))
    assert float(safe_norm(jnp.zeros((3, 2), jnp.bfloat16))) == 0.0
    with enable_x64(True):
        big = jnp.full((4, 4), 1e200, jnp.float64)
        assert safe_norm(big).dtype == jnp.float64
        np.testing.assert_allclose(float(safe_norm(big)), 4e200, rtol=1e-12)


def _f32_square(context, actions):
    """Sums in float32 whatever the actions' dtype, so the energy itself stays finite."""
    return 0.5 * jnp.sum(jnp.square(actions.astype(jnp.float32) - context))


def test_clip_holds_in_float16_where_the_norm_squared_overflows():
    # Here ||a||^2 > 65504: a bound computed from a naive float16 norm is inf, and the
    # step would pass unclipped (3.0 ||a|| here, 2.5 ||a|| for the reference recipe).
    a = 6.5 + 0.3 * jax.random.normal(jax.random.key(0), (50, 32))
    a = a.astype(jnp.float16)
    target = jnp.zeros((50, 32))
    corrector = fc.ClipStep(fc.GradientStep(3.0), 0.2)
    out, info = fc.correct(_f32_square, target, a, corrector=corrector, key=KEY)
    moved = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(a, np.float64))
    norm = np.linalg.norm(np.asarray(a, np.float64))
    assert not bool(info.fell_back) and int(info.num_accepted) == 1
    assert 0.19 * norm <= moved <= 0.2 * norm * (1 + 1e-3)
    recipe = fc.reference_recipe(alpha=3.0)
    out, info = fc.correct(_f32_square, target, a, corrector=recipe, key=KEY)
    moved = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(a, np.float64))
    assert moved <= (1.2**3 - 1) * norm * (1 + 1e-3)


@LAW
@given(
    data=st.data(),
    dtype_name=st.sampled_from(sorted(DTYPES)),
    clip_frac=st.sampled_from([0.01, 0.2, 0.9]),
    relative_to=st.sampled_from(["current", "initial"]),
)
def test_clip_bound_at_extreme_magnitudes_in_every_dtype(data, dtype_name, clip_frac,
                                                         relative_to):
    shape = (6, 4)
    a = _extreme_chunk(data.draw, dtype_name, shape)
    elements = st.floats(-1, 1, width=32)
    target = jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=elements)))
    corrector = fc.ClipStep(fc.GradientStep(3.0), clip_frac, relative_to=relative_to)
    out, info = fc.correct(_f32_square, target, a, corrector=corrector, key=KEY)
    assert out.dtype == a.dtype
    a64, out64 = np.asarray(a.astype(jnp.float32), np.float64), np.asarray(
        out.astype(jnp.float32), np.float64
    )
    assert np.all(np.isfinite(out64))
    norm = np.linalg.norm(a64)
    eps = float(jnp.finfo(DTYPES[dtype_name]).eps)
    # Up to the rounding of a + step to the dtype, entry by entry.
    bound = clip_frac * norm * (1 + 1e-5) + eps * (1 + clip_frac) * norm
    assert np.linalg.norm(out64 - a64) <= bound


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
@pytest.mark.parametrize("relative_to", ["current", "initial"])
def test_clip_holds_where_the_scaled_step_underflows(dtype, relative_to):
    # Regression (found by the law above): a bfloat16 chunk at the smallest normal
    # number, a 90% clip towards zero; XLA's CPU runtime flushed the scaled step's
    # subnormal result to zero, and every entry moved the whole way (100% > 90%).
    a = jnp.full((6, 4), jnp.finfo(dtype).tiny, dtype) * jnp.asarray([[1, -1, 2, 1]], dtype)
    corrector = fc.ClipStep(fc.GradientStep(3.0), 0.9, relative_to=relative_to)
    out, _ = fc.correct(_f32_square, jnp.zeros((6, 4)), a, corrector=corrector, key=KEY)
    a64, out64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, out))
    assert np.all(np.abs(out64 - a64) <= 0.9 * np.abs(a64) * (1 + 1e-5))
    assert np.linalg.norm(out64 - a64) <= 0.9 * np.linalg.norm(a64) * (1 + 1e-5)
    # And where the step is representable it is still taken (float16 has subnormals
    # that float32 arithmetic does not flush): no entry is frozen without need.
    if dtype == jnp.float16:
        assert np.all(np.abs(out64) < np.abs(a64))


class _Proposes(fc.AbstractCorrector):
    """Proposes a fixed chunk, whatever the energy says."""

    proposal: jax.Array

    def init(self, energy, actions):
        return None

    def step(self, energy, actions, state, key):
        return self.proposal.astype(actions.dtype), None, jnp.asarray(1, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("relative_to", ["current", "initial"])
def test_clip_drops_a_step_whose_norm_or_bound_cannot_be_computed(dtype, relative_to):
    actions = jnp.arange(12.0).reshape(4, 3).astype(dtype) - 5
    key = jax.random.key(0)
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        clip = fc.ClipStep(_Proposes(actions.at[2, 1].set(bad) + 1), 0.3, relative_to)
        state = clip.init(lambda a: jnp.sum(a), actions)
        out, _, n = clip.step(lambda a: jnp.sum(a), actions, state, key)
        assert tree_bitwise_equal(out, actions) and int(n) == 0
    # A non-finite chunk has no computable bound: nothing moves, nothing is accepted.
    broken = actions.at[0, 0].set(jnp.inf)
    clip = fc.ClipStep(_Proposes(jnp.zeros_like(actions)), 0.3, relative_to)
    state = clip.init(lambda a: jnp.sum(a), broken)
    out, _, n = clip.step(lambda a: jnp.sum(a), broken, state, key)
    assert tree_bitwise_equal(out, broken) and int(n) == 0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_scale_step_keeps_untouched_entries_bit_identical(dtype):
    from flowcorrect._correctors.base import scale_step

    actions = jnp.array([[-0.0, 1.5, -3.0], [60000.0, -60000.0, 2.0]]).astype(dtype)
    proposal = actions.at[0, 1].set(2.5).at[1, 0].set(-60000.0).at[1, 1].set(60000.0)
    for scale in (0.0, 1e-3, 0.5, 1.0):
        out = scale_step(actions, proposal, jnp.float32(scale))
        assert tree_bitwise_equal(out[0, ::2], actions[0, ::2])
        assert tree_bitwise_equal(out[1, 2], actions[1, 2])
        assert bool(jnp.all(jnp.isfinite(out)))  # the difference is taken in float32
    assert tree_bitwise_equal(scale_step(actions, proposal, 1.0), proposal)
    assert tree_bitwise_equal(scale_step(actions, proposal.at[0, 0].set(jnp.nan), 0.0), actions)


# --- settings refused when built ---------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fc.GradientStep(float("inf")), r"alpha.*finite.*inf"),
        (lambda: fc.GradientStep(float("nan")), r"alpha.*finite.*nan"),
        (lambda: fc.GradientStep([0.1, 0.2]), r"alpha.*scalar.*\(2,\)"),
        (lambda: fc.GradientStep(True), r"alpha.*boolean"),
        (lambda: fc.GradientStep("0.1"), r"alpha.*number"),
        (lambda: fc.GradientStep(1j), r"alpha.*real"),
        (lambda: fc.LangevinStep(0.1, temperature=float("inf")), r"temperature.*finite"),
        (lambda: fc.LangevinStep(float("nan")), r"alpha.*finite"),
        (lambda: fc.LangevinStep(0.1, temperature=jnp.ones((2, 2))), r"temperature.*\(2, 2\)"),
        (lambda: fc.ClipStep(fc.GradientStep(), [0.1, 0.2]), r"clip_frac.*scalar.*\(2,\).*0\.2"),
        (lambda: fc.ClipStep(fc.GradientStep(), float("inf")), r"clip_frac.*finite"),
        (lambda: fc.ClipStep(fc.GradientStep(), float("nan")), r"clip_frac.*finite"),
        (lambda: fc.ClipStep(fc.GradientStep(), None), r"clip_frac.*number"),
        (lambda: fc.ProjectBounds(jnp.nan, 1.0), r"low.*NaN"),
        (lambda: fc.ProjectBounds(-1.0, jnp.array([1.0, jnp.nan])), r"high.*NaN"),
        (lambda: fc.ProjectBounds(jnp.inf, jnp.inf), r"low.*inf"),
        (lambda: fc.ProjectBounds(-1.0, "1"), r"high"),
        (lambda: fc.ProjectBounds(False, True), r"low"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=2.7), r"horizon.*float 2\.7.*int"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=2.0), r"horizon.*int"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=True), r"horizon.*boolean"),
        (lambda: fc.Mask(fc.GradientStep(), action_dims=np.array([1, 0, 1])), r"action_dims.*bool"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=jnp.ones((2, 3), bool)), r"horizon.*1-d"),
        (lambda: fc.Mask(fc.GradientStep(), action_dims="7"), r"action_dims"),
        (lambda: fc.Repeat(fc.GradientStep(), True), r"num_steps.*boolean"),
        (lambda: fc.Repeat(fc.GradientStep(), 3.0), r"num_steps.*int"),
        (lambda: fc.Backtrack(fc.GradientStep(), max_halvings=False), r"max_halvings.*boolean"),
        (lambda: fc.Backtrack(fc.GradientStep(), max_halvings=2.5), r"max_halvings.*int"),
        (lambda: fc.reference_recipe(num_steps=True), r"num_steps.*boolean"),
        (lambda: fc.reference_recipe(first_only=1), r"first_only"),
        (lambda: fc.reference_recipe(action_dims=7.5), r"action_dims"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_counts_accept_numpy_integers():
    assert fc.Repeat(fc.GradientStep(), np.int64(2)).num_steps == 2
    assert type(fc.Backtrack(fc.GradientStep(), np.int32(3)).max_halvings) is int
    assert int(fc.Mask(fc.GradientStep(), horizon=np.int16(2)).horizon) == 2


_NOT_CORRECTORS = [
    (optax.adam(1e-2), r"OptaxStep"),
    (lambda e, a, s, k: a, r"function is not a corrector"),
    (fc.GradientStep, r"instantiate it: GradientStep\(...\)"),
    (0.1, r"AbstractCorrector"),
]
_WRAPPERS = {
    "ClipStep": lambda x: fc.ClipStep(x, 0.2),
    "Mask": lambda x: fc.Mask(x, horizon=1),
    "Backtrack": lambda x: fc.Backtrack(x),
    "Repeat": lambda x: fc.Repeat(x, 3),
    "Chain": lambda x: fc.Chain(fc.GradientStep(), x),
}


@pytest.mark.parametrize("wrapper", sorted(_WRAPPERS))
@pytest.mark.parametrize("thing, match", _NOT_CORRECTORS)
def test_wrappers_refuse_what_is_not_a_corrector(wrapper, thing, match):
    with pytest.raises(TypeError, match=f"{wrapper}.*{match}"):
        _WRAPPERS[wrapper](thing)


def test_optax_step_refuses_a_corrector_or_an_uncalled_factory():
    # jaxtyping 0.2.36 (openpi's pin) checks the field's type before our check runs.
    with pytest.raises((ValueError, TypeError), match="not a corrector|Type-check error"):
        fc.OptaxStep(fc.GradientStep())
    with pytest.raises((ValueError, TypeError), match=r"optax\.adam\(1e-2\)|typechecking"):
        fc.OptaxStep(optax.adam)


# --- Mask (one wrapper for both axes) ---------------------------------------------------


def test_mask_int_and_boolean_forms_agree_and_combine_both_axes():
    shape = (6, 4)
    target = jax.random.normal(jax.random.key(1), shape)
    actions = jax.random.normal(jax.random.key(2), shape)
    by_count = fc.Mask(fc.GradientStep(0.3), horizon=2, action_dims=3)
    by_mask = fc.Mask(
        fc.GradientStep(0.3),
        horizon=jnp.arange(6) < 2,
        action_dims=jnp.array([True, True, True, False]),
    )
    out_count, _ = fc.correct(ENERGY, target, actions, corrector=by_count, key=KEY)
    out_mask, _ = fc.correct(ENERGY, target, actions, corrector=by_mask, key=KEY)
    assert tree_bitwise_equal(out_count, out_mask)
    changed = np.asarray(out_count != actions)
    assert changed[:2, :3].all() and not changed[2:].any() and not changed[:, 3].any()
    # reference_recipe's keywords build the same Mask.
    recipe = fc.reference_recipe(2, 0.1, 0.2, first_only=True, action_dims=3)
    explicit = fc.Repeat(
        fc.ClipStep(fc.Mask(fc.GradientStep(0.1), horizon=1, action_dims=3), 0.2), 2
    )
    out_r, _ = fc.correct(ENERGY, target, actions, corrector=recipe, key=KEY)
    out_e, _ = fc.correct(ENERGY, target, actions, corrector=explicit, key=KEY)
    assert tree_bitwise_equal(out_r, out_e)
    assert np.asarray(out_r != actions)[1:].sum() == 0 and np.asarray(out_r != actions)[0, :3].all()


def test_mask_count_changes_do_not_recompile():
    run = jax.jit(lambda c, t, a: fc.correct(ENERGY, t, a, corrector=c, key=KEY)[0])
    run = eqx_assert_max_traces(run)
    target = jax.random.normal(jax.random.key(1), (6, 4))
    actions = jax.random.normal(jax.random.key(2), (6, 4))
    for k in (1, 2, 5):
        run(fc.Mask(fc.GradientStep(0.1), horizon=k, action_dims=k), target, actions)


def eqx_assert_max_traces(fn):
    import equinox as eqx

    return eqx.filter_jit(eqx.debug.assert_max_traces(fn, max_traces=1))


# --- stochastic correctors and uses_key -------------------------------------------------


def test_uses_key_walks_nested_correctors():
    from flowcorrect._correctors.base import uses_key

    assert not uses_key(fc.reference_recipe(first_only=True, action_dims=2))
    assert not uses_key(fc.Chain(fc.OptaxStep(optax.adam(0.1)), fc.ProjectBounds(-1, 1)))
    assert uses_key(fc.LangevinStep())
    assert uses_key(fc.Repeat(fc.Chain(fc.GradientStep(), fc.Mask(fc.LangevinStep(),
                                                                    horizon=1)), 2))
    assert fc.LangevinStep.stochastic and not fc.GradientStep.stochastic
    assert not fc.AbstractCorrector.stochastic
    for name in NAMES:
        c = CORRECTORS[name][0](0.1, (4, 3))
        assert uses_key(c) == any(cls is fc.LangevinStep for cls in _classes(c)), name


def test_uses_key_finds_a_user_defined_stochastic_corrector_at_depth_three():
    from typing import ClassVar

    from flowcorrect._correctors.base import uses_key

    class Jitter(fc.AbstractCorrector):
        stochastic: ClassVar[bool] = True
        scale: jax.Array

        def init(self, energy, actions):
            return None

        def step(self, energy, actions, state, key):
            noise = jax.random.normal(key, actions.shape, actions.dtype)
            return actions + self.scale * noise, None, jnp.asarray(1, jnp.int32)

    class MyWrapper(fc.AbstractCorrector):
        """A user's wrapper that holds its children in a list-valued field."""

        children: list

        def init(self, energy, actions):
            return [c.init(energy, actions) for c in self.children]

        def step(self, energy, actions, state, key):
            n = jnp.asarray(0, jnp.int32)
            new = []
            for c, s in zip(self.children, state, strict=True):
                actions, s, k = c.step(energy, actions, s, key)
                new.append(s)
                n = n + k
            return actions, new, n

    deep = fc.Repeat(
        fc.Chain(fc.GradientStep(0.1), fc.Mask(Jitter(jnp.array(0.1)), horizon=1)), 2
    )
    assert uses_key(deep)
    assert uses_key(MyWrapper([fc.GradientStep(), fc.Backtrack(fc.ClipStep(
        Jitter(jnp.array(0.1)), 0.2))]))
    assert not uses_key(MyWrapper([fc.GradientStep(), fc.Backtrack(fc.GradientStep())]))
    target = jnp.zeros((4, 3))
    actions = jnp.ones((4, 3))
    out1, _ = fc.correct(ENERGY, target, actions, corrector=deep, key=jax.random.key(1))
    out2, _ = fc.correct(ENERGY, target, actions, corrector=deep, key=jax.random.key(2))
    assert not tree_bitwise_equal(out1, out2)
