"""Draws docs/img/harness.svg: what helps and what does not on the Meta-World harness.

Every number comes from a run of the harness: the results files in
benchmarks/results/metaworld/ (verifiers, consensus, real-time chunking; pairs of
settings are recounted from their per-episode successes), and, for the runs whose
results file is not in the repository (the seed's post-hoc recipe and lower noise on
pick-place-v3), the tables the harness printed, kept verbatim in docs/metaworld.md.

Run from the repository root: python docs/scripts/harness_figure.py [--out docs/img]
(needs matplotlib; about a second).
"""

import argparse
import dataclasses
import json
import pathlib
import re

from flowcorrect.metaworld import stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = pathlib.Path("benchmarks") / "results" / "metaworld"
NAME = "harness.svg"


@dataclasses.dataclass(frozen=True)
class Row:
    """One paired comparison: `setting` against `baseline` on the same episodes."""

    group: str
    label: str
    task: str
    baseline: int
    setting: int
    total: int
    wins: int
    losses: int
    p: float
    source: str

    @property
    def text(self) -> str:
        """The numbers printed next to the row's bars."""
        return (f"{self.baseline} \N{RIGHTWARDS ARROW} {self.setting} of {self.total}, "
                f"+{self.wins}/-{self.losses}, p = {self.p:.2g}")  # fmt: skip


def _json(root, name):
    return json.loads((root / RESULTS / name).read_text())


def from_table(root, group, label, task, name, row, baseline="plain"):
    """A row of a results file's table (`rows[baseline]`) against its baseline row."""
    table = _json(root, name)["rows"][baseline]
    base = next(r for r in table if r["name"] == baseline)
    r = next(r for r in table if r["name"] == row)
    assert base["total"] == r["total"], (name, row)
    return Row(group, label, task, base["success"], r["success"], r["total"], r["wins"],
               r["losses"], r["p"], f"{RESULTS / name}: {row}")  # fmt: skip


def from_pair(root, group, label, task, name, setting, baseline):
    """Two settings of a results file, paired again from their per-episode successes."""
    settings = _json(root, name)["settings"]

    def successes(s):
        return [bool(x) for key in settings[s] for x in key["success"]]  # one list per key

    b, s = successes(baseline), successes(setting)
    wins, losses = stats.paired_counts(b, s)
    source = f"{RESULTS / name}: {setting} vs {baseline}"
    p = stats.mcnemar(wins, losses)
    return Row(group, label, task, sum(b), sum(s), len(b), wins, losses, p, source)


def from_printed(root, group, label, task, page, command, row):
    """A row of a table the harness printed, as a docs page keeps it.

    `command` picks the block: the `$ ...` line that opens it must contain it.
    """
    text = (root / "docs" / page).read_text()
    for block in re.findall(r"```\n(\$ .*?)```", text, flags=re.S):
        if command in block.splitlines()[0]:
            break
    else:
        raise ValueError(f"docs/{page}: no printed table whose command has {command!r}")

    def parse(name):
        m = re.search(rf"^{re.escape(name)}\s+(\d+)/(\d+)\s+\S+\s*(?:\+(\d+)/-(\d+))?",
                      block, flags=re.M)  # fmt: skip
        if m is None:
            raise ValueError(f"docs/{page}: no row {name!r} in the table of {command!r}")
        return int(m[1]), int(m[2]), int(m[3] or 0), int(m[4] or 0)

    base, total, _, _ = parse("plain")
    success, total_, wins, losses = parse(row)
    assert total == total_, (page, row)
    source = f"docs/{page}, printed by `... {command}`: {row}"
    p = stats.mcnemar(wins, losses)
    return Row(group, label, task, base, success, total, wins, losses, p, source)


VERIFIER = "A verifier trained on the policy's own rollouts, against the plain policy"
RTC = "Real-time chunking under inference delay, against naive chunk switching"
CONSENSUS = "Consensus and lower noise (no training), against the plain policy"
RECIPE = "The seed's post-hoc recipe (K = 3, alpha 0.1, clip 0.2), against the plain policy"
PEG = "peg-insert-side, 25 demos"
PEG100 = "peg-insert-side, 100 demos"
SWEEP = "sweep-into, 10 demos"
VIA = "pick-place via point, 50 demos"
PICK = "pick-place, 10 demos"
REFERENCE = "--suite reference --only"


