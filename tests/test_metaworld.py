"""The Meta-World harness: statistics (no simulator needed) and, when Meta-World is
installed, seeded layouts, demonstrations, the policy seam and pairing."""

import dataclasses
import importlib
import importlib.util
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowcorrect as fc
from flowcorrect.metaworld import stats

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_METAWORLD = importlib.util.find_spec("metaworld") is not None
# Meta-World's scripted experts warn when their gains saturate the action bounds; the
# environment clips the actions, as the message says.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Constant\(s\) may be too high:UserWarning"
)

needs_metaworld = pytest.mark.skipif(
    not HAVE_METAWORLD,
    reason="Meta-World is not installed: pip install 'flowcorrect[metaworld]'",
)


# -- statistics: exact McNemar ------------------------------------------------------

# (k, n, p) from scipy.stats.binomtest(k, n).pvalue, checked by hand for small n.
KNOWN = [
    (0, 5, 0.0625),  # 2 * (1/32)
    (1, 1, 1.0),
    (3, 7, 1.0),  # symmetric around the middle: every outcome counts
    (10, 22, 0.8318119049072266),
    (21, 24, 0.0002771615982055664),
    (46, 101, 0.4261600154669939),
    (3, 24, 0.0002771615982055664),  # mirror of (21, 24)
]


@pytest.mark.parametrize("k,n,p", KNOWN)
def test_binomial_two_sided_known_values(k, n, p):
    assert stats.binomial_two_sided(k, n) == pytest.approx(p, rel=1e-12)


def _exact_two_sided(k, n):
    """The definition in integers: outcomes at most as likely as `k`, one division."""
    counts = [math.comb(n, i) for i in range(n + 1)]
    return min(1.0, sum(c for c in counts if c <= counts[k]) / 2**n)


def test_binomial_matches_direct_sum_for_all_small_cases():
    for n in range(0, 30):
        for k in range(n + 1):
            assert stats.binomial_two_sided(k, n) == pytest.approx(
                _exact_two_sided(k, n), rel=1e-9
            )
            assert stats.binomial_two_sided(k, n) == stats.binomial_two_sided(n - k, n)


@pytest.mark.parametrize("n", [73, 150, 300])
def test_binomial_matches_exact_integers_at_harness_sizes(n):
    # Discordant pairs of 300 paired episodes reach n = 300; tails reach 1e-90.
    for k in range(n + 1):
        assert stats.binomial_two_sided(k, n) == pytest.approx(
            _exact_two_sided(k, n), rel=1e-12
        )


def test_stored_results_p_values_are_reproduced():
    # Every p-value in the committed results (written by the harness, and quoted in the
    # docs) is what the test gives today for the row's wins and losses.
    checked = 0
    for path in sorted((ROOT / "benchmarks" / "results" / "metaworld").glob("*.json")):
        rows = json.loads(path.read_text())["rows"]
        # One table, or one table per baseline.
        for table in rows.values() if isinstance(rows, dict) else [rows]:
            for r in table:
                p = stats.mcnemar(r["wins"], r["losses"])
                assert p == pytest.approx(r["p"], rel=1e-12), (path.name, r["name"])
                checked += 1
    assert checked >= 60


# "+13/-42 0.00011", "+29/-14, p = 0.032", "| +9/-0 | 0.0039 |": wins, losses and the
# p-value as the docs print it.
_NUMBER = r"(\d[\d.]*(?:e[+-]?\d+)?)"
_QUOTED_P = [rf"\+(\d+)/-(\d+)\s+{_NUMBER}\s", rf"\+(\d+)/-(\d+), p = {_NUMBER}",
             rf"\| \+(\d+)/-(\d+) \| {_NUMBER} \|"]  # fmt: skip


def test_docs_p_values_are_reproduced():
    checked = 0
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text()
        for pattern in _QUOTED_P:
            for m in re.finditer(pattern, text):
                quoted = m[3]
                digits = max(1, len(quoted.split("e")[0].replace(".", "").lstrip("0")))
                p = stats.mcnemar(int(m[1]), int(m[2]))
                assert float(f"{p:.{digits}g}") == float(quoted), (page.name, m[0], p)
                checked += 1
    assert checked >= 100


