"""A served openpi policy left running: validated requests, state per episode, fuzzed.

Against a real test-size openpi Pi0 through openpi's own `Policy` (and, where
`websockets` is installed, its `WebsocketPolicyServer` and `openpi-client`); skipped,
saying why, where openpi is absent. The option checks themselves run everywhere, in
tests/test_requests.py.
"""

import collections
import importlib.util
import os

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from .helpers import tree_bitwise_equal
from .test_openpi import _energy, _make_model, _obs_dict, _run_until_cancelled
from .test_requests import _NEAR_VALID

HAS_OPENPI = importlib.util.find_spec("openpi") is not None
pytestmark = [
    pytest.mark.skipif(
        not HAS_OPENPI,
        reason="openpi is not installed (it is not on PyPI); see docs/openpi.md for the "
        "environment these tests run in",
    ),
    pytest.mark.filterwarnings(
        "ignore:linear_util.wrap_init is missing a DebugInfo:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:shape requires ndarray or scalar arguments:DeprecationWarning"
    ),
]
EXAMPLES = int(os.environ.get("FLOWCORRECT_FUZZ_EXAMPLES", "12"))
COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _rank_promotion(request):
    # openpi's Gemma relies on implicit rank promotion (see tests/test_openpi.py).
    with jax.numpy_rank_promotion("allow"):
        yield
    if COUNTS:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\nserved fuzz: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


@pytest.fixture(scope="module")
def served():
    from openpi.policies import policy as _policy

    config, model = _make_model(False, "float32")
    obs = _obs_dict(config, jax.random.key(11))
    plain = _policy.Policy(model)
    return config, model, obs, plain


def _fresh(served, **kwargs):
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain = served
    return CorrectedPolicy.from_policy(plain, _energy(), action_dims=7, **kwargs)


