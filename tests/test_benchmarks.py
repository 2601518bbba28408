"""Smoke tests of `benchmarks/` (python -m benchmarks): it runs, reports every row, and
its compiled functions take weights and hyperparameters as arguments.

Timings are never asserted on here; they belong to the benchmark's own output.
"""

import importlib.util
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from benchmarks import harness, infonce, openpi_pi0, overhead

import flowcorrect as fc

# The placements' keyword API (fc.sample(policy, observation, key, placement=...)).
NEW_API = hasattr(fc, "bind")
needs_new_api = pytest.mark.skipif(not NEW_API, reason="fc.sample's policy API not merged yet")

HAS_OPENPI = importlib.util.find_spec("openpi") is not None

# The shaped policy only: openpi's rows have tests of their own below.
TINY = ["--preset", "tiny", "--repeats", "2", "--warmup", "1", "--policies", "shaped"]
NO_FLOPS = {"openpi_sample_actions"}  # openpi's while_loop: trip count unknown to a jaxpr


def _check(result, names, batch_sizes, policies=("shaped",)):
    runs = result["runs"]
    assert [(run["policy"], run["batch_size"]) for run in runs] == [
        (p, b) for p in policies for b in batch_sizes
    ]
    for run in runs:
        rows = run["rows"]
        assert [r["row"] for r in rows] == names
        for r in rows:
            assert len(r["times_ms"]) == 2
            fields = ["median_ms", "min_ms", "ratio", "paired_ratio", "compile_s"]
            if r["row"] not in NO_FLOPS:
                fields.append("matmul_flops")
            for field in fields:
                assert math.isfinite(r[field]) and r[field] > 0, (r["row"], field, r[field])
            assert r["min_ms"] <= r["median_ms"]
        base = rows[0]
        assert base["ratio"] == pytest.approx(1.0) and base["added_ms"] is None
        assert base["paired_ratio"] == pytest.approx(1.0)
        for r in rows[1:]:
            assert math.isfinite(r["added_ms"])
            assert (r["added_flops_ratio"] is None) == (r["row"] in NO_FLOPS), r["row"]
    env, settings = result["environment"], result["settings"]
    for key in ("device", "platform", "jax", "equinox", "machine"):
        assert env[key]
    assert sorted(settings["policies"]) == sorted(policies)
    for policy in settings["policies"].values():
        assert policy["policy_parameters"] > 0 and policy["energy_parameters"] > 0
    if "shaped" in policies:
        assert settings["policies"]["shaped"]["policy_config"]["horizon"] == 50


def test_harness_and_reference_rows(tmp_path, capsys):
    """Runs without the placements API: the hand-written sampler and method B."""
    out = tmp_path / "r.json"
    names = ["handwritten", "reference_k1", "reference_k2"]
    argv = ["--steps", "1", "2", "--baseline", "handwritten", "--batch-size", "1"]
    result = overhead.main([*TINY, *argv, "--rows", *names, "--out", str(out)])
    _check(result, names, [1])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["row"]: r for r in result["runs"][0]["rows"]}
    # Method B adds a prefix pass plus K energy gradients: more FLOPs at larger K.
    assert 0 < rows["reference_k1"]["added_flops_ratio"] < rows["reference_k2"]["added_flops_ratio"]
    printed = capsys.readouterr().out
    assert "| row |" in printed and all(f"| {n} |" in printed for n in names)


@pytest.mark.slow  # one row of every kind, 10 compiles: ~40 s on 2 idle cores
@needs_new_api
def test_every_kind_of_row(tmp_path):
    out = tmp_path / "r.json"
    names = ["plain", "handwritten", "posthoc_k1", "denoised_last3", "guided_all",
             "best_of_2", "best_of_2_medoid", "early_best_of_2", "reference_k1"]  # fmt: skip
    result = overhead.main([*TINY, "--steps", "1", "--best-of", "2", "--out", str(out),
                            "--rows", *names])  # fmt: skip
    assert json.loads(out.read_text())["settings"]["rows"] == names
    _check(result, names, [1])
    rows = {r["row"]: r for r in result["runs"][0]["rows"]}
    assert rows["posthoc_k1"]["vs_reference"] is not None
    # Every placement, and method B, adds matrix multiplies to plain sampling.
    for name in names[2:]:
        assert rows[name]["added_flops_ratio"] > 0, name


