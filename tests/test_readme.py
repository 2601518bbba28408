"""The README's usage examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_usage_examples():
    assert len(_python_blocks()) >= 2


def test_readme_examples_run(capsys):
    namespace: dict = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "->" in out
    # The flow example corrects towards the energy's minimum.
    assert float(namespace["info"].final_energy) < float(namespace["info"].uncorrected_energy)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert len(commands) >= 2
    assert commands[1] in ci, "the README's test command must be what CI runs"
