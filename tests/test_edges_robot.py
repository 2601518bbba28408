"""What reaches the robot, and the arguments that decide it: the action queue, real-time
chunking's values (known and traced) and the integer, bool and number arguments of the
placements, selection rules and correctors.

The fuzz tests at the end follow tests/test_fuzz.py: seeded, `FLOWCORRECT_FUZZ_EXAMPLES`
examples (the NumPy-only executor and the eager weights get ten times as many), one
chunk shape, so the compiled sampler is reused by every example. The counts of what
ran are printed at the end of the module.
"""

import collections
import functools
import os

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc

from .test_rtc import bitwise_equal, leftover, mlp_policy

H, A = 8, 3  # test_rtc's chunk shape
NUM_STEPS = 4

EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)
FUZZ_CHEAP = settings(FUZZ, max_examples=10 * EXAMPLES)

COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if not COUNTS:
        return
    line = (f"fuzz edges ({EXAMPLES} examples per sampler test, {10 * EXAMPLES} per NumPy "
            "one, FLOWCORRECT_FUZZ_EXAMPLES): "
            + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + line)


def numbered(k: float, horizon: int = 6, batch=()) -> np.ndarray:
    """Chunk `k` whose row `r` holds (k, r)."""
    rows = np.stack([np.full(horizon, k), np.arange(horizon)], axis=-1).astype(np.float64)
    return np.broadcast_to(rows, (*batch, horizon, 2)).copy()