def _tiny_setup():
    config, (hidden, heads) = overhead.PRESETS["tiny"]
    policy = fc.Pi0ShapedPolicy(config, key=jax.random.key(0))
    energy = eqx.nn.inference_mode(
        fc.EnergyModel(
            fc.EnergyModelConfig(config.width, config.action_dim, hidden=hidden, num_heads=heads),
            key=jax.random.key(1),
        )
    )
    obs = fc.Pi0ShapedObservation.random(config, jax.random.key(2), 2, num_padding=3)
    return policy, energy, obs, jax.random.key(3)


def _heavier(policy):
    return eqx.tree_at(lambda p: p.expert_layers.down, policy, policy.expert_layers.down * 2)


@needs_new_api
def test_new_alpha_or_weights_do_not_recompile():
    policy, energy, obs, key = _tiny_setup()
    placed = eqx.filter_jit(eqx.debug.assert_max_traces(overhead.sample_placed, max_traces=1))
    for alpha, p in ((0.1, policy), (0.3, policy), (0.3, _heavier(policy))):
        placement = fc.PostHoc(corrector=fc.reference_recipe(3, alpha=alpha))
        assert jnp.isfinite(placed(p, obs, key, energy, placement)).all()


def test_reference_and_handwritten_do_not_recompile():
    policy, energy, obs, key = _tiny_setup()
    sample = eqx.filter_jit(eqx.debug.assert_max_traces(overhead.sample_handwritten, max_traces=1))
    step = eqx.filter_jit(eqx.debug.assert_max_traces(overhead.reference_step, max_traces=1))
    context = overhead.reference_prefix_out(policy, obs)
    first = sample(policy, obs, key)
    second = sample(_heavier(policy), obs, key)
    assert float(jnp.abs(first - second).max()) > 1e-4
    a = step(energy, context, first, jnp.asarray(0.1), jnp.asarray(0.2))
    b = step(energy, context, first, jnp.asarray(0.3), jnp.asarray(0.2))
    assert float(jnp.abs(a - b).max()) > 0


def test_matmul_flops_count_loop_trips():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))

    def f(x, w, n):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=n)[0]

    one = harness.matmul_flops(lambda x, w: f(x, w, 1), x, w)
    ten = harness.matmul_flops(lambda x, w: f(x, w, 10), x, w)
    assert one == 2 * 8 * 16 * 16 and ten == 10 * one


def test_paired_ratio_is_taken_round_by_round():
    """Load that doubles every call in a round cancels in the paired ratio, not in the
    ratio of medians."""
    rows = [
        {"row": "plain", "k": None, "median_ms": 2.0, "times_ms": [1.0, 2.0, 4.0],
         "matmul_flops": 10.0, "matmul_flops_min": 10.0},
        {"row": "posthoc_k1", "k": 1, "median_ms": 6.0, "times_ms": [1.5, 3.0, 6.0],
         "matmul_flops": 11.0, "matmul_flops_min": 10.5},
        {"row": "reference_k1", "k": 1, "median_ms": 4.0, "times_ms": [4.0, 4.0, 4.0],
         "matmul_flops": 15.0, "matmul_flops_min": 15.0},
    ]  # fmt: skip
    overhead.add_ratios(rows, "plain")
    plain, ours, ref = rows
    assert plain["paired_ratio"] == 1.0 and plain["added_ms"] is None
    assert ours["paired_ratio"] == pytest.approx(1.5) and ours["ratio"] == pytest.approx(3.0)
    assert ref["paired_ratio"] == pytest.approx(2.0)
    assert ours["added_flops_ratio"] == pytest.approx(0.1)
    assert ours["added_flops_ratio_min"] == pytest.approx(0.05)
    assert ours["vs_reference"] == pytest.approx(4.0 / 2.0) and ref["vs_reference"] is None


