"""Hard constraints on the harness: plain, projection, guidance by the violation, and
guidance then projection, paired on the same layouts and noise.

    python -m flowcorrect.metaworld.constraints --task pick-place-v3 --demos 10 \\
        --constraint speed --episodes 100 --keys 3 --out results/metaworld

Two constraints on the translation command `a[:3]` (Meta-World moves the hand by
`a[:3] / 100` per step; the scripted experts saturate at 1 per axis, so the
demonstrations never respect either):

- `speed`: `||a[:3]|| <= 0.8` ([`flowcorrect.constraints.Ball`][] about 0), a speed limit;
- `descent`: `-a[2] <= 0.3` ([`flowcorrect.constraints.HalfSpace`][]), a limit on how fast the hand
    may move down (towards the table).

Every executed action (after the environment's clip to [-1, 1], which keeps both
feasible) is checked against the constraint; the table reports the episodes and steps
that violated it, the mean violation of the chunks before projection and how far the
projection moved them. Settings (the number compared with plain is in the table):

- `plain`;
- `project`: [`flowcorrect.Project`][] of the plain chunk, the guarantee;
- `guided w=W`: [`flowcorrect.Guided`][] by [`flowcorrect.constraints.ViolationEnergy`][] of the
    constraint, every flow step (no guarantee);
- `guided w=W + project`: both, so the projection has less to do;
- `best-of-8 feasible-first + project`: [`flowcorrect.constraints.FeasibleFirst`][] among 8
    candidates by consensus ([`flowcorrect.Medoid`][]), then projected.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _cli, stats
from .envs import collect_demos, default_cache, expert_success, limit_tag
from .evaluate import EnvPool, Episodes, rollout
from .experiment import EVAL_SEED0, _slug, _tag, get_policy
from .policy import PolicyConfig
from .verifiers import paired_rows


def make_constraint(name: str, limit: float | None = None) -> Any:
    """The named constraint on the translation command (see the module docstring), with
    its bound `limit` (default 0.8 for `speed`, 0.3 for `descent`)."""
    import flowcorrect as fc

    if name == "speed":
        return fc.constraints.Ball(jnp.zeros(3), 0.8 if limit is None else limit, dims=(0, 1, 2))
    if name == "descent":
        return fc.constraints.HalfSpace(
            jnp.array([0.0, 0.0, -1.0]), 0.3 if limit is None else limit, dims=(0, 1, 2)
        )
    raise ValueError(f"`constraint` must be one of {list(CONSTRAINTS)}; got {name!r}.")


CONSTRAINTS = ("speed", "descent")


@dataclasses.dataclass(frozen=True)
class ConstraintSetting:
    """One row of the table: `placement` of the chunk, guided by the constraint's
    violation (`guided`) or not."""

    name: str
    placement: Any = None
    guided: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "placement": repr(self.placement), "guided": self.guided}


def suite(constraint: Any, weight: float) -> list[ConstraintSetting]:
    """Plain, projection, guidance, guidance then projection, feasible-first best-of-8."""
    import flowcorrect as fc

    guide = fc.Guided(schedule=fc.EveryStep(), weight=weight, cap=1e3)
    pick = fc.BestOfN(8, select=fc.constraints.FeasibleFirst(constraint, inner=fc.Medoid()))
    return [
        ConstraintSetting("plain"),
        ConstraintSetting("project", fc.Project(constraint)),
        ConstraintSetting(f"guided w={weight:g}", guide, guided=True),
        ConstraintSetting(f"guided w={weight:g} + project", fc.Project(constraint, guide),
                          guided=True),
        ConstraintSetting("best-of-8 feasible-first + project", fc.Project(constraint, pick)),
    ]


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


@eqx.filter_jit
def _run(policy, constraint, static, obs, key):
    import flowcorrect as fc

    setting = static.value
    # The noise of the placement's own shape, drawn from the query's key: every setting
    # of one shape starts from the same noise (best-of-8 ranks the same candidates).
    placement = fc.Plain() if setting.placement is None else setting.placement
    shape = placement.noise_shape(policy.chunk_shape)
    noise = jax.random.normal(key, (obs.shape[0], *shape), jnp.float32)
    energy = fc.constraints.ViolationEnergy(constraint) if setting.guided else None
    actions, info = fc.sample(policy, obs, key, noise=noise, placement=placement, energy=energy)
    after = jax.vmap(constraint.violation)(actions)
    diag = {"violation_after": after}
    project = info.placement
    if isinstance(project, fc.ProjectInfo):
        diag["violation_before"] = project.violation_before
        diag["distance"] = project.distance
        diag["moved"] = (project.distance > 0).astype(jnp.float32)
    else:
        diag["violation_before"] = after
    return actions, diag


def make_act(policy: Any, constraint: Any, setting: ConstraintSetting):
    """`act(obs [N, obs_dim], key) -> (chunks, diagnostics)`, one compiled call."""
    static = _Static(setting)

    def act(obs: np.ndarray, key: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        actions, diag = _run(policy, constraint, static, jnp.asarray(obs, jnp.float32), key)
        return np.asarray(actions), {k: np.asarray(v) for k, v in diag.items()}

    return act


@dataclasses.dataclass(frozen=True)
class Config:
    """What one run measures (the flags of `python -m flowcorrect.metaworld.constraints`)."""

    # The Meta-World task.
    task: str = "pick-place-v3"
    # Scripted demonstrations the policy is trained on.
    demos: int = 10
    # The constraint on the translation command a[:3].
    constraint: Literal["speed", "descent"] = "speed"
    # Its bound (default 0.8 for speed, 0.3 for descent).
    limit: float | None = None
    # The weight of guidance by the constraint's violation.
    weight: float = 10.0
    # Evaluation episodes (layouts) per noise key.
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
    # Seed of the demonstrations' layouts.
    demo_seed: int = 0
    # Seed of the policy's training.
    train_seed: int = 0
    # Where the table's JSON and the per-key episodes are written.
    out: str = "results/metaworld"
    # Where demos and policies are cached (default ~/.cache/flowcorrect/metaworld).
    cache: str | None = None
    # No progress bars.
    quiet: bool = False
    # Instead of the suite: a policy trained on demonstrations whose every action was
    # projected onto the limit, run plain, projected and guided then projected, against
    # the plain policy.
    train_under_limit: bool = False


def run(config: Config) -> dict[str, Any]:
    """Runs every setting of [`suite`][] for `config`, paired with plain, and writes
    `constraint-<task>-<demos>demos-<constraint>.json` (and the per-key episodes, reused
    by a later run with the same settings) under `config.out`."""
    if config.constraint not in CONSTRAINTS:
        raise ValueError(
            f"`constraint` must be one of {list(CONSTRAINTS)}; got {config.constraint!r}.")
    cache = pathlib.Path(config.cache) if config.cache else default_cache()
    out = pathlib.Path(config.out)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    progress = not config.quiet
    t0 = time.time()
    demos = collect_demos(config.task, config.demos, seed=config.demo_seed, cache=cache,
                          progress=progress)
    pconf = PolicyConfig(horizon=config.horizon, steps=config.policy_steps)
    policy = get_policy(config.task, demos, pconf, cache, config.train_seed, progress)
    constraint = make_constraint(config.constraint, config.limit)
    check = jax.jit(lambda a: constraint.violation(a[None]))
    tol = float(constraint.tolerance(jnp.ones((1, 4), jnp.float32)))

    def violation(a: np.ndarray) -> float:
        return float(check(jnp.asarray(a, jnp.float32)))

    seeds = EVAL_SEED0 + np.arange(config.episodes)
    expert = expert_success(config.task, seeds, max_steps=config.max_steps, cache=cache,
                            progress=progress)
    policy_tag = (f"{config.task}-{config.demos}-h{config.horizon}-s{config.policy_steps}-"
                  f"{config.train_seed}")
    runs = [(policy, policy_tag, s) for s in suite(constraint, config.weight)]
    limited_expert = None
    if config.train_under_limit:
        limited, limited_expert = under_limit(config, constraint, cache, seeds, progress)
        tag = f"{policy_tag}-limited-{limit_tag(constraint)}"
        runs = [(policy, policy_tag, runs[0][2])] + [
            (limited, tag, dataclasses.replace(s, name=f"{UNDER_LIMIT}{s.name}"))
            for s in suite(constraint, config.weight)
            if s.name in ("plain", "project", f"guided w={config.weight:g} + project")
        ]
    pool = None
    results: dict[str, list[Episodes]] = {}
    seconds: dict[str, float] = {}
    for policy, policy_tag, setting in runs:
        keys = []
        act = None
        start = time.time()
        for k in range(config.keys):
            tag = _tag([policy_tag, config.constraint, setting.describe(), config.episodes,
                        config.execute, config.max_steps, k]
                       + ([config.limit] if config.limit is not None else []))
            path = out / "episodes" / f"{config.task}-{_slug(setting.name)}-key{k}-{tag}.json"
            if path.exists():
                keys.append(Episodes.from_json(json.loads(path.read_text())))
                continue
            pool = pool or EnvPool(config.task, config.episodes)
            act = act or make_act(policy, constraint, setting)
            ep = rollout(pool, seeds, act, jax.random.key(1000 + k), execute=config.execute,
                         max_steps=config.max_steps, violation=violation, tolerance=tol,
                         progress=progress, desc=f"{setting.name} key {k}")
            path.write_text(json.dumps(ep.to_json()))
            keys.append(ep)
        results[setting.name] = keys
        seconds[setting.name] = time.time() - start
        print(f"[{time.time() - t0:.0f}s] {table_rows(results)[-1]}", flush=True)
    rows = table_rows(results)
    null = [int(e.success.sum()) for e in results["plain"]]
    table = stats.format_table(
        rows, baseline="plain", null_spread=null, expert=int(expert.sum()),
        episodes_per_key=config.episodes, num_settings=len(rows) - 1,
    )
    header = (f"task {config.task}, {config.demos} demos, constraint {config.constraint} "
              f"({constraint!r}), horizon {config.horizon} (execute {config.execute}), "
              f"{config.episodes} episodes x {config.keys} noise keys, max "
              f"{config.max_steps} steps")
    if limited_expert is not None:
        header += (f"; '{UNDER_LIMIT}' rows: a policy trained on {config.demos} "
                   f"demonstrations projected onto the limit (the expert under it solves "
                   f"{int(limited_expert.sum())}/{config.episodes} of these layouts)")
    report = {
        "config": dataclasses.asdict(config), "header": header, "table": table,
        "rows": rows, "null_spread": null, "expert_success": int(expert.sum()),
        "expert_success_under_limit": (None if limited_expert is None
                                       else int(limited_expert.sum())),
        "tolerance": tol, "seconds": time.time() - t0, "seconds_per_setting": seconds,
        "settings": {name: [e.to_json() for e in eps] for name, eps in results.items()},
    }
    stem = f"constraint-{config.task}-{config.demos}demos-{config.constraint}"
    if config.limit is not None:
        stem += f"-{config.limit:g}"
    if config.train_under_limit:
        stem += "-trained-under-limit"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    print(header)
    print(table)
    return report


UNDER_LIMIT = "trained under limit: "


def under_limit(config: Config, constraint: Any, cache: pathlib.Path, seeds: np.ndarray,
                progress: bool) -> tuple[Any, np.ndarray]:
    """The policy trained on demonstrations of the expert under `constraint` (every
    action projected onto it, [`flowcorrect.metaworld.envs.LimitedExpert`][]), on the
    same layouts and with the same training as the plain policy, and that expert's
    success on the evaluation `seeds`."""
    demos = collect_demos(config.task, config.demos, seed=config.demo_seed, cache=cache,
                          progress=progress, limit=constraint)
    pconf = PolicyConfig(horizon=config.horizon, steps=config.policy_steps)
    policy = get_policy(config.task, demos, pconf, cache, config.train_seed, progress,
                        extra=f"limited-{limit_tag(constraint)}")
    expert = expert_success(config.task, seeds, max_steps=config.max_steps, cache=cache,
                            progress=progress, limit=constraint)
    return policy, expert


def table_rows(results: dict[str, list[Episodes]]) -> list[dict[str, Any]]:
    """One row per setting: success, paired wins and losses against plain with the exact
    McNemar p-value (`verifiers.paired_rows`), and
    the violations of the executed actions."""
    rows = paired_rows(results, "plain")
    for row, eps in zip(rows, results.values()):
        viol = np.concatenate([e.violations for e in eps])
        steps = np.concatenate([e.steps for e in eps])
        mean = {k: float(np.mean([e.diagnostics.get(k, np.nan) for e in eps]))
                for k in ("violation_before", "violation_after", "distance", "moved")}
        extra = (f"violating episodes {int(np.sum(viol > 0))}, executed steps "
                 f"{int(viol.sum())}/{int(steps.sum())}; chunk violation "
                 f"{mean['violation_before']:.3g}->{mean['violation_after']:.3g}")
        if np.isfinite(mean["distance"]):
            extra += (f"; moved {100 * mean['moved']:.0f}% of chunks, mean distance "
                      f"{mean['distance']:.3g}")
        row.update({
            "violating_episodes": int(np.sum(viol > 0)),
            "violating_steps": int(viol.sum()), "steps": int(steps.sum()),
            "max_violation": float(np.max(np.concatenate([e.max_violation for e in eps]))),
            **{f"mean_{k}": v for k, v in mean.items()}, "extra": extra,
        })
    return rows


def parse_cli(argv: list[str] | None = None) -> Config:
    """The `Config` that the command line `argv` names."""
    return _cli.parse(Config, argv, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_cli(argv))


if __name__ == "__main__":
    main()
