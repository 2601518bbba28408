"""Selection rules of best-of-N: consensus needs no training.

Expected values are computed here with NumPy in float64 from the definitions (mean
distance to the other candidates; mean of the k nearest the mean), never read off the
library.
"""

import os

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc

from .helpers import tree_allclose

LAW = settings(
    max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "60")), deadline=None
)
N, H, D = 5, 3, 2  # one shape for the laws: one compile per rule

RULES = {
    "by-energy": fc.ByEnergy(),
    "medoid": fc.Medoid(),
    "cluster-mean": fc.ClusterMean(3),
    "softmax": fc.SoftmaxSample(0.5),
    "near-mean": fc.NearMean(3),
    "near-mean-medoid": fc.NearMean(2, fc.Medoid()),
}


@eqx.filter_jit
def _select(rule, candidates, energy, ok, key):
    return rule.select(candidates, energy if rule.needs_energy else None, ok, key)


def _run(rule, candidates, energy=None, ok=None, seed=0):
    candidates = jnp.asarray(candidates)
    if ok is None:
        ok = jnp.all(jnp.isfinite(candidates).reshape(candidates.shape[0], -1), axis=1)
    if energy is None:
        energy = jnp.arange(candidates.shape[0], dtype=jnp.float32)
    energy = jnp.where(ok, jnp.asarray(energy, jnp.float32), jnp.inf)
    return _select(rule, candidates, energy, jnp.asarray(ok), jax.random.key(seed))


def _medoid_scores(c: np.ndarray, ok: np.ndarray) -> np.ndarray:
    c = c.astype(np.float64).reshape(len(c), -1)
    out = np.full(len(c), np.inf)
    idx = np.flatnonzero(ok)
    for i in idx:
        others = [j for j in idx if j != i]
        out[i] = np.mean([np.linalg.norm(c[i] - c[j]) for j in others]) if others else 0.0
    return out


BIG = float(np.float32(1e30))
magnitudes = st.sampled_from([1e-3, 1.0, 1e3, 1e30])
finite_chunks = hnp.arrays(
    np.float32, (N, H, D), elements=st.floats(-1, 1, width=32, allow_subnormal=False)
)


# ------------------------------------------------------------------------- laws


@LAW
@given(c=finite_chunks, scale=magnitudes, perm=st.permutations(range(N)))
def test_medoid_is_the_lowest_mean_distance_and_permutation_invariant(c, scale, perm):
    c = (c * np.float32(scale)).astype(np.float32)
    ok = np.ones(N, bool)
    expected = _medoid_scores(c, ok)
    out = _run(fc.Medoid(), c)
    out_p = _run(fc.Medoid(), c[list(perm)])
    # Chosen by the definition (up to float32 ties), and the same chunk's score whatever
    # the order.
    tol = 1e-5 * np.max(expected) + 1e-30
    assert expected[int(out.index)] <= np.min(expected) + tol
    assert np.allclose(np.asarray(out.score, np.float64), expected, rtol=1e-4, atol=tol)
    assert np.allclose(np.asarray(out_p.score), np.asarray(out.score)[list(perm)], rtol=1e-5,
                       atol=tol)
    assert expected[list(perm)][int(out_p.index)] <= np.min(expected) + tol
    assert np.all(np.isfinite(np.asarray(out.actions)))


@LAW
@given(c=finite_chunks, bad=hnp.arrays(bool, (N,)), which=st.sampled_from(list(RULES)),
       poison=st.sampled_from([np.nan, np.inf, -np.inf]), seed=st.integers(0, 2**16))
def test_no_rule_chooses_a_non_finite_candidate(c, bad, which, poison, seed):
    if bad.all():
        bad[0] = False
    c = c.copy()
    c[bad, 0, 0] = poison
    energy = np.linspace(-1, 1, N).astype(np.float32)
    energy[1] = np.nan  # a non-finite energy also excludes its candidate
    ok = ~bad
    if RULES[which].needs_energy:
        ok = ok & np.isfinite(energy)
        if not ok.any():
            ok[0], c[0] = True, np.zeros((H, D), np.float32)
    out = _run(RULES[which], c, energy, ok, seed)
    assert ok[int(out.index)]
    assert np.all(np.isfinite(np.asarray(out.actions)))
    assert np.all(np.isinf(np.asarray(out.score)[~ok]))


@LAW
@given(chunk=hnp.arrays(np.float32, (H, D), elements=st.floats(-BIG, BIG, width=32)),
       which=st.sampled_from(["medoid", "cluster-mean", "near-mean-medoid"]))
def test_identical_candidates_give_that_candidate(chunk, which):
    c = np.broadcast_to(chunk, (N, H, D)).copy()
    out = _run(RULES[which], c)
    # The mean of identical chunks may round in the last bit.
    # (XLA on CPU flushes subnormal intermediates to zero, hence the atol.)
    assert np.allclose(np.asarray(out.actions), chunk, rtol=1e-6, atol=1e-37)
    if which == "medoid":
        assert np.all(np.asarray(out.score) == 0)


