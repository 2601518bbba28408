"""Best-of-N over partially denoised candidates: `fc.BestOfN(n, rank_at=k)` (FM-Steer
style), and its deprecated spelling `fc.EarlyBestOfN(n, k)`.

Expected values are written here by hand, per convention, from the conventions' own
formulas (openpi: `x_t = t * eps + (1 - t) * a`, `a_hat = x_t - t * v`; reverse:
`x_t = (1 - t) * eps + t * a`, `a_hat = x_t + (1 - t) * v`), never read off the
library's convention objects, so that a sign error cannot cancel.
"""

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc

from .helpers import Tanh, tree_allclose, tree_bitwise_equal

H, D = 3, 2  # one chunk shape for the file: few compiles
N_CAND, STEPS, BATCH = 5, 8, 2
ALPHA = 2.0  # the affine field's slope, see `Affine`
CONVENTIONS = [fc.OpenPI(), fc.Reverse()]
CONV_IDS = ["openpi", "reverse"]


def _is_openpi(convention) -> bool:
    return isinstance(convention, fc.OpenPI)


def _grid(convention, num_steps):
    """Start time and dt as openpi writes its loop (t accumulates in float32)."""
    if _is_openpi(convention):
        return np.float32(1.0), np.float32(-1.0 / num_steps)
    return np.float32(0.0), np.float32(1.0 / num_steps)


# ---------------------------------------------------------------- toy policies


class Affine(fc.AbstractPolicy):
    """A per-sample policy with a closed-form Euler flow: `v = alpha * x - c` (openpi)
    or `v = c - alpha * x` (reverse), for the observation's `c`. The observation is
    `(c, target)`; the energy's context is the target.

    In both conventions Euler gives `x_k = c / alpha + r**k * (eps - c / alpha)` with
    `r = 1 - alpha / num_steps`; with `s = 1 - k / num_steps` the time left (`t_k` in
    openpi's convention, `1 - t_k` in the reverse one) the denoised estimate is
    `a_hat_k = x_k - s * (alpha * x_k - c)`.
    """

    alpha: jax.Array
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    convention: fc.AbstractConvention

    def condition(self, observation):
        return observation

    def velocity(self, cond, x_t, t):
        c = cond[0]
        if isinstance(self.convention, fc.OpenPI):
            return self.alpha * x_t - c
        return c - self.alpha * x_t

    def energy_context(self, cond):
        return cond[1]


def _affine(convention):
    return Affine(jnp.float32(ALPHA), (H, D), convention)


def _closed_form(c, eps, k, num_steps=STEPS, alpha=ALPHA):
    """`(x_k, a_hat_k)` in float64, `c`: (batch, H, D), `eps`: (batch, n, H, D)."""
    c = np.asarray(c, np.float64)[:, None]
    eps = np.asarray(eps, np.float64)
    r = 1 - alpha / num_steps
    x = c / alpha + r**k * (eps - c / alpha)
    s = 1 - k / num_steps
    return x, x - s * (alpha * x - c)


def _hand_euler(convention, c, x, t, dt, num_steps):
    """`num_steps` plain Euler steps by hand (eager float32) from `x` at time `t`."""
    for _ in range(num_steps):
        v = ALPHA * x - c if _is_openpi(convention) else c - ALPHA * x
        x = (x + dt * v).astype(np.float32)
        t = np.float32(t + dt)
    return x, t


def _hand_denoised(convention, x, v, t):
    return x - t * v if _is_openpi(convention) else x + (1 - t) * v


def _case(seed=0, target_seed=1001):
    c = np.linspace(-1, 1, BATCH * H * D, dtype=np.float32).reshape(BATCH, H, D)
    target = np.asarray(jax.random.normal(jax.random.key(target_seed), (BATCH, H, D)))
    noise = jax.random.normal(jax.random.key(seed), (BATCH, N_CAND, H, D))
    return (jnp.asarray(c), jnp.asarray(target)), noise


def _energy_of(a, target):
    """`fc.SquaredDistance()` (the context is the target), by hand, in float64."""
    return 0.5 * np.sum((a - np.asarray(target, np.float64)[:, None]) ** 2, axis=(2, 3))