def test_every_request_is_checked_before_any_work(served, monkeypatch):
    from flowcorrect.openpi import RequestError, _serving

    config, model, obs, plain = served
    reference = _fresh(served).infer(obs)["actions"]
    policy = _fresh(served)
    calls = []
    original = _serving.sample
    monkeypatch.setattr(_serving, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    rtc = {"placement": "rtc", "episode": "e", "inference_delay": 45, "execution_horizon": 10}
    bad = [
        ({"placement": "post_hoc", "steps": 10**9}, r"'steps' must be an int in \[0, 20\]"),
        ({"placement": "guided", "last": 10**10}, r"'last' must be an int in \[1, 10\]"),
        ({"placement": "best_of_n", "n": 10**9}, r"'n' must be an int in \[1, 64\]"),
        ({"placement": "guided", "weight": float("inf")}, r"'weight' must be a finite"),
        ({"placement": "guided", "weight": float("nan")}, r"'weight' must be a finite"),
        (rtc, r"'inference_delay' must be an int in \[0, 40\]"),  # on the first request
        ({"episode": "nobody", "done": True}, r"Episode 'nobody' is not open"),
    ]
    for options, match in bad:
        with pytest.raises(RequestError, match=match):
            policy.infer({**obs, "flowcorrect": options})
    state = {**obs, "state": np.ones(5, np.float32)}
    with pytest.raises(RequestError, match=r"state is float32\[5\].*vector of 32"):
        policy.infer(state)
    with pytest.raises(RequestError, match=r"obs\['state'\] .* non-finite"):
        policy.infer({**obs, "state": np.full(32, np.nan, np.float32)})
    small = {**obs, "image": {**obs["image"], "base_0_rgb": np.zeros((96, 96, 3), np.uint8)}}
    with pytest.raises(RequestError, match=r"Image 'base_0_rgb' is uint8\[96, 96, 3\].*resize"):
        policy.infer(small)
    missing = {k: v for k, v in obs.items() if k != "image_mask"}
    with pytest.raises(RequestError, match=r"must give 'image', 'image_mask' and 'state'"):
        policy.infer(missing)
    assert calls == []  # nothing was sampled for any of them
    # ... and no state changed: the next request is a fresh server's first, bit for bit.
    assert tree_bitwise_equal(policy.infer(obs)["actions"], reference)
    meta = policy.metadata["flowcorrect"]
    assert meta["limits"]["max_steps"] == 20 and meta["limits"]["max_candidates"] == 64
    assert meta["num_steps"] == 10 and meta["action_horizon"] == config.action_horizon


def test_episodes_own_their_state_and_noise(served):
    """Two clients interleaving on one server get exactly what each gets alone, and
    real-time chunking continues each episode's own chunk."""
    config, model, obs, plain = served
    other_obs = _obs_dict(config, jax.random.key(12))
    rtc = {"placement": "rtc", "inference_delay": 2, "execution_horizon": 8}

    def request(episode, observation, i):
        options = {**rtc, "episode": episode} if i else {"placement": "off", "episode": episode}
        return {**observation, "flowcorrect": options}

    alone_a, alone_b = _fresh(served), _fresh(served)
    a = [alone_a.infer(request("a", obs, i))["actions"] for i in range(3)]
    b = [alone_b.infer(request("b", other_obs, i))["actions"] for i in range(3)]
    shared = _fresh(served)
    shared.infer(obs)  # other traffic without an episode: must change nothing below
    got_a, got_b = [], []
    for i in range(3):
        got_b.append(shared.infer(request("b", other_obs, i))["actions"])
        got_a.append(shared.infer(request("a", obs, i))["actions"])
    assert tree_bitwise_equal(got_a, a) and tree_bitwise_equal(got_b, b)
    assert not tree_bitwise_equal(a[1], b[1])
    out = shared.infer(request("a", obs, 3))
    assert out["flowcorrect"] == {"placement": "RealTimeChunking", "episode": "a", "request": 3}
    # A reset starts the episode afresh: its first chunk again, plain.
    again = shared.infer({**obs, "flowcorrect": {"placement": "off", "episode": "a",
                                                 "reset": True}})
    assert tree_bitwise_equal(again["actions"], a[0])
    assert shared.infer({**obs, "flowcorrect": {"episode": "a", "done": True}}) == {
        "flowcorrect": {"episode": "a", "done": True}}
    first = shared.infer(request("a", obs, 1))  # a new 'a': nothing to continue
    assert first["flowcorrect"]["placement"] == "off"


def test_idle_and_surplus_episodes_are_dropped(served):
    from flowcorrect.openpi import ServerLimits

    config, model, obs, plain = served
    policy = _fresh(served, limits=ServerLimits(max_episodes=2))
    for name in "xyz":
        policy.infer({**obs, "flowcorrect": {"placement": "off", "episode": name}})
    assert len(policy._episodes) == 2 and "x" not in policy._episodes
    assert policy._episodes.dropped == 1


_MUTATIONS = st.one_of(*[st.just("none")] * 4, st.sampled_from([
    "none", "drop_state", "extra_key", "state_shape", "state_nan", "state_int", "image_dtype",
    "image_shape", "huge_array", "image_object", "prompt_shape", "options_not_dict",
]))


def _mutate(obs, how):
    obs = dict(obs)
    if how == "drop_state":
        del obs["state"]
    elif how == "extra_key":
        obs["surplus"] = np.arange(3)
    elif how == "state_shape":
        obs["state"] = np.ones((2, 32), np.float32)
    elif how == "state_nan":
        obs["state"] = np.where(np.arange(32) == 3, np.inf, obs["state"]).astype(np.float32)
    elif how == "state_int":
        obs["state"] = np.arange(32)
    elif how == "image_dtype":
        obs["image"] = {**obs["image"], "base_0_rgb": np.zeros((224, 224, 3), np.complex64)}
    elif how == "image_shape":
        obs["image"] = {**obs["image"], "left_wrist_0_rgb": np.zeros((224, 224), np.uint8)}
    elif how == "huge_array":
        obs["big"] = np.zeros(2**24, np.float32)  # 64 MB > 32 MB per array
    elif how == "image_object":
        obs["image"] = {**obs["image"], "base_0_rgb": np.array([None], object)}
    elif how == "prompt_shape":
        obs["tokenized_prompt"] = obs["tokenized_prompt"][:5]
    return obs


@settings(max_examples=max(8, EXAMPLES), derandomize=True, database=None, deadline=None)
@given(options=_NEAR_VALID, mutation=_MUTATIONS)
def test_fuzz_served_requests(served, options, mutation):
    """Every request gets a finite chunk of the model's shape or a clear refusal, and
    the next valid request gets exactly what it would on a fresh server."""
    from flowcorrect.openpi import RequestError

    config, model, obs, plain = served
    policy, probe = _fuzz_policy(served)
    COUNTS["requests tried"] += 1
    options = {k: v for k, v in options.items() if k != "episode"}
    if options.get("placement") == "rtc":
        options["episode"] = "fuzz"
    request = _mutate(obs, mutation)
    request["flowcorrect"] = "post_hoc" if mutation == "options_not_dict" else options
    try:
        out = policy.infer(request)
    except RequestError as e:
        COUNTS["requests refused"] += 1
        assert str(e)
    else:
        COUNTS["requests served"] += 1
        assert out["actions"].shape == (config.action_horizon, config.action_dim)
        assert np.isfinite(out["actions"]).all()
    check = policy.infer({**obs, "flowcorrect": {"placement": "off", "episode": "probe",
                                                 "reset": True}})
    assert tree_bitwise_equal(check["actions"], probe)


_FUZZ_POLICY = {}


def _fuzz_policy(served):
    # One served policy for every example (so compiled functions are reused), and the
    # probe's chunk from a fresh one.
    if not _FUZZ_POLICY:
        probe = _fresh(served).infer({**served[2], "flowcorrect": {"placement": "off",
                                                                   "episode": "probe"}})
        _FUZZ_POLICY["policy"] = (_fresh(served), probe["actions"])
    return _FUZZ_POLICY["policy"]


def test_two_openpi_clients_interleaved_through_the_server(served):
    pytest.importorskip("websockets", reason="openpi's websocket server needs `websockets`")
    import asyncio
    import socket
    import threading

    from openpi.serving.websocket_policy_server import WebsocketPolicyServer
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    config, model, obs, plain = served
    other_obs = _obs_dict(config, jax.random.key(13))
    rtc = {"placement": "rtc", "inference_delay": 3, "execution_horizon": 10}
    steps = [{"placement": "off"}, {"placement": "guided", "last": 2}, rtc, rtc]

    def request(episode, observation, i):
        return {**observation, "flowcorrect": {**steps[i], "episode": episode}}

    alone = {}
    for name, o in (("one", obs), ("two", other_obs)):
        policy = _fresh(served)
        alone[name] = [policy.infer(request(name, o, i))["actions"] for i in range(4)]

    policy = _fresh(served)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = WebsocketPolicyServer(policy, host="127.0.0.1", port=port, metadata=policy.metadata)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: _run_until_cancelled(loop, server.run()),
                              daemon=True)
    thread.start()
    clients = {name: WebsocketClientPolicy("127.0.0.1", port) for name in ("one", "two")}
    got = collections.defaultdict(list)
    barrier = threading.Barrier(2)
    errors = []

    def run(name, o):
        try:
            for i in range(4):
                barrier.wait(30)  # both clients' requests interleave at every step
                got[name].append(clients[name].infer(request(name, o, i))["actions"])
            bad = clients[name]
            # A refused request: the client is told why; the server keeps serving.
            with pytest.raises(RuntimeError, match=r"'steps' must be an int in \[0, 20\]"):
                bad.infer({**o, "flowcorrect": {"placement": "post_hoc", "steps": 10**9}})
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("one", obs), ("two", other_obs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        for name in ("one", "two"):
            for a, b in zip(got[name], alone[name], strict=True):
                np.testing.assert_array_equal(a, b)
        fresh = WebsocketClientPolicy("127.0.0.1", port)  # the server still serves
        assert fresh.infer(request("three", obs, 0))["actions"].shape == alone["one"][0].shape
        fresh._ws.close()
    finally:
        for c in clients.values():
            c._ws.close()
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        thread.join(30)
        loop.close()


def test_recording_training_and_serving_a_verifier(served, tmp_path, monkeypatch):
    """The loop an openpi user runs: serve with recording, report outcomes, train a
    verifier on the recorded prefix features, serve ranked and guided by it."""
    import equinox as eqx

    import flowcorrect as fc
    from flowcorrect.openpi import (
        CorrectedPolicy,
        Pi0Policy,
        RequestError,
        recorded_rollouts,
    )

    config, model, obs, plain = served
    record = tmp_path / "recording"
    policy = CorrectedPolicy.from_policy(plain, record_dir=record, record_candidates=2)
    observations = [_obs_dict(config, jax.random.key(40 + i)) for i in range(3)]
    returned = {}
    for name, o in zip(("win", "loss", "unknown"), observations, strict=True):
        returned[name] = [
            policy.infer({**o, "flowcorrect": {"placement": "off", "episode": name}})["actions"]
            for _ in range(3)
        ]
    reply = policy.infer({"flowcorrect": {"episode": "win", "done": True, "success": True}})
    assert reply["flowcorrect"]["recorded_queries"] == 3
    reply = policy.infer({"flowcorrect": {"episode": "loss", "done": True, "success": False}})
    assert reply["flowcorrect"]["recorded_queries"] == 3
    reply = policy.infer({"flowcorrect": {"episode": "unknown", "done": True}})
    assert reply["flowcorrect"]["recorded_queries"] == 0  # no outcome: never trained on
    for bad, match in (({"episode": "win", "done": True, "success": True}, "not open"),
                       ({"episode": "never", "done": True, "success": True}, "not open"),
                       ({"done": True, "success": True}, "must name its 'episode'")):
        with pytest.raises(RequestError, match=match):
            policy.infer({"flowcorrect": bad})
    # Recording changes no action: a server without it gives the same chunks.
    quiet = _fresh_plain(served)
    same = [quiet.infer({**observations[0], "flowcorrect": {"placement": "off",
                                                            "episode": "win"}})["actions"]
            for _ in range(3)]
    np.testing.assert_allclose(np.stack(same), np.stack(returned["win"]), rtol=1e-6, atol=1e-6)

    rollouts = recorded_rollouts(record, model)
    assert rollouts.num_episodes == 2 and rollouts.num_queries == 6
    assert list(rollouts.success) == [True] * 3 + [False] * 3
    assert list(rollouts.steps_to_success[:3]) == [3, 2, 1]
    assert rollouts.candidates.shape == (6, 3, config.action_horizon, config.action_dim)
    # Candidate 0 is the executed chunk, exactly what the client got (model space here).
    np.testing.assert_array_equal(rollouts.candidates[:3, 0], np.stack(returned["win"]))
    assert not np.array_equal(rollouts.candidates[:, 1], rollouts.candidates[:, 0])
    # The observation is the pooled prefix features of the request's own prefix pass.
    pi0 = Pi0Policy(model)
    batch = jax.tree.map(lambda x: np.asarray(x)[None], observations[0])
    from openpi.models import model as _model

    prefix = eqx.filter_jit(type(pi0).condition)(pi0, _model.Observation.from_dict(batch))
    pooled = fc.pool_tokens(pi0.energy_context(prefix))[0]
    np.testing.assert_allclose(rollouts.observation[0], pooled, rtol=1e-5, atol=1e-5)

    # Another checkpoint's features are refused.
    other = _make_model_seed(config, 1)
    with pytest.raises(ValueError, match="recorded from a model with fingerprint"):
        recorded_rollouts(record, other)

    # Train, save with its report, serve with it.
    width = rollouts.observation.shape[1]
    verifier = fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=width, action_dim=config.action_dim,
                                               horizon=config.action_horizon, hidden=32),
                            key=jax.random.key(0))
    result = fc.verifiers.fit_verifier(
        verifier,
        fc.verifiers.outcome_batches(rollouts, 4),
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(1),
        progress=False,
        config=fc.train.TrainConfig(num_steps=5, warmup_steps=1, log_every=1),
    )
    trained = eqx.nn.inference_mode(result.model)
    path = fc.save_model(trained, tmp_path / "verifier")
    report = fc.verifiers.verifier_report(trained, rollouts)
    (path / "report.json").write_text(__import__("json").dumps(report.to_dict()))
    served_policy = CorrectedPolicy.from_policy(plain, verifier=path)
    meta = served_policy.metadata["flowcorrect"]["verifier"]
    assert meta["path"] == str(path.absolute()) and len(meta["hash"]) == 32
    assert meta["report"]["num_episodes"] == 2
    for options in ({"placement": "best_of_n", "n": 4},
                    {"placement": "best_of_n", "n": 4, "select": "near_mean", "k": 2},
                    {"placement": "guided", "last": 2, "weight": 0.5}):
        out = served_policy.infer({**obs, "flowcorrect": options})
        assert np.isfinite(out["actions"]).all()
        assert out["actions"].shape == (config.action_horizon, config.action_dim)
    # Ranking reads the verifier: best-of-4 returns the candidate it scores lowest.
    ranked = served_policy.infer({**obs, "flowcorrect": {"placement": "best_of_n", "n": 4}})
    assert ranked["flowcorrect"]["placement"] == "BestOfN"
    # A verifier that cannot read this model's features is refused at start.
    wrong = fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=width + 1, action_dim=config.action_dim,
                                            horizon=config.action_horizon, hidden=8),
                         key=jax.random.key(2))
    with pytest.raises(ValueError, match=r"verifier cannot score this model's contexts"):
        CorrectedPolicy.from_policy(plain, verifier=wrong)
    with pytest.raises(ValueError, match="an `energy` or a `verifier`, not both"):
        CorrectedPolicy.from_policy(plain, _energy(), verifier=wrong)


