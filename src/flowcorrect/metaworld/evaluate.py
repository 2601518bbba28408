"""Batched, paired closed-loop evaluation on Meta-World.

All episodes of a setting run together: the environments are stepped in Python and,
at each control query, one compiled sampler call produces the chunks for every
environment's observation. Every setting sees the same layouts (seeds) and, at query
`q`, the same noise key `fold_in(key, q)`, so settings differ from the plain policy
only by what they change.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .envs import make_env, reset_env

# (observations [N, obs_dim], key) -> (chunks [N, horizon, action_dim], diagnostics)
ActFn = Callable[[np.ndarray, Any], tuple[np.ndarray, dict[str, np.ndarray]]]


class EnvPool:
    """`size` environments of one task, built once and reused by every setting."""

    def __init__(self, task: str, size: int):
        metaworld_env = make_env(task)
        self.task = task
        self.envs = [metaworld_env] + [_clone(metaworld_env, task) for _ in range(size - 1)]

    def __len__(self) -> int:
        return len(self.envs)


def _clone(env: Any, task: str) -> Any:
    out = type(env)()
    out.set_task(_task_of(env, task))
    out._freeze_rand_vec = False
    out.seeded_rand_vec = True
    return out


_TASKS: dict[str, Any] = {}


def _task_of(env: Any, task: str) -> Any:
    if task not in _TASKS:
        from ._require import require_metaworld

        _TASKS[task] = require_metaworld().MT1(task, seed=0).train_tasks[0]
    return _TASKS[task]


@dataclasses.dataclass
class Episodes:
    """Per-episode results of one setting (arrays over episodes, in seed order).

    - `success`: solved within the step limit; `steps`: steps taken (to success or limit);
    - `speed_violations`: executed steps whose translation command `||a[:3]||` exceeded
        `speed_limit` (when one was given), `max_speed`: the largest such norm;
    - `diagnostics`: the mean over queries of each diagnostic the sampler returned;
    - `violations`, `max_violation`: with a `violation` function given to
        [`rollout`][], the executed steps whose action violated it (by more than its
        tolerance) and the largest violation seen; `None` otherwise.
    """

    seeds: np.ndarray
    success: np.ndarray
    steps: np.ndarray
    speed_violations: np.ndarray
    max_speed: np.ndarray
    diagnostics: dict[str, float]
    violations: np.ndarray | None = None
    max_violation: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds.tolist(),
            "success": self.success.astype(int).tolist(),
            "steps": self.steps.tolist(),
            "speed_violations": self.speed_violations.tolist(),
            "max_speed": np.round(self.max_speed, 4).tolist(),
            "diagnostics": self.diagnostics,
            **({} if self.violations is None else {
                "violations": self.violations.tolist(),
                "max_violation": [float(v) for v in self.max_violation],
            }),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Episodes":
        """Rebuilds what `to_json` wrote (`max_speed` is rounded to 4 decimals there)."""
        return cls(
            seeds=np.asarray(data["seeds"], np.int64),
            success=np.asarray(data["success"], bool),
            steps=np.asarray(data["steps"], np.int32),
            speed_violations=np.asarray(data["speed_violations"], np.int32),
            max_speed=np.asarray(data["max_speed"], np.float32),
            diagnostics={k: float(v) for k, v in data["diagnostics"].items()},
            violations=(np.asarray(data["violations"], np.int32)
                        if "violations" in data else None),
            max_violation=(np.asarray(data["max_violation"], np.float64)
                           if "max_violation" in data else None),
        )


def rollout(
    pool: EnvPool,
    seeds: np.ndarray,
    act: ActFn,
    key: Any,
    *,
    execute: int,
    max_steps: int = 500,
    speed_limit: float | None = None,
    violation: Callable[[np.ndarray], float] | None = None,
    tolerance: float = 1e-6,
    progress: bool = True,
    desc: str = "",
) -> Episodes:
    """Runs one episode per seed, all at once, querying `act` every `execute` steps.

    Receding horizon: each query returns a chunk for every environment and the first
    `execute` actions are executed (the chunk's horizon must be at least `execute`).
    An environment that has succeeded stops (its observation is still sent, so the
    batch keeps its shape and the sampler compiles once).

    With `violation` (a function of one executed action, `(action_dim,)` after the
    environment's clip to [-1, 1], returning how far it is from a constraint's feasible
    set), every executed step whose violation exceeds `tolerance` is counted.
    """
    from tqdm.auto import tqdm

    seeds = np.asarray(seeds)
    n = len(seeds)
    if n > len(pool):
        raise ValueError(f"{n} seeds but the pool has {len(pool)} environments.")
    envs = pool.envs[:n]
    obs = np.stack([reset_env(e, s) for e, s in zip(envs, seeds)])
    done = np.zeros(n, bool)
    success = np.zeros(n, bool)
    steps = np.zeros(n, np.int32)
    violations = np.zeros(n, np.int32)
    max_speed = np.zeros(n, np.float32)
    broken = np.zeros(n, np.int32)
    worst = np.zeros(n, np.float64)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    bar = tqdm(total=max_steps, desc=desc or "rollout", disable=not progress, mininterval=2)
    t = 0
    query = 0
    while t < max_steps and not done.all():
        chunks, diag = act(obs, jax.random.fold_in(key, query))
        query += 1
        if chunks.shape[1] < execute:
            raise ValueError(f"Chunks of horizon {chunks.shape[1]} < execute={execute}.")
        live = ~done
        for name, value in diag.items():
            value = np.asarray(value)
            if value.shape[:1] == (n,):
                value = value[live]
            finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
            if finite.size:
                sums[name] = sums.get(name, 0.0) + float(np.sum(finite))
                counts[name] = counts.get(name, 0) + int(finite.size)
        for j in range(execute):
            if t >= max_steps or done.all():
                break
            for i in np.flatnonzero(~done):
                a = np.clip(chunks[i, j], -1.0, 1.0)
                speed = float(np.linalg.norm(a[:3]))
                max_speed[i] = max(max_speed[i], speed)
                if speed_limit is not None and speed > speed_limit + 1e-6:
                    violations[i] += 1
                if violation is not None:
                    v = float(violation(a))
                    worst[i] = max(worst[i], v)
                    if not v <= tolerance:
                        broken[i] += 1
                o, _, _, truncated, info = envs[i].step(a)
                obs[i] = o
                steps[i] += 1
                if info["success"]:
                    success[i] = True
                    done[i] = True
                elif truncated:
                    done[i] = True
            t += 1
            bar.update(1)
        bar.set_postfix(success=int(success.sum()), live=int((~done).sum()))
    bar.close()
    diagnostics = {k: sums[k] / counts[k] for k in sums}
    return Episodes(
        seeds, success, steps, violations, max_speed, diagnostics,
        violations=None if violation is None else broken,
        max_violation=None if violation is None else worst,
    )