def test_binomial_large_n_is_finite_and_tiny():
    # 300 discordant pairs all one way: 2 / 2**300, far below float rounding of 1.
    p = stats.binomial_two_sided(0, 300)
    assert 0 < p == pytest.approx(2.0**-299, rel=1e-12)


def test_mcnemar_uses_discordant_pairs_only():
    assert stats.mcnemar(21, 3) == pytest.approx(0.0002771615982055664, rel=1e-12)
    assert stats.mcnemar(0, 0) == 1.0
    with pytest.raises(ValueError, match="wins"):
        stats.mcnemar(-1, 3)
    with pytest.raises(ValueError, match="k="):
        stats.binomial_two_sided(5, 3)


def test_paired_counts():
    base = [True, True, False, False, True]
    new = [True, False, True, True, True]
    assert stats.paired_counts(base, new) == (2, 1)
    with pytest.raises(ValueError, match="same episodes"):
        stats.paired_counts(base, new[:3])


def test_format_table_reports_null_spread_expert_and_count():
    rows = [
        dict(name="plain", success=150, total=300, per_key=[45, 50, 55], wins=0, losses=0, p=1),
        dict(name="x", success=160, total=300, per_key=[50, 52, 58], wins=20, losses=10,
             p=stats.mcnemar(20, 10)),
    ]
    text = stats.format_table(rows, baseline="plain", null_spread=[45, 50, 55], expert=81,
                              episodes_per_key=100, num_settings=1)
    assert "[45, 50, 55]" in text and "81/100" in text and "+20/-10" in text
    assert "settings compared with 'plain': 1" in text


def test_missing_metaworld_names_the_extra(monkeypatch):
    from flowcorrect.metaworld import _require

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "metaworld":
            raise ImportError("no metaworld")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"flowcorrect\[metaworld\]"):
        _require.require_metaworld()


# -- policy seam and energies (no simulator needed) ------------------------------------


def _policy(horizon=4):
    from flowcorrect.metaworld.policy import FlowMLPPolicy, PolicyConfig

    config = PolicyConfig(horizon=horizon, width=32, depth=2)
    mean = np.linspace(-1, 1, 39)
    return FlowMLPPolicy(config, mean, np.full(39, 2.0), key=jax.random.key(1))


def test_policy_implements_the_seam():
    policy = _policy()
    assert isinstance(policy, fc.AbstractPolicy)
    assert policy.chunk_shape == (4, 4) and isinstance(policy.convention, fc.OpenPI)
    obs = jax.random.normal(jax.random.key(2), (39,))
    cond = policy.condition(obs)
    np.testing.assert_array_equal(policy.energy_context(cond), obs)
    x = jax.random.normal(jax.random.key(3), (4, 4))
    v1 = policy.velocity(cond, x, jnp.asarray(0.7))
    v2 = policy.velocity(cond, x, jnp.asarray(0.2))
    assert v1.shape == (4, 4) and not np.allclose(v1, v2)  # depends on t


def test_policy_training_lowers_the_flow_matching_loss():
    from flowcorrect.metaworld.policy import PolicyConfig, flow_matching_loss, train_policy

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, 39)).astype(np.float32)
    # Actions a deterministic function of the observation: learnable.
    chunks = np.tanh(obs[:, :16]).reshape(64, 4, 4).astype(np.float32)
    config = PolicyConfig(horizon=4, width=32, depth=2, steps=200, batch_size=64,
                          learning_rate=3e-3)
    untrained, _ = train_policy(obs, chunks, dataclasses.replace(config, steps=1),
                                progress=False)
    trained, _ = train_policy(obs, chunks, config, progress=False)
    key = jax.random.key(9)
    before = flow_matching_loss(untrained, obs, chunks, key)
    after = flow_matching_loss(trained, obs, chunks, key)
    assert after < 0.85 * before, (before, after)


