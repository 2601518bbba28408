"""Smoke tests of benchmarks/overhead.py: it runs and reports every row.

Timings are never asserted on here; they belong to the benchmark's own output.
"""

import importlib.util
import json
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
_spec = importlib.util.spec_from_file_location("flowcorrect_benchmark_overhead", _PATH)
assert _spec is not None and _spec.loader is not None
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)

# Tiny sizes: the run is dominated by compiling each case once.
TINY = [
    "--quick",
    "--policy-size", "tiny",
    "--context-tokens", "16",
    "--context-dim", "32",
    "--energy-hidden", "32",
    "--energy-heads", "2",
    "--repeats", "2",
    "--warmup", "1",
    "--best-of", "2",
]  # fmt: skip


def _check_result(result, batch_sizes, names):
    assert [run["batch_size"] for run in result["runs"]] == batch_sizes
    for run in result["runs"]:
        rows = run["rows"]
        assert [row["case"] for row in rows] == names
        for row in rows:
            for field in ("median_ms", "min_ms", "ratio_median", "ratio_min"):
                value = row[field]
                assert math.isfinite(value) and value > 0, (row["case"], field, value)
            assert len(row["times_ms"]) == 2
            assert row["group"] in ("sampler", "alone")
            if row["group"] == "sampler" and row["case"] != "plain":
                assert math.isfinite(row["added_ms"])
            else:
                assert row["added_ms"] is None
        plain = rows[0]
        assert plain["ratio_median"] == pytest.approx(1.0)
        assert plain["ratio_min"] == pytest.approx(1.0)
    env, setup = result["environment"], result["setup"]
    for key in ("device", "jax", "equinox", "flowcorrect"):
        assert env[key]
    assert setup["chunk"] == [50, 32]
    assert setup["energy_parameters"] > 0 and setup["policy_parameters"] > 0


def test_quick_subset_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    names = ["plain", "posthoc_k1", "correct_k1_alone"]
    argv = [*TINY, "--steps", "1", "--cases", *names[1:], "--out", str(out), "--markdown", str(md)]
    result = overhead.main(argv)
    _check_result(result, [1], names)
    # The JSON file is the returned result.
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    for text in (printed, md.read_text()):
        assert "| case |" in text
        for name in names:
            assert f"| {name} |" in text


@pytest.mark.slow
def test_every_row_present(tmp_path):
    result = overhead.main([*TINY, "--steps", "1", "2", "--batch-size", "2", "--cases",
                            *overhead.case_names([1, 2], 2, quick=False)])  # fmt: skip
    names = [
        "plain",
        "posthoc_k1",
        "posthoc_k2",
        "posthoc_k1_backtrack",
        "posthoc_k1_diagnostics",
        "denoised_last3",
        "denoised_last3_tracked",
        "guided_last3",
        "guided_last3_tracked",
        "best_of_2",
        "encode_alone",
        "correct_k1_alone",
        "correct_k2_alone",
        "correct_k1_reencode",
        "correct_k1_pre_encoded",
    ]
    _check_result(result, [2], names)


def test_default_selection():
    quick = overhead.parse_args(["--quick"])
    assert quick.cases == [
        "plain",
        "posthoc_k1",
        "posthoc_k3",
        "posthoc_k5",
        "denoised_last3",
        "guided_last3",
        "best_of_8",
        "encode_alone",
        "correct_k3_alone",
    ]
    assert (quick.context_tokens, quick.context_dim) == (256, 512)
    full = overhead.parse_args([])
    assert (full.context_tokens, full.context_dim, full.batch_size) == (816, 2048, [1])
    assert set(quick.cases) < set(full.cases) and full.cases[0] == "plain"
    # "plain" is the baseline of every ratio, so it is always run, first.
    assert overhead.parse_args(["--cases", "encode_alone"]).cases == ["plain", "encode_alone"]


@pytest.mark.parametrize(
    "argv",
    [["--cases", "nonsense"], ["--batch-size", "0"], ["--steps", "0"], ["--warmup", "0"]],
)
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        overhead.parse_args(argv)
