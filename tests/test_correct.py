"""The `correct` entry point: results, diagnostics, compilation and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flowcorrect as fc

from .helpers import tree_bitwise_equal

KEY = jax.random.key(0)


def _chunks(shape=(6, 4), seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape), 2 * jax.random.normal(k2, shape)


def test_reference_recipe_matches_hand_written_steps():
    target, actions = _chunks()
    energy = fc.SquaredDistance(weight=4.0)
    out, info = fc.correct(energy, target, actions, key=KEY)  # default: reference recipe

    a = actions
    for _ in range(3):
        step = 0.1 * 4.0 * (a - target)
        max_norm = 0.2 * jnp.linalg.norm(a)
        norm = jnp.linalg.norm(step)
        step = jnp.where(norm > max_norm, step * max_norm / norm, step)
        a = a - step
    np.testing.assert_allclose(out, a, rtol=1e-5, atol=1e-6)
    assert int(info.num_accepted) == 3
    assert not bool(info.fell_back)
    assert float(info.energy_before) == pytest.approx(float(energy(target, actions)), rel=1e-6)
    assert float(info.energy_after) == pytest.approx(float(energy(target, out)), rel=1e-6)
    assert float(info.energy_after) < float(info.energy_before)
    assert float(info.delta_norm) == pytest.approx(float(jnp.linalg.norm(out - actions)), 1e-5)


def test_reference_recipe_defaults_and_options():
    recipe = fc.reference_recipe()
    assert isinstance(recipe, fc.Repeat) and recipe.num_steps == 3
    assert isinstance(recipe.inner, fc.ClipStep)
    assert float(recipe.inner.clip_frac) == pytest.approx(0.2)
    assert float(recipe.inner.inner.alpha) == pytest.approx(0.1)

    target, actions = _chunks((5, 8))
    masked = fc.reference_recipe(first_only=True, action_dims=3)
    out, _ = fc.correct(fc.SquaredDistance(), target, actions, corrector=masked, key=KEY)
    assert tree_bitwise_equal(out[1:], actions[1:])
    assert tree_bitwise_equal(out[:, 3:], actions[:, 3:])
    assert float(jnp.abs(out[0, :3] - actions[0, :3]).min()) > 0


def test_clip_relative_to_current_uses_entering_chunk():
    # A huge step is clipped to exactly clip_frac * ||a|| of the chunk entering each step.
    target, actions = _chunks()
    energy = fc.SquaredDistance(weight=100.0)
    corrector = fc.Repeat(fc.ClipStep(fc.GradientStep(1.0), 0.1), num_steps=2)
    out, _ = fc.correct(energy, target, actions, corrector=corrector, key=KEY)
    first, _ = fc.correct(energy, target, actions, corrector=fc.ClipStep(fc.GradientStep(1.0), 0.1))
    assert float(jnp.linalg.norm(first - actions)) == pytest.approx(
        0.1 * float(jnp.linalg.norm(actions)), rel=1e-5
    )
    assert float(jnp.linalg.norm(out - first)) == pytest.approx(
        0.1 * float(jnp.linalg.norm(first)), rel=1e-5
    )


def test_optax_sgd_equals_gradient_step_and_adam_carries_state():
    target, actions = _chunks()
    energy = fc.SquaredDistance(weight=2.0)
    sgd, _ = fc.correct(
        energy, target, actions, corrector=fc.Repeat(fc.OptaxStep(optax.sgd(0.1)), num_steps=4)
    )
    plain, _ = fc.correct(
        energy, target, actions, corrector=fc.Repeat(fc.GradientStep(0.1), num_steps=4)
    )
    np.testing.assert_allclose(sgd, plain, rtol=1e-6, atol=1e-6)

    # Adam's first step has size lr in every coordinate; its moments make the second
    # step differ from a fresh first step, which only happens if the state is carried.
    adam = fc.OptaxStep(optax.adam(0.05))
    one, _ = fc.correct(energy, target, actions, corrector=adam, key=KEY)
    np.testing.assert_allclose(jnp.abs(one - actions), 0.05, rtol=1e-3)
    two, _ = fc.correct(energy, target, actions, corrector=fc.Repeat(adam, num_steps=2), key=KEY)
    fresh, _ = fc.correct(energy, target, one, corrector=adam, key=KEY)
    assert float(jnp.max(jnp.abs(two - fresh))) > 1e-4


def test_backtracking_halves_until_the_energy_falls():
    # E = 0.5 * ||a - t||^2 (L = 1). alpha = 3 overshoots: a - 3(a - t) mirrors the error
    # at twice its size. Halved once (alpha = 1.5) the error is -0.5x: energy falls.
    target = jnp.zeros((2, 2))
    actions = jnp.ones((2, 2))
    corrector = fc.Backtrack(fc.GradientStep(3.0), max_halvings=3)
    out, info = fc.correct(fc.SquaredDistance(), target, actions, corrector=corrector, key=KEY)
    np.testing.assert_allclose(out, -0.5 * actions, rtol=1e-6)
    assert int(info.num_accepted) == 1

    never = fc.Backtrack(fc.GradientStep(3.0), max_halvings=0)
    out, info = fc.correct(fc.SquaredDistance(), target, actions, corrector=never, key=KEY)
    assert tree_bitwise_equal(out, actions)
    assert int(info.num_accepted) == 0


def test_backtracking_rolls_back_inner_state_on_rejection():
    # Rejected Adam steps must not advance Adam's step count.
    target = jnp.zeros((2, 2))
    actions = jnp.ones((2, 2))
    bt = fc.Backtrack(fc.OptaxStep(optax.sgd(3.0, momentum=0.9)), max_halvings=0)
    bound = fc.bind(fc.SquaredDistance(), target)

    def energy(a):
        return bound(None, a)

    state = bt.init(energy, actions)
    out, new_state, n = bt.step(energy, actions, state, KEY)
    assert int(n) == 0
    assert tree_bitwise_equal(new_state, state)


def test_langevin_is_reproducible_and_key_driven():
    target, actions = _chunks()
    corrector = fc.Repeat(fc.LangevinStep(0.05, temperature=0.5), num_steps=3)
    energy = fc.SquaredDistance()
    a1, _ = fc.correct(energy, target, actions, corrector=corrector, key=jax.random.key(1))
    a2, _ = fc.correct(energy, target, actions, corrector=corrector, key=jax.random.key(1))
    a3, _ = fc.correct(energy, target, actions, corrector=corrector, key=jax.random.key(2))
    assert tree_bitwise_equal(a1, a2)
    assert float(jnp.max(jnp.abs(a1 - a3))) > 1e-3
    cold = fc.Repeat(fc.LangevinStep(0.05, temperature=0.0), num_steps=3)
    grad = fc.Repeat(fc.GradientStep(0.05), num_steps=3)
    np.testing.assert_allclose(
        fc.correct(energy, target, actions, corrector=cold, key=KEY)[0],
        fc.correct(energy, target, actions, corrector=grad, key=KEY)[0],
        rtol=1e-6,
    )


def test_langevin_samples_the_boltzmann_distribution():
    # For E = 0.5 * w * ||a||^2 the stationary law of exp(-E / T) is N(0, T / w).
    energy = fc.SquaredDistance(weight=2.0)
    corrector = fc.Repeat(fc.LangevinStep(0.01, temperature=0.5), num_steps=400)
    starts = jnp.zeros((256, 4, 2))
    out, _ = fc.correct(energy, jnp.zeros_like(starts), starts, corrector=corrector, key=KEY)
    assert float(jnp.var(out)) == pytest.approx(0.25, rel=0.1)


def test_project_bounds_clips_into_bounds():
    target, actions = _chunks()
    corrector = fc.Chain(fc.GradientStep(0.1), fc.ProjectBounds(-0.5, jnp.full((4,), 0.7)))
    out, info = fc.correct(fc.SquaredDistance(), 5 * target, actions, corrector=corrector, key=KEY)
    assert float(out.min()) >= -0.5 and float(out.max()) <= 0.7
    assert int(info.num_accepted) == 1  # the projection is not an update step


def test_chain_counts_and_splits_keys():
    target, actions = _chunks()
    langevin = fc.LangevinStep(0.05, 1.0)
    out, info = fc.correct(
        fc.SquaredDistance(), target, actions, corrector=fc.Chain(langevin, langevin), key=KEY
    )
    assert int(info.num_accepted) == 2
    same_key_twice, _ = fc.correct(
        fc.SquaredDistance(), target, actions, corrector=fc.Repeat(langevin, 1), key=KEY
    )
    assert float(jnp.max(jnp.abs(out - same_key_twice))) > 1e-4


def test_split_energy_encodes_context_once_per_observation():
    encodes = []
    scores = []

    class CountingEnergy(fc.AbstractEnergy):
        def encode(self, context):
            encodes.append(None)
            return 2.0 * context

        def score(self, encoded, actions):
            scores.append(None)
            return jnp.sum((actions - encoded) ** 2)

    target, actions = _chunks()
    corrector = fc.Repeat(fc.Backtrack(fc.GradientStep(0.1)), num_steps=7)
    fc.correct(CountingEnergy(), target, actions, corrector=corrector, key=KEY)
    assert len(encodes) == 1  # traced once, outside the loop over steps
    assert len(scores) >= 1


def test_padding_mask_in_context_compiles_and_is_respected():
    # An attention-pooling energy over context tokens with a mask (True = real token).
    class PooledEnergy(fc.AbstractEnergy):
        proj: jax.Array

        def encode(self, context):
            tokens, mask = context
            logits = jnp.where(mask, tokens @ self.proj[:, 0], -jnp.inf)
            any_real = jnp.any(mask)
            weights = jax.nn.softmax(jnp.where(any_real, logits, 0.0))
            weights = jnp.where(any_real, weights, 0.0)
            return jnp.sum(weights[:, None] * tokens, axis=0)

        def score(self, encoded, actions):
            return jnp.sum((actions - encoded[None, : actions.shape[1]]) ** 2)

    energy = PooledEnergy(jax.random.normal(KEY, (5, 1)))
    tokens = jax.random.normal(jax.random.key(3), (7, 5))
    mask = jnp.array([True, True, True, False, False, True, False])
    actions = jax.random.normal(jax.random.key(4), (4, 3))
    out, info = fc.correct(energy, (tokens, mask), actions, key=KEY)
    changed = tokens.at[~mask].set(1e3)  # padding content must not matter
    out2, _ = fc.correct(energy, (changed, mask), actions, key=KEY)
    np.testing.assert_allclose(out, out2, rtol=1e-6)
    empty, info = fc.correct(energy, (tokens, jnp.zeros(7, bool)), actions)
    assert bool(jnp.all(jnp.isfinite(empty))) and not bool(info.fell_back)


def _traced_correct():
    def correct(energy, context, actions, corrector, key):
        return fc.correct(energy, context, actions, corrector=corrector, key=key)

    return eqx.filter_jit(eqx.debug.assert_max_traces(correct, max_traces=1))


def test_no_recompile_when_values_change():
    run = _traced_correct()
    target, actions = _chunks()
    energy = fc.SquaredDistance(weight=1.0)

    def corrector(alpha, clip, mask, first):
        step = fc.Mask(fc.GradientStep(alpha), horizon=mask)
        return fc.Repeat(fc.ClipStep(fc.Mask(step, action_dims=first), clip), num_steps=3)

    m1 = jnp.array([True, False, True, True, False, True])
    m2 = ~m1
    run(energy, target, actions, corrector(0.1, 0.2, m1, 2), KEY)
    run(fc.SquaredDistance(weight=3.0), 2 * target, -actions, corrector(0.5, 0.05, m2, 3), KEY)
    run(energy, target, actions, corrector(np.float64(0.3), jnp.float32(0.1), m1, 1), KEY)


def test_batch_of_contexts_and_actions():
    targets = jax.random.normal(jax.random.key(5), (3, 6, 4))
    actions = jax.random.normal(jax.random.key(6), (3, 6, 4))
    out, info = fc.correct(fc.SquaredDistance(), targets, actions, key=KEY)
    assert out.shape == actions.shape
    assert info.energy_before.shape == (3,) and info.fell_back.shape == (3,)
    for i in range(3):
        single, single_info = fc.correct(fc.SquaredDistance(), targets[i], actions[i], key=KEY)
        np.testing.assert_allclose(out[i], single, rtol=1e-6)
        assert float(info.energy_after[i]) == pytest.approx(float(single_info.energy_after))


def test_non_finite_energy_falls_back_per_sample():
    class NanForNegativeFirst(fc.AbstractEnergy):
        def encode(self, context):
            return context

        def score(self, encoded, actions):
            return jnp.sum((actions - encoded) ** 2) + jnp.log(actions[0, 0])

    actions = jnp.stack([jnp.full((3, 2), 2.0), jnp.full((3, 2), -1.0), jnp.full((3, 2), 3.0)])
    targets = jnp.ones_like(actions)
    out, info = fc.correct(NanForNegativeFirst(), targets, actions, key=KEY)
    assert info.fell_back.tolist() == [False, True, False]
    assert tree_bitwise_equal(out[1], actions[1])
    assert float(jnp.max(jnp.abs(out[0] - actions[0]))) > 0
    assert bool(jnp.all(jnp.isfinite(out)))
    assert int(info.num_accepted[1]) == 0


def test_non_finite_gradient_falls_back():
    class InfGradient(fc.AbstractEnergy):
        def encode(self, context):
            return None

        def score(self, encoded, actions):
            return jnp.sum(jnp.sqrt(jnp.abs(actions)))  # gradient inf at 0

    actions = jnp.zeros((3, 2)).at[0, 0].set(1.0)
    out, info = fc.correct(InfGradient(), None, actions, corrector=fc.GradientStep(0.1), key=KEY)
    assert bool(info.fell_back)
    assert tree_bitwise_equal(out, actions)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fc.GradientStep(-0.1), "alpha"),
        (lambda: fc.LangevinStep(0.1, temperature=-1.0), "temperature"),
        (lambda: fc.ClipStep(fc.GradientStep(), 0.0), "clip_frac"),
        (lambda: fc.ClipStep(fc.GradientStep(), -0.5), "clip_frac"),
        (lambda: fc.Repeat(fc.GradientStep(), num_steps=-1), "num_steps"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=jnp.zeros(5, bool)), "all False"),
        (lambda: fc.Mask(fc.GradientStep(), action_dims=[False, False]), "all False"),
        (lambda: fc.Mask(fc.GradientStep(), horizon=0), "horizon"),
        (lambda: fc.Mask(fc.GradientStep(), action_dims=0), "action_dims"),
        (lambda: fc.Mask(fc.GradientStep()), "horizon.*action_dims"),
        (lambda: fc.ProjectBounds(1.0, -1.0), "low <= high"),
        (lambda: fc.ProjectBounds(jnp.zeros(3), jnp.ones(4)), "broadcast"),
        (lambda: fc.BoundsPenalty(jnp.ones(2), jnp.zeros(2)), "low <= high"),
        (lambda: fc.Backtrack(fc.GradientStep(), max_halvings=-1), "max_halvings"),
        (lambda: fc.Chain(), "at least one"),
        (lambda: fc.SquaredDistance(weight=-1.0), "weight"),
        (lambda: fc.SumEnergy([]), "empty"),
        (lambda: fc.SumEnergy([fc.SquaredDistance()], weights=[1.0, 2.0]), "one weight"),
    ],
)
def test_invalid_settings_raise_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: fc.ClipStep(fc.GradientStep(), 0.2, relative_to="start"),
        lambda: fc.Repeat(fc.GradientStep(), num_steps=2.5),
        lambda: fc.Chain(fc.GradientStep(), "sgd"),
        lambda: fc.OptaxStep("adam"),
    ],
)
def test_wrong_types_raise_when_built(build):
    # A ValueError from __check_init__ in production; under the test run's jaxtyping
    # checks the annotation catches it first, as a TypeError.
    with pytest.raises((ValueError, TypeError), match="relative_to|num_steps|corrector|optimizer"):
        build()


def test_shape_mismatches_raise_at_trace_time_naming_the_argument():
    target, actions = _chunks((6, 4))
    energy = fc.SquaredDistance()
    with pytest.raises(ValueError, match=r"mask.*\(5,\).*\(6, 4\)"):
        fc.correct(
            energy, target, actions,
            corrector=fc.Mask(fc.GradientStep(), horizon=jnp.ones(5, bool)),
        )
    with pytest.raises(ValueError, match=r"mask.*\(3,\).*\(6, 4\)"):
        fc.correct(
            energy, target, actions,
            corrector=fc.Mask(fc.GradientStep(), action_dims=jnp.ones(3, bool)),
        )
    with pytest.raises(ValueError, match=r"context.*\(6, 3\).*\(6, 4\)"):
        fc.correct(energy, target[:, :3], actions, key=KEY)
    # Rank and dtype: our ValueError in production, the annotation's TypeError first
    # under the test run's jaxtyping checks; both name `actions`.
    with pytest.raises((ValueError, TypeError), match="actions"):
        fc.correct(energy, target.ravel(), actions.ravel(), key=KEY)
    with pytest.raises(ValueError, match=r"leading batch axis of size 2.*\(3, 6, 4\)"):
        fc.correct(energy, jnp.stack([target] * 3), jnp.stack([actions] * 2), key=KEY)
    with pytest.raises(ValueError, match=r"high.*\(3,\).*\(6, 4\)"):
        fc.correct(energy, target, actions, corrector=fc.ProjectBounds(0.0, jnp.ones(3)))
    with pytest.raises((ValueError, TypeError), match="actions"):
        fc.correct(energy, target, actions.astype(jnp.int32), key=KEY)
    with pytest.raises(TypeError, match="corrector"):
        fc.correct(energy, target, actions, corrector=optax.sgd(0.1), key=KEY)


def test_non_scalar_energy_raises_naming_the_shape():
    def per_step_energy(context, actions):
        return jnp.sum((actions - context) ** 2, axis=-1)

    target, actions = _chunks((6, 4))
    with pytest.raises(ValueError, match=r"scalar.*\(6,\)"):
        fc.correct(per_step_energy, target, actions, key=KEY)


def test_plain_function_is_an_energy():
    def energy(context, actions):
        return jnp.sum((actions - context["goal"]) ** 2)

    target, actions = _chunks()
    assert isinstance(energy, fc.EnergyFn)
    out, info = fc.correct(energy, {"goal": target}, actions, key=KEY)
    assert float(info.energy_after) < float(info.energy_before)