def _tanh_policy(convention=fc.OpenPI(), seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    field = Tanh(
        jax.random.normal(k[0], (D, 8)) / 2,
        jax.random.normal(k[1], (8, D)) / 2,
        jax.random.normal(k[2], (8,)),
    )
    return fc.VelocityPolicy(field, (H, D), convention)


def _tanh_context(batch=BATCH, seed=5):
    return jax.random.normal(jax.random.key(seed), (batch, 8))


# ---------------------------------------------------------------- rank_at = num_steps


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize(
    "select", [fc.ByEnergy(), fc.Medoid(), fc.SoftmaxSample(0.5)], ids=lambda s: type(s).__name__
)
def test_ranking_at_the_end_is_best_of_n_bit_for_bit(convention, select):
    policy, context = _tanh_policy(convention), _tanh_context()
    noise = jax.random.normal(jax.random.key(2), (BATCH, N_CAND, H, D))
    energy = fc.SquaredDistance(jnp.full((H, D), 0.3)) if select.needs_energy else None
    # Ten steps: the grid's last time is not exactly 0 (or 1) in float32, so an extra
    # denoising pass at the end would show in the last bits.
    steps = 10
    kwargs = dict(noise=noise, energy=energy, num_steps=steps, step_energies=True)
    key = jax.random.key(7)  # the keys drive SoftmaxSample's draw
    best, best_info = fc.sample(policy, context, key,
                                placement=fc.BestOfN(N_CAND, select=select), **kwargs)
    early, early_info = fc.sample(policy, context, key,
                                  placement=fc.BestOfN(N_CAND, select=select, rank_at=steps),
                                  **kwargs)
    assert tree_bitwise_equal(early, best)
    b, e = best_info.placement, early_info.placement
    assert tree_bitwise_equal(
        (e.candidate_energy, e.candidate_score, e.selected, e.num_ok),
        (b.candidate_energy, b.candidate_score, b.selected, b.num_ok),
    )
    assert tree_bitwise_equal(early_info.final_energy, best_info.final_energy)
    # The candidates' scores differ: the equality is not that of a constant.
    assert len(np.unique(np.asarray(e.candidate_score))) == BATCH * N_CAND
    if energy is not None:
        assert tree_bitwise_equal(e.step_energy, b.inner.step_energy)
    final_t = np.float32(0.0) if _is_openpi(convention) else np.float32(1.0)
    assert np.allclose(np.asarray(e.t), final_t, atol=1e-6) and e.t.shape == (BATCH,)


# ---------------------------------------------------------------- closed form


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
# With alpha = 2 the estimate's coefficient on the noise, (1 - 2 s) r**k, is negative
# before the middle of the flow (k < 4 of 8), zero at it (every estimate equal) and
# positive after: early rankings here differ from the final one, as they should.
@pytest.mark.parametrize("rank_at", [0, 2, 3])
def test_ranks_the_closed_form_denoised_estimates_and_continues_the_chosen(
    convention, rank_at
):
    observation, noise = _case()
    c, target = observation
    x_k, a_hat = _closed_form(c, noise, rank_at)
    expected_energy = _energy_of(a_hat, target)
    expected = np.argmin(expected_energy, axis=1)
    # The test can tell the right estimate from the likely wrong ones: ranking the
    # finished candidates, the noisy sample x_t itself, or the estimate with the
    # other convention's sign picks another candidate for some observation.
    x_end, _ = _closed_form(c, noise, STEPS)
    s = 1 - rank_at / STEPS
    wrong_sign = x_k + s * (ALPHA * x_k - np.asarray(c, np.float64)[:, None])
    for wrong in (x_end, x_k, wrong_sign):
        assert np.any(np.argmin(_energy_of(wrong, target), axis=1) != expected)

    out, info = fc.sample(
        _affine(convention), observation, noise=noise, num_steps=STEPS,
        energy=fc.SquaredDistance(), placement=fc.BestOfN(N_CAND, rank_at=rank_at),
        step_energies=True,
    )
    early = info.placement
    assert np.asarray(early.selected).tolist() == expected.tolist()
    np.testing.assert_allclose(early.candidate_energy, expected_energy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(early.candidate_score, early.candidate_energy)
    assert np.asarray(early.num_ok).tolist() == [N_CAND] * BATCH
    assert not np.any(np.asarray(info.fell_back))

    # The reference, by hand: every candidate for rank_at steps, then the chosen one's
    # x_t for the remaining steps; time accumulated as openpi's loop does.
    t, dt = _grid(convention, STEPS)
    c32 = np.asarray(c)[:, None]
    x, t = _hand_euler(convention, c32, np.asarray(noise), t, dt, rank_at)
    np.testing.assert_allclose(x, x_k, rtol=1e-5, atol=1e-5)  # the closed form holds
    v = ALPHA * x - c32 if _is_openpi(convention) else c32 - ALPHA * x
    np.testing.assert_allclose(_hand_denoised(convention, x, v, t), a_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(early.t, np.full(BATCH, t), rtol=0, atol=1e-7)
    chosen = x[np.arange(BATCH), expected]
    reference, _ = _hand_euler(convention, np.asarray(c), chosen, t, dt, STEPS - rank_at)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
    # Finishing the chosen candidate is what a plain sample from its noise gives; the
    # energies along its path are the plain path's.
    plain, plain_info = fc.sample(
        _affine(convention), observation, noise=noise[np.arange(BATCH), expected],
        num_steps=STEPS, energy=fc.SquaredDistance(), placement=fc.Plain(), step_energies=True,
    )
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(early.step_energy, plain_info.placement.step_energy, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
def test_a_synthesising_rule_continues_the_candidate_it_reports(convention):
    observation, noise = _case(seed=3)
    out, info = fc.sample(
        _affine(convention), observation, noise=noise, num_steps=STEPS,
        placement=fc.BestOfN(N_CAND, select=fc.ClusterMean(3), rank_at=3),
    )
    selected = np.asarray(info.placement.selected)
    assert info.placement.candidate_energy is None  # no energy needed, none computed
    # ClusterMean reports the candidate nearest the estimates' mean; the affine map
    # from noise to estimate is common to all candidates, so it is the one nearest
    # the noises' mean.
    eps = np.asarray(noise, np.float64)
    nearest = np.argmin(np.linalg.norm((eps - eps.mean(1, keepdims=True)).reshape(
        BATCH, N_CAND, -1), axis=2), axis=1)
    assert selected.tolist() == nearest.tolist()
    # Continued from its own x_t: a candidate's finished chunk, not a mean of chunks.
    finished = np.stack([
        np.asarray(fc.sample(_affine(convention), observation, noise=noise[:, j],
                             num_steps=STEPS)[0])
        for j in range(N_CAND)
    ], axis=1)
    np.testing.assert_allclose(out, finished[np.arange(BATCH), selected], rtol=1e-5, atol=1e-6)
    mean3, _ = fc.sample(_affine(convention), observation, noise=noise, num_steps=STEPS,
                         placement=fc.BestOfN(N_CAND, select=fc.ClusterMean(3)))
    assert not np.allclose(out, mean3, atol=1e-3)


# ---------------------------------------------------------------- cost


class Recording(fc.AbstractBatchedPolicy):
    """A batched policy that records, at run time, the batch size of every velocity
    call (a `jax.debug.callback` fires per execution, also inside `lax.scan`, and not
    for a branch of `lax.cond` that is not taken)."""

    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, D))
    convention: fc.AbstractConvention = fc.OpenPI()
    calls: ClassVar[list] = []

    def condition(self, observations):
        return observations

    def batch_size(self, cond):
        return cond.shape[0]

    def velocity(self, cond, x_t, t):
        jax.debug.callback(functools.partial(Recording.calls.append, x_t.shape[0]))
        return x_t - cond[:, None, :]

    def energy_context(self, cond):
        return cond

    def repeat(self, cond, n):
        return jnp.repeat(cond, n, axis=0)


@pytest.mark.parametrize("rank_at", [0, 3, STEPS])
def test_velocity_runs_on_all_candidates_only_until_the_ranking(rank_at):
    obs = jnp.linspace(-1, 1, BATCH * D).reshape(BATCH, D)
    noise = jax.random.normal(jax.random.key(4), (BATCH, N_CAND, H, D))
    wide = BATCH * N_CAND

    def calls(placement):
        Recording.calls.clear()
        out, _ = fc.sample(Recording(), obs, noise=noise, num_steps=STEPS, placement=placement)
        jax.block_until_ready(out)
        jax.effects_barrier()
        return sorted(Recording.calls, reverse=True)

    # Counted per execution: the same counts on a second (cached) call.
    for _ in range(2):
        got = calls(fc.BestOfN(N_CAND, select=fc.Medoid(), rank_at=rank_at))
        ranking_pass = 1 if rank_at < STEPS else 0
        assert got == [wide] * (rank_at + ranking_pass) + [BATCH] * (STEPS - rank_at)
    assert calls(fc.BestOfN(N_CAND, select=fc.Medoid())) == [wide] * STEPS


# ---------------------------------------------------------------- safety


class NanAbove(eqx.Module):
    """Velocity `2 x - c` (`Affine`'s openpi field), NaN for a chunk whose first entry
    is above 1.5."""

    def __call__(self, context, x, t):
        return jnp.where(x[0, 0] > 1.5, jnp.nan, ALPHA * x - context)


class NanIfFirstIsLarge(eqx.Module):
    """Squared distance to the context over every entry but the first; NaN where the
    first entry is beyond 10 in size (a finite chunk whose energy is not)."""

    def __call__(self, context, actions):
        e = 0.5 * jnp.sum(((actions - context) ** 2).at[0, 0].set(0.0))
        return jnp.where(jnp.abs(actions[0, 0]) > 10.0, jnp.nan, e)


@pytest.mark.parametrize("rank_at", [0, 2, STEPS])
@pytest.mark.parametrize("select", [fc.ByEnergy(), fc.Medoid()], ids=lambda s: type(s).__name__)
def test_a_non_finite_candidate_is_never_chosen(rank_at, select):
    policy = fc.VelocityPolicy(NanAbove(), (H, D))
    context = jnp.zeros((H, D))
    noise = jnp.clip(jax.random.normal(jax.random.key(6), (N_CAND, H, D)), -0.9, 0.9)
    # Candidate 1 goes NaN at its first velocity. Candidate 3 is near the energy's
    # target everywhere but in its first entry, which the energy ignores, so it would
    # be the lowest energy; but that entry stays beyond 10 in size in its denoised
    # estimate at every step (`Affine`'s closed form), where the energy is NaN.
    noise = noise.at[1, 0, 0].set(3.0).at[3].set(0.01).at[3, 0, 0].set(-500.0)
    energy = NanIfFirstIsLarge() if select.needs_energy else None
    out, info = fc.sample(policy, context, noise=noise, num_steps=STEPS, energy=energy,
                          placement=fc.BestOfN(N_CAND, select=select, rank_at=rank_at))
    early = info.placement
    bad = [1, 3] if select.needs_energy else [1]
    assert int(early.selected) not in bad
    assert int(early.num_ok) == N_CAND - len(bad)
    assert np.all(np.isinf(np.asarray(early.candidate_score)[bad]))
    if select.needs_energy:
        assert np.all(np.isinf(np.asarray(early.candidate_energy)[bad]))
        # Without the NaN, candidate 3 would have won: the exclusion is what decides.
        _, a_hat = _closed_form(context[None], noise[None], rank_at)
        finite_energy = 0.5 * np.sum((a_hat[0] ** 2).reshape(N_CAND, -1)[:, 1:], axis=1)
        finite_energy[1] = np.inf
        assert int(np.argmin(finite_energy)) == 3
    assert np.all(np.isfinite(np.asarray(out))) and not bool(info.fell_back)


def test_no_finite_candidate_falls_back_and_flags():
    policy = fc.VelocityPolicy(NanAbove(), (H, D))
    out, info = fc.sample(policy, jnp.zeros((H, D)), noise=jnp.full((3, H, D), 2.0),
                          num_steps=STEPS,
                          placement=fc.BestOfN(3, select=fc.Medoid(), rank_at=2))
    # Every candidate is NaN, and so is the plain chunk of this noise: flagged.
    assert int(info.placement.num_ok) == 0 and bool(info.fell_back)


# ---------------------------------------------------------------- batches and compiles


@pytest.mark.parametrize("select", [fc.ByEnergy(), fc.Medoid()], ids=lambda s: type(s).__name__)
def test_batch_equals_per_observation(select):
    policy, context = _tanh_policy(fc.Reverse(), seed=1), _tanh_context(3, seed=8)
    noise = jax.random.normal(jax.random.key(9), (3, N_CAND, H, D))
    energy = fc.SquaredDistance(jnp.full((H, D), -0.2)) if select.needs_energy else None
    placement = fc.BestOfN(N_CAND, select=select, rank_at=4)
    out, info = fc.sample(policy, context, noise=noise, num_steps=STEPS, energy=energy,
                          placement=placement)
    assert out.shape == (3, H, D) and info.placement.selected.shape == (3,)
    assert info.placement.candidate_score.shape == (3, N_CAND)
    for i in range(3):
        one, one_info = fc.sample(policy, context[i], noise=noise[i], num_steps=STEPS,
                                  energy=energy, placement=placement)
        assert tree_allclose(out[i], one)
        assert tree_allclose(jax.tree.map(lambda a: a[i], info.placement), one_info.placement,
                             rtol=1e-5, atol=1e-5)


def test_new_noise_weights_and_temperature_do_not_recompile():
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(policy, context, noise, energy, placement):
        return fc.sample(policy, context, noise=noise, num_steps=STEPS, energy=energy,
                         placement=placement)

    outs = []
    for seed in range(3):
        out, info = run(
            _tanh_policy(fc.OpenPI(), seed),
            _tanh_context(BATCH, seed),
            jax.random.normal(jax.random.key(seed), (BATCH, N_CAND, H, D)),
            fc.SquaredDistance(jnp.full((H, D), 0.1 * seed)),
            fc.BestOfN(N_CAND, select=fc.SoftmaxSample(0.5 + seed), rank_at=3),
        )
        assert out.shape == (BATCH, H, D) and np.all(np.isfinite(np.asarray(out)))
        outs.append(np.asarray(out))
    assert not np.allclose(outs[0], outs[1])


# ---------------------------------------------------------------- fc.integrate ranges


class TwoSegments(fc.AbstractPlacement):
    """A user placement: the plain flow in two `fc.integrate` calls, split at `k`."""

    k: int = eqx.field(static=True)
    needs_energy = False

    def noise_shape(self, chunk_shape):
        return tuple(chunk_shape)

    def sample(self, flow, noise, keys):
        x, _, first = fc.integrate(flow, fc.Plain(), noise, keys, stop=self.k)
        x, _, rest = fc.integrate(flow, fc.Plain(), x, keys, start=self.k)
        return x, (first, rest)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("k", [0, 3, STEPS])
def test_integrate_in_two_ranges_is_one_run(convention, k):
    policy, context = _tanh_policy(convention), _tanh_context()
    noise = jax.random.normal(jax.random.key(10), (BATCH, H, D))
    kwargs = dict(noise=noise, num_steps=STEPS, energy=fc.SquaredDistance(jnp.zeros((H, D))),
                  step_energies=True)
    whole, whole_info = fc.sample(policy, context, placement=fc.Plain(), **kwargs)
    split, split_info = fc.sample(policy, context, placement=TwoSegments(k), **kwargs)
    first, rest = split_info.placement
    assert first.shape == (BATCH, k) and rest.shape == (BATCH, STEPS - k)
    # The same steps at the same times: equal bit for bit on this CPU; to float32
    # rounding where a compiler fuses the two loops' bodies differently.
    assert tree_allclose(split, whole, rtol=1e-6, atol=1e-7)
    assert tree_allclose(jnp.concatenate([first, rest], axis=1),
                         whole_info.placement.step_energy, rtol=1e-6, atol=1e-7)


def test_integrate_rejects_a_bad_range():
    class Bad(fc.AbstractPlacement):
        start: int = eqx.field(static=True)
        stop: object = eqx.field(static=True)
        needs_energy = False

        def noise_shape(self, chunk_shape):
            return tuple(chunk_shape)

        def sample(self, flow, noise, keys):
            return fc.integrate(flow, fc.Plain(), noise, keys, start=self.start,
                                  stop=self.stop)[0], None

    policy = _tanh_policy()
    for start, stop in [(3, 2), (-1, 2), (0, STEPS + 1)]:
        with pytest.raises(ValueError, match=rf"start={start}, stop={stop}, num_steps={STEPS}"):
            fc.sample(policy, jnp.zeros(8), noise=jnp.zeros((H, D)), num_steps=STEPS,
                      placement=Bad(start, stop))
    # Under the test run's runtime type checks the annotation `int | None` answers
    # first; without them, the library's own message. Both name `stop`.
    with pytest.raises(TypeError, match="`stop` must be a Python int|parameter 'stop'"):
        fc.sample(policy, jnp.zeros(8), noise=jnp.zeros((H, D)), num_steps=STEPS,
                  placement=Bad(0, 2.0))


# ---------------------------------------------------------------- errors


def test_clear_errors():
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=rf"`rank_at` must be an int >= 0.*{bad!r}"):
            fc.BestOfN(4, rank_at=bad)
    with pytest.raises(ValueError, match=r"`rank_at` splits.*AbstractInterleaved.*got PostHoc"):
        fc.BestOfN(4, fc.PostHoc(), rank_at=2)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"`n` must be an int >= 1"):
            fc.BestOfN(bad, rank_at=2)
    with pytest.raises(TypeError, match="`BestOfN `select`` must be a selection rule.*str"):
        fc.BestOfN(4, select="medoid", rank_at=2)
    policy, context = _tanh_policy(), jnp.zeros(8)
    noise = jnp.zeros((4, H, D))
    with pytest.raises(ValueError, match=r"`rank_at`.*rank_at=11 with num_steps=10"):
        fc.sample(policy, context, noise=noise, num_steps=10,
                  placement=fc.BestOfN(4, select=fc.Medoid(), rank_at=11))
    for rule in (fc.ByEnergy(), fc.NearMean(2)):
        with pytest.raises(ValueError, match="BestOfN placement needs an energy"):
            fc.sample(policy, context, noise=noise,
                      placement=fc.BestOfN(4, select=rule, rank_at=2))
    with pytest.raises(ValueError, match=r"`noise` must have shape \(4, 3, 2\)"):
        fc.sample(policy, context, noise=jnp.zeros((3, H, D)), energy=fc.SquaredDistance(),
                  placement=fc.BestOfN(4, rank_at=2))
    # The list of placements in the message names this one.
    with pytest.raises(TypeError, match=r"`PostHoc `inner`` must be a placement.*rank_at="):
        fc.PostHoc(inner="early")


