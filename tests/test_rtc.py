"""Tests of real-time chunking: weights, PiGDM weight, placement, executor.

The expected values are written from the paper (Black, Galliker, Levine 2025, eq. 5 for
the weights, eq. 2 / Algorithm 1 for the guided step, in its convention: tau = 0 noise,
1 actions), in this file, never from the library's own functions.
"""

import math
import os

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.testing import GaussianPolicy

from .helpers import enable_x64

LAW = settings(max_examples=int(os.environ.get("FLOWCORRECT_LAW_EXAMPLES", "100")))
H, A = 8, 3  # one chunk shape for the file: few compiles


def bitwise_equal(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()


# --------------------------------------------------------------------------- the paper
def paper_weights(d: int, s: int, horizon: int, schedule: str) -> np.ndarray:
    """Eq. 5: W_i = 1 for i < d; c_i (e^c_i - 1)/(e - 1) for d <= i < H - s with
    c_i = (H - s - i)/(H - s - d + 1); 0 for i >= H - s. 'linear' uses c_i, 'ones' 1
    on the whole overlap, 'zeros' only the first d."""
    out = np.zeros(horizon)
    end = horizon - s
    for i in range(horizon):
        if i >= end:
            out[i] = 0.0
        elif i < d:
            out[i] = 1.0
        elif schedule == "ones":
            out[i] = 1.0
        elif schedule == "zeros":
            out[i] = 0.0
        else:
            c = (end - i) / (end - d + 1)
            out[i] = c if schedule == "linear" else c * (math.exp(c) - 1) / (math.e - 1)
    return out


def paper_guidance_weight(tau: float, beta: float) -> float:
    """min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2);
    the formula tends to +inf at tau = 0, so the min is beta there."""
    if tau == 0.0:
        return beta
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    return min(beta, (1 - tau) / (tau * r2))


def paper_rtc(v_paper, noise, y, weights, num_steps, beta):
    """Algorithm 1 of the paper, one sample, in its convention (tau from 0 to 1):
    A_hat = A + (1 - tau) v; v_guided = v + w(tau) (dA_hat/dA)^T diag(W) (Y - A_hat);
    A <- A + v_guided / n."""
    x = noise
    for k in range(num_steps):
        tau = k / num_steps

        def denoise(x, tau=tau):
            v = v_paper(x, tau)
            return x + (1 - tau) * v, v

        a_hat, pullback, v = jax.vjp(denoise, x, has_aux=True)
        (corr,) = pullback((y - a_hat) * weights[:, None])
        x = x + (v + paper_guidance_weight(tau, beta) * corr) / num_steps
    return x


# --------------------------------------------------------------------------- policies
class MLPPolicy(fc.AbstractPolicy):
    """A small nonlinear velocity in either convention; the observation enters it."""

    mlp: eqx.nn.MLP
    convention: fc.AbstractConvention
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(H, A))

    def condition(self, observation):
        return observation

    def velocity(self, cond, x, t):
        inp = jnp.concatenate([x.ravel(), cond, jnp.stack([jnp.sin(3 * t), t])])
        return self.mlp(inp).reshape(x.shape)

    def energy_context(self, cond):
        return cond


def mlp_policy(convention, seed=0):
    mlp = eqx.nn.MLP(H * A + 2 + 2, H * A, 32, 2, activation=jnp.tanh, key=jax.random.key(seed))
    return MLPPolicy(mlp, convention)


def leftover(seed=1, rows=H - 4, batch=None):
    shape = (rows, A) if batch is None else (batch, rows, A)
    return jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------- weights
@LAW
@given(s=st.integers(1, H), d=st.integers(0, H), schedule=st.sampled_from(fc._rtc.SCHEDULES))
def test_prefix_weights_are_the_papers(s, d, schedule):
    if d > H - s:
        return
    w = np.asarray(fc.rtc.rtc_prefix_weights(H, d, s, schedule))
    np.testing.assert_allclose(w, paper_weights(d, s, H, schedule), rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(w) <= 1e-7) and np.all((w >= 0) & (w <= 1))
    assert np.all(w[:d] == 1.0) and np.all(w[H - s:] == 0.0)


