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
    prefix = eqx.filter_jit(type(policy).prefix)(policy, observation)
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
        policy.prefix({"state": observation.state})
    unbatched = jax.tree.map(lambda x: x[0], observation)
    with pytest.raises(ValueError, match=r"\(batch, state_dim\).*got \(32,\)"):
        policy.prefix(unbatched)
    prefix = eqx.filter_jit(type(policy).prefix)(policy, observation)
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
