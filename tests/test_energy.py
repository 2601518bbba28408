"""Hand-written energies, `bind`, and the users' energy checker."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.testing import action_chunks, check_energy, chunk_pairs


@settings(max_examples=200)
@given(pair=chunk_pairs(), weight=st.floats(0.0, 5.0))
def test_squared_distance_value_and_gradient(pair, weight):
    target, actions = pair
    energy = fc.SquaredDistance(weight=weight)
    expected = 0.5 * weight * np.sum((np.asarray(actions) - np.asarray(target)) ** 2)
    assert float(energy(target, actions)) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    grad = jax.grad(lambda a: energy(target, a))(actions)
    np.testing.assert_allclose(grad, weight * (actions - target), rtol=1e-5, atol=1e-4)


def test_squared_distance_fixed_target_and_per_entry_weights():
    target = jnp.arange(6.0).reshape(3, 2)
    weight = jnp.array([[1.0, 0.0], [2.0, 0.5], [0.0, 1.0]])
    energy = fc.SquaredDistance(target, weight)
    actions = jnp.ones((3, 2))
    expected = 0.5 * jnp.sum(weight * (actions - target) ** 2)
    assert float(energy(None, actions)) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match=r"target.*\(3, 2\).*\(4, 2\)"):
        energy(None, jnp.ones((4, 2)))


@settings(max_examples=200)
@given(actions=action_chunks(), low=st.floats(-3, 0), width=st.floats(0, 4))
def test_bounds_penalty_is_zero_inside_and_positive_outside(actions, low, width):
    high = low + width
    energy = fc.BoundsPenalty(low, high, weight=2.0)
    value = float(energy(None, actions))
    a = np.asarray(actions)
    outside = (a < np.float32(low)) | (a > np.float32(high))
    over = np.maximum(a - np.float32(high), 0)
    under = np.maximum(np.float32(low) - a, 0)
    expected = float(np.sum(over.astype(np.float64) ** 2 + under.astype(np.float64) ** 2))
    if not outside.any():
        assert value == 0.0
    else:
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-30)
        if expected > 1e-30:  # below that, float32 squares underflow to zero
            assert value > 0.0
    grad = jax.grad(lambda x: energy(None, x))(actions)
    assert bool(jnp.all(grad[~outside] == 0))


def test_sum_energy_is_the_weighted_sum_and_encodes_each_term_once():
    calls = []

    class Doubling(fc.AbstractEnergy):
        def encode(self, context):
            calls.append(None)
            return 2 * context

        def score(self, encoded, actions):
            return jnp.sum(actions * encoded)

    def plain(context, actions):
        return jnp.sum(actions**2) + jnp.sum(context)

    context = jnp.full((3, 2), 0.5)
    actions = jnp.arange(6.0).reshape(3, 2)
    energy = fc.SumEnergy([Doubling(), plain, fc.SquaredDistance()], weights=[1.0, 0.5, 2.0])
    expected = (
        float(jnp.sum(actions * 2 * context))
        + 0.5 * float(plain(context, actions))
        + 2.0 * float(fc.SquaredDistance()(context, actions))
    )
    assert float(energy(context, actions)) == pytest.approx(expected, rel=1e-6)
    calls.clear()
    out, _ = fc.correct(energy, context, actions, corrector=fc.Repeat(fc.GradientStep(0.01), 5))
    assert len(calls) == 1


def test_bind_encodes_split_energies_and_binds_plain_ones():
    target = jnp.ones((2, 2))
    bound = fc.bind(fc.SquaredDistance(), target)
    assert isinstance(bound, fc.BoundEnergy) and isinstance(bound, fc.AbstractEnergy)
    # A bound energy ignores the context it is called with.
    assert float(bound(None, jnp.zeros((2, 2)))) == pytest.approx(2.0)
    assert float(bound(jnp.full((2, 2), 9.0), jnp.zeros((2, 2)))) == pytest.approx(2.0)

    def plain(context, actions):
        return jnp.sum((actions - context) ** 2)

    assert isinstance(fc.as_energy(plain), fc.FnEnergy)
    assert float(fc.bind(plain, target)(None, jnp.zeros((2, 2)))) == pytest.approx(4.0)
    with pytest.raises(TypeError, match="energy"):
        fc.bind(3.0, target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "energy",
    [
        fc.SquaredDistance(weight=2.0),
        fc.SumEnergy([fc.SquaredDistance(), fc.BoundsPenalty(-1.0, 1.0)], [1.0, 3.0]),
        fc.BoundsPenalty(-0.5, 0.5),
    ],
)
def test_check_energy_passes_on_builtin_energies(energy):
    target = jax.random.normal(jax.random.key(0), (5, 3))
    actions = 2 * jax.random.normal(jax.random.key(1), (5, 3))
    other = jax.tree.map(lambda x: x * 1.5 if eqx_is_float(x) else x, energy)
    check_energy(energy, target, actions, other_energy=other)


def eqx_is_float(x):
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def test_check_energy_catches_broken_energies():
    target = jax.random.normal(jax.random.key(0), (5, 3))
    actions = jax.random.normal(jax.random.key(1), (5, 3))

    def per_step(context, a):
        return jnp.sum((a - context) ** 2, axis=-1)

    with pytest.raises(AssertionError, match="scalar"):
        check_energy(per_step, target, actions)

    def nan_energy(context, a):
        return jnp.sum(a) * jnp.nan

    with pytest.raises(AssertionError, match="not finite"):
        check_energy(nan_energy, target, actions)

    def kinked(context, a):
        return jnp.sum(jnp.sqrt(jnp.abs(a - context)))

    with pytest.raises(AssertionError, match="gradient"):
        check_energy(kinked, target, target)

    class Inconsistent(fc.AbstractEnergy):
        def encode(self, context):
            return context + 1.0

        def score(self, encoded, a):
            return jnp.sum((a - encoded) ** 2)

    # Consistent by construction through AbstractEnergy; a hand-made split that is not:
    class BadSplit:
        def __call__(self, context, a):
            return jnp.sum((a - context) ** 2)

        def encode(self, context):
            return context + 1.0

        def score(self, encoded, a):
            return jnp.sum((a - encoded) ** 2)

    check_energy(Inconsistent(), target, actions)
    with pytest.raises(AssertionError, match="encode/score"):
        check_energy(BadSplit(), target, actions)

    class FloatScaled(fc.AbstractEnergy):
        scale: float  # a Python float is static under jit: each new value recompiles

        def encode(self, context):
            return context

        def score(self, encoded, a):
            return self.scale * jnp.sum((a - encoded) ** 2)

    with pytest.raises(AssertionError, match="recompile"):
        check_energy(FloatScaled(1.0), target, actions, other_energy=FloatScaled(2.0))


def test_bad_contexts_weights_and_bounds_get_clear_errors():
    target = jnp.linspace(-1, 1, 6).reshape(3, 2)
    actions = target + 0.5
    energy = fc.SquaredDistance()
    # A context that is not the target chunk: None, a float, a list, a dict.
    for context in (None, 1.5, [[0.0, 0.0]] * 3, {"target": target}):
        with pytest.raises(TypeError, match=r"SquaredDistance\(\) without a target.*context"):
            fc.correct(energy, context, actions)
    # Weights: wrong shape, NaN, inf, negative.
    with pytest.raises(ValueError, match=r"`weight` has shape \(5,\).*\(3, 2\)"):
        fc.SquaredDistance(target, weight=jnp.ones(5))
    with pytest.raises(ValueError, match=r"`weight` has shape \(5,\).*\(3, 2\)"):
        fc.correct(fc.SquaredDistance(weight=jnp.ones(5)), target, actions)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="SquaredDistance `weight` must be finite and >= 0"):
            fc.SquaredDistance(weight=bad)
        with pytest.raises(ValueError, match="BoundsPenalty `weight` must be finite and >= 0"):
            fc.BoundsPenalty(-1.0, 1.0, weight=bad)
    with pytest.raises(ValueError, match="NaN"):
        fc.BoundsPenalty(jnp.array([0.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="`weights` must be finite"):
        fc.SumEnergy([energy, energy], weights=[1.0, float("nan")])
    # Actions that are not an array.
    with pytest.raises(TypeError, match="`actions` must be a JAX or NumPy array.*list"):
        fc.correct(energy, target, [[0.0, 0.0]] * 3)
    # A batch whose context lacks the batch axis, or holds a Python float.
    with pytest.raises(ValueError, match=r"leading batch axis of size 4.*fc.bind"):
        fc.correct(energy, target, jnp.stack([actions] * 4))
    with pytest.raises(TypeError, match="is a float"):
        fc.correct(fc.BoundsPenalty(-1.0, 1.0), {"x": 1.0}, jnp.stack([actions] * 4))
