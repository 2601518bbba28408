"""Verifiers from rollouts on synthetic data whose answer is known.

Two data sets of the same shape: in one the episode succeeds when the executed chunk's
first action points the right way for the state (the action matters); in the other
success depends on the state only. A verifier must find the first with a high
action-advantage AUC and must not claim one (about 0.5) on the second.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc

OBS, N, H, D = 6, 8, 4, 2


def _synthetic(num_episodes: int, action_matters: bool, seed: int = 0) -> fc.verifiers.Rollouts:
    """One query per episode (so queries are independent); the executed candidate is a
    random one of the `N` i.i.d. candidates, as in a plain rollout."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((num_episodes, OBS)).astype(np.float32)
    cand = rng.standard_normal((num_episodes, N, H, D)).astype(np.float32)
    executed = rng.integers(0, N, num_episodes)
    a = cand[np.arange(num_episodes), executed]
    if action_matters:
        success = a[:, 0, 0] * np.sign(obs[:, 0]) > 0  # move towards the state's side
    else:
        success = obs[:, 1] > 0
    steps = rng.integers(1, 50, num_episodes)
    return fc.verifiers.Rollouts(
        observation=obs, candidates=cand, executed=executed.astype(np.int64),
        episode=np.arange(num_episodes, dtype=np.int64), step=np.zeros(num_episodes, np.int64),
        success=success, steps_to_success=np.where(success, steps, -1).astype(np.int64),
        episode_seed=np.arange(num_episodes, dtype=np.int64),
    )


def _model(seed=0):
    return fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=OBS, action_dim=D, horizon=H, hidden=64),
                        key=jax.random.key(seed))


CONFIG = fc.train.TrainConfig(num_steps=400, learning_rate=3e-3, warmup_steps=20, log_every=100,
                        grad_penalty=0.0)


@pytest.fixture(scope="module")
def data():
    return {flag: _synthetic(3000, flag, seed=int(flag)).split(0.3, seed=1)
            for flag in (True, False)}


def test_outcome_verifier_learns_the_action_rule(data):
    train, held = data[True]
    result = fc.verifiers.fit_verifier(
        _model(),
        fc.verifiers.outcome_batches(train, 128),
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(0),
        config=CONFIG,
        progress=False,
    )
    rep = fc.verifiers.verifier_report(result.model, held)
    assert rep.success_auc > 0.9
    assert rep.action_advantage_auc > 0.85
    # Best-of-8 by the verifier would choose well: offline, the queries whose executed
    # chunk was its argmin succeeded far more often than a random candidate.
    assert rep.top_success > rep.random_success + 0.3
    assert result.history[-1]["accuracy"] > 0.85


def test_state_only_outcomes_give_no_action_advantage(data):
    train, held = data[False]
    result = fc.verifiers.fit_verifier(
        _model(),
        fc.verifiers.outcome_batches(train, 128),
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(0),
        config=CONFIG,
        progress=False,
    )
    rep = fc.verifiers.verifier_report(result.model, held)
    assert rep.success_auc > 0.9  # it knows the state's value...
    assert abs(rep.action_advantage_auc - 0.5) < 0.08  # ...and nothing about the action
    assert rep.spread_ratio < 0.5


def test_bradley_terry_on_similar_states_learns_the_action():
    # Many episodes at few states, so that succeeding and failing queries share states.
    base = _synthetic(4000, True, seed=3)
    rng = np.random.default_rng(0)
    states = rng.standard_normal((40, OBS)).astype(np.float32)
    obs = states[rng.integers(0, 40, base.num_queries)]
    a = base.executed_actions
    success = a[:, 0, 0] * np.sign(obs[:, 0]) > 0
    roll = fc.verifiers.Rollouts(
        obs,
        base.candidates,
        base.executed,
        base.episode,
        base.step,
        success,
        np.where(success, 5, -1),
        base.episode_seed,
    )
    train, held = roll.split(0.3, seed=0)
    win, lose = fc.verifiers.similar_state_pairs(train, max_distance=1e-3)
    assert len(win) > 500 and np.all(train.success[win]) and not np.any(train.success[lose])
    assert np.allclose(train.observation[win], train.observation[lose])
    result = fc.verifiers.fit_verifier(
        _model(1),
        fc.verifiers.pair_batches(train, 128, max_distance=1e-3),
        fc.verifiers.BradleyTerryLoss(),
        key=jax.random.key(1),
        config=CONFIG,
        progress=False,
    )
    rep = fc.verifiers.verifier_report(result.model, held)
    assert rep.action_advantage_auc > 0.85


def test_discounted_target_orders_by_time_to_success():
    roll = _synthetic(10, True)
    v = roll.discounted(0.9)
    assert np.all(v[~roll.success] == 0)
    assert np.allclose(v[roll.success], 0.9 ** roll.steps_to_success[roll.success])
    batch = fc.verifiers.outcome_batches(roll, 5, target="discounted", gamma=0.9)(0)
    assert batch.target.shape == (5,) and float(jnp.max(batch.target)) <= 1
    with pytest.raises(ValueError, match="gamma"):
        roll.discounted(0.0)
    with pytest.raises(ValueError, match="'success' or 'discounted'"):
        fc.verifiers.outcome_batches(roll, 5, target="value")


