"""What a client may send a served openpi policy: checked in plain Python, before any work.

`flowcorrect.openpi`'s request checks import no openpi, so these run everywhere; the
same checks through openpi's `Policy`, server and client are in tests/test_openpi.py.
The fuzz tests here draw whole option dicts (any keys, types and values) and whole
observations, and hold every request to one promise: it is either refused with a
`RequestError` that names what was wrong, or every setting is within the server's
limits and the placement it asks for builds. Counts are printed at the end.
"""

import collections
import dataclasses
import math
import os

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc
from flowcorrect.openpi import (
    RequestError,
    ServerLimits,
    check_observation,
    parse_request,
    placement_from_options,
    placement_from_request,
)
from flowcorrect.openpi._episodes import Episodes, episode_key

HORIZON, NUM_STEPS = 50, 10
LIMITS = ServerLimits()
EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
# Parsing is pure Python: many examples cost little.
REQUEST_FUZZ = settings(
    max_examples=max(300, 25 * EXAMPLES), derandomize=True, database=None, deadline=None
)
COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if COUNTS:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\nrequest fuzz: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


def parse(options, *, has_energy=True, limits=LIMITS, has_constraint=False):
    return parse_request(
        options, limits=limits, horizon=HORIZON, num_steps=NUM_STEPS, has_energy=has_energy,
        has_constraint=has_constraint,
    )


# -- the cases that once locked or misled a server -------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"placement": "post_hoc", "steps": 10**9}, r"'steps' must be an int in \[0, 20\]"),
        ({"placement": "denoised", "steps": 21}, r"'steps' must be an int in \[0, 20\]"),
        ({"placement": "guided", "last": 10**9}, r"'last' must be an int in \[1, 10\]"),
        ({"placement": "guided", "last": 10**10}, r"'last' must be an int in \[1, 10\]"),
        ({"placement": "guided", "last": 0}, r"'last' must be an int in \[1, 10\]"),
        ({"placement": "best_of_n", "n": 10**9}, r"'n' must be an int in \[1, 64\]"),
        ({"placement": "guided", "weight": math.inf}, r"'weight' must be a finite number"),
        ({"placement": "guided", "weight": math.nan}, r"'weight' must be a finite number"),
        ({"placement": "guided", "weight": -1.0}, r"'weight' .* in \[0.0, 100.0\]"),
        ({"placement": "denoised", "weight": 1e300}, r"'weight' .* got 1e\+300"),
        ({"placement": "post_hoc", "alpha": math.nan}, r"'alpha' must be a finite number"),
        ({"placement": "post_hoc", "clip_frac": 0.0}, r"'clip_frac' .* in \(0.0, 1.0\]"),
        ({"placement": "guided", "cap": 0}, r"'cap' .* in \(0.0"),
        ({"placement": "post_hoc", "steps": True}, r"'steps' must be an int"),
        ({"placement": "post_hoc", "steps": 3.0}, r"'steps' must be an int"),
        ({"placement": "post_hoc", "steps": "3"}, r"'steps' must be an int"),
        ({"placement": "post_hoc", "alpha": "0.1"}, r"'alpha' must be a finite number"),
        ({"placement": "post_hoc", "alpha": True}, r"'alpha' must be a finite number"),
        ({"placement": "post_hoc", "first_only": "no"}, r"'first_only' must be true or false"),
        ({"placement": "post_hoc", "first_only": 1}, r"'first_only' must be true or false"),
        (
            {"placement": "rtc", "inference_delay": 45, "execution_horizon": 10},
            r"'inference_delay' must be an int in \[0, 40\].*50 - 10",
        ),
        (
            {"placement": "rtc", "inference_delay": 0, "execution_horizon": 51},
            r"'execution_horizon' must be an int in \[1, 50\]",
        ),
        (
            {"placement": "rtc", "inference_delay": 2, "execution_horizon": 5,
             "max_guidance_weight": -5.0},
            r"'max_guidance_weight' .* in \[0.0, 100.0\]",
        ),
        (
            {"placement": "rtc", "inference_delay": 2, "execution_horizon": 5,
             "hard_prefix": "no"},
            r"'hard_prefix' must be true or false",
        ),
        (
            {"placement": "rtc", "inference_delay": 2, "execution_horizon": 5,
             "prefix_attention_schedule": "cubic"},
            r"'prefix_attention_schedule' must be one of",
        ),
        ({"placement": "rtc", "inference_delay": 2}, r"needs 'inference_delay' and"),
        ({"placement": "best_of_n", "select": "vote"}, r"'select' must be one of"),
        ({"placement": "best_of_n", "k": 2}, r"'k' belongs to select='near_mean'"),
        (
            {"placement": "best_of_n", "n": 4, "select": "near_mean", "k": 5},
            r"'k' must be an int in \[1, 4\]",
        ),
        ({"placement": "post_hoc", "alpah": 0.1}, r"Unknown correction options .*\['alpah'\]"),
        ({"placement": "sideways"}, r"'placement' must be one of \['off'"),
        ({"placement": ["post_hoc"]}, r"'placement' must be one of"),
        ({"steps": 3}, r"\['steps'\] need 'placement'"),
        ({"done": True}, r"must name its 'episode'"),
        ({"episode": "a", "done": True, "placement": "off"}, r"takes only 'episode' and"),
        ({"episode": "a", "success": True}, r"send it with 'done': true"),
        ({"episode": "", "placement": "off"}, r"'episode' must be a non-empty string"),
        ({"episode": "x" * 129, "placement": "off"}, r"at most 128 characters"),
        ({"episode": 1.5, "placement": "off"}, r"'episode' must be"),
        ({"episode": "a", "reset": "yes", "placement": "off"}, r"'reset' must be true or"),
        ({"executed": 5}, r"'executed' refers to the episode's previous chunk"),
        ({"episode": "a", "executed": 0}, r"'executed' .* an int from 1 to the horizon 50"),
        ({"episode": "a", "executed": 51, "placement": "off"}, r"from 1 to the horizon"),
        ({"episode": "a", "executed": 2.0}, r"'executed' .* got 2.0"),
        ({"episode": "a", "executed": True}, r"'executed' .* an int"),
        ({"episode": "a", "done": True, "executed": 3}, r"takes only 'episode' and"),
        (
            {"episode": "a", "executed": 5, "placement": "rtc", "inference_delay": 2,
             "execution_horizon": 5},
            r"'rtc' reads what was executed from its own settings",
        ),
        ({1: "x"}, r"keys must be strings"),
        ("post_hoc", r"must be a dict"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, match):
    with pytest.raises(RequestError, match=match):
        parse(options)


