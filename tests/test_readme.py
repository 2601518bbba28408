"""The README's usage examples run as written, and it leads with what a user needs."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"
# As in the docs: a block preceded by this line needs what CI lacks (openpi, a robot).
BLOCK = re.compile(r"(?P<skip><!--\s*docs-test:\s*skip\s*\([^\n]+\)\s*-->\n)?"
                   r"```python\n(?P<code>.*?)```", flags=re.S)  # fmt: skip
MAX_COLUMNS = 88  # what the docs' theme shows without cutting


def _python_blocks(text=None) -> list[tuple[str, bool]]:
    """`(code, skipped)` for each ```python block."""
    text = README.read_text() if text is None else text
    return [(m["code"], m["skip"] is not None) for m in BLOCK.finditer(text)]


def test_readme_has_usage_examples():
    blocks = _python_blocks()
    assert sum(not skipped for _, skipped in blocks) >= 2
    assert any(skipped and "CorrectedPolicy" in code for code, skipped in blocks)


def test_skip_marker_skips_only_its_block():
    text = ("```python\nx = 1\n```\n<!-- docs-test: skip (needs openpi) -->\n"
            "```python\nimport openpi\n```\n```python\ny = 2\n```\n")  # fmt: skip
    assert _python_blocks(text) == [("x = 1\n", False), ("import openpi\n", True),
                                    ("y = 2\n", False)]  # fmt: skip


def test_readme_examples_run(capsys):
    namespace: dict = {}
    for block, skipped in _python_blocks():
        if skipped:
            continue
        exec(compile(block, str(README), "exec"), namespace)
        info = namespace["info"]
        if "fc.sample(" in block:
            # Best of 8 guided samples beats the plain chunk from the same noise.
            assert float(info.final_energy) < float(info.uncorrected_energy)
        if "fc.correct(" in block:
            assert float(info.energy_after) < float(info.energy_before)
    assert "->" in capsys.readouterr().out


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert len(commands) >= 2
    assert commands[1] in ci, "the README's test command must be what CI runs"


def test_readme_order_install_openpi_figure_api():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert "flowcorrect.metaworld.demo" in commands[0] and "pytest" in commands[1]
    positions = [text.index(s) for s in (
        commands[1], "pip install flowcorrect", "constraints/openpi.txt",
        "CorrectedPolicy.from_policy", "docs/img/harness.svg", "fc.sample(",
        "fc.reference_recipe()")]  # fmt: skip
    assert positions == sorted(positions), "README order: commands, install, openpi, " \
        "figure, the API, then the seed's post-hoc recipe"
    openpi = next(code for code, skipped in _python_blocks() if "CorrectedPolicy" in code)
    assert len(openpi.strip().splitlines()) <= 5
    assert (README.parent / "docs" / "img" / "harness.svg").exists()


def test_readme_code_fits_the_page():
    blocks = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)
    # The first two commands (demo, tests) stay one line each: CI runs the second as is.
    too_long = [line for _, code in blocks[2:] for line in code.splitlines()
                if len(line) > MAX_COLUMNS]  # fmt: skip
    assert not too_long, f"README code lines over {MAX_COLUMNS} columns: {too_long}"
