"""flowcorrect.openpi against a real test-size openpi Pi0 / Pi0.5.

These tests run where openpi is importable and skip, saying why, where it is not (CI
installs flowcorrect alone; openpi is not on PyPI). Local run, in the environment of
docs/openpi.md:

    /work/venv-openpi/bin/python -m pytest tests/test_openpi.py

The models are openpi's `dummy` Gemma variants with SigLIP's `mu/14` variant swapped
in (openpi hard-codes `So400m/14`, about 20 s a call on two CPU cores): the same code
paths, a few hundred milliseconds a call. Models and observations are built once per
module, and each test checks several things on them, so that there are few compiles.
"""

import importlib.util

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc

from .helpers import tree_bitwise_equal

HAS_OPENPI = importlib.util.find_spec("openpi") is not None
needs_openpi = pytest.mark.skipif(
    not HAS_OPENPI,
    reason="openpi is not installed (it is not on PyPI); see docs/openpi.md for the "
    "environment these tests run in",
)

# flax 0.10.2 (openpi's pin) calls two jax 0.5.3 APIs in ways jax deprecates (Gemma's
# layer scan, and shapes of ShapeDtypeStructs in linen's `param`): openpi's pinned
# stack, not our code.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:linear_util.wrap_init is missing a DebugInfo:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:shape requires ndarray or scalar arguments:DeprecationWarning"
    ),
]

BATCH = 2
NUM_STEPS = 10


@pytest.mark.skipif(HAS_OPENPI, reason="checks the error shown where openpi is absent")
def test_missing_openpi_error_says_how_to_install():
    import flowcorrect.openpi as fco  # importing the subpackage alone must work

    assert "Pi0Policy" in dir(fco)
    with pytest.raises(ImportError, match=r"not on PyPI.*Physical-Intelligence/openpi"):
        fco.Pi0Policy  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fco.Nope  # noqa: B018


def _make_model(pi05: bool, dtype: str):
    from openpi.models import pi0_config

    from flowcorrect.openpi import tiny_siglip

    config = pi0_config.Pi0Config(
        paligemma_variant="dummy", action_expert_variant="dummy", pi05=pi05, dtype=dtype
    )
    with tiny_siglip():
        model = config.create(jax.random.key(0))
    return config, model