def test_prefix_weights_example():
    # H = 10, d = 2, s = 4: the overlap ends at H - s = 6 and c_i = (6 - i) / 5.
    w = fc.rtc.rtc_prefix_weights(10, 2, 4, "linear")
    np.testing.assert_allclose(w, [1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0], atol=1e-7)


# --------------------------------------------------------------------------- PiGDM weight
@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_pigdm_weight_maps_time_and_clamps(convention, dtype):
    weight = fc.rtc.PiGDMWeight(5.0)
    for tau in np.linspace(0, 1, 11):
        t = tau if isinstance(convention, fc.Reverse) else 1 - tau
        w = weight(jnp.asarray(t, dtype), convention)
        assert w.dtype == dtype and bool(jnp.isfinite(w))
        tau_seen = float(jnp.asarray(t, dtype)) if isinstance(convention, fc.Reverse) else (
            1 - float(jnp.asarray(t, dtype)))
        expected = 5.0 if tau_seen >= 1 else paper_guidance_weight(tau_seen, 5.0)
        np.testing.assert_allclose(float(w), expected, rtol=1e-2 if dtype != jnp.float32 else 1e-6)
    # The noise end is beta in both conventions (the formula's 1/0 there).
    noise_t = 1.0 if isinstance(convention, fc.OpenPI) else 0.0
    assert float(weight(jnp.asarray(noise_t, dtype), convention)) == 5.0


@LAW
@given(t=st.floats(0, 1), beta=st.floats(0, 1e4),
       dtype=st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16]))
def test_pigdm_weight_law(t, beta, dtype):
    """Finite, within [0, beta], and the same value for the same point of the flow in
    both conventions (openpi's t is the reverse convention's 1 - t)."""
    t_openpi = jnp.asarray(t, dtype)
    t_reverse = (1 - t_openpi.astype(jnp.float32)).astype(dtype)
    weight = fc.rtc.PiGDMWeight(beta)
    w_openpi = float(weight(t_openpi, fc.OpenPI()))
    w_reverse = float(weight(t_reverse, fc.Reverse()))
    assert np.isfinite(w_openpi) and 0 <= w_openpi <= float(jnp.asarray(beta, dtype)) * (1 + 1e-2)
    if float(1 - t_reverse.astype(jnp.float32)) == float(t_openpi):  # exactly one point
        assert w_openpi == w_reverse


def test_pigdm_weight_below_beta_in_the_middle():
    # At tau = 1/2: (1/2) / (1/2 * 1/2) = 2, so beta = 5 does not bind and beta = 1 does.
    assert float(fc.rtc.PiGDMWeight(5.0)(jnp.float32(0.5), fc.Reverse())) == pytest.approx(2.0)
    assert float(fc.rtc.PiGDMWeight(1.0)(jnp.float32(0.5), fc.OpenPI())) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the placement
@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
def test_equals_the_papers_algorithm_on_an_mlp(convention):
    policy = mlp_policy(convention)
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    num_steps, beta = 5, 5.0

    # One compile for every case: all of RealTimeChunking's fields are data.
    @eqx.filter_jit
    def ours(placement):
        return fc.sample(policy, obs, noise=noise, num_steps=num_steps, placement=placement)

    # The policy's velocity in the paper's time (d x / d tau), written by hand.
    if isinstance(convention, fc.Reverse):
        def v_paper(x, tau):
            return policy.velocity(obs, x, jnp.float32(tau))
    else:
        def v_paper(x, tau):
            return -policy.velocity(obs, x, jnp.float32(1 - tau))

    plain, _ = fc.sample(policy, obs, noise=noise, num_steps=num_steps)
    for schedule, d, s in [("exp", 2, 4), ("linear", 1, 3), ("ones", 3, 5), ("zeros", 2, 2),
                           ("exp", 0, 4)]:
        left = leftover(rows=H - s)
        # The leftover is padded to a fixed length (H - 2 rows) so that every case has
        # one shape; rows past H - s have weight 0 through `execution_horizon`.
        padded = jnp.concatenate([left, jnp.zeros((s - 2, A))])
        out, info = ours(fc.RealTimeChunking(padded, d, s, prefix_attention_schedule=schedule,
                                             max_guidance_weight=beta))
        y = jnp.concatenate([left, jnp.zeros((s, A))])
        w = jnp.asarray(paper_weights(d, s, H, schedule), jnp.float32)
        expected = paper_rtc(v_paper, noise, y, w, num_steps, beta)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5,
                                   err_msg=str((schedule, d, s)))
        assert int(info.placement.guidance.num_applied) == num_steps
        # Guidance moved the chunk: the comparison would catch a dropped or capped step.
        assert float(jnp.max(jnp.abs(plain - expected))) > 1e-2