# ---------------------------------------------------------------- the deprecated spelling


@pytest.mark.parametrize("convention", CONVENTIONS, ids=CONV_IDS)
@pytest.mark.parametrize("rank_at", [0, 3, STEPS])
def test_early_best_of_n_is_best_of_n_with_rank_at_bit_for_bit(convention, rank_at):
    policy, context = _tanh_policy(convention), _tanh_context()
    noise = jax.random.normal(jax.random.key(30), (BATCH, N_CAND, H, D))
    kwargs = dict(noise=noise, num_steps=STEPS, energy=fc.SquaredDistance(jnp.zeros((H, D))),
                  step_energies=True)
    with pytest.warns(DeprecationWarning, match=r"EarlyBestOfN.*fc.BestOfN\(n, select=select, "
                      r"rank_at=rank_at\)"):
        old = fc.EarlyBestOfN(N_CAND, rank_at, fc.Medoid())
    new = fc.BestOfN(N_CAND, select=fc.Medoid(), rank_at=rank_at)
    assert isinstance(old, fc.BestOfN) and old.rank_at == rank_at
    assert tree_bitwise_equal(fc.sample(policy, context, placement=old, **kwargs),
                              fc.sample(policy, context, placement=new, **kwargs))
    _, info = fc.sample(policy, context, placement=new, **kwargs)
    assert fc.EarlyBestOfNInfo is fc.BestOfNInfo
    assert isinstance(info.placement, fc.BestOfNInfo) and info.placement.t.shape == (BATCH,)
    assert info.placement.step_energy.shape == (BATCH, STEPS)
    # Without rank_at there is no ranking time, and the same rule ranks finished chunks:
    # rank_at = num_steps is rank_at = None exactly.
    _, finished = fc.sample(policy, context, placement=fc.BestOfN(N_CAND, select=fc.Medoid()),
                            **kwargs)
    assert finished.placement.t is None
    if rank_at == STEPS:
        whole = fc.sample(policy, context, placement=fc.BestOfN(N_CAND, select=fc.Medoid()),
                          **kwargs)[0]
        assert np.asarray(whole).tobytes() == np.asarray(
            fc.sample(policy, context, placement=new, **kwargs)[0]).tobytes()