def test_a_failing_disk_stops_recording_not_serving(served, tmp_path, caplog):
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain = served
    policy = CorrectedPolicy.from_policy(plain, record_dir=tmp_path / "r", record_candidates=0)
    policy.infer({**obs, "flowcorrect": {"placement": "off", "episode": "a"}})

    def full(_):
        raise OSError(28, "No space left on device")

    policy._recorder.writer.append = full
    with caplog.at_level("ERROR", logger="flowcorrect.openpi"):
        reply = policy.infer({"flowcorrect": {"episode": "a", "done": True, "success": True}})
    assert reply["flowcorrect"]["recorded_queries"] == 0
    assert reply["flowcorrect"]["recording"]["recording"] is False
    assert "No space left" in reply["flowcorrect"]["recording"]["error"]
    assert sum("Recording to" in r.message for r in caplog.records) == 1
    out = policy.infer({**obs, "flowcorrect": {"placement": "off", "episode": "b"}})
    assert np.isfinite(out["actions"]).all()  # still serving
    assert policy.metadata["flowcorrect"]["recording"]["recording"] is False


def _fresh_plain(served):
    from flowcorrect.openpi import CorrectedPolicy

    return CorrectedPolicy.from_policy(served[3])


def _make_model_seed(config, seed):
    from flowcorrect.openpi import tiny_siglip

    with tiny_siglip():
        return config.create(jax.random.key(seed))


