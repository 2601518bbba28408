"""fc.Ensemble: the pessimistic mean of several energies, as a user ranks with it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc

H, D = 6, 3


def _members():
    # Three energies that agree near `a` and disagree elsewhere.
    a = jnp.linspace(-1.0, 1.0, H * D).reshape(H, D)
    return a, [fc.SquaredDistance(weight=w) for w in (0.5, 1.0, 3.0)]


@pytest.mark.parametrize("pessimism", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_value_is_mean_plus_pessimism_times_population_std(pessimism, dtype):
    target, members = _members()
    target = target.astype(dtype)
    energy = fc.Ensemble(members, pessimism)
    for seed in range(5):
        x = (target + jax.random.normal(jax.random.key(seed), (H, D))).astype(dtype)
        values = np.array([float(m(target, x)) for m in members], np.float64)
        want = values.mean() + pessimism * values.std()
        got = energy(target, x)
        assert got.dtype == jnp.promote_types(dtype, jnp.float32)  # never rounded to float16
        assert float(got) == pytest.approx(want, rel=1e-5 if dtype == jnp.float32 else 3e-3)


def test_gradient_is_finite_where_members_agree():
    target, members = _members()
    for energy in (fc.Ensemble(members[:1]), fc.Ensemble([members[1]] * 3, 2.0)):
        x = target + 0.3
        g = jax.grad(lambda a: energy(target, a))(x)
        assert bool(jnp.all(jnp.isfinite(g)))
        # With agreeing members the spread adds nothing: the gradient is the mean's.
        np.testing.assert_allclose(g, jax.grad(lambda a: energy.energies[0](target, a))(x),
                                   rtol=1e-6)
    # At the shared minimum every member is 0: value 0, gradient 0, not NaN.
    full = fc.Ensemble(members, 1.0)
    assert float(full(target, target)) == 0.0
    assert bool(jnp.all(jax.grad(lambda a: full(target, a))(target) == 0))


def test_pessimism_prefers_the_candidate_members_agree_on():
    # Candidate A (x = 0): the members say 0 and 10 (mean 5, spread 5); candidate B
    # (x = 1): both say 6. The mean prefers A, the pessimistic ensemble B.
    members = [lambda c, a: 6.0 * a[0, 0], lambda c, a: 10.0 - 4.0 * a[0, 0]]
    cands = jnp.stack([jnp.zeros((H, D)), jnp.ones((H, D))])
    e_plain = jax.vmap(lambda a: fc.Ensemble(members, 0.0)(None, a))(cands)
    e_pess = jax.vmap(lambda a: fc.Ensemble(members, 1.0)(None, a))(cands)
    np.testing.assert_allclose(e_plain, [5.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(e_pess, [10.0, 6.0], rtol=1e-6)
    assert int(jnp.argmin(e_plain)) == 0 and int(jnp.argmin(e_pess)) == 1


def test_best_of_n_ranks_by_the_ensemble_under_jit():
    target, members = _members()

    class Policy(fc.AbstractPolicy):
        chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
        convention: fc.AbstractConvention = fc.OpenPI()

        def condition(self, observation):
            return observation

        def velocity(self, cond, x_t, t):
            return x_t - cond

        def energy_context(self, cond):
            return cond

    energy = fc.Ensemble(members, 1.0)
    actions, info = eqx.filter_jit(fc.sample)(
        Policy(), target, jax.random.key(0), energy=energy, placement=fc.BestOfN(6))
    scores = info.placement.candidate_energy
    assert scores.shape == (6,) and float(jnp.ptp(scores)) > 0
    assert int(info.placement.selected) == int(jnp.argmin(scores))
    np.testing.assert_allclose(info.final_energy, scores.min(), rtol=1e-5)


def test_a_non_finite_member_makes_the_ensemble_non_finite():
    target, members = _members()
    bad = fc.Ensemble([members[0], lambda c, a: jnp.nan * jnp.sum(a)])
    assert not bool(jnp.isfinite(bad(target, target + 1)))


def test_bad_arguments_name_the_argument():
    _, members = _members()
    with pytest.raises(ValueError, match="empty"):
        fc.Ensemble([])
    with pytest.raises(ValueError, match="pessimism"):
        fc.Ensemble(members, -1.0)
    with pytest.raises(ValueError, match="pessimism"):
        fc.Ensemble(members, [1.0, 2.0])
    with pytest.raises(TypeError):
        fc.Ensemble([3.0])