def test_speed_limit_energy():
    from flowcorrect.metaworld.energies import SpeedLimit

    e = SpeedLimit(0.5)
    slow = jnp.array([[0.1, 0.2, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0]])
    fast = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0]])
    assert e(None, slow) == 0.0
    assert e(None, fast) == pytest.approx(0.25)
    g = jax.grad(lambda a: e(None, a))(fast)
    assert np.all(np.isfinite(g)) and g[0, 0] > 0 and g[0, 3] == 0
    # A zero command has a finite gradient (the norm's is 0/0).
    assert np.all(np.isfinite(jax.grad(lambda a: e(None, a))(jnp.zeros((2, 4)))))


# -- with the simulator ----------------------------------------------------------------


@needs_metaworld
def test_layouts_are_reproducible_and_differ_across_seeds():
    from flowcorrect.metaworld.envs import make_env, reset_env

    env = make_env("pick-place-v3")
    a = reset_env(env, 3)
    b = reset_env(env, 4)
    c = reset_env(env, 3)
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a[4:7], b[4:7])  # the object moved


@needs_metaworld
def test_demos_are_reproducible_from_seeds(tmp_path):
    from flowcorrect.metaworld.envs import collect_demos

    d1 = collect_demos("pick-place-v3", 2, cache=tmp_path / "a", progress=False)
    d2 = collect_demos("pick-place-v3", 2, cache=tmp_path / "b", progress=False)
    np.testing.assert_array_equal(d1.obs, d2.obs)
    np.testing.assert_array_equal(d1.actions, d2.actions)
    assert d1.success.all() and len(d1.seeds) == 2
    assert not np.allclose(d1.obs[0], d1.obs[d1.length[0]])  # two layouts
    obs, chunks = d1.chunks(5)
    # The chunk at step t is the expert's actions t..t+4, held at the episode's last.
    np.testing.assert_array_equal(chunks[0], d1.actions[:5])
    last = d1.length[0] - 1
    np.testing.assert_array_equal(chunks[last], np.repeat(d1.actions[last][None], 5, 0))


@needs_metaworld
def test_via_point_demonstrations_are_bimodal_and_reproducible(tmp_path):
    from flowcorrect.metaworld.envs import collect_demos, via_point_side

    sides = np.array([via_point_side(s) for s in range(200)])
    assert set(sides.tolist()) == {-1, 1} and 0.4 < (sides == 1).mean() < 0.6
    assert [via_point_side(s) for s in range(10)] == sides[:10].tolist()  # deterministic

    plain = collect_demos("pick-place-v3", 4, cache=tmp_path, progress=False)
    via = collect_demos("pick-place-v3", 4, cache=tmp_path, progress=False, via_point=0.15)
    again = collect_demos("pick-place-v3", 4, cache=tmp_path / "b", progress=False,
                          via_point=0.15)
    np.testing.assert_array_equal(via.actions, again.actions)
    assert via.success.all()
    assert (via.length > plain.length).all()  # the detour takes steps
    seen = set()
    start = 0
    for seed, n, n_plain in zip(via.seeds, via.length, plain.length):
        hand_x = via.obs[start:start + n, 0] - via.obs[start, 0]
        side = via_point_side(seed)
        seen.add(side)
        # The hand heads for its side first and goes most of the 0.15 m before the
        # task's expert takes over.
        assert side * hand_x[10] > 0.05, (seed, side, hand_x[:12])
        extreme = hand_x.max() if side == 1 else -hand_x.min()
        assert extreme > 0.12, (seed, side, extreme)
        start += n
    assert seen == {-1, 1}, "4 layouts from seed 0 cover both sides"
    # The plain demonstrations (the cached default) are unchanged by the option.
    assert not np.array_equal(plain.obs[:10], via.obs[:10])


@needs_metaworld
def test_via_point_expert_needs_a_positive_offset():
    from flowcorrect.metaworld.envs import ViaPointExpert, expert

    with pytest.raises(ValueError, match="offset"):
        ViaPointExpert(expert("reach-v3"), 0.0)


