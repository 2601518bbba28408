"""One command per experiment: demos, policy, energies, paired evaluation, table, JSON, plots.

    python -m flowcorrect.metaworld.experiment --task pick-place-v3 --demos 10 \
        --suite reference --episodes 100 --keys 3 --out results/metaworld

Everything is seeded: demonstration layouts, evaluation layouts (seeds from
10_000_000), the policy's and energy's training, and the noise keys (`--keys 3` uses
keys 0, 1, 2). Demos, policies and energies are cached (`--cache`).
"""

import dataclasses
import hashlib
import json
import pathlib
import re
import time
from typing import Any, Literal

import jax
import numpy as np

from . import _cli, stats
from .envs import collect_demos, default_cache, expert_success
from .evaluate import EnvPool, Episodes, rollout
from .policy import PolicyConfig, load_policy, policy_saved, save_policy, train_policy
from .settings import Setting, make_act

EVAL_SEED0 = 10_000_000


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a task's demonstrations, its policy and energy, a suite of
    settings and their paired evaluation (the flags of
    `python -m flowcorrect.metaworld.experiment`)."""

    # The Meta-World task.
    task: str = "pick-place-v3"
    # Scripted demonstrations the policy and the energy are trained on.
    demos: int = 10
    # Seed of the demonstrations' layouts.
    demo_seed: int = 0
    # The settings: the reference suite, the speed-limit suite or the short demo's.
    suite: Literal["reference", "constraint", "demo"] = "reference"
    # Comma-separated setting names to run (plain always runs); empty runs the suite.
    only: str = ""
    # Evaluation episodes (layouts, seeds from 10_000_000) per noise key.
    episodes: int = 100
    # Noise keys: 3 uses keys 0, 1, 2.
    keys: int = 3
    # Chunk length of the policy.
    horizon: int = 8
    # Actions executed of each chunk before the next query.
    execute: int = 4
    # An episode stops at success or after this many steps.
    max_steps: int = 300
    # Training steps of the flow policy.
    policy_steps: int = 3000
    # Training steps of the learned energy.
    energy_steps: int = 2000
    # Seed of the policy's and the energy's training.
    train_seed: int = 0
    # The limit on the speed `||a[:3]||` of the constraint suite.
    speed_limit: float = 0.8
    # Where demos, policies and energies are cached (default ~/.cache/flowcorrect/metaworld).
    cache: str | None = None
    # Where the table's JSON, the plots and the per-key episodes are written.
    out: str = "results/metaworld"
    # No progress bars.
    quiet: bool = False
    # No PNG plots.
    no_plots: bool = False
    # Run every setting again instead of reusing <out>/episodes/.
    rerun: bool = False


def _fc():
    import flowcorrect as fc

    return fc


def reference_suite() -> list[Setting]:
    """Temperature, the reference recipe, monotone, interleaved, ranking."""
    fc = _fc()
    out = [
        Setting("plain"),
        Setting("plain noise x0.5", noise_scale=0.5),
        Setting("plain noise x0.25", noise_scale=0.25),
    ]
    for k in (1, 3, 5):
        out.append(Setting(f"post-hoc K={k} a=0.1", energy="learned",
                           placement=fc.PostHoc(fc.reference_recipe(k, 0.1, 0.2))))
    for a in (0.01, 0.03, 0.3):
        out.append(Setting(f"post-hoc K=3 a={a}", energy="learned",
                           placement=fc.PostHoc(fc.reference_recipe(3, a, 0.2))))
    out += [
        Setting("monotone K=3 a=0.1", energy="learned", placement=fc.PostHoc(
            fc.Repeat(fc.Backtrack(fc.ClipStep(fc.GradientStep(0.1), 0.2)), 3))),
        Setting("denoised K=1 every step", energy="learned", placement=fc.Denoised(
            fc.reference_recipe(1, 0.1, 0.2), schedule=fc.EveryStep(), weight=1.0)),
        Setting("guided w=3", energy="learned",
                placement=fc.Guided(schedule=fc.EveryStep(), weight=3.0)),
        Setting("best-of-8 by energy", energy="learned", placement=fc.BestOfN(8)),
    ]
    return out


def constraint_suite(limit: float) -> list[Setting]:
    """A speed limit the demonstrations never respected."""
    fc = _fc()
    step = fc.Repeat(fc.GradientStep(0.5), 3)
    return [
        Setting("plain"),
        Setting(f"speed<={limit} post-hoc", energy="speed", placement=fc.PostHoc(step)),
        Setting(f"speed<={limit} denoised", energy="speed",
                placement=fc.Denoised(step, schedule=fc.EveryStep(), weight=1.0)),
        Setting(f"speed<={limit} guided w=1", energy="speed",
                placement=fc.Guided(schedule=fc.EveryStep(), weight=1.0, cap=1e3)),
        Setting(f"speed<={limit} guided w=10", energy="speed",
                placement=fc.Guided(schedule=fc.EveryStep(), weight=10.0, cap=1e3)),
        Setting(f"speed<={limit} best-of-8", energy="speed", placement=fc.BestOfN(8)),
    ]


def demo_suite() -> list[Setting]:
    """The README's short demo: plain, lower temperature, the reference recipe, ranking."""
    fc = _fc()
    return [
        Setting("plain"),
        Setting("plain noise x0.5", noise_scale=0.5),
        Setting("post-hoc K=3 a=0.1", energy="learned",
                placement=fc.PostHoc(fc.reference_recipe(3, 0.1, 0.2))),
        Setting("best-of-8 by energy", energy="learned", placement=fc.BestOfN(8)),
    ]