def test_energy_placements_need_an_energy():
    with pytest.raises(RequestError, match=r"'post_hoc' needs an energy or verifier"):
        parse({"placement": "post_hoc"}, has_energy=False)
    rtc = {"placement": "rtc", "inference_delay": 2, "execution_horizon": 5}
    assert parse(rtc, has_energy=False).placement == "rtc"
    assert parse({"placement": "off"}, has_energy=False).placement == "off"
    consensus = parse({"placement": "best_of_n", "select": "medoid"}, has_energy=False)
    assert consensus.settings["select"] == "medoid"  # consensus reads no energy
    with pytest.raises(RequestError, match=r"'best_of_n' needs an energy"):
        parse({"placement": "best_of_n", "select": "near_mean"}, has_energy=False)


def test_defaults_and_numpy_scalars_are_accepted():
    request = parse({"placement": "post_hoc", "steps": np.int64(5), "alpha": np.float32(0.5)})
    assert request.settings == {"steps": 5, "alpha": 0.5, "clip_frac": 0.2, "first_only": False}
    assert type(request.settings["steps"]) is int and type(request.settings["alpha"]) is float
    assert parse({"placement": "guided"}).settings == {"weight": 1.0, "last": 10, "cap": 1.0}
    near = parse({"placement": "best_of_n", "n": 8, "select": "near_mean"}).settings
    assert near == {"n": 8, "select": "near_mean", "k": 4, "feasible_first": False}
    assert parse(None).placement is None
    assert parse({"episode": 7}).episode == "7"  # an int id is a string id
    executed = parse({"episode": "a", "executed": np.int64(5)})
    assert (executed.executed, executed.placement) == (5, None)
    assert type(executed.executed) is int
    assert parse({"episode": "a", "executed": 50, "placement": "off"}).executed == 50
    assert parse({"episode": "a", "placement": "off"}).executed is None
    done = parse({"episode": "a", "done": True, "success": False})
    assert (done.done, done.success, done.episode) == (True, False, "a")