@needs_metaworld
def test_rollouts_are_paired_across_settings():
    from flowcorrect.metaworld.evaluate import EnvPool, rollout

    pool = EnvPool("pick-place-v3", 2)
    seeds = np.array([10, 11])
    seen = {}

    def recorder(name, scale):
        def act(obs, key):
            seen.setdefault(name, []).append(obs.copy())
            noise = np.asarray(jax.random.normal(key, (2, 4, 4)))
            return scale * noise, {}
        return act

    r1 = rollout(pool, seeds, recorder("a", 1.0), jax.random.key(0), execute=2, max_steps=6,
                 progress=False)
    r2 = rollout(pool, seeds, recorder("b", 1.0), jax.random.key(0), execute=2, max_steps=6,
                 progress=False)
    r3 = rollout(pool, seeds, recorder("c", 0.0), jax.random.key(0), execute=2, max_steps=6,
                 progress=False)
    np.testing.assert_array_equal(r1.seeds, r3.seeds)
    # Same seeds: same first observations; same key and actions: the same episode.
    np.testing.assert_array_equal(seen["a"][0], seen["c"][0])
    for x, y in zip(seen["a"], seen["b"]):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(seen["a"][-1], seen["c"][-1])  # different actions diverge
    assert r1.steps.tolist() == [6, 6]
    np.testing.assert_array_equal(r1.success, r2.success)


def test_fc_sample_plain_equals_the_euler_loop():
    # openpi's loop by hand: one prefix pass, t from 1 down by 1/5, t accumulated.
    policy = _policy()
    obs = jax.random.normal(jax.random.key(6), (3, 39))
    noise = jax.random.normal(jax.random.key(7), (3, 4, 4))
    out, _ = fc.sample(policy, obs, jax.random.key(0), noise=noise, num_steps=5)
    for i in range(3):
        cond = policy.condition(obs[i])
        x, t = noise[i], jnp.float32(1.0)
        for _ in range(5):
            x = x + jnp.float32(-0.2) * policy.velocity(cond, x, t)
            t = t + jnp.float32(-0.2)
        np.testing.assert_allclose(out[i], x, rtol=1e-5, atol=1e-5)


# Compiles one sampler per placement (about 20 s on 2 cores); the constraint suite has
# one setting of each placement kind.
@pytest.mark.slow
@pytest.mark.parametrize("suite", ["constraint"])
def test_every_setting_of_a_suite_runs_batched(suite):
    from flowcorrect.metaworld.energies import SpeedLimit
    from flowcorrect.metaworld.experiment import constraint_suite, reference_suite
    from flowcorrect.metaworld.settings import make_act

    policy = _policy()
    settings = reference_suite() if suite == "reference" else constraint_suite(0.3)
    # A cheap stand-in for the learned energy: any energy exercises the placements.
    energies = {"learned": SpeedLimit(0.3), "speed": SpeedLimit(0.3)}
    obs = np.random.default_rng(0).normal(size=(3, 39)).astype(np.float32)
    plain, _ = make_act(policy, settings[0], energies)(obs, jax.random.key(1))
    for setting in settings:
        chunks, diag = make_act(policy, setting, energies)(obs, jax.random.key(1))
        assert chunks.shape == (3, 4, 4) and np.all(np.isfinite(chunks)), setting.name
        if setting.energy is not None and "best-of" not in setting.name:
            # Corrections lower the speed energy of the plain chunk from the same noise.
            assert np.all(diag["energy_after"] <= diag["energy_before"] + 1e-5), setting.name
            np.testing.assert_allclose(
                diag["energy_before"],
                [SpeedLimit(0.3)(None, jnp.asarray(c)) for c in plain], rtol=1e-4, atol=1e-6,
            )


# -- the learned energy, the alpha sweep and the plots' numbers (no simulator needed) --


