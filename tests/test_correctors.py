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

from .helpers import tree_bitwise_equal

SHAPES = ((4, 3), (6, 2))
# FLOWCORRECT_LAW_EXAMPLES lowers the count for quick local runs; CI uses the default.
LAW = settings(max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "200")))


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
    "HorizonMask-first": (lambda a, s: fc.HorizonMask(fc.GradientStep(a), first=2), True),
    "HorizonMask-mask": (
        lambda a, s: fc.HorizonMask(fc.GradientStep(a), mask=_alternating(s[0])),
        True,
    ),
    "ActionDimMask-first": (lambda a, s: fc.ActionDimMask(fc.GradientStep(a), first=1), True),
    "ActionDimMask-mask": (
        lambda a, s: fc.ActionDimMask(fc.LangevinStep(a, 0.05), mask=_alternating(s[1])),
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
    out, _ = fc.correct(ENERGY, target, actions, corrector=fc.Repeat(inner, num_steps=3))
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
    inner = fc.ActionDimMask(fc.HorizonMask(make(alpha, shape), mask=hmask), mask=dmask)
    out, _ = fc.correct(ENERGY, target, actions, corrector=fc.Repeat(inner, num_steps=3))
    frozen = ~(hmask[:, None] & dmask[None, :])
    assert tree_bitwise_equal(out[frozen], actions[frozen])


@pytest.mark.parametrize("name", NAMES)
@LAW
@given(case=cases, alpha=ALPHAS)
def test_zero_steps_is_identity(name, case, alpha):
    shape, target, actions = case
    make, _ = CORRECTORS[name]
    corrector = fc.Repeat(make(alpha, shape), num_steps=0)
    out, info = fc.correct(ENERGY, target, actions, corrector=corrector)
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
    bound = fc.bind(fc.SquaredDistance(weight=weight), target)

    def energy(a):
        return bound(None, a)

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


@pytest.mark.parametrize("name", NAMES)
@LAW
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