def test_early_best_of_n_still_checks_its_arguments():
    for bad in (-1, None):
        with pytest.warns(DeprecationWarning):  # noqa: PT031
            with pytest.raises(ValueError, match=r"`rank_at` must be an int >= 0"):
                fc.EarlyBestOfN(4, bad)


def test_renamed_children_warn_and_still_work():
    box = fc.constraints.Box(-1.0, 1.0)
    with pytest.warns(DeprecationWarning, match=r"PostHoc's `after` is deprecated.*`inner`"):
        old = fc.PostHoc(fc.reference_recipe(), after=fc.BestOfN(2))
    assert old == fc.PostHoc(fc.reference_recipe(), inner=fc.BestOfN(2))
    with pytest.warns(DeprecationWarning, match=r"PostHoc.after is deprecated.*PostHoc.inner"):
        assert old.after is old.inner
    with pytest.warns(DeprecationWarning, match=r"NearMean's `then` is deprecated"):
        near = fc.NearMean(2, then=fc.Medoid())
    assert near == fc.NearMean(2, inner=fc.Medoid()) == fc.NearMean(2, fc.Medoid())
    with pytest.warns(DeprecationWarning, match=r"NearMean.then is deprecated"):
        assert near.then is near.inner
    with pytest.warns(DeprecationWarning, match=r"FeasibleFirst's `then` is deprecated"):
        first = fc.constraints.FeasibleFirst(box, then=fc.Medoid())
    assert first == fc.constraints.FeasibleFirst(box, inner=fc.Medoid())
    with pytest.warns(DeprecationWarning, match=r"FeasibleFirst.then is deprecated"):
        assert first.then is first.inner
    with pytest.raises(TypeError, match=r"`inner` or its deprecated name `after`, not both"):
        fc.PostHoc(inner=fc.Plain(), after=fc.Plain())
    # Nothing warns under the new names.
    assert fc.PostHoc(fc.reference_recipe(), fc.BestOfN(2)).inner == fc.BestOfN(2)


def test_rank_at_splits_an_interleaved_inner_placement_at_the_ranking():
    # The candidates take the inner placement's steps before the ranking, the chosen one
    # after it; the inner's state (here its step counts) starts afresh at the ranking.
    policy, context = _tanh_policy(), _tanh_context()
    noise = jax.random.normal(jax.random.key(40), (BATCH, N_CAND, H, D))
    kwargs = dict(noise=noise, num_steps=STEPS, energy=fc.SquaredDistance(jnp.zeros((H, D))))
    plain, _ = fc.sample(policy, context, placement=fc.BestOfN(N_CAND, rank_at=3), **kwargs)
    off, _ = fc.sample(policy, context, placement=fc.BestOfN(
        N_CAND, fc.Guided(weight=0.0), rank_at=3), **kwargs)
    assert tree_allclose(off, plain, rtol=1e-6, atol=1e-7)
    guided, info = fc.sample(policy, context, placement=fc.BestOfN(
        N_CAND, fc.Guided(weight=1.0), rank_at=3), **kwargs)
    assert not np.allclose(guided, plain, atol=1e-4)
    assert np.asarray(info.placement.inner.placement.num_applied).tolist() == [STEPS - 3] * BATCH