def test_serve_command_end_to_end(tmp_path):
    """`python -m flowcorrect.openpi.serve` on the test-size Pi0, queried by
    openpi-client, stopped with Ctrl-C."""
    pytest.importorskip("websockets", reason="openpi's websocket server needs `websockets`")
    pytest.importorskip("tyro", reason="the serve command reads its arguments with tyro")
    import signal
    import socket
    import subprocess
    import sys
    import time

    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "flowcorrect.openpi.serve", "--host", "127.0.0.1",
               "--port", str(port), "--limits.max-steps", "5",
               "--record-dir", str(tmp_path / "rec"), "--record-candidates", "1",
               "--constraint", '{"box": {"low": -0.5, "high": 0.5}}',
               "--constraint-units", "model", "policy:test-size",
               "default:rtc", "--default.inference-delay", "2",
               "--default.execution-horizon", "10"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "".join(lines)
            lines.append(line)
            if "serving on" in line:
                break
        banner = "".join(lines)
        assert f"ws://127.0.0.1:{port}" in banner
        # Compiled before listening: the first requests compile nothing, so no client
        # waits on a compile past its keep-alive.
        assert ("compiled Project(Plain), Project(Plain) (recording), "
                "Project(RealTimeChunking), Project(RealTimeChunking) (recording)") in banner
        client = WebsocketClientPolicy("127.0.0.1", port)
        meta = client.get_server_metadata()["flowcorrect"]
        assert meta["limits"]["max_steps"] == 5
        assert meta["default"]["placement"] == "rtc"
        # Each served placement's settings, from its config, bounded by this server.
        assert meta["options"]["rtc"]["execution_horizon"] == {
            "type": "int", "default": "required", "low": 1, "high": 50}
        assert set(meta["options"]) == set(meta["placements"])  # no energy: no post_hoc
        assert meta["options"]["best_of_n"]["n"]["high"] == meta["limits"]["max_candidates"]
        config, _ = _make_model(False, "float32")
        obs = _obs_dict(config, jax.random.key(5))
        first = client.infer({**obs, "flowcorrect": {"episode": "run"}})
        # The episode's first chunk continues nothing: plain, projected on the box.
        assert first["flowcorrect"]["placement"] == "Project(Plain)"
        second = client.infer({**obs, "flowcorrect": {"episode": "run"}})
        assert second["flowcorrect"]["placement"] == "Project(RealTimeChunking)"
        for reply in (first, second):
            assert np.abs(reply["actions"]).max() <= 0.5 + 1e-5
            assert reply["flowcorrect"]["constraint"]["feasible"]
        assert meta["constraint"]["fixed"] and "Box" in meta["constraint"]["constraint"]
        done = client.infer({"flowcorrect": {"episode": "run", "done": True, "success": True}})
        assert done["flowcorrect"]["recorded_queries"] == 2
        client._ws.close()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        out = server.stdout.read()  # through the same buffer readline filled
        assert server.returncode == 0, banner + out
        assert "recorded 1 episodes (2 requests)" in out and "server stopped" in out
        printed = banner + out
        assert "limits: max_steps=5" in printed and "default: {'placement': 'rtc'" in printed
        assert "model: openpi test-size Pi0 (random weights)" in printed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
        server.stdout.close()