@LAW
@given(c=finite_chunks, scale=st.sampled_from([1.0, 100.0]),
       which=st.sampled_from(["medoid", "cluster-mean", "near-mean-medoid"]))
def test_bfloat16_candidates_choose_as_their_float32_values_do(c, scale, which):
    c16 = jnp.asarray(c * scale, jnp.bfloat16)
    out16 = _run(RULES[which], c16)
    out32 = _run(RULES[which], c16.astype(jnp.float32))
    assert out16.actions.dtype == jnp.bfloat16
    assert int(out16.index) == int(out32.index)
    assert np.allclose(np.asarray(out16.actions, np.float32), np.asarray(out32.actions),
                       rtol=1e-2, atol=1e-2 * scale)


@LAW
@given(c=finite_chunks, shift=st.floats(-100, 100), scale=st.sampled_from([1e-3, 7.0, 1e20]))
def test_medoid_and_cluster_mean_commute_with_a_common_affine_map(c, shift, scale):
    c64 = c.astype(np.float64)
    moved = (c64 * scale + shift).astype(np.float32)
    base = _medoid_scores(c64, np.ones(N, bool))
    out = _run(fc.Medoid(), moved)
    assert base[int(out.index)] <= np.min(base) + 1e-4 * np.max(base) + 1e-6


# ------------------------------------------------------------------ known cases


def _cluster_with_outlier():
    rng = np.random.default_rng(0)
    c = (0.05 * rng.standard_normal((N, H, D))).astype(np.float32)
    c[2] += 10.0  # one candidate far from the others
    return c


def test_cluster_mean_averages_the_central_cluster():
    c = _cluster_with_outlier()
    out = _run(fc.ClusterMean(4), c)
    expected = c[[0, 1, 3, 4]].astype(np.float64).mean(0)
    assert np.allclose(np.asarray(out.actions), expected, atol=1e-6)
    all_mean = _run(fc.ClusterMean(N), c)
    assert np.allclose(np.asarray(all_mean.actions), c.astype(np.float64).mean(0), atol=1e-5)
    nearest = _run(fc.ClusterMean(1), c)
    d = np.linalg.norm((c - c.mean(0)).reshape(N, -1), axis=1)
    assert int(nearest.index) == int(np.argmin(d))
    assert np.allclose(np.asarray(nearest.actions), c[np.argmin(d)], rtol=1e-6, atol=0)


def test_near_mean_keeps_argmin_off_the_outlier():
    c = _cluster_with_outlier()
    energy = np.array([3.0, 2.0, -5.0, 1.0, 4.0], np.float32)  # the outlier scores best
    assert int(_run(fc.ByEnergy(), c, energy).index) == 2
    guarded = _run(fc.NearMean(4), c, energy)
    assert int(guarded.index) == 3
    # k = n leaves the rule unchanged.
    assert int(_run(fc.NearMean(N), c, energy).index) == 2
    assert int(_run(fc.Medoid(), c).index) != 2


def test_softmax_sample_frequencies_follow_the_softmax():
    c = _cluster_with_outlier()
    energy = np.array([0.0, 1.0, 0.5, 3.0, 0.2], np.float32)
    ok = np.array([True, True, False, True, True])
    rule = fc.SoftmaxSample(0.7)
    draws = np.array([int(_run(rule, c, energy, ok, seed).index) for seed in range(600)])
    assert not np.any(draws == 2)
    logits = np.where(ok, -energy / 0.7, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=N) / len(draws)
    assert np.allclose(freq, p, atol=0.06)
    cold = np.array([int(_run(fc.SoftmaxSample(1e-4), c, energy, ok, s).index) for s in range(20)])
    assert np.all(cold == 0)


# ---------------------------------------------------------- through fc.sample


class Nanny(eqx.Module):
    """A constant velocity (each sample is its noise minus `shift`: distinct samples),
    NaN for a chunk whose first entry is above 1.5."""

    shift: jax.Array

    def __call__(self, context, x, t):
        return jnp.where(x[0, 0] > 1.5, jnp.nan, self.shift)


def _policy(target=np.float32(0.3)):
    return fc.VelocityPolicy(Nanny(jnp.full((H, D), target)), (H, D), fc.OpenPI())


def _noise(n=4, seed=0):
    # Below Nanny's 1.5 everywhere: every candidate finite unless a test poisons one.
    return jnp.clip(jax.random.normal(jax.random.key(seed), (n, H, D)), -1.4, 1.4)


def test_default_rule_is_by_energy_bit_for_bit():
    policy, noise = _policy(), _noise(seed=3)
    energy = fc.SquaredDistance(jnp.full((H, D), 0.1))
    a, ia = fc.sample(policy, None, jax.random.key(0), noise=noise,
                      placement=fc.BestOfN(4), energy=energy)
    b, ib = fc.sample(policy, None, jax.random.key(0), noise=noise,
                      placement=fc.BestOfN(4, select=fc.ByEnergy()), energy=energy)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert tree_allclose(ia.placement.candidate_score, ib.placement.candidate_energy)