def test_the_three_traps_would_each_change_the_result():
    """Guided with its default cap, with an unmapped weight, or unclamped at the noise
    end, gives another chunk than RealTimeChunking: the comparison above can fail."""
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    left = leftover(rows=4)
    noise = jax.random.normal(jax.random.key(5), (H, A))
    rtc, _ = fc.sample(policy, obs, noise=noise, num_steps=5,
                       placement=fc.RealTimeChunking(left, 2, 4))
    target = jnp.concatenate([left, jnp.zeros((4, A))])
    energy = fc.bind(fc.rtc.RTCEnergy(), (target, fc.rtc.rtc_prefix_weights(H, 2, 4)))

    def unmapped(t):  # the paper's formula fed openpi's t: 0/0 at t = 1
        r2 = (1 - t) ** 2 / (t**2 + (1 - t) ** 2)
        return jnp.minimum(5.0, (1 - t) / (t * r2))

    for placement in [
        fc.Guided(weight=fc.rtc.PiGDMWeight(5.0)),  # cap = 1
        fc.Guided(weight=unmapped, cap=None),
    ]:
        other, _ = fc.sample(policy, obs, noise=noise, num_steps=5, placement=placement,
                             energy=energy)
        assert float(jnp.max(jnp.abs(other - rtc))) > 1e-3
    same, _ = fc.sample(policy, obs, noise=noise, num_steps=5, energy=energy,
                        placement=fc.Guided(weight=fc.rtc.PiGDMWeight(5.0), cap=None))
    np.testing.assert_allclose(same, rtc, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("convention", [fc.OpenPI(), fc.Reverse()], ids=["openpi", "reverse"])
def test_closed_form_on_a_gaussian_flow(convention):
    """Linear denoiser: A_hat = m + alpha (x - tau m), alpha = tau std^2 / var, so the
    guided Euler step is an affine map per entry, written here in float64 by hand."""
    with enable_x64(True):
        mean = jnp.linspace(-1, 1, H * A).reshape(H, A)
        std = jnp.asarray(0.5)
        policy = GaussianPolicy(mean, std, convention)
        left = jnp.asarray(np.random.default_rng(0).normal(size=(H - 3, A)))
        noise = jnp.asarray(np.random.default_rng(1).normal(size=(H, A)))
        n, d, s, beta = 6, 2, 3, 5.0
        ours, _ = fc.sample(policy, jnp.zeros(1), noise=noise, num_steps=n,
                            placement=fc.RealTimeChunking(left, d, s, max_guidance_weight=beta))
        m, sd = np.asarray(mean), 0.5
        y = np.concatenate([np.asarray(left), np.zeros((s, A))])
        w = paper_weights(d, s, H, "exp")[:, None]
        x = np.asarray(noise)
        for k in range(n):
            tau = k / n
            var = (1 - tau) ** 2 + tau**2 * sd**2
            alpha = tau * sd**2 / var
            a_hat = m + alpha * (x - tau * m)
            eps_hat = (1 - tau) / var * (x - tau * m)
            # d A_hat / d x = alpha, per entry (the denoiser is linear and diagonal).
            pull = paper_guidance_weight(tau, beta) * alpha * w * (y - a_hat)
            guided_v = (a_hat - eps_hat) + pull
            x = x + guided_v / n
        np.testing.assert_allclose(np.asarray(ours), x, rtol=1e-9, atol=1e-9)


def test_guidance_pulls_the_prefix_onto_the_leftover():
    policy = GaussianPolicy(jnp.zeros((H, A)), jnp.asarray(1.0), fc.OpenPI())
    left = 3.0 + leftover(rows=4)
    noise = jax.random.normal(jax.random.key(2), (64, H, A))
    obs = jnp.zeros((64, 1))
    plain, _ = fc.sample(policy, obs, noise=noise)
    rtc, info = fc.sample(policy, obs, noise=noise, placement=fc.RealTimeChunking(left, 2, 4))
    gap = lambda x: float(jnp.mean(jnp.abs(x[:, :2] - left[None, :2])))  # noqa: E731
    assert gap(rtc) < 0.25 * gap(plain)
    # The denoiser is diagonal, so rows of weight 0 (from H - s = 4 on) get no guidance:
    # they are the plain sampler's, not pulled towards the zero padding.
    np.testing.assert_allclose(rtc[:, 4:], plain[:, 4:], rtol=1e-5, atol=1e-5)
    assert info.placement.weights.shape == (64, H)


@pytest.mark.parametrize("batched", [False, True])
def test_zero_weights_are_the_plain_sampler_bit_for_bit(batched):
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([[0.3, -0.7], [1.0, 2.0]]) if batched else jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), ((2,) if batched else ()) + (H, A))
    plain, _ = fc.sample(policy, obs, noise=noise, num_steps=4)
    left = leftover(rows=4, batch=2 if batched else None)
    for rtc in [fc.RealTimeChunking(left, 0, 4, prefix_attention_schedule="zeros"),
                fc.RealTimeChunking(left, 2, 4, max_guidance_weight=0.0)]:
        out, info = fc.sample(policy, obs, noise=noise, num_steps=4, placement=rtc)
        assert bitwise_equal(out, plain)
        assert int(jnp.sum(info.placement.guidance.num_applied)) == 0


