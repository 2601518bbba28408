"""The harness's constraint experiment: its constraints, its settings' guarantees on a
small policy, the rollout's violation count and the table."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc
from flowcorrect.metaworld import constraints as mc
from flowcorrect.metaworld.evaluate import Episodes

needs_metaworld = pytest.mark.skipif(
    importlib.util.find_spec("metaworld") is None, reason="needs flowcorrect[metaworld]"
)


def _policy():
    from flowcorrect.metaworld.policy import FlowMLPPolicy, PolicyConfig

    config = PolicyConfig(horizon=4, width=32, depth=2)
    return FlowMLPPolicy(config, np.linspace(-1, 1, 39), np.full(39, 2.0),
                         key=jax.random.key(1))


@pytest.mark.parametrize(("name", "action", "expected"), [
    ("speed", [0.6, 0.0, 0.8, 1.0], 0.2),       # ||a[:3]|| = 1.0, limit 0.8
    ("speed", [0.4, 0.4, 0.4, -1.0], 0.0),      # inside; the gripper is free
    ("descent", [0.0, 0.0, -0.5, 0.0], 0.2),    # down at 0.5, limit 0.3
    ("descent", [1.0, -1.0, 1.0, 1.0], 0.0),    # up is free
])
def test_constraints_measure_the_translation_command(name, action, expected):
    c = mc.make_constraint(name)
    got = float(c.violation(jnp.asarray([action], jnp.float32)))
    assert got == pytest.approx(expected, abs=1e-6)


def test_unknown_constraint_is_refused_by_name():
    with pytest.raises(ValueError, match="speed.*descent.*'jerk'"):
        mc.make_constraint("jerk")


@pytest.mark.parametrize("name", mc.CONSTRAINTS)
def test_projected_settings_leave_every_chunk_feasible(name):
    policy = _policy()
    c = mc.make_constraint(name)
    obs = np.asarray(jax.random.normal(jax.random.key(2), (8, 39)) * 3, np.float32)
    by_name = {s.name: s for s in mc.suite(c, 10.0)}
    assert list(by_name)[:2] == ["plain", "project"]
    plain, diag_plain = mc.make_act(policy, c, by_name["plain"])(obs, jax.random.key(3))
    # The untrained policy's chunks (unit noise, pushed by its random velocity) must
    # violate for the test to mean anything.
    assert np.mean(diag_plain["violation_after"] > 1e-4) > 0.2
    # Projection alone, and after guidance (feasible-first ranking is tested with the
    # constraints themselves).
    for setting in (by_name["project"], by_name["guided w=10 + project"]):
        chunks, diag = mc.make_act(policy, c, setting)(obs, jax.random.key(3))
        after = np.asarray(jax.vmap(c.violation)(chunks))
        assert np.all(after <= 1e-5), setting.name
        assert np.all(np.isfinite(diag["distance"])) and np.all(diag["distance"] >= 0)
        if setting.name == "project":
            # Projection of the same plain chunk: moved exactly where it violated, by
            # the distance to the feasible set (closed form for a ball and a plane).
            np.testing.assert_allclose(diag["violation_before"],
                                       diag_plain["violation_after"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(diag["distance"], diag["violation_before"],
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(diag["moved"] > 0,
                                          diag_plain["violation_after"] > 0)


def _episodes(success, violations, distance):
    n = len(success)
    return Episodes(np.arange(n), np.asarray(success, bool), np.full(n, 10, np.int32),
                    np.zeros(n, np.int32), np.zeros(n, np.float32),
                    {"violation_before": 0.5, "violation_after": 0.0, "distance": distance,
                     "moved": 1.0},
                    violations=np.asarray(violations, np.int32),
                    max_violation=np.asarray(violations, float) * 0.1)


def test_table_pairs_with_plain_and_counts_violations():
    plain = [_episodes([1, 1, 0, 0, 1], [3, 0, 2, 0, 1], np.nan)]
    other = [_episodes([1, 0, 1, 1, 1], [0, 0, 0, 0, 0], 0.25)]
    rows = mc.table_rows({"plain": plain, "project": other})
    assert rows[0]["violating_episodes"] == 3 and rows[0]["violating_steps"] == 6
    assert rows[1]["violating_steps"] == 0 and rows[1]["max_violation"] == 0.0
    assert (rows[1]["wins"], rows[1]["losses"]) == (2, 1)
    assert rows[1]["p"] == pytest.approx(1.0)  # exact McNemar on 2 vs 1
    assert "mean distance 0.25" in rows[1]["extra"]


def test_episode_violations_survive_json():
    ep = _episodes([1, 0], [4, 0], 0.1)
    back = Episodes.from_json(json.loads(json.dumps(ep.to_json())))
    np.testing.assert_array_equal(back.violations, [4, 0])
    np.testing.assert_allclose(back.max_violation, [0.4, 0.0])
    old = ep.to_json()
    del old["violations"], old["max_violation"]
    assert Episodes.from_json(old).violations is None  # files without them still load


@needs_metaworld
def test_rollout_counts_executed_violations_only():
    from flowcorrect.metaworld.evaluate import EnvPool, rollout

    pool = EnvPool("pick-place-v3", 2)
    c = mc.make_constraint("descent")

    def act(obs, key):
        chunks = np.zeros((2, 4, 4), np.float32)
        chunks[0, :, 2] = -0.9   # every executed step descends too fast
        chunks[1, 1:, 2] = -0.9  # only the second executed step does; 3, 4 never run
        chunks[1, 0, 2] = -0.1
        chunks[1, 2:, 2] = -0.1
        return chunks, {}

    def violation(a):
        return float(c.violation(jnp.asarray(a[None], jnp.float32)))

    ep = rollout(pool, np.array([3, 4]), act, jax.random.key(0), execute=2, max_steps=6,
                 progress=False, violation=violation, tolerance=1e-6)
    assert ep.violations.tolist() == [6, 3]
    np.testing.assert_allclose(ep.max_violation, [0.6, 0.6], atol=1e-6)
    assert isinstance(c, fc.constraints.HalfSpace)


@needs_metaworld
@pytest.mark.filterwarnings(r"ignore:Constant\(s\) may be too high:UserWarning")
@pytest.mark.parametrize("name", mc.CONSTRAINTS)
def test_demonstrations_under_a_limit_respect_it_and_are_cached_apart(name, tmp_path):
    from flowcorrect.metaworld.envs import collect_demos

    c = mc.make_constraint(name)
    plain = collect_demos("pick-place-v3", 1, cache=tmp_path, progress=False, max_steps=150)
    limited = collect_demos("pick-place-v3", 1, cache=tmp_path, progress=False,
                            max_steps=150, limit=c)
    assert len(list(tmp_path.glob("demos-*.npz"))) == 2  # one cache entry each
    violation = jax.vmap(lambda a: c.violation(a[None]))
    before = np.asarray(violation(jnp.asarray(plain.actions)))
    after = np.asarray(violation(jnp.asarray(limited.actions)))
    tol = float(c.tolerance(jnp.ones((1, 4), jnp.float32)))
    assert (before > 0.05).mean() > 0.1  # the expert saturates: it crosses the limit
    assert after.max() <= tol  # every demonstrated action respects it
    # Only the translation is limited: the gripper command is the expert's own.
    assert set(np.unique(limited.actions[:, 3])) <= set(np.unique(plain.actions[:, 3]))
    again = collect_demos("pick-place-v3", 1, cache=tmp_path, progress=False,
                          max_steps=150, limit=c)
    np.testing.assert_array_equal(again.actions, limited.actions)


def test_the_cache_name_of_a_limit_reads_its_values():
    from flowcorrect.metaworld.envs import limit_tag

    assert limit_tag(mc.make_constraint("speed")) == limit_tag(mc.make_constraint("speed"))
    assert limit_tag(mc.make_constraint("speed")) != limit_tag(mc.make_constraint("speed", 1.2))
    assert limit_tag(mc.make_constraint("speed", 0.3)) != limit_tag(
        mc.make_constraint("descent", 0.3))