class _ToTarget(fc.AbstractEnergy):
    """`0.5 * ||a - target||^2` with the target given as the (flat) context: the
    gradient step's outcome is known in closed form."""

    def encode(self, context):
        return context.reshape(4, 4)

    def score(self, encoded, actions):
        return 0.5 * jnp.sum((actions - encoded) ** 2)


def test_direction_sweep_matches_the_closed_form_on_a_quadratic():
    from flowcorrect.metaworld.energies import direction_sweep

    k1, k2 = jax.random.split(jax.random.key(11))
    expert = jax.random.normal(k1, (3, 4, 4))
    # Samples at very different distances: some steps are clipped, others are not.
    scale = jnp.array([0.1, 1.0, 30.0])[:, None, None, None]
    samples = expert[:, None] + scale * jax.random.normal(k2, (3, 2, 4, 4))
    alphas = (0.0, 0.1, 0.5, 1.0)
    out = direction_sweep(_ToTarget(), expert.reshape(3, 16), samples, expert, alphas)
    d0 = jnp.sqrt(jnp.sum((samples - expert[:, None]) ** 2, axis=(2, 3))).reshape(-1)
    for i, a in enumerate(alphas):
        # Unclipped: a - alpha * (a - e) shrinks the distance by (1 - alpha).
        np.testing.assert_allclose(out["distance_unclipped"][i], np.mean((1 - a) * d0),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["energy_unclipped"][i],
                                   np.mean(0.5 * ((1 - a) * d0) ** 2), rtol=1e-4,
                                   atol=1e-5)
        # Clipped: the step is at most 20% of the chunk's norm.
        norms = jnp.sqrt(jnp.sum(samples**2, axis=(2, 3))).reshape(-1)
        moved = jnp.minimum(a * d0, 0.2 * norms)
        np.testing.assert_allclose(out["distance_clipped"][i], np.mean(d0 - moved), rtol=1e-4,
                                   atol=1e-5)
    assert out["fall_fraction_unclipped"] == [0.0, 1.0, 1.0, 1.0]
    assert out["energy_expert"] == pytest.approx(0.0, abs=1e-6)
    assert out["num_samples"] == 6 and out["alphas"] == list(alphas)


# Compiles fc.train.fit, fc.train.evaluate, the policy sampler and the sweep: 56 s on this 2-core
# machine under a load of ~20 (the policy-training test above took 73 s beside it).
@pytest.mark.slow
def test_train_energy_is_an_mlp_energy_with_policy_negatives(tmp_path):
    from flowcorrect.metaworld.energies import load_energy, save_energy, train_energy

    policy = _policy()
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(60, 39)).astype(np.float32)
    chunks = np.tanh(obs[:, :16]).reshape(60, 4, 4).astype(np.float32)
    episode = np.repeat(np.arange(6), 10)
    energy, meta = train_energy(policy, obs, chunks, episode, steps=30, hidden=32,
                                batch_size=16, progress=False)
    assert isinstance(energy, fc.MLPEnergy)
    # One whole episode (10 states, 8 policy samples each) is held out.
    assert meta["held_out_episodes"] == 1 and meta["train_states"] == 50
    assert meta["report"]["num_contexts"] == 10 and meta["report"]["num_policy_samples"] == 8
    assert meta["direction"]["num_samples"] == 80
    assert meta["history"] and "e_neg_extra" in meta["history"][-1]  # policy negatives used
    save_energy(tmp_path / "e", energy, meta)
    loaded, meta2 = load_energy(tmp_path / "e")
    a = jnp.asarray(chunks[0])
    assert loaded(jnp.asarray(obs[0]), a) == energy(jnp.asarray(obs[0]), a)
    assert meta2["direction"] == json.loads(json.dumps(meta["direction"]))


def _row(name, success, wins=0, losses=0):
    return dict(name=name, success=success, total=300, per_key=[], wins=wins, losses=losses,
                p=stats.mcnemar(wins, losses))