def test_batched_leftovers_are_per_sample():
    policy = mlp_policy(fc.Reverse())
    obs = jnp.array([[0.3, -0.7], [1.0, 2.0]])
    noise = jax.random.normal(jax.random.key(5), (2, H, A))
    left = leftover(rows=4, batch=2)
    both, _ = fc.sample(policy, obs, noise=noise, placement=fc.RealTimeChunking(left, 2, 4))
    for i in range(2):
        one, _ = fc.sample(policy, obs[i], noise=noise[i],
                           placement=fc.RealTimeChunking(left[i], 2, 4))
        np.testing.assert_allclose(both[i], one, rtol=1e-5, atol=1e-5)


def test_hard_prefix_copies_the_committed_actions():
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    left = leftover(rows=4)
    soft, _ = fc.sample(policy, obs, noise=noise, placement=fc.RealTimeChunking(left, 3, 4))
    hard, _ = fc.sample(policy, obs, noise=noise,
                        placement=fc.RealTimeChunking(left, 3, 4, hard_prefix=True))
    assert bitwise_equal(hard[:3], left[:3])
    assert bitwise_equal(hard[3:], soft[3:])
    assert not np.allclose(soft[:3], left[:3])


def test_a_non_finite_leftover_never_reaches_the_robot():
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    plain, _ = fc.sample(policy, obs, noise=noise)
    left = leftover(rows=4).at[1, 2].set(jnp.nan)
    soft, info = fc.sample(policy, obs, noise=noise, placement=fc.RealTimeChunking(left, 2, 4))
    # Every guided step was not finite, so each took the plain step, and said so.
    assert int(info.placement.guidance.num_skipped) == 10
    assert bitwise_equal(soft, plain)
    hard, info = fc.sample(policy, obs, noise=noise,
                           placement=fc.RealTimeChunking(left, 2, 4, hard_prefix=True))
    assert bool(info.fell_back) and bitwise_equal(hard, plain)


def test_new_values_do_not_recompile():
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(placement):
        return fc.sample(policy, obs, noise=noise, num_steps=3, placement=placement)[0]

    outs = []
    for i, (d, s, sched, beta, hard) in enumerate(
        [(2, 4, "exp", 5.0, False), (1, 3, "linear", 2.0, True), (0, 4, "zeros", 1.0, False),
         (4, 4, "ones", 10.0, True)]
    ):
        left = leftover(seed=i, rows=4)  # the leftover keeps its shape; values change
        outs.append(run(fc.RealTimeChunking(left, d, s, prefix_attention_schedule=sched,
                                            max_guidance_weight=beta, hard_prefix=hard)))
    assert len({np.asarray(o).tobytes() for o in outs}) == 4


