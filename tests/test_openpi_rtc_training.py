"""Training-time real-time chunking for openpi's Pi0, against a real test-size Pi0.

Runs where openpi is importable and skips, saying why, where it is not (openpi is not
on PyPI). Local run, in the environment of docs/openpi.md:

    /work/venv-openpi/bin/python -m pytest tests/test_openpi_rtc_training.py

One Pi0 (openpi's `dummy` Gemma variants, SigLIP `mu/14`), built once for the module;
each test checks several things on it so that there are few compiles.
"""

import importlib.util
import types

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

# openpi's pinned flax / jax stack, not our code (as in tests/test_openpi.py).
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:linear_util.wrap_init is missing a DebugInfo:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:shape requires ndarray or scalar arguments:DeprecationWarning"
    ),
]

BATCH = 2


@pytest.fixture(scope="module")
def setup():
    if not HAS_OPENPI:
        pytest.skip("openpi is not installed (it is not on PyPI); see docs/openpi.md")
    from openpi.models import model as _model, pi0_config

    from flowcorrect.openpi import Pi0Policy, tiny_siglip

    # openpi's Gemma relies on implicit rank promotion, which conftest makes an error.
    with jax.numpy_rank_promotion("allow"):
        config = pi0_config.Pi0Config(paligemma_variant="dummy",
                                      action_expert_variant="dummy", dtype="float32")
        with tiny_siglip():
            model = config.create(jax.random.key(0))
        spec, _ = config.inputs_spec(batch_size=BATCH)
        keys = iter(jax.random.split(jax.random.key(1), 16))
        length = spec.tokenized_prompt.shape[1]
        obs = _model.Observation(
            images={n: jax.random.uniform(next(keys), s.shape, minval=-1.0, maxval=1.0)
                    for n, s in spec.images.items()},
            image_masks={n: jnp.ones((BATCH,), bool) for n in spec.images},
            state=jax.random.normal(next(keys), spec.state.shape),
            tokenized_prompt=jax.random.randint(next(keys), (BATCH, length), 1, 1000),
            tokenized_prompt_mask=jnp.arange(length)[None, :] < jnp.array([[7], [length // 2]]),
        )
        yield config, model, Pi0Policy(model), obs


@needs_openpi
def test_token_time_velocity_is_openpis_at_equal_times_and_conditions_on_the_prefix(setup):
    from flowcorrect.openpi import Pi0TokenTimePolicy

    config, model, plain, obs = setup
    policy = Pi0TokenTimePolicy(model)
    h, a = config.action_horizon, config.action_dim
    with jax.numpy_rank_promotion("allow"):
        prefix = eqx.filter_jit(lambda p, o: p.condition(o))(plain, obs)
        x = jax.random.normal(jax.random.key(2), (BATCH, h, a))
        t = jnp.float32(0.6)
        v_plain = eqx.filter_jit(lambda p, *args: p.velocity(*args))(plain, prefix, x, t)
        token_jit = eqx.filter_jit(lambda p, *args: p.velocity(*args))

        def v_token(*args):
            return token_jit(policy, *args)
        # Equal times: openpi's own embed_suffix, up to float rounding.
        np.testing.assert_allclose(v_token(prefix, x, jnp.full((h,), t)), v_plain,
                                   rtol=1e-4, atol=3e-4)
        np.testing.assert_allclose(v_token(prefix, x, t), v_plain, rtol=1e-4, atol=3e-4)
        # A clean prefix at openpi's data end (t = 0) changes the velocity of the rest.
        times = fc.rtc.token_times(t, 3, h, fc.OpenPI())
        assert float(times[0]) == 0.0 and float(times[3]) == float(t)
        v_mixed = v_token(prefix, x, times)
        assert not np.allclose(v_mixed[:, 3:], v_plain[:, 3:], atol=1e-2)

        # Sampling with the committed prefix: exact on the prefix, one velocity per step.
        left = jax.random.normal(jax.random.key(3), (BATCH, h - 2, a))
        noise = jax.random.normal(jax.random.key(4), (BATCH, h, a))
        actions, info = fc.sample(policy, obs, None, noise=noise, num_steps=4,
                                  placement=fc.rtc.PrefixConditioned(left, 2))
        assert not bool(info.fell_back.any())
        np.testing.assert_array_equal(actions[:, :2], left[:, :2])
        zero, _ = fc.sample(policy, obs, None, noise=noise, num_steps=4,
                            placement=fc.rtc.PrefixConditioned(left, 0))
        base, _ = fc.sample(plain, obs, None, noise=noise, num_steps=4)
        np.testing.assert_allclose(zero, base, rtol=1e-4, atol=3e-4)


@needs_openpi
def test_loss_is_taken_on_the_postfix_only_and_pi05_is_refused(setup):
    from flowcorrect.openpi import Pi0TokenTimePolicy, pi0_prefix_conditioned_loss
    from flowcorrect.openpi._rtc_training import _refuse_pi05

    config, model, _, obs = setup
    h, a = config.action_horizon, config.action_dim
    actions = jax.random.normal(jax.random.key(5), (BATCH, h, a))
    with jax.numpy_rank_promotion("allow"):
        from flax import nnx

        graphdef, weights = nnx.split(model)  # an nnx module is not a pytree; its state is
        loss = jax.jit(lambda w, o, x: pi0_prefix_conditioned_loss(
            nnx.merge(graphdef, w), jax.random.key(6), o, x,
            fc.rtc.UniformDelays(3, min_delay=3)))(weights, obs, actions)
    assert loss.shape == (BATCH, h)
    np.testing.assert_array_equal(loss[:, :3], 0.0)
    assert bool((loss[:, 3:] > 0).all())
    # openpi's training loop takes the plain mean: that is the mean over postfix tokens.
    np.testing.assert_allclose(jnp.mean(loss), jnp.mean(loss[:, 3:] * (h - 3) / h),
                               rtol=1e-5)
    with pytest.raises(NotImplementedError, match="adaRMS"):
        _refuse_pi05(types.SimpleNamespace(pi05=True))
    with pytest.raises(TypeError, match="delays"):
        pi0_prefix_conditioned_loss(model, jax.random.key(0), obs, actions, 4)
    assert Pi0TokenTimePolicy(model).accepts_token_time