def test_recording_the_model_inputs(served, tmp_path):
    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain = served
    policy = CorrectedPolicy.from_policy(plain, record_dir=tmp_path / "r", record_candidates=0,
                                         record_observation="inputs")
    for _ in range(2):
        policy.infer({**obs, "flowcorrect": {"placement": "off", "episode": "a"}})
    policy.infer({"flowcorrect": {"episode": "a", "done": True, "success": False}})
    rollouts = fc.verifiers.load_rollouts(tmp_path / "r")
    assert set(rollouts.observation) == set(obs)
    for name, image in obs["image"].items():
        np.testing.assert_array_equal(rollouts.observation["image"][name][1], image)
    np.testing.assert_array_equal(rollouts.observation["state"][0], obs["state"])
    assert rollouts.observation["tokenized_prompt"].dtype == obs["tokenized_prompt"].dtype
    assert rollouts.candidates.shape == (2, 1, config.action_horizon, config.action_dim)
    with pytest.raises(ValueError, match="`record_observation` must be 'context'"):
        CorrectedPolicy.from_policy(plain, record_dir=tmp_path / "s", record_observation="x")


def test_a_server_without_an_energy_serves_what_needs_none(served):
    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy, RequestError

    config, model, obs, plain = served
    policy = CorrectedPolicy.from_policy(plain, placement=fc.BestOfN(3, select=fc.Medoid()))
    out = policy.infer(obs)
    assert out["flowcorrect"]["placement"] == "BestOfN" and np.isfinite(out["actions"]).all()
    assert "best_of_n" in policy.metadata["flowcorrect"]["placements"]
    with pytest.raises(RequestError, match="needs an energy or verifier"):
        policy.infer({**obs, "flowcorrect": {"placement": "best_of_n", "n": 3}})
    with pytest.raises(ValueError, match=r"PostHoc cannot run on this server without an energy"):
        CorrectedPolicy.from_policy(plain, placement=fc.PostHoc(fc.reference_recipe()))