def test_round_robin_times_every_call():
    calls = {"a": lambda: jnp.ones(3) * 2, "b": lambda: jnp.zeros(2)}
    times = harness.time_round_robin(calls, repeats=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert harness.summarise(times["a"])["median_ms"] > 0


def test_quick_set_is_the_default():
    args = overhead.parse_args([])
    assert args.preset == "cpu" and args.batch_size == [1] and args.repeats >= 20
    assert args.warmup >= 1 and args.policies == ["shaped", "openpi"]
    assert args.rows == ["plain", "handwritten", "openpi_sample_actions", "openpi_trt",
                         "posthoc_k1",
                         "posthoc_k3", "guided_last3", "denoised_all", "best_of_8", "rtc",
                         "reference_k1", "reference_k3"]  # fmt: skip


def test_full_grid_behind_a_flag():
    args = overhead.parse_args(["--full"])
    assert args.batch_size == [1, 8] and args.repeats >= 20
    assert args.steps == [0, 1, 3, 5, 10] and args.best_of == [4, 8, 16]
    assert args.rows[0] == "plain"
    for name in ["posthoc_k0", "posthoc_k10", "denoised_last3", "denoised_all",
                 "guided_last3", "guided_all", "best_of_4", "best_of_16", "reference_k10",
                 "handwritten", "openpi_sample_actions", "rtc", "best_of_8_medoid",
                 "early_best_of_4", "early_best_of_16"]:  # fmt: skip
        assert name in args.rows
    assert "reference_k0" not in args.rows
    # Explicit choices override either set; the baseline is always run, first.
    assert overhead.parse_args(["--rows", "best_of_8"]).rows == ["plain", "best_of_8"]
    assert overhead.parse_args(["--rows", "guided_all"]).rows == ["plain", "guided_all"]
    ranking = ["plain", "best_of_8_medoid", "early_best_of_8"]
    assert overhead.parse_args(["--rows", *ranking[1:]]).rows == ranking
    assert overhead.parse_args(["--full", "--batch-size", "2"]).batch_size == [2]
    assert "posthoc_k5" in overhead.parse_args(["--steps", "5"]).rows


def test_quick_set_leaves_slow_policies_rows_out():
    setup = overhead.Setup("slow", None, None, None, {}, {}, quick_skip=frozenset({"plain", "x"}))
    quick = overhead.parse_args([])
    # The baseline always runs; the rest of quick_skip is left out.
    assert overhead.rows_to_run(quick, setup) == [r for r in quick.rows if r != "x"]
    assert "posthoc_k3" in overhead.rows_to_run(quick, setup)
    for argv in (["--full"], ["--rows", "handwritten", "best_of_8"]):
        args = overhead.parse_args(argv)
        assert overhead.rows_to_run(args, setup) == args.rows


def test_openpi_rows_skip_saying_why(monkeypatch, capsys, tmp_path):
    """Where openpi cannot be imported, its rows are skipped and the record says why."""
    monkeypatch.setattr(openpi_pi0, "unavailable", lambda: "no openpi in this test")
    out = tmp_path / "r.json"
    result = overhead.main(["--preset", "tiny", "--policies", "openpi", "--out", str(out)])
    assert result["runs"] == [] and result["skipped"] == {"openpi": "no openpi in this test"}
    assert json.loads(out.read_text())["skipped"] == result["skipped"]
    captured = capsys.readouterr()
    assert "openpi Pi0 rows skipped: no openpi in this test" in captured.err
    assert "openpi Pi0: skipped (no openpi in this test)" in captured.out


@pytest.mark.skipif(HAS_OPENPI, reason="checks the reason given where openpi is absent")
def test_openpi_absent_reason():
    assert "openpi is not installed" in openpi_pi0.unavailable()


@pytest.mark.slow  # openpi's test-size Pi0 (3 images through SigLIP mu/14): ~1 min
@pytest.mark.skipif(not HAS_OPENPI, reason="openpi is not installed (it is not on PyPI); "
                    "run in the environment of docs/openpi.md")  # fmt: skip
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openpi's pinned flax/jax
def test_openpi_rows(tmp_path):
    assert openpi_pi0.unavailable() is None
    names = ["plain", "openpi_sample_actions", "openpi_trt", "posthoc_k1", "best_of_2",
             "reference_k1"]
    result = overhead.main(["--preset", "tiny", "--repeats", "2", "--warmup", "1",
                            "--policies", "openpi", "--steps", "1", "--best-of", "2",
                            "--rows", *names])  # fmt: skip
    _check(result, names, [1], policies=("openpi",))
    rows = {r["row"]: r for r in result["runs"][0]["rows"]}
    # Method B runs the prefix (SigLIP and the VLM) twice: it adds more than post-hoc.
    assert rows["reference_k1"]["added_flops_ratio"] > rows["posthoc_k1"]["added_flops_ratio"]
    assert result["skipped"] == {}


@pytest.mark.parametrize(
    "argv",
    [["--rows", "nonsense"], ["--batch-size", "0"], ["--steps", "-1"], ["--warmup", "0"],
     ["--preset", "huge"], ["--baseline", "nope"]],
)  # fmt: skip
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        overhead.parse_args(argv)


@pytest.mark.parametrize("batch", [1, 8])
def test_stored_gpu_records_still_render(batch):
    """The H100 records in benchmarks/results predate openpi's rows and the paired
    ratio; the report still reads them."""
    import pathlib

    from benchmarks import report

    path = pathlib.Path(overhead.__file__).parent / "results" / f"h100_pi0_batch{batch}.json"
    result = json.loads(path.read_text())
    assert "NVIDIA H100" in report.header(result)
    table = report.markdown_table(result)
    assert f"**Pi0ShapedPolicy, batch size {batch}**" in table
    assert "| posthoc_k3 |" in table and "| reference_k10 |" in table


def test_plot_is_optional(tmp_path):
    result = {
        "environment": {"device": "cpu"},
        "runs": [{"batch_size": 1, "rows": [{"row": "plain", "ratio": 1.0},
                                            {"row": "x", "ratio": 1.5}]}],
    }  # fmt: skip
    pytest.importorskip("matplotlib")
    from benchmarks import report

    assert report.plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_infonce_ways_agree():
    """The replicated computation the reference uses and `fc.train.info_nce` are the same
    loss: the benchmark compares the cost of one computation done two ways."""
    model = infonce.make_model(16, 32, jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tokens, mask, actions = infonce.make_inputs(5, 16, 16, seed=3)
    assert not bool(mask.all())  # a padded tail, so masking is exercised
    v_ours, g_ours = infonce.ours(params, static, tokens, mask, actions)
    v_rep, g_rep = infonce.replicated(params, static, tokens, mask, actions)
    assert float(v_ours) > 0.1  # not a degenerate loss
    assert jnp.allclose(v_ours, v_rep, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_rep)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_infonce_benchmark_record(tmp_path):
    out = tmp_path / "infonce.json"
    record = infonce.main(["--batches", "2", "4", "--seq", "8", "--dim", "8", "--hidden", "16",
                           "--repeats", "2", "--memory-limit-gb", str(3 * 4 * 8 * 8 * 4 / 1e9),
                           "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    small, large = record["rows"]
    assert small["batch"] == 2 and len(small["ours"]["times_s"]) == 2
    assert small["replicated"]["median_s"] > 0 and small["speedup"] > 0
    # B = 4's pairs (4 * 4 * 8 * 8 floats) exceed the limit: reported, not run.
    assert large["replicated"]["out_of_memory"] and "speedup" not in large
    assert "OOM" in infonce.table(record["rows"])
