"""docs/img/harness.svg, the README's figure, says what the harness's results say."""

import html
import importlib.util
import json
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "metaworld"


def _script():
    path = ROOT / "docs" / "scripts" / "harness_figure.py"
    spec = importlib.util.spec_from_file_location("harness_figure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _svg_texts(path):
    return {html.unescape(t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>",
                                                        path.read_text(), flags=re.S)}  # fmt: skip


def test_every_row_matches_a_second_record_of_the_same_run():
    # Rows read from a results table match that table; pairs recounted from episodes
    # match the pair lines the harness printed into the same file; rows read from a
    # printed table match the page's own markdown table of that run.
    rows = _script().rows()
    assert len(rows) >= 10
    metaworld = (ROOT / "docs" / "metaworld.md").read_text()
    for r in rows:
        path, name = r.source.rsplit(": ", 1)
        if path.startswith("docs/"):
            m = re.search(rf"^\| {re.escape(name)} \| (\d+)/(\d+) \| [\d/]+ \| \+(\d+)/-(\d+) \|",
                          metaworld, flags=re.M)  # fmt: skip
            assert m is not None, name
            found = [int(g) for g in m.groups()]
            if r.task.startswith("peg-insert"):  # the page's second task
                found = [int(g) for g in re.findall(
                    rf"^\| {re.escape(name)} \| (\d+)/(\d+) \| [\d/]+ \| \+(\d+)/-(\d+) \|",
                    metaworld, flags=re.M)[1]]  # fmt: skip
            assert found == [r.setting, r.total, r.wins, r.losses], r
            continue
        report = json.loads((ROOT / path).read_text())
        if " vs " in name:
            line = re.search(rf"^{re.escape(name)}: \+(\d+)/-(\d+), p = (\S+)$",
                             report["table"], flags=re.M)  # fmt: skip
            assert line is not None, name
            assert (r.wins, r.losses) == (int(line[1]), int(line[2])), r
            assert f"{r.p:.2g}" == line[3], r
            continue
        table = next(t for t in report["rows"].values() if t[0]["name"] == "plain")
        row = next(x for x in table if x["name"] == name)
        assert (r.baseline, r.setting) == (table[0]["success"], row["success"]), r
        assert (r.wins, r.losses, r.p) == (row["wins"], row["losses"], row["p"]), r


def test_rows_are_read_not_written_in(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(RESULTS, root / "benchmarks" / "results" / "metaworld")
    (root / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "metaworld.md", root / "docs")
    name = "verify-peg-insert-side-v3-25demos.json"
    report = json.loads((root / "benchmarks" / "results" / "metaworld" / name).read_text())
    for r in report["rows"]["plain"]:
        if r["name"] == "guided by outcome verifier w=1":
            r["wins"], r["losses"] = 3, 40
    (root / "benchmarks" / "results" / "metaworld" / name).write_text(json.dumps(report))
    page = root / "docs" / "metaworld.md"
    page.write_text(page.read_text().replace("147/300           49/48/50     +13/-42",
                                             "150/300           49/48/50     +14/-40"))
    by_source = {r.source: r for r in _script().rows(root)}
    guided = by_source[f"benchmarks/results/metaworld/{name}: guided by outcome verifier w=1"]
    assert (guided.wins, guided.losses) == (3, 40)
    (recipe,) = [r for r in by_source.values()
                 if r.task.startswith("pick-place,") and r.source.endswith("post-hoc K=3 a=0.1")]
    assert (recipe.setting, recipe.wins, recipe.losses) == (150, 14, 40)


def test_committed_figure_is_what_the_script_draws_now(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    module = _script()
    rows = module.draw(tmp_path / module.NAME)
    drawn = _svg_texts(tmp_path / module.NAME)
    committed = _svg_texts(ROOT / "docs" / "img" / module.NAME)
    for r in rows:
        assert r.text in drawn, r.text
    assert drawn == committed, (
        "docs/img/harness.svg is stale: run python docs/scripts/harness_figure.py "
        f"(differs in {sorted(drawn ^ committed)})"
    )