def test_consensus_through_sample_needs_no_energy_and_skips_nan_candidates():
    policy = _policy()
    noise = _noise(4, seed=1).at[1, 0, 0].set(3.0).at[3, 0, 0].set(2.0)  # 1 and 3 go NaN
    singles = [fc.sample(policy, None, noise=noise[i])[0] for i in range(4)]
    assert not np.isfinite(np.asarray(singles[1])).all()
    for rule in [fc.Medoid(), fc.ClusterMean(2), fc.NearMean(2, fc.Medoid())]:
        out, info = fc.sample(policy, None, jax.random.key(0), noise=noise,
                              placement=fc.BestOfN(4, select=rule))
        best = info.placement
        assert best.candidate_energy is None and int(best.num_ok) == 2
        assert int(best.selected) in (0, 2)
        assert np.all(np.isfinite(np.asarray(out))) and not bool(info.fell_back)
    out, _ = fc.sample(policy, None, noise=noise, placement=fc.BestOfN(4, select=fc.ClusterMean(2)))
    assert np.allclose(np.asarray(out), (np.asarray(singles[0]) + np.asarray(singles[2])) / 2,
                       atol=1e-6)


def test_n_equal_one_is_the_plain_sample():
    policy, noise = _policy(), _noise(1, seed=5)
    plain, _ = fc.sample(policy, None, noise=noise[0])
    for rule in [fc.Medoid(), fc.ClusterMean(1), fc.NearMean(1, fc.Medoid())]:
        out, info = fc.sample(policy, None, noise=noise, placement=fc.BestOfN(1, select=rule))
        assert np.array_equal(np.asarray(out), np.asarray(plain))
        assert int(info.placement.selected) == 0


def test_all_candidates_non_finite_falls_back_and_flags():
    policy = _policy()
    noise = jnp.full((3, H, D), 2.0)
    placement = fc.BestOfN(3, select=fc.ClusterMean(2))
    out, info = fc.sample(policy, None, noise=noise, placement=placement)
    # Every candidate is NaN (and so is the plain chunk of this noise): flagged.
    assert bool(info.fell_back) and int(info.placement.num_ok) == 0


def test_a_users_rule_plugs_in():
    class Closest(fc.AbstractSelection):
        target: jax.Array
        needs_energy = False

        def select(self, candidates, energy, ok, key):
            d = jnp.where(ok, jnp.sum((candidates - self.target[None]) ** 2, axis=(1, 2)), jnp.inf)
            i = jnp.argmin(d).astype(jnp.int32)
            return fc.Selected(candidates[i], i, d)

    policy, noise = _policy(), _noise(4, seed=2)
    singles = np.stack([np.asarray(fc.sample(policy, None, noise=noise[i])[0]) for i in range(4)])
    target = singles[2] + 1e-3
    out, info = fc.sample(policy, None, noise=noise,
                          placement=fc.BestOfN(4, select=Closest(jnp.asarray(target))))
    assert int(info.placement.selected) == 2


def test_temperature_change_does_not_recompile():
    c = _cluster_with_outlier()

    @eqx.debug.assert_max_traces(max_traces=1)
    def run(rule):
        return _select.__wrapped__(rule, jnp.asarray(c), jnp.zeros(N), jnp.ones(N, bool),
                                   jax.random.key(0))

    jitted = eqx.filter_jit(run)
    for t in [0.1, 1.0, 3.0]:
        jitted(fc.SoftmaxSample(t))


# ------------------------------------------------------------------------ errors


def test_clear_errors():
    with pytest.raises(ValueError, match="ClusterMean `k` must be an int >= 1"):
        fc.ClusterMean(0)
    with pytest.raises(ValueError, match="NearMean `k`"):
        fc.NearMean(2.5)
    with pytest.raises(TypeError, match="`NearMean `inner`` must be a selection rule"):
        fc.NearMean(2, inner="energy")
    with pytest.raises(TypeError, match="`BestOfN `select`` must be a selection rule.*str"):
        fc.BestOfN(4, select="medoid")
    with pytest.raises(ValueError, match="temperature.*> 0"):
        fc.SoftmaxSample(0.0)
    with pytest.raises(ValueError, match="temperature"):
        fc.SoftmaxSample(float("nan"))
    policy, noise = _policy(), _noise(4)
    with pytest.raises(ValueError, match="k=6 but BestOfN draws only n=4"):
        fc.sample(policy, None, noise=noise, placement=fc.BestOfN(4, select=fc.ClusterMean(6)))
    for rule in [fc.ByEnergy(), fc.SoftmaxSample(1.0), fc.NearMean(2)]:
        with pytest.raises(ValueError, match="BestOfN placement needs an energy"):
            fc.sample(policy, None, noise=noise, placement=fc.BestOfN(4, select=rule))