# --------------------------------------------------------------------------- the queue
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_submit_refuses_non_finite_chunks(bad):
    queue = fc.rtc.ActionQueue(2, 1)
    queue.request()
    chunk = numbered(0)
    chunk[3, 1] = bad
    with pytest.raises(ValueError, match=r"`chunk` has 1 non-finite entries.*\(3, 1\)"):
        queue.submit(chunk)
    # Refused without a trace: the same request takes a good chunk.
    queue.submit(numbered(0))
    assert queue.pop()[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("chunk,match", [
    (np.full((6, 2), "0.5"), "dtype <U3"),
    (np.full((6, 2), 0.5, dtype=object), "dtype object"),
    (np.ones((6, 2), bool), "dtype bool"),
    (np.ones((6, 2), complex), "dtype complex128"),
    ([[0.0, 1.0], [2.0]], "not an array of numbers"),
    ([["a", "b"]] * 6, "dtype <U1"),
])
def test_submit_refuses_chunks_that_are_not_real_numbers(chunk, match):
    queue = fc.rtc.ActionQueue(2, 1)
    queue.request()
    with pytest.raises(TypeError, match=rf"`chunk`.*{match}"):
        queue.submit(chunk)


def test_submit_copies_the_chunk_and_pop_hands_out_copies():
    queue = fc.rtc.ActionQueue(2, 1)
    queue.request()
    buffer = numbered(0)
    queue.submit(buffer)
    buffer[:] = -1.0  # a caller reusing its buffer for the next inference
    action, _ = queue.pop()
    assert action.tolist() == [0.0, 0.0]
    action[:] = 7.0  # a caller editing the action in place (clipping it, say)
    assert queue.pop()[0].tolist() == [0.0, 1.0]
    np.testing.assert_array_equal(queue.request().prev_chunk_left_over, numbered(0)[2:])


def test_a_second_submit_is_refused_unless_it_replaces():
    queue = fc.rtc.ActionQueue(2, 1)
    queue.request()
    queue.submit(numbered(0))
    with pytest.raises(RuntimeError, match="taken over"):  # the first chunk runs at once
        queue.submit(numbered(9), replace=True)
    queue.pop(), queue.pop()
    queue.request()
    queue.submit(numbered(1))
    with pytest.raises(RuntimeError, match=r"already submitted.*replace=True"):
        queue.submit(numbered(2))
    with pytest.raises(TypeError, match="`replace` must be True or False|parameter .replace."):
        queue.submit(numbered(2), replace="yes")
    queue.submit(numbered(2), replace=True)  # before the delay of 1 step has passed
    assert queue.pop() == (pytest.approx([0.0, 2.0]), False)  # the committed action
    action, switched = queue.pop()
    assert switched and action.tolist() == [2.0, 1.0]  # the replacement, at row d = 1
    with pytest.raises(RuntimeError, match="taken over"):
        queue.submit(numbered(3), replace=True)


def test_measured_delay_takes_over_at_submit_so_nothing_can_be_replaced():
    queue = fc.rtc.ActionQueue(2, 1, simulate_delay=False)
    queue.request()
    queue.submit(numbered(0))
    queue.pop(), queue.pop()
    queue.request()
    queue.pop()
    queue.submit(numbered(1))
    with pytest.raises(RuntimeError, match="taken over"):
        queue.submit(numbered(2), replace=True)
    assert queue.pop()[0].tolist() == [1.0, 1.0] and queue.measured_delays == [1]


# --------------------------------------------------------------------------- RTC, traced
@functools.cache
def _plain_and_rtc(left_rows: int):
    """The policy, its plain chunk, a leftover and a sampler compiled once for traced
    (d, s, beta)."""
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    plain, _ = fc.sample(policy, obs, noise=noise, num_steps=NUM_STEPS)
    left = leftover(rows=left_rows)

    @eqx.filter_jit
    def rtc(d, s, beta):
        return fc.sample(policy, obs, noise=noise, num_steps=NUM_STEPS,
                         placement=fc.RealTimeChunking(left, d, s, max_guidance_weight=beta))

    return policy, plain, left, rtc


@pytest.mark.parametrize("jit", [jax.jit, eqx.filter_jit], ids=["jax.jit", "filter_jit"])
def test_a_bad_traced_guidance_weight_takes_the_plain_steps_and_says_so(jit):
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    plain, _ = fc.sample(policy, obs, noise=noise, num_steps=NUM_STEPS)
    left = leftover(rows=4)
    run = jit(lambda beta: fc.sample(
        policy, obs, noise=noise, num_steps=NUM_STEPS,
        placement=fc.RealTimeChunking(left, 2, 4, max_guidance_weight=beta)))
    good, info = run(jnp.float32(5.0))
    assert int(info.placement.guidance.num_applied) == NUM_STEPS
    assert not np.allclose(good, plain, rtol=1e-3, atol=1e-3)  # guidance does move it
    for beta in [-5.0, -1e-30, np.nan, np.inf, -np.inf]:
        out, info = run(jnp.float32(beta))
        # Never guided away from the committed actions: the plain chunk, flagged.
        assert bitwise_equal(out, plain), beta
        assert int(info.placement.guidance.num_skipped) == NUM_STEPS
        assert int(info.placement.guidance.num_applied) == 0


def test_pigdm_weight_is_nan_for_a_bad_traced_beta():
    weight = jax.jit(lambda beta, t: fc.rtc.PiGDMWeight(beta)(t, fc.OpenPI()))
    for t in [0.0, 0.5, 1.0]:
        assert float(weight(jnp.float32(3.0), jnp.float32(t))) <= 3.0
        for beta in [-5.0, np.nan, np.inf]:
            assert np.isnan(float(weight(jnp.float32(beta), jnp.float32(t))))


@pytest.mark.parametrize("d,s,match", [
    (7, 2, "inference_delay"),  # d > H - s = 6
    (-1, 2, "inference_delay"),
    (2, 9, "execution_horizon"),  # s > H
    (0, 0, "execution_horizon"),
])
@pytest.mark.parametrize("jit", [jax.jit, eqx.filter_jit], ids=["jax.jit", "filter_jit"])
def test_traced_delay_and_execution_horizon_are_checked_at_run_time(d, s, match, jit):
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    noise = jax.random.normal(jax.random.key(5), (H, A))
    left = leftover(rows=H)
    # The default hard_prefix=False: nothing but the weights reads the delay.
    run = jit(lambda d, s: fc.sample(policy, obs, noise=noise, num_steps=NUM_STEPS,
                                     placement=fc.RealTimeChunking(left, d, s))[0])
    assert bool(jnp.all(jnp.isfinite(run(jnp.int32(6), jnp.int32(2)))))
    # jax.jit surfaces the callback's error as a ValueError, filter_jit as a RuntimeError.
    with pytest.raises((RuntimeError, ValueError), match=match):
        jax.block_until_ready(run(jnp.int32(d), jnp.int32(s)))


def test_traced_delay_beyond_the_leftover_is_checked_at_run_time():
    _, _, _, rtc = _plain_and_rtc(4)
    with pytest.raises(RuntimeError, match=r"inference_delay.*4 actions left"):
        jax.block_until_ready(rtc(jnp.int32(5), jnp.int32(1), jnp.float32(5.0)))


def test_traced_prefix_weights_are_checked_at_run_time():
    weights = eqx.filter_jit(lambda d, s: fc.rtc.rtc_prefix_weights(H, d, s))
    # Compiled and eager float32 may differ in the last bit.
    np.testing.assert_allclose(weights(jnp.int32(2), jnp.int32(4)),
                               fc.rtc.rtc_prefix_weights(H, 2, 4), rtol=1e-6, atol=1e-7)
    for d, s, match in [(1, 100, "execution_horizon"), (7, 2, "inference_delay"),
                        (-1, 2, "inference_delay")]:
        with pytest.raises(RuntimeError, match=match):
            jax.block_until_ready(weights(jnp.int32(d), jnp.int32(s)))


# --------------------------------------------------------------------------- RTC, known
@pytest.mark.parametrize("args,match", [
    ((H, 1, 100), r"`execution_horizon` 100 exceeds the chunk's horizon 8"),
    ((H, 7, 2), r"`inference_delay` 7 exceeds horizon - execution_horizon = 8 - 2"),
    ((-1, 1, 2), r"`horizon` must be an int >= 1.*got -1"),
    ((0, 0, 1), r"`horizon` must be an int >= 1.*got 0"),
    ((2.5, 1, 2), r"`horizon` must be an int >= 1.*float 2\.5"),
    (("8", 1, 2), r"`horizon` must be an int.*str '8'"),
    ((True, 0, 1), r"`horizon` must be an int.*boolean"),
    ((H, 10**12, 2), r"`inference_delay`.*2\*\*31 - 1.*1000000000000"),
    ((H, None, 2), r"`inference_delay` must be an int.*None"),
    ((H, 1, "2"), r"`execution_horizon` must be an int.*str '2'"),
])
def test_prefix_weights_refuse_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fc.rtc.rtc_prefix_weights(*args)


@pytest.mark.parametrize("d,s,kwargs,match", [
    (10**12, 2, {}, r"`inference_delay` must be an int >= 0.*2\*\*31 - 1.*1000000000000"),
    ("2", 2, {}, r"`inference_delay` must be an int.*str '2'"),
    (None, 2, {}, r"`inference_delay` must be an int.*None"),
    (np.array(10**12), 2, {}, r"`inference_delay` must be an int from 0 to 2\*\*31 - 1"),
    (1, 10**12, {}, r"`execution_horizon`.*2\*\*31 - 1"),
    (1, 2, {"hard_prefix": "no"}, r"`hard_prefix` must be True or False.*str 'no'"),
    (1, 2, {"hard_prefix": 1}, r"`hard_prefix` must be True or False.*int 1"),
    (1, 2, {"hard_prefix": None}, r"`hard_prefix` must be True or False"),
])
def test_realtime_chunking_refuses_bad_arguments_naming_them(d, s, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fc.RealTimeChunking(leftover(rows=4), d, s, **kwargs)


@pytest.mark.parametrize("build,match", [
    (lambda: fc.RealTimeChunking(leftover(rows=4), 1, 2, max_guidance_weight="5"),
     r"RealTimeChunking `max_guidance_weight` must be a number.*str '5'"),
    (lambda: fc.rtc.PiGDMWeight("5"), r"PiGDMWeight `max_guidance_weight` must be a number"),
    (lambda: fc.Ensemble([fc.SquaredDistance()], pessimism="1"),
     r"Ensemble `pessimism` must be a number.*str '1'"),
    (lambda: fc.Ensemble([fc.SquaredDistance()], pessimism=True),
     r"Ensemble `pessimism` must be a number, not a boolean"),
])
def test_a_string_is_never_a_number(build, match):
    with pytest.raises(TypeError, match=match):
        build()


@pytest.mark.parametrize("placement", [
    lambda: fc.RealTimeChunking(leftover(rows=6), 5, 4),  # d > H - s
    lambda: fc.RealTimeChunking(leftover(rows=4), 1, 9),  # s > H
    lambda: fc.BestOfN(2, fc.RealTimeChunking(leftover(rows=6), 5, 4)),
    lambda: fc.PostHoc(fc.reference_recipe(), fc.RealTimeChunking(leftover(rows=6), 5, 4)),
])
def test_known_values_are_checked_before_tracing(placement):
    policy = mlp_policy(fc.OpenPI())
    obs = jnp.array([0.3, -0.7])
    with pytest.raises(ValueError, match="exceeds") as caught:
        fc.sample(policy, obs, jax.random.key(0), placement=placement(),
                  energy=lambda c, a: jnp.sum(a**2))
    # A plain ValueError, not the run-time error of a check inside the compiled function.
    assert type(caught.value) is ValueError
    assert "horizon" in str(caught.value)


# --------------------------------------------------------------------------- counts
def test_numpy_integers_are_counts_everywhere():
    assert fc.BestOfN(np.int64(8)).n == 8 and type(fc.BestOfN(np.int64(8)).n) is int
    early = fc.BestOfN(np.int64(4), select=fc.Medoid(), rank_at=np.int32(2))
    assert (early.n, early.rank_at) == (4, 2) and type(early.rank_at) is int
    assert type(fc.NearMean(np.int64(3)).k) is int and fc.ClusterMean(np.int16(3)).k == 3
    assert fc.Repeat(fc.GradientStep(), np.uint8(2)).num_steps == 2
    # What the stricter checks must still accept.
    left = leftover(rows=4)
    for hard in [True, np.True_, jnp.asarray(True), np.asarray(False)]:
        rtc = fc.RealTimeChunking(left, np.int64(2), np.int32(4), hard_prefix=hard)
        assert rtc.hard_prefix.dtype == bool and rtc.inference_delay.dtype == jnp.int32
    assert float(fc.Ensemble([fc.SquaredDistance()], pessimism=np.float32(2)).pessimism) == 2.0


@pytest.mark.parametrize("build,name", [
    (lambda v: fc.BestOfN(v), "BestOfN `n`"),
    (lambda v: fc.BestOfN(v, rank_at=1), "BestOfN `n`"),
    (lambda v: fc.BestOfN(4, rank_at=v), "BestOfN `rank_at`"),
    (lambda v: fc.NearMean(v), "NearMean `k`"),
    (lambda v: fc.ClusterMean(v), "ClusterMean `k`"),
    (lambda v: fc.Repeat(fc.GradientStep(), v), "Repeat `num_steps`"),
    (lambda v: fc.Backtrack(fc.GradientStep(), v), "Backtrack `max_halvings`"),
    (lambda v: fc.Mask(fc.GradientStep(), horizon=v), "Mask `horizon`"),
])
@pytest.mark.parametrize("value,what", [
    (10**12, r"at most 2\*\*31 - 1"),
    (2**31, r"at most 2\*\*31 - 1"),
    (np.int64(2**40), r"at most 2\*\*31 - 1"),
])
def test_counts_too_large_for_int32_are_refused(build, name, value, what):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= \d.*{what}"):
        build(value)


@pytest.mark.parametrize("build,name", [
    (lambda v: fc.BestOfN(v), "`n`"),
    (lambda v: fc.BestOfN(4, rank_at=v), "`rank_at`"),
    (lambda v: fc.NearMean(v), "`k`"),
])
@pytest.mark.parametrize("value", [True, np.True_, "8", 8.0, None, np.array(8)])
def test_counts_refuse_bools_strings_floats_and_arrays(build, name, value):
    if value is None and name == "`rank_at`":
        return  # rank_at=None is BestOfN's default: rank the finished candidates
    # Refused by this check or, in the test run, by the runtime type check of a field
    # annotated `int`; either way a TypeError (the library's is also a ValueError).
    with pytest.raises(TypeError, match=rf"{name}|parameter|type hint"):
        build(value)


def test_count_errors_are_type_and_value_errors():
    with pytest.raises(TypeError) as as_type:
        fc.BestOfN("8")
    assert isinstance(as_type.value, ValueError)
    with pytest.raises(ValueError, match=r"fc.sample `num_steps` must be an int >= 1"):
        fc.sample(mlp_policy(fc.OpenPI()), jnp.zeros(2), jax.random.key(0), num_steps=0)


# --------------------------------------------------------------------------- fuzz
BAD_CHUNKS = ("nan", "inf", "string", "object", "bool")


def _bad_chunk(kind: str, chunk: np.ndarray, row: int) -> np.ndarray:
    if kind in ("nan", "inf"):
        chunk = chunk.copy()
        chunk[row % chunk.shape[0], row % 2] = np.nan if kind == "nan" else -np.inf
        return chunk
    return chunk.astype({"string": str, "object": object, "bool": bool}[kind])


@FUZZ_CHEAP
@given(s=st.integers(1, 4), d=st.integers(0, 4), simulate=st.booleans(),
       plan=st.lists(st.sampled_from(("good", "twice", "replace", *BAD_CHUNKS)),
                     min_size=1, max_size=8),
       scribble=st.booleans(), steps=st.integers(1, 30))
def test_fuzz_executor_submit_and_pop(s, d, simulate, plan, scribble, steps):
    """Whatever a careless loop hands in, every popped action is finite and is the row
    the schedule says of the chunk that was accepted, as it was when submitted."""
    d = min(d, s)
    horizon = s + d + 1
    delay = d if simulate else 0  # a measured delay: submitted at once, so 0
    queue = fc.rtc.ActionQueue(s, d, simulate_delay=simulate)
    marks = []  # the value of column 0 of each accepted chunk
    for t in range(steps):
        if queue.inference_due:
            queue.request()
            k = len(marks)
            kind = plan[k % len(plan)]
            COUNTS[f"executor {kind}"] += 1
            buffer = numbered(k, horizon)
            if kind in BAD_CHUNKS:
                with pytest.raises((TypeError, ValueError), match="`chunk`"):
                    queue.submit(_bad_chunk(kind, buffer, t))
            queue.submit(buffer)
            mark = float(k)
            if kind in ("twice", "replace"):
                # The first chunk, a measured delay and d = 0 take over at once.
                open_ = k >= 1 and simulate and d >= 1
                with pytest.raises(RuntimeError, match="replace=True" if open_ else "taken over"):
                    queue.submit(numbered(k + 0.5, horizon))
                if kind == "replace":
                    if open_:
                        queue.submit(numbered(k + 0.5, horizon), replace=True)
                        mark = k + 0.5
                    else:
                        with pytest.raises(RuntimeError, match="taken over"):
                            queue.submit(numbered(k + 0.5, horizon), replace=True)
            if scribble:
                buffer[:] = np.nan
            marks.append(mark)
        action, switched = queue.pop()
        assert np.all(np.isfinite(action))
        k = max(0, (t - delay) // s)
        assert action.tolist() == [marks[k], t - k * s]
        if scribble:
            action[:] = np.inf


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


NOT_INTS = (2.5, 2.0, "2", None, True, False, 10**12, 2**31, np.float32(1))


@st.composite
def prefix_arguments(draw):
    """(horizon, d, s): about half of the draws valid, the rest out of range or not ints."""
    horizon = draw(st.one_of(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10),
                             st.integers(-2, 0), st.sampled_from(NOT_INTS)))
    h = horizon if _is_int(horizon) and horizon >= 1 else 8
    s = draw(st.one_of(st.integers(1, h), st.integers(1, h), st.integers(1, h),
                       st.integers(-1, h + 2), st.sampled_from(NOT_INTS)))
    room = h - s if _is_int(s) and 1 <= s <= h else 0
    d = draw(st.one_of(st.integers(0, room), st.integers(0, room), st.integers(0, room),
                       st.integers(-2, h + 2), st.sampled_from(NOT_INTS)))
    return horizon, d, s


@st.composite
def rtc_values(draw):
    """(d, s, beta) for a horizon of H and a leftover of 6 rows, about half valid."""
    s = draw(st.one_of(st.integers(1, H), st.integers(1, H), st.integers(-1, H + 1)))
    room = min(H - s, 6) if 1 <= s <= H else 0
    d = draw(st.one_of(st.integers(0, room), st.integers(0, room), st.integers(-2, H + 1)))
    beta = draw(st.one_of(st.sampled_from([5.0, 0.5, 2.0, 0.0]),
                          st.sampled_from([-5.0, -1e-6, np.nan, np.inf, -np.inf])))
    return d, s, beta


@FUZZ_CHEAP
@given(args=prefix_arguments(), schedule=st.sampled_from(fc._rtc.SCHEDULES))
def test_fuzz_prefix_weights_untraced(args, schedule):
    """Valid arguments give the paper's weights' invariants; every invalid one a clear
    error naming an argument."""
    horizon, d, s = args
    valid = (all(_is_int(v) and v < 2**31 for v in (horizon, d, s)) and horizon >= 1
             and d >= 0 and 1 <= s <= horizon and d <= horizon - s)
    COUNTS[f"weights {'valid' if valid else 'refused'}"] += 1
    if not valid:
        with pytest.raises(ValueError, match="`(horizon|inference_delay|execution_horizon)`"):
            fc.rtc.rtc_prefix_weights(horizon, d, s, schedule)
        return
    w = np.asarray(fc.rtc.rtc_prefix_weights(horizon, d, s, schedule))
    assert w.shape == (horizon,) and np.all((w >= 0) & (w <= 1))
    assert np.all(w[:d] == 1) and np.all(w[horizon - s:] == 0)


@FUZZ
@given(values=rtc_values())
def test_fuzz_realtime_chunking_known_values(values):
    """Known values: a plain ValueError naming the argument before anything compiles,
    or a finite chunk."""
    d, s, beta = values
    policy, _, left, _ = _plain_and_rtc(6)
    valid_d = 0 <= d <= left.shape[0]
    valid = valid_d and 1 <= s <= H and d <= H - s and np.isfinite(beta) and beta >= 0
    COUNTS[f"rtc known {'valid' if valid else 'refused'}"] += 1

    def run():
        placement = fc.RealTimeChunking(left, d, s, max_guidance_weight=beta)
        return fc.sample(policy, jnp.array([0.3, -0.7]), noise=jnp.ones((H, A)),
                         num_steps=NUM_STEPS, placement=placement)

    if not valid:
        with pytest.raises(ValueError, match="inference_delay|execution_horizon|max_guidance") \
                as caught:
            run()
        assert type(caught.value) in (ValueError, fc._misc.ArgumentTypeError)
        return
    out, info = run()
    assert bool(jnp.all(jnp.isfinite(out))) and not bool(info.fell_back)


@FUZZ
@given(values=rtc_values())
def test_fuzz_realtime_chunking_traced_values(values):
    """Traced values, one compile for all examples: a run-time error naming the delay or
    the execution horizon; else a finite chunk, and with a bad weight the plain chunk
    with every step counted as skipped."""
    d, s, beta = values
    _, plain, left, rtc = _plain_and_rtc(6)
    valid_timing = 1 <= s <= H and 0 <= d <= H - s and d <= left.shape[0]
    good_beta = bool(np.isfinite(beta) and beta >= 0)
    if not valid_timing:
        COUNTS["rtc traced refused"] += 1
        with pytest.raises(RuntimeError, match="inference_delay|execution_horizon"):
            jax.block_until_ready(rtc(jnp.int32(d), jnp.int32(s), jnp.float32(beta)))
        return
    out, info = rtc(jnp.int32(d), jnp.int32(s), jnp.float32(beta))
    counts = info.placement.guidance
    assert bool(jnp.all(jnp.isfinite(out)))
    weights_on = bool(jnp.any(info.placement.weights != 0))
    if not weights_on or beta == 0:
        COUNTS["rtc traced off"] += 1
        assert bitwise_equal(out, plain) and int(counts.num_applied) == 0
    elif not good_beta:
        COUNTS["rtc traced bad weight"] += 1
        assert bitwise_equal(out, plain) and int(counts.num_skipped) == NUM_STEPS
    else:
        COUNTS["rtc traced guided"] += 1
        assert int(counts.num_applied) == NUM_STEPS