def test_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.random(200) < 0.4
    pos, neg = s[y], s[~y]
    expected = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert fc.verifiers.auc(s, y) == pytest.approx(expected)
    assert np.isnan(fc.verifiers.auc(s, np.ones(200, bool)))


def test_rollouts_from_episodes_and_writer_resume(tmp_path):
    t, e = 5, 3
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((t, e, OBS))
    cand = rng.standard_normal((t, e, N, H, D))
    steps = np.arange(t) * 4
    length = np.array([20, 7, 13])  # episode 0 ran out, 1 and 2 succeeded early
    success = np.array([False, True, True])
    roll = fc.verifiers.Rollouts.from_episodes(
        obs, cand, np.zeros((t, e), int), steps, length, success, [10, 11, 12]
    )
    assert roll.num_queries == 5 + 2 + 4
    assert list(roll.steps_to_success[roll.episode == 1]) == [7, 3]
    assert np.all(roll.steps_to_success[roll.episode == 0] == -1)
    assert np.array_equal(roll.observation[roll.episode == 2][-1], obs[3, 2].astype(np.float32))
    writer = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    writer.append(roll)
    again = fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "x"})
    assert again.num_episodes == 3
    again.append(roll)
    # A part written but never listed (a crash before meta.json) is ignored.
    (tmp_path / "r" / "part-00002.npz").write_bytes(b"partial")
    loaded = fc.verifiers.load_rollouts(tmp_path / "r")
    assert loaded.num_episodes == 6 and loaded.num_queries == 2 * roll.num_queries
    assert np.array_equal(loaded.episode[roll.num_queries:], roll.episode + 3)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["episodes"] == 6
    with pytest.raises(ValueError, match="collected with"):
        fc.verifiers.RolloutWriter(tmp_path / "r", {"task": "y"})
    train, held = loaded.split(0.5, seed=0)
    assert train.num_episodes + held.num_episodes == 6
    assert not set(train.episode_seed.tolist()) & set(held.episode_seed.tolist()) - {10, 11, 12}


def test_fit_verifier_resumes_exactly(tmp_path):
    roll = _synthetic(300, True)
    data = fc.verifiers.outcome_batches(roll, 32, seed=4)
    cfg = fc.train.TrainConfig(num_steps=12, learning_rate=1e-3, warmup_steps=2, log_every=3,
                         checkpoint_every=6)
    full = fc.verifiers.fit_verifier(
        _model(),
        data,
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(2),
        config=cfg,
        progress=False,
    )
    half = fc.train.TrainConfig(**{**cfg.to_dict(), "num_steps": 12})
    # A run killed after its first checkpoint, then started again.
    calls = []

    def dying(step):
        if step == 7:
            raise KeyboardInterrupt
        calls.append(step)
        return data(step)

    with pytest.raises(KeyboardInterrupt):
        fc.verifiers.fit_verifier(
            _model(),
            dying,
            fc.verifiers.OutcomeLoss(),
            key=jax.random.key(2),
            config=half,
            checkpoint_dir=tmp_path / "ck",
            progress=False,
        )
    resumed = fc.verifiers.fit_verifier(
        _model(),
        data,
        fc.verifiers.OutcomeLoss(),
        key=jax.random.key(2),
        config=half,
        checkpoint_dir=tmp_path / "ck",
        progress=False,
    )
    assert eqx.tree_equal(full.model, resumed.model, rtol=1e-6, atol=1e-7)
    assert [h["step"] for h in resumed.history] == [3, 6, 9, 12]
    with pytest.raises(ValueError, match="trained with"):
        fc.verifiers.fit_verifier(
            _model(),
            fc.verifiers.pair_batches(_pairs_roll(), 8),
            fc.verifiers.BradleyTerryLoss(),
            key=jax.random.key(2),
            config=half,
            checkpoint_dir=tmp_path / "ck",
            progress=False,
        )


def _pairs_roll():
    return _synthetic(200, True)


def test_clear_errors():
    roll = _synthetic(20, True)
    with pytest.raises(TypeError, match="`loss` must be a verifier loss"):
        fc.verifiers.fit_verifier(
            _model(), fc.verifiers.outcome_batches(roll, 4), "bce", key=jax.random.key(0)
        )
    with pytest.raises(TypeError, match="`data` must be a function"):
        fc.verifiers.fit_verifier(
            _model(), [1, 2], fc.verifiers.OutcomeLoss(), key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="batch_size"):
        fc.verifiers.outcome_batches(roll, 21)
    with pytest.raises(ValueError, match="Only .* pairs of similar states"):
        fc.verifiers.pair_batches(roll, 8, max_distance=1e-9)
    with pytest.raises(ValueError, match="`executed` must index the 8 candidates"):
        fc.verifiers.Rollouts(roll.observation, roll.candidates, roll.executed + 8, roll.episode,
                    roll.step, roll.success, roll.steps_to_success, roll.episode_seed)
    with pytest.raises(ValueError, match="`success` must be a NumPy array with one row"):
        fc.verifiers.Rollouts(roll.observation, roll.candidates, roll.executed, roll.episode,
                    roll.step, roll.success[:3], roll.steps_to_success, roll.episode_seed)
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        fc.verifiers.load_rollouts("/nonexistent/rollouts")