def test_plot_data_reads_the_sweeps_from_the_rows():
    from flowcorrect.metaworld.experiment import plot_data

    rows = [_row("plain", 180), _row("post-hoc K=3 a=0.1", 150, 10, 40),
            _row("post-hoc K=1 a=0.1", 170, 5, 15), _row("post-hoc K=3 a=0.01", 178, 3, 5),
            _row("best-of-8 by energy", 182, 6, 4)]
    out = plot_data(rows, [58, 60, 62], 100, 95, {"direction": {"alphas": [0.0]}})
    assert out["success_vs_K"]["x"] == [0, 1, 3]
    assert out["success_vs_K"]["success_rate"] == [0.6, 170 / 300, 0.5]
    assert out["success_vs_K"]["losses"] == [0, 15, 40]
    assert out["success_vs_alpha"]["x"] == [0.01, 0.1]
    assert out["success_vs_alpha"]["null_spread"] == [0.58, 0.6, 0.62]
    assert out["success_vs_alpha"]["expert"] == 0.95
    assert out["energy_along_direction"] == {"alphas": [0.0]}
    assert plot_data(rows[:1], [58], 100, 95, {}) == {}


def test_episodes_round_trip_through_json():
    from flowcorrect.metaworld.evaluate import Episodes

    ep = Episodes(np.array([5, 6]), np.array([True, False]), np.array([40, 300], np.int32),
                  np.array([0, 7], np.int32), np.array([0.5, 1.25], np.float32),
                  {"energy_before": 1.5})
    back = Episodes.from_json(json.loads(json.dumps(ep.to_json())))
    for f in dataclasses.fields(Episodes):
        a, b = getattr(ep, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        else:
            assert a == b


# Trains a tiny policy and verifier and runs every command of the verifiers CLI end to
# end on two short episodes (about a minute on 2 cores): `collect` once broke for want
# of a helper that a refactor removed, and nothing ran it.
@needs_metaworld
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_verifiers_cli_collects_trains_and_iterates_rounds(tmp_path):
    from flowcorrect.metaworld import verifiers

    common = ["--task", "reach-v3", "--demos", "2", "--policy-steps", "20",
              "--max-steps", "8", "--candidates", "3", "--cluster-k", "2", "--batch", "2",
              "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--quiet"]
    meta = verifiers.main(["collect", "--episodes", "2", "--explore-noise", "2", *common])
    assert meta["episodes"] == 2 and meta["info"]["explore_noise"] == 2
    root = tmp_path / "out" / "rollouts"
    (first,) = [p for p in root.iterdir()]
    assert first.name.endswith("-e2")
    import flowcorrect as fc

    roll = fc.verifiers.load_rollouts(first)
    assert roll.candidates.shape[1:] == (3, 8, 4)
    assert (roll.executed == 0).all()
    # Candidate 0 was drawn with twice the noise: it is farther from the others.
    spread = np.linalg.norm(roll.candidates - roll.candidates.mean(1, keepdims=True),
                            axis=(2, 3))
    assert spread[:, 0].mean() > spread[:, 1:].mean()

    train = ["--verifier-steps", "5", "--losses", "outcome", "--explore-noise", "2"]
    meta2 = verifiers.main(["collect", "--episodes", "2", "--round", "2", *train, *common])
    assert meta2["info"]["round"] == 2 and "NearMean(2)" in meta2["info"]["executed"]
    second = fc.verifiers.load_rollouts(first.parent / (first.name + "-round2"))
    assert not set(second.episode_seed) & set(roll.episode_seed)  # fresh layouts
    assert (second.executed < 3).all()

    out = verifiers.main(["verify", "--episodes", "2", "--keys", "1", "--round", "2",
                          "--guided", "1", "--early", "4", *train, *common])
    names = [r["name"] for r in out["rows"]["plain"]]
    assert "guided by outcome verifier w=1" in names
    assert "best-of-3 outcome verifier NearMean(2)" in names
    assert "early best-of-3 outcome verifier NearMean(2) rank_at=4" in names
    assert out["verifiers"]["rounds"] == 2 and out["verifiers"]["rollout_episodes"] == 4