def test_works_under_bestofn():
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([[0.3, -0.7], [1.0, 2.0]])
    left = leftover(rows=4, batch=2)
    energy = lambda ctx, a: jnp.sum(a**2)  # noqa: E731
    out, info = fc.sample(policy, obs, jax.random.key(0), batch_size=2, energy=energy,
                          placement=fc.BestOfN(3, fc.RealTimeChunking(left, 2, 4)))
    assert out.shape == (2, H, A) and info.placement.inner.weights.shape == (2, H)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,kwargs,match", [
    ((leftover(rows=4), 5, 4), {}, "inference_delay"),  # d > the leftover
    ((leftover(rows=4), -1, 4), {}, "inference_delay"),
    ((leftover(rows=4), 1.5, 4), {}, "inference_delay"),
    ((leftover(rows=4), True, 4), {}, "inference_delay"),
    ((leftover(rows=4), jnp.array([1, 2]), 4), {}, "inference_delay"),
    ((leftover(rows=4), 1, 0), {}, "execution_horizon"),
    ((jnp.zeros(3), 0, 4), {}, "prev_chunk_left_over"),
    ((jnp.zeros((0, 3)), 0, 4), {}, "prev_chunk_left_over"),
    ((jnp.zeros((4, 3), jnp.int32), 0, 4), {}, "prev_chunk_left_over"),
    (([[0.0] * 3] * 4, 1, 4), {}, "prev_chunk_left_over"),
    ((leftover(rows=4), 1, 4), {"prefix_attention_schedule": "cosine"}, "prefix_attention"),
    ((leftover(rows=4), 1, 4), {"max_guidance_weight": -1.0}, "max_guidance_weight"),
    ((leftover(rows=4), 1, 4), {"max_guidance_weight": float("nan")}, "max_guidance_weight"),
])
def test_bad_arguments_name_themselves(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fc.RealTimeChunking(*args, **kwargs)


@pytest.mark.parametrize("args,match", [
    ((jnp.zeros((4, 2)), 1, 4), "prev_chunk_left_over"),  # wrong action_dim
    ((jnp.zeros((9, 3)), 1, 4), "prev_chunk_left_over"),  # longer than the horizon
    ((jnp.zeros((3, 4, 3)), 1, 4), "prev_chunk_left_over"),  # batch 3 vs 2
    ((leftover(rows=6), 5, 4), "inference_delay"),  # d > H - s
    ((leftover(rows=4), 1, 9), "execution_horizon"),  # s > H
])
def test_bad_arguments_for_this_policy(args, match):
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([[0.3, -0.7], [1.0, 2.0]])
    # Shapes and known values (d > H - s, s > H) are checked before tracing: a plain
    # ValueError (traced values are tested in test_edges_robot.py).
    with pytest.raises(ValueError, match=match):
        fc.sample(policy, obs, jax.random.key(0), batch_size=2,
                  placement=fc.RealTimeChunking(*args))


# --------------------------------------------------------------------------- executor
def numbered_chunk(k: int, horizon: int, batch=()) -> np.ndarray:
    """Chunk `k` whose row `r` holds (k, r): the executed sequence says which ran."""
    rows = np.stack([np.full(horizon, k), np.arange(horizon)], axis=-1).astype(float)
    return np.broadcast_to(rows, (*batch, horizon, 2)).copy()


@st.composite
def queue_sizes(draw):
    """(horizon, s, d) with d <= s and d <= horizon - s, including d = s = horizon / 2."""
    s = draw(st.integers(1, 6))
    d = draw(st.integers(0, s))
    horizon = draw(st.integers(s + d, 12)) if s + d <= 12 else s + d
    return max(horizon, 1), s, d


@LAW
@given(sizes=queue_sizes(), steps=st.integers(1, 40))
def test_executor_runs_the_right_actions(sizes, steps):
    horizon, s, d = sizes
    queue = fc.rtc.ActionQueue(s, d)
    requests = []
    executed = []
    for t in range(steps):
        if queue.inference_due:
            req = queue.request()
            requests.append((t, req))
            queue.submit(numbered_chunk(len(requests) - 1, horizon))
        action, switched = queue.pop()
        executed.append((int(action[0]), int(action[1]), switched))
    for t, (k, r, switched) in enumerate(executed):
        k_expected = max(0, (t - d) // s)
        assert (k, r) == (k_expected, t - k_expected * s)
        assert switched == (k_expected >= 1 and t == k_expected * s + d)
    for k, (t, req) in enumerate(requests):
        assert t == k * s and req.step == t and req.inference_delay == d
        if k == 0:
            assert req.prev_chunk_left_over is None
        else:  # the previous chunk from row s on, in the new frame
            np.testing.assert_array_equal(req.prev_chunk_left_over,
                                          numbered_chunk(k - 1, horizon)[s:])


@pytest.mark.parametrize("horizon,s,d", [(8, 4, 4), (8, 4, 0), (2, 1, 1)])
def test_executor_delay_equal_to_execution_horizon(horizon, s, d):
    # Each chunk runs exactly s actions and the requests come every s steps.
    test_executor_runs_the_right_actions.hypothesis.inner_test((horizon, s, d), 6 * s + 1)


def test_executor_batched_and_measured_delay():
    queue = fc.rtc.ActionQueue(3, 1, simulate_delay=False)
    queue.request()
    queue.submit(numbered_chunk(0, 6, batch=(2,)))
    for _ in range(3):
        queue.pop()
    assert queue.inference_due
    req = queue.request()
    assert req.prev_chunk_left_over.shape == (2, 3, 2)
    for _ in range(2):  # the robot runs two more actions while the policy thinks
        action, switched = queue.pop()
        assert action.shape == (2, 2) and not switched
    queue.submit(numbered_chunk(1, 6, batch=(2,)))
    action, switched = queue.pop()
    assert switched and action[0].tolist() == [1.0, 2.0] and queue.measured_delays == [2]


def test_executor_errors():
    with pytest.raises(ValueError, match="inference_delay"):
        fc.rtc.ActionQueue(2, 3)
    with pytest.raises(ValueError, match="execution_horizon"):
        fc.rtc.ActionQueue(0)
    queue = fc.rtc.ActionQueue(4, 3)
    with pytest.raises(RuntimeError, match="request"):
        queue.submit(numbered_chunk(0, 6))
    queue.request()
    with pytest.raises(ValueError, match="inference_delay"):  # 3 > 6 - 4
        queue.submit(numbered_chunk(0, 6))
    queue = fc.rtc.ActionQueue(2, 0, simulate_delay=False)
    queue.request()
    queue.submit(numbered_chunk(0, 3))
    queue.pop(), queue.pop()
    queue.request()
    queue.pop()
    with pytest.raises(RuntimeError, match="ran out"):
        queue.pop()


# --------------------------------------------------------------------------- harness
def test_realtime_harness_tables_pair_settings():
    from flowcorrect.metaworld import realtime

    assert realtime.parse_setting("guided:0") == ("rtc", 0)
    with pytest.raises(ValueError, match="kind"):
        realtime.parse_setting("fast:2")

    def keys(*successes):
        return [{"success": s, "jump_at_switch": 0.1, "jump_ordinary": 0.05, "jerk": 0.2}
                for s in successes]

    results = {"sync": keys([1, 0, 1, 0], [1, 1, 0, 0]),
               "naive:2": keys([0, 0, 1, 0], [1, 0, 0, 0]),
               "rtc:2": keys([1, 1, 1, 0], [1, 1, 0, 1])}
    text, rows = realtime.table(results, 4)
    by_name = {r["name"]: r for r in rows}
    assert (by_name["naive:2"]["wins"], by_name["naive:2"]["losses"]) == (0, 2)
    assert (by_name["rtc:2"]["wins"], by_name["rtc:2"]["losses"]) == (2, 0)
    assert "rtc:2 vs naive:2: +4/-0" in text and "[2, 2]" in text


def test_example_runs_and_rtc_keeps_its_mode(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "realtime_chunking.py"
    spec = importlib.util.spec_from_file_location("example_realtime_chunking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--steps", "60"])
    (naive_jump, naive_flips), (rtc_jump, rtc_flips) = results["naive"], results["rtc"]
    assert rtc_flips == 0 < naive_flips and rtc_jump < 0.5 * naive_jump
    assert "rtc:" in capsys.readouterr().out