def _observation(config, key):
    """A batch with real variety: random images and state, one image masked out for
    the second sample, and prompts padded to different lengths (so the prefix mask has
    False entries that must be respected)."""
    from openpi.models import model as _model

    spec, _ = config.inputs_spec(batch_size=BATCH)
    keys = iter(jax.random.split(key, 16))
    images = {
        name: jax.random.uniform(next(keys), s.shape, minval=-1.0, maxval=1.0)
        for name, s in spec.images.items()
    }
    masks = {name: jnp.ones((BATCH,), bool) for name in spec.images}
    masks["right_wrist_0_rgb"] = jnp.array([True, False])
    length = spec.tokenized_prompt.shape[1]
    prompt = jax.random.randint(next(keys), (BATCH, length), 1, 1000)
    prompt_mask = jnp.arange(length)[None, :] < jnp.array([[7], [length // 2]])
    return _model.Observation(
        images=images,
        image_masks=masks,
        state=jax.random.normal(next(keys), spec.state.shape),
        tokenized_prompt=prompt,
        tokenized_prompt_mask=prompt_mask,
    )


@pytest.fixture(scope="module", autouse=True)
def _openpi_rank_promotion():
    # conftest makes implicit rank promotion an error; openpi's own Gemma relies on it
    # (RMSNorm multiplies (b, t, d) by (d,)), so it is allowed for this module only.
    with jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(scope="module", params=[(False, "float32"), (True, "bfloat16")],
                ids=["pi0-float32", "pi05-bfloat16"])
def setup(request, _openpi_rank_promotion):
    if not HAS_OPENPI:
        pytest.skip("openpi is not installed (it is not on PyPI); see docs/openpi.md")
    from flowcorrect.openpi import Pi0Policy

    pi05, dtype = request.param
    config, model = _make_model(pi05, dtype)
    observation = _observation(config, jax.random.key(1))
    noise = jax.random.normal(jax.random.key(2), (BATCH, config.action_horizon,
                                                  config.action_dim))
    return config, model, Pi0Policy(model), observation, noise


def _plain(policy, observation, noise):
    return fc.sample(policy, observation, None, noise=noise, num_steps=NUM_STEPS)[0]


def _energy():
    """A learned energy of LIBERO's 7 action dims (openpi pads them to 32)."""
    config = fc.EnergyModelConfig(context_dim=64, action_dim=7, hidden=32, num_heads=2)
    return eqx.nn.inference_mode(fc.EnergyModel(config, key=jax.random.key(5)))


@needs_openpi
def test_no_correction_equals_sample_actions_bitwise(setup):
    from openpi.shared import nnx_utils

    config, model, policy, observation, noise = setup
    # openpi's Policy jits sample_actions exactly like this.
    sample_actions = nnx_utils.module_jit(model.sample_actions)
    expected = sample_actions(jax.random.key(3), observation, num_steps=NUM_STEPS, noise=noise)
    # Through a plain jax.jit, as in openpi's own code, with the policy as an argument.
    plain = jax.jit(eqx.debug.assert_max_traces(_plain, max_traces=1))
    actions = plain(policy, observation, noise)
    assert actions.dtype == expected.dtype == jnp.float32
    assert actions.shape == (BATCH, *policy.chunk_shape) == expected.shape
    assert bool(jnp.all(jnp.isfinite(actions)))
    # The flow moved the samples (a zero velocity would also "match").
    assert float(jnp.max(jnp.abs(actions - noise))) > 1e-2
    assert float(jnp.max(jnp.abs(actions - expected))) == 0.0

    # New weights are traced leaves: same structure, no recompile, different actions.
    scaled = eqx.tree_at(lambda p: p.weights, policy,
                         jax.tree.map(lambda w: w * 1.5, policy.weights))
    other = plain(scaled, observation, noise)
    assert float(jnp.max(jnp.abs(other - actions))) > 1e-3


@needs_openpi
def test_every_placement_runs_the_prefix_once(setup, monkeypatch):
    from openpi.models import pi0 as _pi0

    from flowcorrect.openpi import sample_actions_with_energy_correction

    config, model, policy, observation, noise = setup
    calls = []
    original = _pi0.Pi0.embed_prefix

    def counted(self, obs):
        jax.debug.callback(lambda: calls.append(1))
        return original(self, obs)

    monkeypatch.setattr(_pi0.Pi0, "embed_prefix", counted)
    energy = _energy()   # scores (horizon, 7) chunks only
    energy7 = fc.OnActionDims(energy, 7)
    n = 3
    many_noise = jax.random.normal(jax.random.key(4), (BATCH, n, *policy.chunk_shape))
    placements = {
        "post-hoc": (None, noise),  # through the reference's user API
        "denoised": (fc.Denoised(fc.reference_recipe(), schedule=fc.LastSteps(3)), noise),
        "guided": (fc.Guided(schedule=fc.LastSteps(3), weight=1.0), noise),
        "best-of-3": (fc.BestOfN(n), many_noise),
    }
    # K = 0: no correction, the plain sampler.
    plain = sample_actions_with_energy_correction(
        model, energy, jax.random.key(3), observation, energy_correction_steps=0, noise=noise
    )
    for name, (placement, start) in placements.items():
        calls.clear()
        if placement is None:
            actions, info = sample_actions_with_energy_correction(
                policy, energy, jax.random.key(3), observation, NUM_STEPS,
                energy_correction_steps=3, energy_alpha=0.1, energy_clip_frac=0.2,
                action_dims=7, noise=start, return_info=True,
            )
        else:
            actions, info = fc.sample(policy, observation, None, noise=start,
                                      num_steps=NUM_STEPS, placement=placement, energy=energy7)
        jax.block_until_ready(actions)
        assert len(calls) == 1, name
        assert actions.shape == (BATCH, *policy.chunk_shape), name
        assert not bool(jnp.any(info.fell_back)), name
        assert info.final_energy.shape == (BATCH,), name
        if name == "post-hoc":
            # Only the first 7 of the 32 dims move (LIBERO's), and they do move.
            np.testing.assert_array_equal(actions[..., 7:], plain[..., 7:])
            assert float(jnp.max(jnp.abs(actions[..., :7] - plain[..., :7]))) > 0
            assert bool(jnp.all(jnp.isfinite(info.placement.correction.energy_after)))
        if name == "best-of-3":
            # Candidates share one prefix, observation-major: the chosen chunk of
            # sample b is the plain flow of observation b from its chosen noise.
            chosen = many_noise[jnp.arange(BATCH), info.placement.selected]
            again = fc.sample(policy, observation, None, noise=chosen, num_steps=NUM_STEPS)[0]
            np.testing.assert_allclose(actions, again, rtol=2e-2, atol=2e-2)


@needs_openpi
def test_energy_context_is_prefix_out_with_openpis_mask(setup):
    from openpi.models import model as _model

    config, model, policy, observation, noise = setup
    prefix = eqx.filter_jit(type(policy).condition)(policy, observation)
    context = policy.energy_context(prefix)
    assert isinstance(context, fc.TokenContext)
    processed = _model.preprocess_observation(None, observation, train=False)
    _, expected_mask, _ = model.embed_prefix(processed)
    np.testing.assert_array_equal(context.mask, expected_mask)
    num_image = 3 * (224 // 14) ** 2
    # Sample 1's third image is masked out; the prompts are padded after 7 and 24 tokens.
    assert not bool(jnp.any(context.mask[1, 2 * num_image // 3 : num_image]))
    assert bool(jnp.all(context.mask[0, :num_image]))
    assert int(jnp.sum(context.mask[0, num_image:])) == 7
    assert int(jnp.sum(context.mask[1, num_image:])) == config.max_token_len // 2
    assert context.tokens.shape == (BATCH, context.mask.shape[1], 64)
    assert bool(jnp.all(jnp.isfinite(context.tokens.astype(jnp.float32))))
    assert float(jnp.std(context.tokens.astype(jnp.float32))) > 1e-3
    assert policy.batch_size(prefix) == BATCH
    repeated = policy.repeat(prefix, 3)
    assert repeated.kv_cache[0].shape[1] == BATCH * 3
    np.testing.assert_array_equal(repeated.kv_cache[0][:, 3:6],
                                  jnp.repeat(prefix.kv_cache[0][:, 1:2], 3, axis=1))
    np.testing.assert_array_equal(repeated.prefix_out[3], prefix.prefix_out[1])


@needs_openpi
def test_bad_inputs(setup):
    from flowcorrect.openpi import Pi0Policy

    config, model, policy, observation, noise = setup
    with pytest.raises(TypeError, match="openpi's JAX `openpi.models.pi0.Pi0`"):
        Pi0Policy(object())
    with pytest.raises(TypeError, match="must be an openpi `Observation`"):
        policy.condition({"state": observation.state})
    unbatched = jax.tree.map(lambda x: x[0], observation)
    with pytest.raises(ValueError, match=r"\(batch, state_dim\).*got \(32,\)"):
        policy.condition(unbatched)
    prefix = eqx.filter_jit(type(policy).condition)(policy, observation)
    with pytest.raises(ValueError, match=r"`x_t` must be \(batch, horizon, action_dim\)"):
        policy.velocity(prefix, noise[:, :, :7], jnp.asarray(1.0))
    with pytest.raises(ValueError, match="`n` must be an int >= 1"):
        policy.repeat(prefix, 0)
    from flowcorrect.openpi import sample_actions_with_energy_correction

    with pytest.raises(TypeError, match="openpi's JAX Pi0 or a flowcorrect.openpi.Pi0Policy"):
        sample_actions_with_energy_correction(object(), None, None, observation)
    with pytest.raises(ValueError, match="`energy_correction_steps` must be an int >= 0"):
        sample_actions_with_energy_correction(policy, None, None, observation,
                                              energy_correction_steps=-1)


# -- serving: openpi's own Policy, websocket server and client --


def _obs_dict(config, key):
    """One observation as openpi's Policy receives it after its input transforms (no
    batch axis): what `Observation.from_dict` reads."""
    spec, _ = config.inputs_spec(batch_size=1)
    keys = iter(jax.random.split(key, 8))
    length = spec.tokenized_prompt.shape[1]
    return {
        "image": {
            name: np.asarray(jax.random.uniform(next(keys), s.shape[1:], minval=-1, maxval=1))
            for name, s in spec.images.items()
        },
        "image_mask": {name: np.asarray(name != "right_wrist_0_rgb") for name in spec.images},
        "state": np.asarray(jax.random.normal(next(keys), spec.state.shape[1:])),
        "tokenized_prompt": np.asarray(jax.random.randint(next(keys), (length,), 1, 1000)),
        "tokenized_prompt_mask": np.arange(length) < 9,
    }


@pytest.fixture(scope="module")
def serving(_openpi_rank_promotion):
    if not HAS_OPENPI:
        pytest.skip("openpi is not installed (it is not on PyPI); see docs/openpi.md")
    from openpi.policies import policy as _policy

    config, model = _make_model(False, "float32")
    obs = _obs_dict(config, jax.random.key(11))
    plain = _policy.Policy(model)  # openpi's, as create_trained_policy builds it
    first = plain.infer(obs)["actions"]
    return config, model, obs, plain, first


@needs_openpi
def test_openpi_policy_with_correction_per_request(serving, monkeypatch):
    from flowcorrect.openpi import CorrectedPolicy, _serving

    config, model, obs, plain, first = serving
    traces = []
    original = _serving.sample

    def counted(*args, **kwargs):
        traces.append(type(kwargs["placement"]).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(_serving, "sample", counted)
    policy = CorrectedPolicy.from_policy(plain, _energy(), action_dims=7)
    out = policy.infer(obs)
    # Off: openpi's own actions for the same rng, bit for bit.
    assert out["flowcorrect"] == {"placement": "off"}
    assert tree_bitwise_equal(out["actions"], first)
    assert policy.metadata["flowcorrect"]["action_dims"] == 7

    noise = np.asarray(jax.random.normal(jax.random.key(12), policy_chunk(config)))
    off = policy.infer({**obs, "flowcorrect": {"placement": "off"}}, noise=noise)["actions"]
    posthoc = {"placement": "post_hoc", "steps": 3, "alpha": 0.1, "clip_frac": 0.2}
    a = policy.infer({**obs, "flowcorrect": posthoc}, noise=noise)
    assert a["flowcorrect"] == {"placement": "PostHoc"}
    a = a["actions"]
    # Only LIBERO's 7 dims move; the energy (action_dim=7) would raise on 32.
    assert tree_bitwise_equal(a[:, 7:], off[:, 7:])
    assert float(np.abs(a[:, :7] - off[:, :7]).max()) > 0
    # New numbers per request: a different result, no new trace.
    count = len(traces)
    b = policy.infer({**obs, "flowcorrect": {**posthoc, "alpha": 0.02, "clip_frac": 0.05}},
                     noise=noise)["actions"]
    assert len(traces) == count
    assert 0 < float(np.abs(b[:, :7] - off[:, :7]).max()) < float(
        np.abs(a[:, :7] - off[:, :7]).max())
    best = policy.infer({**obs, "flowcorrect": {"placement": "best_of_n", "n": 3}})
    assert best["actions"].shape == policy_chunk(config)
    assert bool(np.all(np.isfinite(best["actions"])))
    # One trace per signature: off without noise, off with noise (a new argument),
    # post-hoc (twice called, once traced), best-of-3.
    assert traces == ["Plain", "Plain", "PostHoc", "BestOfN"]

    with pytest.raises(ValueError, match=r"Unknown correction options.*\['alpah'\]"):
        policy.infer({**obs, "flowcorrect": {"placement": "post_hoc", "alpah": 0.1}})
    with pytest.raises(ValueError, match="one of \\['off'"):
        policy.infer({**obs, "flowcorrect": {"placement": "sideways"}})
    with pytest.raises(ValueError, match=r"'n' must be an int in \[1, 64\].*got 2.5"):
        policy.infer({**obs, "flowcorrect": {"placement": "best_of_n", "n": 2.5}})
    no_energy = CorrectedPolicy(model)
    with pytest.raises(ValueError, match="this server has none"):
        no_energy.infer({**obs, "flowcorrect": {"placement": "guided"}})
    with pytest.raises(ValueError, match="in `sample_kwargs`"):
        no_energy._model.sample_actions(jax.random.key(0), None, num_steps=10)
    with pytest.raises(TypeError, match="must be an openpi `Policy`"):
        CorrectedPolicy.from_policy(object())


@needs_openpi
def test_openpi_policy_training_time_rtc_per_request(serving):
    """Training-time RTC through openpi's Policy: no energy needed; the new chunk's first
    `d` actions are the episode's leftover exactly, and the rest are sampled by openpi's
    own modules with the committed actions in at the clean flow time."""
    from openpi.policies import policy as _policy

    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain, first = serving
    policy = CorrectedPolicy.from_policy(plain)
    assert "trt" in policy.metadata["flowcorrect"]["placements"]
    d, s = 3, 10
    trt = {"placement": "trt", "inference_delay": d, "execution_horizon": s, "episode": "t1"}
    keys = jax.random.split(jax.random.key(23), 2)
    noise = [np.asarray(jax.random.normal(k, policy_chunk(config))) for k in keys]
    out = policy.infer({**obs, "flowcorrect": trt}, noise=noise[0])
    assert out["flowcorrect"] == {"placement": "off", "episode": "t1", "request": 0}
    assert tree_bitwise_equal(out["actions"], plain.infer(obs, noise=noise[0])["actions"])
    previous = np.asarray(out["actions"])  # no output transforms: the model's space
    conditioned = policy.infer({**obs, "flowcorrect": trt}, noise=noise[1])
    assert conditioned["flowcorrect"] == {"placement": "PrefixConditioned", "episode": "t1",
                                          "request": 1}
    np.testing.assert_array_equal(conditioned["actions"][:d], previous[s : s + d])
    free = policy.infer({**obs, "flowcorrect": {"placement": "off"}}, noise=noise[1])
    rest = float(np.abs(conditioned["actions"][d:] - free["actions"][d:]).max())
    assert 0 < rest and bool(np.all(np.isfinite(conditioned["actions"])))
    with pytest.raises(ValueError, match="name the episode with 'episode'"):
        policy.infer({**obs, "flowcorrect": {**trt, "episode": None}})
    # Pi0.5 takes one flow time per sample: refused when the server starts, naming 'rtc'.
    _, pi05 = _make_model(True, "float32")
    with pytest.raises(ValueError, match=r"Placement 'trt'.*Pi0\.5.*'rtc'"):
        CorrectedPolicy.from_policy(
            _policy.Policy(pi05),
            default_options={k: v for k, v in trt.items() if k != "episode"},
        )


@needs_openpi
def test_openpi_policy_real_time_chunking_per_request(serving):
    """RTC through openpi's Policy with LeRobot's option names: no energy needed, the
    leftover is the server's own previous chunk, and the new chunk's first `d` actions
    are pulled onto it."""
    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain, first = serving
    policy = CorrectedPolicy.from_policy(plain)  # no energy: RTC needs none
    assert "rtc" in policy.metadata["flowcorrect"]["placements"]
    d, s = 3, 10
    rtc = {"placement": "rtc", "inference_delay": d, "execution_horizon": s, "episode": "e1"}
    keys = jax.random.split(jax.random.key(21), 2)
    noise = [np.asarray(jax.random.normal(k, policy_chunk(config))) for k in keys]
    out = policy.infer({**obs, "flowcorrect": rtc}, noise=noise[0])
    # The first chunk of an episode continues nothing.
    assert out["flowcorrect"] == {"placement": "off", "episode": "e1", "request": 0}
    assert tree_bitwise_equal(out["actions"], plain.infer(obs, noise=noise[0])["actions"])
    previous = np.asarray(out["actions"])  # no output transforms: the model's space
    guided = policy.infer({**obs, "flowcorrect": rtc}, noise=noise[1])
    assert guided["flowcorrect"] == {"placement": "RealTimeChunking", "episode": "e1",
                                     "request": 1}
    free = policy.infer({**obs, "flowcorrect": {"placement": "off"}}, noise=noise[1])
    target = previous[s : s + d]
    gap_guided = float(np.abs(guided["actions"][:d] - target).mean())
    gap_free = float(np.abs(free["actions"][:d] - target).mean())
    assert gap_guided < 0.5 * gap_free, (gap_guided, gap_free)
    assert bool(np.all(np.isfinite(guided["actions"])))
    with pytest.raises(ValueError, match="needs 'inference_delay' and 'execution_horizon'"):
        policy.infer({**obs, "flowcorrect": {"placement": "rtc", "inference_delay": 2}})
    with pytest.raises(ValueError, match="this server has none"):
        policy.infer({**obs, "flowcorrect": {"placement": "post_hoc"}})
    # The leftover is the episode's, never the process's: without an id RTC is refused,
    # and another episode's first request is plain, not pulled onto e1's chunk.
    with pytest.raises(ValueError, match="name the episode with 'episode'"):
        policy.infer({**obs, "flowcorrect": {**rtc, "episode": None}})
    other = policy.infer({**obs, "flowcorrect": {**rtc, "episode": "e2"}}, noise=noise[1])
    assert other["flowcorrect"]["placement"] == "off"
    assert tree_bitwise_equal(other["actions"], free["actions"])


def policy_chunk(config):
    return (config.action_horizon, config.action_dim)


@needs_openpi
def test_websocket_server_and_client_in_process(serving):
    pytest.importorskip(
        "websockets", reason="openpi's websocket server and openpi-client need `websockets`, "
        "which this environment lacks (pip install websockets)"
    )
    import asyncio
    import socket
    import threading

    from openpi.serving.websocket_policy_server import WebsocketPolicyServer
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from flowcorrect.openpi import CorrectedPolicy

    config, model, obs, plain, first = serving
    policy = CorrectedPolicy.from_policy(plain, _energy(), action_dims=7)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = WebsocketPolicyServer(policy, host="127.0.0.1", port=port,
                                   metadata=policy.metadata)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: _run_until_cancelled(loop, server.run()),
                              daemon=True)
    thread.start()
    client = WebsocketClientPolicy("127.0.0.1", port)  # retries until the server is up
    try:
        assert client.get_server_metadata()["flowcorrect"]["action_dims"] == 7
        out = client.infer(obs)  # the server's first call: openpi's actions, same rng
        assert out["flowcorrect"] == {"placement": "off"}
        np.testing.assert_array_equal(out["actions"], first)
        out = client.infer({**obs, "flowcorrect": {"placement": "guided", "last": 2,
                                                   "weight": 1.0}})
        assert out["flowcorrect"] == {"placement": "Guided"}
        assert out["actions"].shape == policy_chunk(config)
        assert bool(np.all(np.isfinite(out["actions"])))
    finally:
        client._ws.close()
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        thread.join(30)
        loop.close()


def _run_until_cancelled(loop, coroutine):
    import asyncio

    asyncio.set_event_loop(loop)
    # jax's config is per thread: openpi's Gemma needs implicit rank promotion here too.
    with jax.numpy_rank_promotion("allow"):
        try:
            loop.run_until_complete(coroutine)
        except asyncio.CancelledError:
            pass


# -- energy-training data from openpi's batches --


def _fake_batches(config, num):
    """Batches in the format of openpi's data loader on its fake data (`repo_id="fake"`):
    (Observation, actions) with every array drawn per `inputs_spec`, plus real padding
    (an absent image, prompts of different lengths)."""
    out = []
    for i in range(num):
        observation = _observation(config, jax.random.key(20 + i))
        actions = jax.random.uniform(jax.random.key(30 + i), (BATCH, config.action_horizon,
                                                              config.action_dim), minval=-1)
        out.append((observation, actions))
    return out


@needs_openpi
def test_energy_batches_from_openpi_data(serving, monkeypatch):
    from openpi.models import pi0 as _pi0

    from flowcorrect.openpi import Pi0Policy, energy_batches

    config, model, obs, plain, first = serving
    policy = Pi0Policy(model)
    data = _fake_batches(config, 3)
    calls = []
    original = _pi0.Pi0.embed_prefix

    def counted(self, o):
        jax.debug.callback(lambda: calls.append(1))
        return original(self, o)

    monkeypatch.setattr(_pi0.Pi0, "embed_prefix", counted)
    batches = list(energy_batches(policy, data, action_dims=7))
    jax.block_until_ready(batches[-1].context.tokens)
    assert len(calls) == 3  # one prefix pass per batch
    for batch, (observation, actions) in zip(batches, data, strict=True):
        assert isinstance(batch, fc.train.Batch)
        np.testing.assert_array_equal(batch.actions, actions[..., :7])
        cond = eqx.filter_jit(type(policy).condition)(policy, observation)
        expected = policy.energy_context(cond)
        np.testing.assert_array_equal(batch.context.mask, expected.mask)
        np.testing.assert_allclose(batch.context.tokens, expected.tokens, rtol=1e-5, atol=1e-5)
        assert batch.context.tokens.dtype == jnp.float32
    # Pooled: the mean over real tokens only.
    (pooled,) = list(energy_batches(model, data[:1], pool=True, keep_observation=True))
    tokens, mask = batches[0].context.tokens, np.asarray(batches[0].context.mask)
    manual = (np.asarray(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled.context, manual, rtol=1e-5, atol=1e-5)
    assert pooled.actions.shape == (BATCH, config.action_horizon, config.action_dim)
    assert pooled.observation is data[0][0]

    # Into the trainer: a learned energy of the 7 dims over prefix_out.
    energy = fc.EnergyModel(fc.EnergyModelConfig(context_dim=64, action_dim=7, hidden=32,
                                                 num_heads=2), key=jax.random.key(6))
    result = fc.train.fit(energy, batches, key=jax.random.key(7), progress=False,
                    config=fc.train.TrainConfig(num_steps=3, warmup_steps=1, log_every=1))
    assert all(np.isfinite(h["loss"]) for h in result.history)

    with pytest.raises(ValueError, match=r"actions must be \(batch, action_horizon"):
        list(energy_batches(policy, [(data[0][0], data[0][1][:, :10])]))
    with pytest.raises(TypeError, match=r"pair \(observation, actions\)"):
        list(energy_batches(policy, [data[0][0]]))
    with pytest.raises(ValueError, match="`action_dims` must be an int from 1"):
        energy_batches(policy, data, action_dims=40)


@needs_openpi
def test_energy_batches_from_openpis_own_fake_loader(serving):
    pytest.importorskip("lerobot", reason="openpi's data_loader module imports lerobot at "
                        "top level, which this environment lacks")
    from openpi.training import config as _config, data_loader as _data_loader

    from flowcorrect.openpi import energy_batches

    config, model, obs, plain, first = serving
    train_config = _config.get_config("debug")  # fake data, dummy Pi0, batch 2
    loader = _data_loader.create_data_loader(train_config, skip_norm_stats=True, num_batches=2)
    batches = list(energy_batches(model, loader, action_dims=7))
    assert len(batches) == 2
    assert batches[0].actions.shape == (train_config.batch_size, config.action_horizon, 7)