def rows(root=ROOT) -> list[Row]:
    """Every row of the figure, read from the results (see the module's docstring)."""
    verify_peg = "verify-peg-insert-side-v3-25demos.json"
    rtc_peg = "realtime-peg-insert-side-v3-100demos-h8-e4-peg.json"
    rtc_via = "realtime-pick-place-v3-50demos-via0.15-h8-e4-via.json"
    consensus_peg = "consensus-peg-insert-side-v3-25demos.json"
    consensus_sweep = "consensus-sweep-into-v3-10demos.json"
    return [
        from_table(root, VERIFIER, "guidance by its gradient", PEG, verify_peg,
                   "guided by outcome verifier w=1"),
        from_table(root, VERIFIER, "best of 8, ranked by it", PEG, verify_peg,
                   "best-of-8 outcome verifier argmin"),
        from_table(root, VERIFIER, "best of 8, ranked by it", SWEEP,
                   "verify-sweep-into-v3-10demos.json", "best-of-8 outcome verifier argmin"),
        from_pair(root, RTC, "delay 1", PEG100, rtc_peg, "rtc:1", "naive:1"),
        from_pair(root, RTC, "delay 2", PEG100, rtc_peg, "rtc:2", "naive:2"),
        from_pair(root, RTC, "delay 3", PEG100, rtc_peg, "rtc:3", "naive:3"),
        from_pair(root, RTC, "delay 1", VIA, rtc_via, "rtc:1", "naive:1"),
        from_pair(root, RTC, "delay 3", VIA, rtc_via, "rtc:3", "naive:3"),
        from_table(root, CONSENSUS, "best of 8 by medoid", PEG, consensus_peg,
                   "best-of-8 medoid"),
        from_table(root, CONSENSUS, "best of 8 by medoid", SWEEP, consensus_sweep,
                   "best-of-8 medoid"),
        from_printed(root, CONSENSUS, "noise x0.5", PICK, "metaworld.md",
                     f"--task pick-place-v3 --demos 10 {REFERENCE}", "plain noise x0.5"),
        from_table(root, CONSENSUS, "noise x0.5", PEG, consensus_peg, "plain noise x0.5"),
        from_table(root, CONSENSUS, "noise x0.5", SWEEP, consensus_sweep, "plain noise x0.5"),
        from_printed(root, RECIPE, "learned energy", PICK, "metaworld.md",
                     f"--task pick-place-v3 --demos 10 {REFERENCE}", "post-hoc K=3 a=0.1"),
        from_printed(root, RECIPE, "learned energy", PEG, "metaworld.md",
                     f"--task peg-insert-side-v3 --demos 25 {REFERENCE}", "post-hoc K=3 a=0.1"),
    ]  # fmt: skip


def draw(path, root=ROOT):
    """Writes the figure to `path` (SVG with its text kept as text) and returns its rows."""
    import matplotlib
    from matplotlib.figure import Figure

    data = rows(root)
    y, ticks, labels, headers = 0.0, [], [], []
    positions = []
    for i, r in enumerate(data):
        if i == 0 or r.group != data[i - 1].group:
            y -= 0.4 if i else 0.0
            headers.append((y, r.group))
            y -= 1.0
        positions.append(y)
        ticks.append(y)
        labels.append(f"{r.label} ({r.task})")
        y -= 1.0
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "flowcorrect"}):
        fig = Figure(figsize=(10, 0.34 * (len(data) + len(headers)) + 1.2), layout="constrained")
        ax = fig.subplots()
        reach = max(max(r.wins, r.losses) for r in data)
        for yy, r in zip(positions, data):
            ax.barh(yy, r.wins, color="tab:green", height=0.7)
            ax.barh(yy, -r.losses, color="tab:red", height=0.7)
            significant = r.p < 0.05
            ax.text(reach * 1.08, yy, r.text, va="center", fontsize=8,
                    fontweight="bold" if significant else "normal")  # fmt: skip
        for yy, title in headers:
            ax.text(-reach * 1.05, yy, title, va="center", fontsize=9, fontweight="bold",
                    bbox=dict(facecolor="white", edgecolor="none", pad=1))  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.set_xlim(-reach * 1.05, reach * 2.3)
        ax.set_ylim(y + 0.3, 0.7)
        ax.set_xticks([t for t in range(-60, 61, 20) if abs(t) <= reach])
        ax.set_xticklabels([str(abs(t)) for t in range(-60, 61, 20) if abs(t) <= reach])
        ax.set_xlabel("episodes lost (red) and won (green) against the baseline, same seeds "
                      "and noise; bold: p < 0.05 (exact McNemar)", fontsize=8)  # fmt: skip
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_title("Meta-World: paired success, 300 episodes per setting", fontsize=10)
        path = pathlib.Path(path)
        fig.savefig(path, format=path.suffix[1:], dpi=110,
                    metadata={"Date": None} if path.suffix == ".svg" else None)  # fmt: skip
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for r in draw(args.out / NAME):
        print(f"{r.group} | {r.label} ({r.task}): {r.text}   [{r.source}]")
    print("wrote", args.out / NAME)


if __name__ == "__main__":
    main()
