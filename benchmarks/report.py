"""The report of a benchmark run: a markdown table, the JSON record, a plot."""

import json
import pathlib
from typing import Any


def _ms(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _ratio(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _flops(r: dict[str, Any]) -> str:
    """The added-FLOPs ratio; `low-high` where a cond's branches differ (see
    `harness.matmul_flops`)."""
    high, low = r["added_flops_ratio"], r.get("added_flops_ratio_min")
    if low is None or high is None or abs(high - low) < 5e-5:
        return _ratio(high, 4)
    return f"{low:.4f}-{high:.4f}"


COLUMNS = [
    ("row", lambda r: r["row"]),
    ("median ms", lambda r: _ms(r["median_ms"])),
    ("min ms", lambda r: _ms(r["min_ms"])),
    ("added ms", lambda r: _ms(r["added_ms"])),
    ("x plain", lambda r: _ratio(r["ratio"])),
    ("x plain, paired", lambda r: _ratio(r.get("paired_ratio"))),
    ("added FLOPs / plain", lambda r: _flops(r)),
    ("vs reference", lambda r: _ratio(r.get("vs_reference"))),
    ("compile s", lambda r: f"{r['compile_s']:.1f}"),
    ("temp MiB", lambda r: _mib(r["temp_bytes"])),
    ("total MiB", lambda r: _mib(r["total_bytes"])),
]


# How each policy of a run is named in the tables.
POLICY_NAMES = {"shaped": "Pi0ShapedPolicy", "openpi": "openpi Pi0"}


def _title(run: dict[str, Any]) -> str:
    policy = run.get("policy", "shaped")
    return f"{POLICY_NAMES.get(policy, policy)}, batch size {run['batch_size']}"


def markdown_table(result: dict[str, Any]) -> str:
    """One table per policy and batch size. `x plain` is the ratio of medians; `x plain,
    paired` the median over rounds of each call over the baseline's call in the same
    round (robust to load that changes between rounds). `vs reference` is our added time
    over the reference-style baseline's added time at the same K."""
    lines = []
    for run in result["runs"]:
        lines += [f"**{_title(run)}**", ""]
        lines.append("| " + " | ".join(name for name, _ in COLUMNS) + " |")
        lines.append("|---|" + "--:|" * (len(COLUMNS) - 1))
        for row in run["rows"]:
            lines.append("| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |")
        if run.get("rows_left_out"):
            lines += ["", f"(left out of the quick set: {', '.join(run['rows_left_out'])}; "
                      "--full runs them)"]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["settings"]
    peak = result.get("device_peak_bytes")
    policies = []
    # Records from before openpi's rows had one policy, described in the settings.
    described = setup["policies"] if "policies" in setup else {"shaped": setup}
    for name, policy in described.items():
        label = POLICY_NAMES.get(name, name)
        policies += [f"{label}: {policy['policy']}", f"  energy: {policy['energy']}"]
    for name, reason in result.get("skipped", {}).items():
        policies.append(f"{POLICY_NAMES.get(name, name)}: skipped ({reason})")
    return "\n".join(
        [
            f"device: {env['device']} ({env['cpu_count']} CPUs, 1-min load "
            f"{env['load_average_1m']} at start, {result.get('load_average_1m_end')} at end); "
            f"jax {env['jax']}, equinox {env['equinox']}, flowcorrect {env['flowcorrect']}",
            *policies,
            f"timing: median of {setup['repeats']} round-robin calls after {setup['warmup']} "
            "warm-up calls, each synchronised with block_until_ready; compile separate",
            "device peak memory: "
            + ("not reported on this backend" if peak is None else f"{_mib(peak)} MiB (process)"),
        ]
    )


def write_json(result: dict[str, Any], path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict[str, Any], path: str | pathlib.Path) -> bool:
    """Bar chart of each row's time over plain sampling, per batch size. matplotlib is
    imported here only; without it nothing is drawn and False is returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = result["runs"]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rows = [r for r in run["rows"] if r["ratio"] is not None]
        ax.barh([r["row"] for r in rows], [r["ratio"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("median time / plain sampling")
        ax.set_title(f"{_title(run)}: {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
