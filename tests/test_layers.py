"""The package's layering, as import-linter contracts in pyproject.toml: no import cycle
between the modules of a package, each layer importing only those below it, and the
energies and correctors never reaching the sampler or the trainer."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                    reason="import-linter is not installed (pip install -e '.[test]')")
def test_import_contracts_hold():
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout, out.stdout[-4000:]


def test_a_broken_contract_is_reported(tmp_path):
    # The check can fail: a contract the package breaks (the sampler imports the
    # correctors) makes lint-imports exit non-zero.
    pytest.importorskip("importlinter")
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "flowcorrect"\n\n'
        '[[tool.importlinter.contracts]]\nname = "made to break"\ntype = "forbidden"\n'
        'source_modules = ["flowcorrect._flow"]\n'
        'forbidden_modules = ["flowcorrect._correctors"]\n'
    )
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "BROKEN" in out.stdout
