"""openpi's Pi0 on Meta-World (flowcorrect.metaworld.openpi_pi0): views, training,
acting through CorrectedPi0.

Runs where both openpi and metaworld import and skips, saying which is missing,
elsewhere (CI has no openpi). Local run, in the environment of docs/openpi.md with
metaworld added:

    /work/venv-openpi/bin/python -m pytest tests/test_metaworld_openpi.py

One tiny model (Pi0 with the `dummy` Gemmas and SigLIP `mu/14`, float32) is trained
for a few steps once per module; observations are synthetic Meta-World vectors, so
no simulator step is needed.
"""

import importlib.util

import jax
import numpy as np
import pytest

from .helpers import tree_bitwise_equal

_MISSING = [m for m in ("openpi", "metaworld") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"needs openpi and metaworld in one environment; missing: {_MISSING} "
        "(see docs/openpi.md and docs/metaworld.md)",
    ),
    # flax 0.10.2 (openpi's pin) calls two jax 0.5.3 APIs in ways jax deprecates.
    pytest.mark.filterwarnings(
        "ignore:linear_util.wrap_init is missing a DebugInfo:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:shape requires ndarray or scalar arguments:DeprecationWarning"
    ),
]

TASK = "pick-place-v3"
BATCH = 3


def _demos():
    """Two short fake demonstrations with the real observation layout: the hand moves
    towards the object, the object then moves towards the goal."""
    from flowcorrect.metaworld.envs import Demos

    rng = np.random.default_rng(0)
    obs, actions, episode, length = [], [], [], []
    for e in range(2):
        n = 12 + 3 * e
        o = np.zeros((n, 39), np.float32)
        o[:, 0:3] = np.linspace([0.0, 0.6, 0.2], [0.05, 0.65, 0.02], n)
        o[:, 3] = np.linspace(1.0, 0.3, n)
        o[:, 4:7] = np.linspace([0.05, 0.65, 0.02], [0.0, 0.85, 0.2], n)
        o[:, 7:11] = [0.0, 0.0, 0.0, 1.0]
        o[1:, 18:29] = o[:-1, 0:11]
        o[0, 18:29] = o[0, 0:11]
        o[:, 36:39] = [0.0, 0.85, 0.2]
        obs.append(o)
        actions.append(np.clip(rng.normal(0, 0.5, (n, 4)), -1, 1).astype(np.float32))
        episode.append(np.full(n, e, np.int32))
        length.append(n)
    return Demos(np.concatenate(obs), np.concatenate(actions), np.concatenate(episode),
                 np.arange(2), np.ones(2, bool), np.asarray(length, np.int32))


@pytest.fixture(scope="module")
def trained():
    from flowcorrect.metaworld import openpi_pi0 as op

    config = op.Pi0TaskConfig(horizon=4, steps=6, batch_size=4, peak_lr=1e-3,
                              warmup_steps=1, augment=False)
    with jax.numpy_rank_promotion("allow"):
        return op.train_pi0(TASK, _demos(), config, seed=0, cache="none", progress=False,
                            log_every=1)


def test_views_deterministic_and_follow_the_object():
    from flowcorrect.metaworld.openpi_pi0 import IMAGE_KEYS, render_views

    obs = _demos().obs[:BATCH]
    a, b = render_views(obs), render_views(obs.copy())
    assert set(a) == set(IMAGE_KEYS)
    for k in IMAGE_KEYS:
        assert a[k].shape == (BATCH, 224, 224, 3) and a[k].dtype == np.uint8
        np.testing.assert_array_equal(a[k], b[k])
    assert not a["right_wrist_0_rgb"].any()
    moved = obs.copy()
    moved[:, 4] += 0.1  # object 10 cm along x: the top view changes, the side view not
    moved[:, 6] += 0.1  # and 10 cm up: now the side view too
    c = render_views(moved)
    for k in ("base_0_rgb", "left_wrist_0_rgb"):
        changed = np.any(a[k] != c[k], axis=-1).sum(axis=(1, 2))
        assert np.all(changed > 50), (k, changed)
    with pytest.raises(ValueError, match=r"`obs` must be \(N, 39\)"):
        render_views(obs[:, :10])


def test_training_lowers_the_loss(trained):
    losses = trained.losses
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_act_shapes_finite_and_keyed(trained):
    from flowcorrect.metaworld.openpi_pi0 import make_act

    act = make_act(trained)
    obs = _demos().obs[:BATCH]
    with jax.numpy_rank_promotion("allow"):
        chunks, diag = act(obs, jax.random.key(3))
        again, _ = act(obs, jax.random.key(3))
        other, _ = act(obs, jax.random.key(4))
    assert chunks.shape == (BATCH, 4, 4) and diag == {}
    assert np.all(np.isfinite(chunks))
    clipped = np.clip(chunks, -1, 1)
    assert clipped.min() >= -1 and clipped.max() <= 1
    np.testing.assert_array_equal(chunks, again)
    assert not np.array_equal(chunks, other)


def test_plain_equals_openpi_sample_actions(trained):
    """Plain through CorrectedPi0 (make_act) is openpi's own `model.sample_actions` with
    the same noise, bit for bit in float32."""
    from openpi.shared import nnx_utils

    from flowcorrect.metaworld.openpi_pi0 import make_act, make_observation

    obs = _demos().obs[5 : 5 + BATCH]
    key = jax.random.key(7)
    config = trained.config
    noise = jax.random.normal(key, (BATCH, config.horizon, config.action_dim))
    with jax.numpy_rank_promotion("allow"):
        chunks, _ = make_act(trained)(obs, key)
        observation = make_observation(obs, TASK, config, trained.norm)
        sample = nnx_utils.module_jit(trained.model.sample_actions)
        want = sample(key, observation, num_steps=config.num_steps, noise=noise)
    want = np.asarray(want)[:, :, :4]
    assert want.dtype == np.float32 and np.abs(want).max() > 0
    assert tree_bitwise_equal(chunks, want), np.abs(chunks - want).max()


def test_cache_round_trip(trained, tmp_path):
    from flowcorrect.metaworld.openpi_pi0 import load_pi0, make_act, save_pi0

    save_pi0(tmp_path / "m", trained)
    loaded = load_pi0(tmp_path / "m")
    assert loaded.config == trained.config and loaded.losses == trained.losses
    obs = _demos().obs[:BATCH]
    with jax.numpy_rank_promotion("allow"):
        a, _ = make_act(trained)(obs, jax.random.key(1))
        b, _ = make_act(loaded)(obs, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
