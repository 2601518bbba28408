"""Smoke tests: the examples run end to end and print the tables they promise."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    # Examples are scripts, not a package: load them by path, without running __main__.
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text):
    return [line.split("  ")[0].strip() for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_quickstart_prints_every_placement(capsys):
    load("quickstart").main(["--batch", "4"])
    rows = table_rows(capsys.readouterr().out)
    for name in ["none", "post-hoc (reference recipe)", "denoised, last 3 steps",
                 "guided, last 3 steps", "best of 8", "best of 8, then post-hoc"]:  # fmt: skip
        assert name in rows


@pytest.mark.slow
def test_train_and_correct_prints_table_and_report(capsys):
    load("train_and_correct").main(["--quick"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    for name in ["reference recipe", "monotone (backtrack) x3", "best of 8 by energy"]:
        assert name in rows
    # The monotone corrector only keeps steps that lower the energy.
    line = next(line for line in out.splitlines() if line.startswith("monotone"))
    energy_before, energy_after = line.split("->")[0].split()[-1], line.split("->")[1].split()[0]
    assert float(energy_after) <= float(energy_before)
    assert "EvalReport(" in out and "top1_accuracy" in out