def _with_unnormalize(served, use_quantiles):
    from openpi import transforms
    from openpi.policies import policy as _policy
    from openpi.shared import normalize

    config, model, obs, plain = served
    rng = np.random.default_rng(3)
    # Statistics for 7 of the model's 32 action dims, as LIBERO's are: openpi pads the
    # rest (quantiles pass them through; z-scores pad with mean 0, std 1).
    q01 = rng.uniform(-2.0, -0.5, 7)
    stats = normalize.NormStats(mean=rng.normal(size=7), std=rng.uniform(0.2, 3.0, 7),
                                q01=q01, q99=q01 + rng.uniform(0.5, 4.0, 7))
    unnormalize = transforms.Unnormalize({"actions": stats}, use_quantiles=use_quantiles)
    return _policy.Policy(model, output_transforms=[unnormalize]), stats


@pytest.mark.parametrize("use_quantiles", [True, False])
def test_a_servers_constraint_holds_for_every_request(served, use_quantiles):
    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy, RequestError

    config, model, obs, _ = served
    policy, stats = _with_unnormalize(served, use_quantiles)
    # Robot-unit limits on the first 7 dims, tight enough that plain chunks cross them.
    centre = stats.mean if not use_quantiles else (stats.q01 + stats.q99) / 2
    low, high = centre - 0.1, centre + 0.1
    box = fc.constraints.Box(low.astype(np.float32), high.astype(np.float32), dims=7)
    served_policy = CorrectedPolicy.from_policy(policy, constraint=box)
    noise = np.asarray(jax.random.normal(jax.random.key(5), (model.action_horizon,
                                                             model.action_dim)))
    plain = policy.infer(dict(obs), noise=noise)["actions"]
    assert np.mean((plain[:, :7] < low) | (plain[:, :7] > high)) > 0.3
    out = served_policy.infer(dict(obs), noise=noise)
    # A box in robot units is a clip in robot units: exactly what projection must give,
    # and the other dims are untouched.
    np.testing.assert_allclose(out["actions"][:, :7], np.clip(plain[:, :7], low, high),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["actions"][:, 7:], plain[:, 7:], rtol=1e-5, atol=1e-6)
    reply = out["flowcorrect"]["constraint"]
    assert reply["changed"] and reply["feasible"] and not reply["fell_back"]
    assert reply["violation_before"] > 0.05 and reply["violation_after"] <= 1e-5
    assert reply["distance"] > 0 and out["flowcorrect"]["placement"] == "Project(Plain)"
    # Whatever a client asks for, the chunk leaves feasible; none can switch it off.
    for options in ({"placement": "off"},
                    {"placement": "feasible", "weight": 5.0},
                    {"placement": "best_of_n", "n": 3, "select": "medoid",
                     "feasible_first": True}):
        got = served_policy.infer({**obs, "flowcorrect": options})
        a = got["actions"][:, :7]
        assert np.all((a >= low - 1e-5) & (a <= high + 1e-5)), options
        assert got["flowcorrect"]["constraint"]["feasible"], options
    for loosen in ({"placement": "off", "constraint": None}, {"constraint": "off"}):
        with pytest.raises(RequestError, match="constraint"):
            served_policy.infer({**obs, "flowcorrect": loosen})
    meta = served_policy.metadata["flowcorrect"]
    assert meta["constraint"]["fixed"] and meta["constraint"]["units"] == "robot"
    assert "feasible" in meta["placements"]


