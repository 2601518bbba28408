"""The held-out report's AUC and the offline checks of guidance, on energies whose
gradients are known in closed form (no training, so cheap)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import flowcorrect as fc
from flowcorrect._verifiers.guidance import guidance_report
from flowcorrect._verifiers.report import auc

OBS, N, H, D = 3, 6, 4, 2


def _rank_auc(score, label):
    """Mann-Whitney U from average ranks, as the report computed it before scipy."""
    score = np.asarray(score, np.float64)
    label = np.asarray(label, bool)
    pos, neg = int(label.sum()), int((~label).sum())
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return (ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40))
def test_auc_is_unchanged_and_counts_ties_half(rows):
    score = np.array([r[0] for r in rows], np.float64)  # small integers: many ties
    label = np.array([r[1] for r in rows])
    got = auc(score, label)
    if label.all() or not label.any():
        assert np.isnan(got)
        return
    assert got == pytest.approx(_rank_auc(score, label), abs=1e-12)
    pairs = score[label][:, None] - score[~label][None, :]
    assert got == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0)), abs=1e-12)


def test_auc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="1-d of equal length"):
        auc(np.zeros(3), np.zeros(4, bool))


def _target(obs):
    return jnp.broadcast_to(obs[:2], (H, D))


def _near(obs, a):
    """Low energy near the state's target chunk: downhill points at the target."""
    return jnp.sum((a - _target(obs)) ** 2)


def _far(obs, a):
    return -_near(obs, a)


def _flat(obs, a):
    return jnp.sum(obs) + 0.0 * jnp.sum(a)


def _rollouts(q=60, seed=0):
    """Successes executed a chunk near the state's target, failures one far from it; a
    failed query and a succeeded one share each state, so pairs of similar states exist."""
    rng = np.random.default_rng(seed)
    obs = np.repeat(rng.standard_normal((q // 2, OBS)), 2, axis=0).astype(np.float32)
    target = np.broadcast_to(obs[:, None, None, :2], (q, N, H, D))
    cand = (target + rng.standard_normal((q, N, H, D))).astype(np.float32)
    success = np.arange(q) % 2 == 0
    far = np.where(success[:, None, None], 0.1, 3.0)
    cand[:, 0] = target[:, 0] + far * rng.standard_normal((q, H, D))
    return fc.verifiers.Rollouts(
        observation=obs, candidates=cand, executed=np.zeros(q, np.int64),
        episode=np.arange(q, dtype=np.int64), step=np.zeros(q, np.int64), success=success,
        steps_to_success=np.where(success, 5, -1).astype(np.int64),
        episode_seed=np.arange(q, dtype=np.int64),
    )


def test_a_judge_that_agrees_sees_every_step_go_downhill():
    rep = guidance_report(_near, _rollouts(), judge=_near, pair_distance=0.1, step_size=0.01)
    assert rep.self_drop > 0
    assert rep.judge_agreement == 1.0
    assert rep.gradient_cosine == pytest.approx(1.0, abs=1e-5)
    assert 0.25 < rep.judge_null_agreement < 0.75  # a random direction: a coin
    # The failed chunks are far from the target, where a step of fixed length gains more.
    assert rep.drop_auc > 0.9
    # At each state the succeeded chunk is near the target, the failed one far: the
    # gradient at the failed chunk points towards the succeeded one.
    assert rep.num_pairs > 0 and rep.pair_cosine > 0.5


def test_an_opposed_judge_sees_every_step_go_uphill():
    rep = guidance_report(_near, _rollouts(), judge=_far, pair_distance=0.1, step_size=0.01)
    assert rep.judge_agreement == 0.0
    assert rep.gradient_cosine == pytest.approx(-1.0, abs=1e-5)
    assert rep.judge_drop < 0
    wrong = guidance_report(_far, _rollouts(), pair_distance=0.1)
    assert wrong.pair_cosine < -0.5


def test_a_judge_blind_to_actions_never_agrees():
    rep = guidance_report(_near, _rollouts(), judge=_flat)
    assert rep.judge_agreement == 0.0 and rep.judge_null_agreement == 0.0
    assert rep.gradient_cosine == 0.0


def test_guided_chunks_are_judged_against_the_plain_ones():
    roll = _rollouts()
    target = np.broadcast_to(roll.observation[:, None, None, :2], roll.candidates.shape)
    towards = roll.candidates + 0.5 * (target - roll.candidates)
    rep = guidance_report(_near, roll, judge=_near, guided=towards)
    assert rep.guided_win == 1.0 and rep.guided_gain > 0 and rep.guided_shift > 0
    away = guidance_report(_near, roll, judge=_near, guided=roll.candidates, plain=towards)
    assert away.guided_win == 0.0 and away.guided_gain < 0
    with pytest.raises(ValueError, match="`guided`"):
        guidance_report(_near, roll, guided=towards[:, :, :2])


def test_verifier_report_carries_the_guidance_check_only_when_asked():
    roll = _rollouts()
    assert fc.verifiers.verifier_report(_near, roll).guidance is None
    rep = fc.verifiers.verifier_report(_near, roll, judge=_near, step_size=0.01)
    assert rep.guidance is not None and rep.guidance.judge_agreement == 1.0
    assert rep.to_dict()["guidance"]["judge_agreement"] == 1.0


def test_medoid_index_is_the_medoid_selections_choice():
    from flowcorrect._verifiers.report import medoid_index

    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((20, 6, 4, 3)).astype(np.float32)
    # Query 0: one candidate sits at the others' centre, so it is the medoid.
    candidates[0, 4] = candidates[0].mean(0)
    got = medoid_index(candidates)
    assert got.shape == (20,) and got[0] == 4
    flat = candidates.reshape(20, 6, -1).astype(np.float64)
    brute = np.sqrt(((flat[:, :, None] - flat[:, None]) ** 2).sum(-1)).mean(-1).argmin(-1)
    np.testing.assert_array_equal(got, brute)
    assert len(set(got.tolist())) > 1  # not one fixed index