def _tag(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def get_policy(task, demos, config: PolicyConfig, cache: pathlib.Path, seed: int, progress,
               via_point: float = 0.0, extra: str = ""):
    """The flow policy trained on `demos`, cached; `extra` names what else sets the
    demonstrations apart (a limit their actions were projected onto)."""
    tag = _tag([dataclasses.asdict(config), seed, demos.seeds.tolist()]
               + ([f"via{via_point}"] if via_point else []) + ([extra] if extra else []))
    path = cache / f"policy-{task}-{len(demos.seeds)}-{tag}"
    if policy_saved(path):
        return load_policy(path)[0]
    obs, chunks = demos.chunks(config.horizon)
    policy, losses = train_policy(obs, chunks, config, seed=seed, progress=progress)
    save_policy(path, policy, config)
    return policy


def get_energy(policy, demos, horizon, cache, tag, steps, seed, progress):
    from .energies import load_energy, save_energy, train_energy

    path = cache / f"mlp-energy-{tag}-{steps}-{seed}"
    if (path / "meta.json").exists():
        return load_energy(path)
    obs, chunks = demos.chunks(horizon)
    energy, meta = train_energy(policy, obs, chunks, demos.episode, steps=steps, seed=seed,
                                progress=progress)
    save_energy(path, energy, meta)
    return energy, meta


def task_policy(
    task: str, num_demos: int, cache: pathlib.Path, *, demo_seed: int = 0, horizon: int = 8,
    policy_steps: int = 3000, train_seed: int = 0, via_point: float = 0.0,
    progress: bool = True,
):
    """The demonstrations of `task` and the flow policy trained on them, both cached.

    **Arguments:**

    - `task`, `num_demos`, `demo_seed`: the scripted demonstrations (`via_point > 0`:
        multimodal ones, see [`flowcorrect.metaworld.envs.collect_demos`][]).
    - `cache`: the cache directory.
    - `horizon`, `policy_steps`, `train_seed`: the policy's chunk length, training steps
        and seed.
    - `progress`: progress bars.

    **Returns:** `(demos, policy)`.
    """
    demos = collect_demos(task, num_demos, seed=demo_seed, cache=cache, progress=progress,
                          via_point=via_point)  # fmt: skip
    config = PolicyConfig(horizon=horizon, steps=policy_steps)
    return demos, get_policy(task, demos, config, cache, train_seed, progress, via_point)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Runs every setting of `config.suite` (paired with plain, on the same layouts and
    noise keys), prints the table and writes it with the episodes and plots under
    `config.out`. **Returns:** the report written as `<suite>-<task>-<demos>demos-h<H>.json`
    (its `"args"` are the config's fields)."""
    cache = pathlib.Path(config.cache) if config.cache else default_cache()
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not config.quiet
    t0 = time.time()
    demos, policy = task_policy(
        config.task, config.demos, cache, demo_seed=config.demo_seed, horizon=config.horizon,
        policy_steps=config.policy_steps, train_seed=config.train_seed, progress=progress,
    )
    policy_tag = (f"{config.task}-{config.demos}-h{config.horizon}-s{config.policy_steps}-"
                  f"{config.train_seed}")
    suite = {
        "reference": reference_suite, "demo": demo_suite,
        "constraint": lambda: constraint_suite(config.speed_limit),
    }[config.suite]()
    if config.only:
        keep = set(config.only.split(","))
        suite = [s for s in suite if s.name == "plain" or s.name in keep]
    energies: dict[str, Any] = {}
    energy_meta: dict[str, Any] = {}
    energy_tag = f"mlp-{config.energy_steps}"
    if any(s.energy == "learned" for s in suite):
        energies["learned"], energy_meta = get_energy(
            policy, demos, config.horizon, cache, policy_tag, config.energy_steps,
            config.train_seed, progress,
        )
    if any(s.energy == "speed" for s in suite):
        from .energies import SpeedLimit

        energies["speed"] = SpeedLimit(config.speed_limit)
    seeds = EVAL_SEED0 + np.arange(config.episodes)
    expert = expert_success(config.task, seeds, max_steps=config.max_steps, cache=cache,
                            progress=progress)
    pool = None
    results: dict[str, Any] = {}
    runs = out / "episodes"
    runs.mkdir(exist_ok=True)
    for setting in suite:
        act = None
        per_key = []
        for k in range(config.keys):
            # Each (setting, key) is stored as it finishes and reused by later commands
            # with the same policy, energy, seeds and limits (`--rerun` ignores them), so
            # settings can run in separate processes and be tabulated together.
            tag = _tag([policy_tag, energy_tag if setting.energy == "learned" else None,
                        setting.describe(), config.episodes, config.execute, config.max_steps,
                        config.speed_limit if config.suite == "constraint" else None, k])
            path = runs / f"{config.task}-{_slug(setting.name)}-key{k}-{tag}.json"
            if path.exists() and not config.rerun:
                per_key.append(Episodes.from_json(json.loads(path.read_text())))
                continue
            if pool is None:
                pool = EnvPool(config.task, config.episodes)
            if act is None:
                act = make_act(policy, setting, energies)
            ep = rollout(
                pool, seeds, act, jax.random.key(1000 + k), execute=config.execute,
                max_steps=config.max_steps, progress=progress,
                speed_limit=config.speed_limit if config.suite == "constraint" else None,
                desc=f"{setting.name} key {k}",
            )
            path.write_text(json.dumps(ep.to_json()))
            per_key.append(ep)
        results[setting.name] = {"setting": setting.describe(), "keys": per_key}
        # Partial results as each setting finishes, so a long run that is stopped
        # still leaves its table.
        partial = table_rows(results, config.suite == "constraint")[-1]
        print(f"[{time.time() - t0:.0f}s] {partial}", flush=True)
        _write(out, config, results, expert, energy_meta, t0, partial=True)
    report = _write(out, config, results, expert, energy_meta, t0, partial=False)
    print(report["header"])
    print(report["table"])
    return report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name)


def _write(out, config, results, expert, energy_meta, t0, *, partial: bool) -> dict[str, Any]:
    rows = table_rows(results, config.suite == "constraint")
    plain = results["plain"]["keys"]
    null = [int(e.success.sum()) for e in plain]
    text = stats.format_table(
        rows, baseline="plain", null_spread=null, expert=int(expert.sum()),
        episodes_per_key=config.episodes, num_settings=len(results) - 1,
    )
    header = (f"task {config.task}, {config.demos} demos, horizon {config.horizon} (execute "
              f"{config.execute}), {config.episodes} episodes x {config.keys} noise keys, "
              f"max {config.max_steps} steps" + (" (PARTIAL)" if partial else ""))
    report = {
        "args": dataclasses.asdict(config), "header": header, "table": text, "rows": rows,
        "null_spread": null, "expert_success": int(expert.sum()),
        "energy": {k: v for k, v in energy_meta.items()
                   if k in ("report", "direction", "config", "steps", "num_negatives")},
        "plots": plot_data(rows, null, config.episodes, int(expert.sum()), energy_meta),
        "settings": {name: {"setting": r["setting"],
                            "keys": [e.to_json() for e in r["keys"]]}
                     for name, r in results.items()},
        "seconds": time.time() - t0,
    }
    stem = f"{config.suite}-{config.task}-{config.demos}demos-h{config.horizon}"
    if config.only:
        stem += "-" + _tag(sorted(config.only.split(",")))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    if not config.no_plots and not partial:
        plot(report, out / f"{stem}.png")
    return report


_POST_HOC = re.compile(r"post-hoc K=(\d+) a=([0-9.]+)$")


def plot_data(
    rows: list[dict[str, Any]], null: list[int], episodes: int, expert: int,
    energy_meta: dict[str, Any],
) -> dict[str, Any]:
    """The numbers behind the plots, read from the table rows by name: success against
    K (at alpha 0.1; K = 0 is the plain policy) and against alpha (at K = 3), and the
    energy along the correction direction from the energy's held-out states."""
    by = {r["name"]: r for r in rows}
    band = {"null_spread": [n / episodes for n in null], "expert": expert / episodes}
    vs_k: dict[int, dict] = {}
    vs_alpha: dict[float, dict] = {}
    if "plain" in by:
        vs_k[0] = by["plain"]
    for r in rows:
        m = _POST_HOC.match(r["name"])
        if m:
            k, a = int(m[1]), float(m[2])
            if a == 0.1:
                vs_k[k] = r
            if k == 3:
                vs_alpha[a] = r

    def series(d: dict) -> dict[str, list]:
        xs = sorted(d)
        return {"x": xs, "success_rate": [d[x]["success"] / d[x]["total"] for x in xs],
                "wins": [d[x]["wins"] for x in xs], "losses": [d[x]["losses"] for x in xs],
                "p": [d[x]["p"] for x in xs], **band}

    out: dict[str, Any] = {}
    if len(vs_k) > 1:
        out["success_vs_K"] = series(vs_k)
    if vs_alpha:
        out["success_vs_alpha"] = series(vs_alpha)
    if "direction" in energy_meta:
        out["energy_along_direction"] = energy_meta["direction"]
    return out


def table_rows(results: dict[str, Any], constraint: bool) -> list[dict[str, Any]]:
    plain = results["plain"]["keys"]
    rows = []
    for name, r in results.items():
        eps = r["keys"]
        wins = losses = 0
        for base, ep in zip(plain, eps):
            w, l_ = stats.paired_counts(base.success, ep.success)
            wins, losses = wins + w, losses + l_
        succ = np.concatenate([e.success for e in eps])
        extra = []
        diag = eps[0].diagnostics
        if "energy_before" in diag:
            keys = ("energy_before", "energy_after", "delta_norm")
            means = {k: np.mean([e.diagnostics.get(k, np.nan) for e in eps]) for k in keys}
            extra.append("E {energy_before:.3g}->{energy_after:.3g} |d| {delta_norm:.3g}"
                         .format(**means))
        if constraint:
            viol = np.concatenate([e.speed_violations for e in eps])
            steps = np.concatenate([e.steps for e in eps])
            extra.append(f"violating episodes {int(np.sum(viol > 0))}, steps "
                         f"{100 * viol.sum() / max(steps.sum(), 1):.1f}%")
        rows.append({
            "name": name, "success": int(succ.sum()), "total": int(succ.size),
            "per_key": [int(e.success.sum()) for e in eps], "wins": wins, "losses": losses,
            "p": stats.mcnemar(wins, losses), "extra": "; ".join(extra),
        })
    return rows


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
    """Writes the bar chart of every setting to `path`, and one figure per entry of
    `report["plots"]` beside it (`<stem>-<name>.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    names = [r["name"] for r in rows][::-1]
    rates = [r["success"] / r["total"] for r in rows][::-1]
    ax.barh(names, rates, color=["C0" if n == "plain" else "C1" for n in names])
    null = report["null_spread"]
    n = report["args"]["episodes"]
    ax.axvspan(min(null) / n, max(null) / n, color="grey", alpha=0.3, label="null spread")
    ax.axvline(report["expert_success"] / n, color="k", ls="--", label="scripted expert")
    ax.set_xlabel("success rate (pooled over noise keys)")
    ax.set_title(report["header"], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for name, data in report["plots"].items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        if name.startswith("success_vs_"):
            ax.plot(data["x"], data["success_rate"], "o-", label="post-hoc reference recipe")
            ax.axhspan(min(data["null_spread"]), max(data["null_spread"]), color="grey",
                       alpha=0.3, label="plain, null spread")
            ax.axhline(data["expert"], color="k", ls="--", label="scripted expert")
            ax.set_xlabel(name.removeprefix("success_vs_"))
            ax.set_ylabel("success rate")
            if name.endswith("alpha"):
                ax.set_xscale("log")
        else:  # energy along the correction direction
            a = data["alphas"]
            ax.plot(a, data["energy_clipped"], "o-", label="E after one clipped step")
            ax.plot(a, data["energy_unclipped"], "x--", label="E after one unclipped step")
            ax.axhline(data["energy_expert"], color="k", ls="--", label="E of expert chunks")
            ax.set_xlabel("alpha")
            ax.set_ylabel("mean energy")
            twin = ax.twinx()
            twin.plot(a, data["distance_clipped"], "s:", color="C3",
                      label="distance to expert (clipped)")
            twin.set_ylabel("mean distance to the expert chunk", color="C3")
            twin.legend(fontsize=7, loc="lower left")
        ax.legend(fontsize=7)
        ax.set_title(f"{report['args']['task']}: {name.replace('_', ' ')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}-{name}.png"), dpi=120)
        plt.close(fig)


def parse_cli(argv: list[str] | None = None) -> ExperimentConfig:
    """The `ExperimentConfig` that the command line `argv` names."""
    return _cli.parse(ExperimentConfig, argv, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_cli(argv))


if __name__ == "__main__":
    main()