def test_a_step_limit_holds_across_an_episodes_chunks(served):
    import jax.monitoring

    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, _ = served
    policy, _ = _with_unnormalize(served, True)
    limit = 0.05  # robot units per control step, on the 7 dims the statistics cover
    step = fc.constraints.MaxStepChange(limit, dims=7)
    joined = CorrectedPolicy.from_policy(policy, constraint=step)
    free = CorrectedPolicy.from_policy(policy, constraint=step)  # same seed, same noise
    # The warm-up compiles the continued limit too, so `executed` compiles nothing.
    assert joined.warm_up() == ["Project(Plain)", "Project(Plain) (continued)"]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )

    def ask(server, **options):
        out = server.infer({**obs, "flowcorrect": {"episode": "e", **options}})
        assert out["flowcorrect"]["constraint"]["feasible"]
        return np.asarray(out["actions"][:, :7], np.float64)

    def steps(a):
        return np.abs(np.diff(a, axis=0)).max()

    first = ask(joined)
    np.testing.assert_array_equal(first, ask(free))
    assert steps(first) <= limit + 1e-5
    # The robot executed 5 actions of the first chunk: the next starts within the limit
    # of the fifth. Without `executed` the join is free, and it is far over the limit.
    k = 5
    # (`after`'s few array ops run eagerly, compiled once per process and past length.)
    joined.constraint.after(np.zeros((k, model.action_dim), np.float32))
    compiles.clear()
    second = ask(joined, executed=k)
    assert not compiles
    unjoined = ask(free)
    assert np.abs(second[0] - first[k - 1]).max() <= limit + 1e-5
    assert np.abs(unjoined[0] - first[k - 1]).max() > 3 * limit
    assert steps(second) <= limit + 1e-5
    # Real-time chunking: s + d actions of the previous chunk are executed, the robot
    # switches at row d, whose rows before it are those executed actions.
    s, d = 5, 2
    third = ask(joined, placement="rtc", inference_delay=d, execution_horizon=s)
    np.testing.assert_allclose(third[:d], second[s:s + d], rtol=1e-5, atol=1e-5)
    assert np.abs(third[d] - second[s + d - 1]).max() <= limit + 1e-5
    assert steps(third) <= limit + 1e-5