def test_the_server_owner_sets_the_limits():
    tight = ServerLimits(max_steps=2, max_candidates=4, max_weight=3.0, max_alpha=0.5)
    with pytest.raises(RequestError, match=r"\[0, 2\]"):
        parse({"placement": "post_hoc", "steps": 3}, limits=tight)
    with pytest.raises(RequestError, match=r"\[1, 4\]"):
        parse({"placement": "best_of_n", "n": 8}, limits=tight)
    with pytest.raises(RequestError, match=r"\[0.0, 3.0\]"):
        parse({"placement": "guided", "weight": 5.0}, limits=tight)
    assert parse({"placement": "post_hoc", "steps": 2}, limits=tight).settings["steps"] == 2
    for bad in ({"max_steps": 0}, {"max_steps": True}, {"max_weight": math.inf},
                {"max_candidates": -2}, {"episode_idle_s": -1.0}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}` must be a finite"):
            ServerLimits(**bad)


def test_placements_built_from_requests():
    request = parse({"placement": "best_of_n", "n": 3, "select": "medoid"})
    placement = placement_from_request(request)
    assert isinstance(placement, fc.BestOfN) and placement.n == 3
    assert isinstance(placement.select, fc.Medoid)
    near = placement_from_request(parse({"placement": "best_of_n", "select": "near_mean",
                                         "k": 2}))
    assert isinstance(near.select, fc.NearMean)
    rtc = parse({"placement": "rtc", "inference_delay": 2, "execution_horizon": 5})
    assert placement_from_request(rtc, previous=None) is None  # an episode's first chunk
    previous = np.arange(2 * HORIZON * 3, dtype=np.float32).reshape(2, HORIZON, 3)
    built = placement_from_request(rtc, previous=previous)
    assert isinstance(built, fc.RealTimeChunking)
    left = np.asarray(built.prev_chunk_left_over)
    np.testing.assert_array_equal(left[:, : HORIZON - 5], previous[:, 5:])
    assert not left[:, HORIZON - 5 :].any()
    # Training-time RTC: the same leftover, committed as it is, no guidance options.
    trt = parse({"placement": "trt", "inference_delay": 2, "execution_horizon": 5},
                has_energy=False)
    assert placement_from_request(trt, previous=None) is None
    conditioned = placement_from_request(trt, previous=previous)
    assert isinstance(conditioned, fc.rtc.PrefixConditioned)
    assert int(conditioned.inference_delay) == 2
    np.testing.assert_array_equal(np.asarray(conditioned.prev_chunk_left_over), left)
    with pytest.raises(RequestError, match=r"Unknown correction options .*max_guidance_weight"):
        parse({"placement": "trt", "inference_delay": 2, "execution_horizon": 5,
               "max_guidance_weight": 3.0})
    with pytest.raises(RequestError, match=r"Placement 'trt' needs 'inference_delay'"):
        parse({"placement": "trt", "execution_horizon": 5})
    # The older entry point: the same checks, the horizon read from `previous`.
    with pytest.raises(RequestError, match=r"\[0, 5\]"):
        placement_from_options({"placement": "rtc", "inference_delay": 6,
                                "execution_horizon": 5}, previous=previous[:, :10])
    assert placement_from_options({"placement": "off"}) is None


# -- fuzz: any option dict ---------------------------------------------------------------

_NAMES = sorted({
    "placement", "steps", "alpha", "clip_frac", "first_only", "weight", "last", "cap", "n",
    "select", "k", "inference_delay", "execution_horizon", "prefix_attention_schedule",
    "max_guidance_weight", "hard_prefix", "episode", "reset", "done", "success", "executed",
    "junk", "",
})
_VALUES = st.one_of(
    st.sampled_from(["off", "post_hoc", "denoised", "guided", "best_of_n", "rtc", "trt", "medoid",
                     "near_mean", "energy", "exp", "zeros", "ep-1", "", "nan"]),
    st.integers(-3, 70),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 120.0),
    st.booleans(),
    st.none(),
    st.builds(np.int64, st.integers(-5, 70)),
    st.builds(np.float16, st.floats(-10, 10)),
    st.builds(np.bool_, st.booleans()),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
# Near-valid values per option: mostly in range, sometimes just outside it.
_PLAUSIBLE = {
    "steps": st.integers(-1, 22),
    "alpha": st.floats(-0.1, 11.0),
    "clip_frac": st.floats(0.0, 1.1),
    "first_only": st.booleans(),
    "weight": st.floats(-0.5, 101.0),
    "last": st.integers(0, 11),
    "cap": st.floats(0.0, 3.0),
    "n": st.integers(0, 66),
    "select": st.sampled_from(["energy", "medoid", "near_mean"]),
    "k": st.integers(0, 9),
    "inference_delay": st.integers(-1, 50),
    "execution_horizon": st.integers(0, 51),
    "prefix_attention_schedule": st.sampled_from(["exp", "linear", "ones", "zeros"]),
    "max_guidance_weight": st.floats(-1.0, 101.0),
    "hard_prefix": st.booleans(),
    "feasible_first": st.booleans(),
    "episode": st.sampled_from(["a", "ep-2", 7]),
    "reset": st.booleans(),
    "executed": st.integers(0, 51),
}
# Each placement's own options, the fields of its config (a new option without a
# near-valid strategy above fails here, so the fuzz keeps up).
_OWN = {kind: tuple(f.name for f in dataclasses.fields(config))
        for kind, config in fc.configs.PLACEMENT_CONFIGS.items()}
_NEAR_VALID = st.sampled_from(sorted(_OWN)).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"placement": st.just(kind)},
        optional={k: _PLAUSIBLE[k] for k in (*_OWN[kind], "episode", "reset", "executed")},
    )
)
_OPTIONS = st.one_of(
    st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=6),
    *[_NEAR_VALID] * 4,  # drawn more often: the valid requests are the ones built
    st.builds(
        lambda kind, rest: {**rest, "placement": kind},
        st.sampled_from(["off", "post_hoc", "denoised", "guided", "best_of_n", "rtc"]),
        st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=4),
    ),
    _VALUES,
)


def _within_limits(request):
    o = request.settings
    if "steps" in o:
        assert 0 <= o["steps"] <= LIMITS.max_steps
    if "n" in o:
        assert 1 <= o["n"] <= LIMITS.max_candidates
    if "last" in o:
        assert 1 <= o["last"] <= NUM_STEPS
    for name in ("weight", "alpha", "clip_frac", "cap", "max_guidance_weight"):
        if name in o:
            assert math.isfinite(o[name]) and o[name] >= 0
    if request.placement == "rtc":
        s, d = o["execution_horizon"], o["inference_delay"]
        assert 1 <= s <= HORIZON and 0 <= d <= HORIZON - s
    if request.executed is not None:
        assert request.episode is not None and 1 <= request.executed <= HORIZON
        assert request.placement not in ("rtc", "trt")


@REQUEST_FUZZ
@given(options=_OPTIONS, has_energy=st.booleans(), has_constraint=st.booleans())
def test_fuzz_options_refused_clearly_or_valid_and_buildable(
    options, has_energy, has_constraint
):
    COUNTS["options tried"] += 1
    try:
        request = parse(options, has_energy=has_energy, has_constraint=has_constraint)
    except RequestError as e:
        COUNTS["options refused"] += 1
        assert str(e) and len(str(e)) < 600
        return
    COUNTS["options valid"] += 1
    _within_limits(request)
    if request.placement is not None and not has_energy:
        assert request.placement in ("off", "rtc", "trt", "feasible") or (
            request.settings["select"] == "medoid")
    if not has_constraint:
        assert request.placement != "feasible" and not request.settings.get("feasible_first")
    if request.done:
        assert request.episode is not None
        return
    previous = np.full((1, HORIZON, 3), 0.5, np.float32)
    constraint = fc.constraints.Box(-1.0, 1.0) if has_constraint else None
    placement = placement_from_request(request, previous=previous, constraint=constraint)
    assert placement is None or isinstance(placement, fc.AbstractPlacement)
    if placement is not None:
        placement.noise_shape((HORIZON, 3))  # the placement accepts the model's chunks


# -- observations ------------------------------------------------------------------------

_LEAVES = st.one_of(
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10),
    st.booleans(),
    st.none(),
    st.sampled_from([
        np.zeros((4, 4, 3), np.uint8),
        np.ones(8, np.float32),
        np.array([1.0, np.nan], np.float32),
        np.array([np.inf], np.float64),
        np.array(["a", "b"]),
        np.array([object()], dtype=object),
        np.zeros(3, np.complex64),
        np.zeros(LIMITS.max_array_bytes // 4 + 1, np.float32),
        np.zeros((2, 2), bool),
    ]),
    st.builds(object),
)


def _nested(inner):
    return st.dictionaries(st.text(max_size=3), inner, max_size=3)


_OBS = st.recursive(
    st.dictionaries(st.text(max_size=3), _LEAVES, max_size=3), _nested, max_leaves=6
)


@REQUEST_FUZZ
@given(obs=st.one_of(_OBS, _LEAVES))
def test_fuzz_observations_refused_clearly_or_clean(obs):
    COUNTS["observations tried"] += 1
    try:
        check_observation(obs, LIMITS)
    except RequestError as e:
        COUNTS["observations refused"] += 1
        assert str(e)
        return
    COUNTS["observations accepted"] += 1
    # Accepted: every leaf is a string or a finite numeric array within the limits.
    stack = [obs]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif not isinstance(node, str):
            leaf = np.asarray(node)
            assert leaf.dtype.kind in "biuf" and leaf.nbytes <= LIMITS.max_array_bytes
            assert leaf.dtype.kind != "f" or np.isfinite(leaf).all()


def test_observation_messages_name_the_key():
    with pytest.raises(RequestError, match=r"obs\['observation/state'\] .* 1 non-finite"):
        check_observation({"observation/state": np.array([0.0, np.nan])}, LIMITS)
    with pytest.raises(RequestError, match=r"obs\['image'\]\['cam'\] has dtype object"):
        check_observation({"image": {"cam": np.array([None])}}, LIMITS)
    with pytest.raises(RequestError, match=r"max_array_bytes"):
        check_observation({"big": np.zeros(2**24, np.float32)}, ServerLimits(max_array_bytes=2**20))
    with pytest.raises(RequestError, match=r"max_observation_bytes"):
        check_observation({"a": np.zeros(2**18, np.float32), "b": np.zeros(2**18, np.float32)},
                          ServerLimits(max_observation_bytes=2**20))
    with pytest.raises(RequestError, match=r"max_string_chars"):
        check_observation({"prompt": "x" * 10_001}, LIMITS)
    check_observation({"prompt": "pick up the cup", "image": np.zeros((8, 8, 3), np.uint8),
                       "state": np.ones(7), "mask": True}, LIMITS)


# -- episodes ----------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_episodes_are_bounded_and_expire():
    clock, dropped = Clock(), []
    limits = ServerLimits(max_episodes=3, episode_idle_s=10.0)
    episodes = Episodes(jax.random.key(0), limits, clock=clock,
                        on_drop=lambda name, _: dropped.append(name))
    for i, name in enumerate("abcd"):
        clock.now = float(i)
        episodes.commit(name, episodes.peek(name), np.full((1, 2, 2), i, np.float32))
    assert len(episodes) == 3 and "a" not in episodes and dropped == ["a"]
    clock.now = 3.5
    episodes.commit("b", episodes.peek("b"), None)  # b is now the most recent
    clock.now = 13.2  # c (used at 2) and d (at 3) are idle for more than 10 s
    assert episodes.peek("b").requests == 2
    assert dropped == ["a", "c", "d"] and len(episodes) == 1
    with pytest.raises(RequestError, match=r"Episode 'c' is not open .* 10 s idle"):
        episodes.close("c")
    assert episodes.close("b").requests == 2
    with pytest.raises(RequestError, match="not open"):
        episodes.close("b")  # a second 'done'


def test_peek_changes_nothing_and_reset_starts_afresh():
    episodes = Episodes(jax.random.key(0), LIMITS)
    first = episodes.peek("a")
    assert first.requests == 0 and first.previous is None and len(episodes) == 0
    episodes.commit("a", first, np.ones((1, 2, 2), np.float32))
    again = episodes.peek("a")
    again.requests = 99  # a copy: the stored episode is not touched until commit
    assert episodes.peek("a").requests == 1
    fresh = episodes.peek("a", reset=True)
    assert fresh.requests == 0 and fresh.previous is None
    assert episodes.peek("a").requests == 1  # a reset is committed only when served


def test_episode_keys_depend_on_the_id_only():
    seed = jax.random.key(3)
    a1, a2, b = episode_key(seed, "a"), episode_key(seed, "a"), episode_key(seed, "b")
    data = jax.random.key_data
    np.testing.assert_array_equal(data(a1), data(a2))
    assert not np.array_equal(data(a1), data(b))
    one, other = Episodes(seed, LIMITS), Episodes(seed, LIMITS)
    other.commit("x", other.peek("x"), None)  # other clients' traffic changes nothing
    np.testing.assert_array_equal(data(one.peek("a").next_rng()),
                                  data(other.peek("a").next_rng()))
    ep = one.peek("a")
    first = data(ep.next_rng())
    one.commit("a", ep, None)
    assert not np.array_equal(first, data(one.peek("a").next_rng()))


# -- recording ---------------------------------------------------------------------------


def _query(i, n=3):
    rng = np.random.default_rng(i)
    return rng.normal(size=8).astype(np.float32), rng.normal(size=(n, 5, 2)).astype(np.float32)


def test_recorder_writes_only_episodes_with_an_outcome(tmp_path):
    from flowcorrect.openpi._recording import Recorder

    recorder = Recorder(tmp_path / "r", {"model_fingerprint": "abc"}, max_bytes=2**20)
    for i in range(4):
        recorder.add("win", *_query(i))
        recorder.add("lost", *_query(10 + i))
        recorder.add("open", *_query(20 + i))
    assert recorder.finish("win", True) == 4
    assert recorder.finish("lost", False) == 4
    assert recorder.finish("open", None) == 0  # done without an outcome: not written
    rollouts = fc.verifiers.load_rollouts(tmp_path / "r")
    assert rollouts.num_episodes == 2 and rollouts.num_queries == 8
    np.testing.assert_array_equal(rollouts.observation[1], _query(1)[0])
    np.testing.assert_array_equal(rollouts.candidates[5], _query(11)[1])
    assert list(rollouts.steps_to_success) == [4, 3, 2, 1, -1, -1, -1, -1]
    assert not rollouts.executed.any()
    assert rollouts.episode_seed[0] != rollouts.episode_seed[1]
    assert recorder.status()["episodes_written"] == 2
    # A server started later on the same directory appends, with the same source only.
    again = Recorder(tmp_path / "r", {"model_fingerprint": "abc"}, max_bytes=2**20)
    again.add("next", *_query(30))
    again.finish("next", True)
    assert fc.verifiers.load_rollouts(tmp_path / "r").num_episodes == 3
    with pytest.raises(ValueError, match="collected with"):
        Recorder(tmp_path / "r", {"model_fingerprint": "other"}, max_bytes=2**20)


def test_recorder_memory_bound_and_failing_disk(tmp_path):
    from flowcorrect.openpi._recording import Recorder

    one = sum(a.nbytes for a in _query(0))
    recorder = Recorder(tmp_path / "r", {}, max_bytes=5 * one)
    for i in range(4):
        recorder.add("a", *_query(i))
    for i in range(2):
        recorder.add("b", *_query(i))  # the second would pass the bound: b is dropped
    assert recorder.finish("b", True) == 0
    recorder.add("c", *_query(0))  # b's memory was freed
    assert recorder.finish("a", True) == 4

    def full(_):
        raise OSError(28, "No space left on device")

    recorder.writer.append = full
    assert recorder.finish("c", True) == 0
    assert "No space left" in recorder.status()["error"]
    recorder.add("d", *_query(0))  # recording has stopped; nothing is held
    assert recorder.status()["episodes_in_flight"] == 0
    assert fc.verifiers.load_rollouts(tmp_path / "r").num_episodes == 1


# -- the server's constraint -------------------------------------------------------------


def test_constraint_options_need_the_servers_constraint():
    with pytest.raises(RequestError, match=r"'feasible'.*server's constraint.*none"):
        parse({"placement": "feasible"})
    with pytest.raises(RequestError, match=r"'feasible_first'.*server's constraint"):
        parse({"placement": "best_of_n", "select": "medoid", "feasible_first": True})
    # Guidance by the violation needs no energy: a server with only a constraint serves it.
    feasible = parse({"placement": "feasible"}, has_energy=False, has_constraint=True)
    assert feasible.settings == {"weight": 10.0, "last": NUM_STEPS, "cap": 1e3}
    with pytest.raises(RequestError, match=r"'weight'.*\[0.0, 100.0\]; got 1000"):
        parse({"placement": "feasible", "weight": 1e3}, has_constraint=True)
    with pytest.raises(RequestError, match=r"Unknown correction options.*'feasible'"):
        parse({"placement": "feasible", "steps": 2}, has_constraint=True)


def test_feasible_requests_build_their_placements():
    box = fc.constraints.Box(-0.5, 0.5)
    options = {"placement": "best_of_n", "n": 4, "select": "medoid", "feasible_first": True}
    best = placement_from_options(options, constraint=box)
    assert isinstance(best, fc.BestOfN) and isinstance(best.select, fc.constraints.FeasibleFirst)
    assert isinstance(best.select.inner, fc.Medoid) and best.select.constraint is box
    guided = placement_from_options({"placement": "feasible", "weight": 3.0, "last": 4},
                                    constraint=box)
    assert isinstance(guided, fc.Guided)
    with pytest.raises(RequestError, match="server's constraint"):
        placement_from_options({"placement": "feasible"})


def test_constraint_specs_build_the_constraints_they_name():
    from flowcorrect.openpi import constraint_from_spec

    one = constraint_from_spec({"box": {"low": -1.0, "high": 1.0, "dims": 7}})
    assert isinstance(one, fc.constraints.Box) and one.dims == tuple(range(7))
    both = constraint_from_spec({
        "box": [{"low": -1.0, "high": 1.0}, {"low": 0.0, "high": 0.5, "dims": [3]}],
        "max_step_change": {"max_change": 0.1, "dims": 2},
        "half_space": {"normal": [0.0, 1.0], "offset": 0.2, "dims": [0, 1]},
    })
    assert isinstance(both, fc.constraints.AllOf) and len(both.constraints) == 4
    chunk = jax.random.normal(jax.random.key(0), (6, 4)) * 2
    out = both.project(chunk)
    assert bool(both.is_feasible(out)) and not bool(both.is_feasible(chunk))
    for bad, match in (
        ({}, "non-empty dict of kinds"),
        ({"speed": {}}, r"Unknown constraint kind 'speed'.*'box'"),
        ({"box": {"low": -1.0}}, r"'box' needs \['low', 'high'\].*got \['low'\]"),
        ({"ball": {"centre": [0.0], "radius": 1.0, "size": 2}}, r"may take \['dims'\]"),
        ({"box": 3}, r"'box' takes a dict"),
    ):
        with pytest.raises(ValueError, match=match):
            constraint_from_spec(bad)
