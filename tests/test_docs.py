"""The documentation cannot rot: its Python runs, its pages are in the nav, its links
and pictures exist, and its copies of the README's commands are the README's.

Every ```python block of a page under docs/ runs, in order, in one namespace per page,
unless the page is listed in NOT_RUN (with the reason) or the block is preceded by a
line `<!-- docs-test: skip (reason) -->` (for code that needs openpi, a robot, a GPU).
"""

import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Pages whose code blocks are fragments by design (signatures with `...`, names defined
# by the reader) or need what CI does not have. New pages run by default.
NOT_RUN = {
    "openpi.md": "needs openpi and a Pi0 checkpoint",
    "benchmarks.md": "commands and tables, no runnable Python",
    "metaworld.md": "needs Meta-World and minutes of simulation",
    "api/policies.md": "API reference: a policy sketch with `...` weights",
    "api/testing.md": "API reference: `my_energy` is the reader's",
    "api/model.md": "API reference: fragments",
    "api/training.md": "API reference: fragments",
    "api/correctors.md": "API reference: corrector expressions without imports",
}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(\(.+\))?\s*-->")
BLOCK = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[a-z]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```",
                   re.S | re.M)  # fmt: skip


def pages():
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def blocks(page, lang="python"):
    """`(code, skipped)` for each fenced block of `lang`, dedented."""
    text = (DOCS / page).read_text()
    out = []
    for m in BLOCK.finditer(text):
        if m.group("lang") != lang:
            continue
        before = text[: m.start()].rstrip().splitlines()
        skipped = bool(before) and SKIP.fullmatch(before[-1].strip()) is not None
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("code").splitlines())
        out.append((code, skipped))
    return out


def nav_pages():
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M)


RUN = [p for p in pages() if p not in NOT_RUN and any(not s for _, s in blocks(p))]
# Pages whose code takes more than ~10 s on 2 cores, with the reason.
SLOW = {
    "guides/training.md": "fit compiles a training step with the gradient penalty",
    "guides/extending.md": "check_energy / check_corrector compile jit, no-jit and batches",
}


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in RUN]
)
def test_page_code_runs(page, tmp_path, monkeypatch, capsys):
    code = "\n".join(c for c, skipped in blocks(page) if not skipped)
    if re.search(r"flowcorrect\.plot|from flowcorrect import plot|matplotlib", code):
        pytest.importorskip("matplotlib", reason="the page plots; needs the `plot` extra")
    monkeypatch.chdir(tmp_path)  # pages may write files (checkpoints, figures)
    namespace = {"__name__": f"docs_{page}"}
    for i, (block, skipped) in enumerate(blocks(page)):
        if not skipped:
            exec(compile(block, f"{DOCS / page} (python block {i})", "exec"), namespace)
    assert capsys.readouterr().out  # each runnable page shows its reader something


def test_every_page_with_python_is_run_or_says_why_not():
    assert RUN, "no page ran"
    for page, reason in NOT_RUN.items():
        assert reason.strip(), page
    for page in pages():
        for code, skipped in blocks(page):
            if skipped:
                text = (DOCS / page).read_text()
                assert re.search(r"docs-test:\s*skip\s*\(.+\)", text), (
                    f"{page}: a skipped block must say why: <!-- docs-test: skip (reason) -->"
                )


def test_skip_marker_skips_only_its_block(tmp_path, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text(
        "```python\nx = 1\n```\n\n<!-- docs-test: skip (needs openpi) -->\n"
        "```python\nimport openpi\n```\n\n    ```python\n    y = x + 1\n    ```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    assert blocks("p.md") == [("x = 1", False), ("import openpi", True), ("y = x + 1", False)]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages()
    missing = sorted(set(pages()) - set(nav))
    assert not missing, f"pages not reachable from mkdocs.yml's nav: {missing}"
    absent = sorted(p for p in nav if not (DOCS / p).exists())
    assert not absent, f"nav entries without a page: {absent}"


def test_local_links_and_images_exist():
    for page in pages():
        text = (DOCS / page).read_text()
        text = BLOCK.sub("", text)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (DOCS / page).parent / target
            assert path.exists(), f"{page} links to {target}, which does not exist"


def _readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_getting_started_repeats_the_readme_commands():
    page = [code for code, _ in blocks("getting-started.md", "bash")]
    assert page[:2] == _readme_commands()[:2], (
        "getting-started.md must show the README's two commands"
    )


def test_home_page_repeats_the_readme_commands_and_openpi_lines():
    page = [code for code, _ in blocks("index.md", "bash")]
    assert page[:2] == _readme_commands()[:2], "index.md must show the README's two commands"
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    openpi = [code for code, skipped in blocks("index.md") if skipped]
    assert openpi and openpi[0] + "\n" == next(c for c in readme if "CorrectedPolicy" in c)
    assert "img/harness.svg" in (DOCS / "index.md").read_text()


# Code is wrapped at 88 columns, what the theme shows without a scroll bar. Pages not yet
# wrapped, to be wrapped when they are next edited:
WIDE = {"benchmarks.md", "guides/extending.md", "guides/training.md", "guides/tuning.md",
        "metaworld.md", "openpi-verifiers.md", "realtime.md", "verifiers.md"}  # fmt: skip
MAX_COLUMNS = 88


def test_code_fits_88_columns():
    commands = set(_readme_commands()[:2])  # one line each, so that they copy whole
    assert WIDE <= set(pages())
    too_long = [(page, line) for page in pages() if page not in WIDE
                for lang in ("python", "bash") for code, _ in blocks(page, lang)
                if code not in commands
                for line in code.splitlines() if len(line) > MAX_COLUMNS]  # fmt: skip
    assert not too_long, f"code lines over {MAX_COLUMNS} columns: {too_long}"


@pytest.mark.slow  # ~30 s: three small flows compile, three PNGs render
@pytest.mark.skipif(os.environ.get("FLOWCORRECT_SKIP_FIGURES") == "1", reason="asked to")
def test_figure_script_draws_every_figure_the_docs_show(tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need the `plot` extra")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_figures",
                                                  DOCS / "scripts" / "make_figures.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    shown = set()
    for page in pages():
        shown |= {pathlib.Path(p).name for p in re.findall(r"\((?:\.\./)*img/([\w.-]+)\)",
                                                           (DOCS / page).read_text())}  # fmt: skip
    drawn = {p.name for p in tmp_path.iterdir() if p.stat().st_size > 1000}
    assert shown and shown <= drawn, f"shown but not drawn by the script: {shown - drawn}"
    assert drawn <= {p.name for p in (DOCS / "img").iterdir()}, "commit the drawn figures"


def test_changelog_names_the_packaged_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"not a semver release: {version}"
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert headings and headings[0] == version, (
        f"CHANGELOG.md's newest entry is {headings[:1]}, pyproject.toml says {version}"
    )