def test_a_constraint_that_cannot_apply_is_refused_at_start(served):
    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy, RequestError

    config, model, obs, plain = served
    with pytest.raises(ValueError, match=r"Unnormalize.*constraint_units='model'"):
        CorrectedPolicy.from_policy(plain, constraint=fc.constraints.Box(-1.0, 1.0))
    with pytest.raises(ValueError, match=r"cannot act on this model's chunks \(50, 32\)"):
        CorrectedPolicy.from_policy(plain, constraint=fc.constraints.Box(-1.0, 1.0, dims=[40]),
                                    constraint_units="model")
    with pytest.raises(TypeError, match="flowcorrect constraint"):
        CorrectedPolicy.from_policy(plain, constraint=(-1.0, 1.0), constraint_units="model")
    without = CorrectedPolicy.from_policy(plain)
    with pytest.raises(RequestError, match="server's constraint"):
        without.infer({**obs, "flowcorrect": {"placement": "feasible"}})


def test_warm_up_leaves_the_first_requests_nothing_to_compile(served):
    import jax.monitoring

    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain = served
    policy = CorrectedPolicy.from_policy(
        plain, constraint=fc.constraints.Box(-0.5, 0.5), constraint_units="model",
        default_options=fc.configs.BestOfNConfig(n=2, select="medoid"),
    )
    # A config is the options a client would send for it.
    assert policy.metadata["flowcorrect"]["default"] == {
        "placement": "best_of_n", "n": 2, "select": "medoid", "feasible_first": False}
    assert policy.warm_up() == ["Project(BestOfN)"]
    plain.infer(dict(obs))  # openpi's own small array ops, compiled once per process
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )
    out = policy.infer(dict(obs))
    assert np.abs(out["actions"]).max() <= 0.5 + 1e-5
    n = len(compiles)
    policy.infer({**obs, "flowcorrect": {"placement": "off"}})  # Project(Plain): new
    assert n == 0 and len(compiles) > 0
