"""Meta-World v3 environments with seeded layouts, scripted experts and demonstrations.

A Meta-World environment freezes its object and goal layout by default, so every reset
gives the same scene; the harness unfreezes it and draws the layout from the
environment's own generator, seeded per episode (`env.seed(seed)`, then `reset()`:
v3's `reset` ignores its `seed` argument). One seed is one layout, for the expert, the
policy and every corrected setting alike.
"""

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any

import numpy as np

from ._require import require_metaworld

OBS_DIM = 39
ACTION_DIM = 4
HAND = slice(0, 3)  # end-effector position in the observation


def default_cache() -> pathlib.Path:
    """`~/.cache/flowcorrect/metaworld`, the default cache directory."""
    return pathlib.Path.home() / ".cache" / "flowcorrect" / "metaworld"


def make_env(task: str) -> Any:
    """A Meta-World v3 environment for `task` (e.g. `"peg-insert-side-v3"`) whose layout
    is drawn from its seeded generator at every reset (see [`reset_env`][])."""
    metaworld = require_metaworld()
    if task not in metaworld.ALL_V3_ENVIRONMENTS:
        near = [n for n in metaworld.ALL_V3_ENVIRONMENTS if task.split("-")[0] in n]
        raise ValueError(f"Unknown Meta-World v3 task {task!r}; similar names: {near[:6]}.")
    benchmark = metaworld.MT1(task, seed=0)
    env = benchmark.train_classes[task]()
    env.set_task(benchmark.train_tasks[0])
    # Unfrozen and seeded: each reset draws a layout from env.np_random.
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    return env


def reset_env(env: Any, seed: Any) -> np.ndarray:
    """Resets `env` to the layout of `seed` and returns the first observation."""
    env.seed(int(seed))
    obs, _ = env.reset()
    return np.asarray(obs, np.float32)


def expert(task: str) -> Any:
    """The scripted expert of `task` from `metaworld.policies` (e.g. `pick-place-v3` ->
    `SawyerPickPlaceV3Policy`)."""
    require_metaworld()
    import metaworld.policies as policies

    base = task.removesuffix("-v3")
    want = "sawyer" + base.replace("-", "") + "v3policy"
    # A few experts are named differently from their task (peg-insert-side -> PegInsertionSide).
    aliases = {"sawyerpeginsertsidev3policy": "sawyerpeginsertionsidev3policy"}
    want = aliases.get(want, want)
    for name in dir(policies):
        if name.lower() == want:
            return getattr(policies, name)()
    raise ValueError(f"No scripted expert found for {task!r} (looked for {want}).")


@dataclasses.dataclass
class Demos:
    """Scripted demonstrations, one row per control step.

    - `obs`: `(steps, 39)` observations; `actions`: `(steps, 4)` the expert's actions;
    - `episode`: `(steps,)` the episode index of each row; `seeds`: `(episodes,)`;
    - `success`: `(episodes,)` whether the expert succeeded; `length`: `(episodes,)`.
    """

    obs: np.ndarray
    actions: np.ndarray
    episode: np.ndarray
    seeds: np.ndarray
    success: np.ndarray
    length: np.ndarray

    def chunks(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """`(obs, chunks)`: every step's observation and the expert's next `horizon`
        actions, the last action repeated past the end of its episode."""
        out = np.empty((len(self.obs), horizon, ACTION_DIM), np.float32)
        start = 0
        for n in self.length:
            a = self.actions[start : start + n]
            idx = np.minimum(np.arange(n)[:, None] + np.arange(horizon)[None], n - 1)
            out[start : start + n] = a[idx]
            start += n
        return self.obs, out


class ViaPointExpert:
    """A scripted expert sent first through a via-point left or right of its start.

    Multimodal demonstrations on purpose: at the start of every episode the hand moves
    to `start + (side * offset, 0, lift)`, `side = +1 or -1` drawn per layout seed (so
    half the demonstrations go each way, reproducibly), then the task's own expert
    takes over. A policy trained on them has two modes at the first observations of an
    episode and, until the hand has clearly committed, shortly after; switching between
    independently sampled chunks can hop between them (what real-time chunking is for).
    The side cannot be read from the layout, only from the hand's own motion.

    **Arguments:**

    - `base`: the task's expert (see [`expert`][]).
    - `offset`: the via-point's lateral (x) distance from the start, in metres.
    - `lift`: its height above the start.
    - `tol`: the distance at which the via-point counts as reached.
    - `gain`: the proportional gain towards it (Meta-World's experts use 10).
    """

    def __init__(self, base: Any, offset: float, *, lift: float = 0.05, tol: float = 0.02,
                 gain: float = 10.0):
        if not offset > 0:
            raise ValueError(f"`offset` must be > 0 metres (0.15 is a good start); got {offset}.")
        self.base, self.offset, self.lift, self.tol, self.gain = base, offset, lift, tol, gain
        self.side = 1
        self.target: np.ndarray | None = None
        self.reached = False

    def reset(self, seed: Any) -> None:
        """Starts an episode on layout `seed`: draws its side, forgets the via-point."""
        self.side = via_point_side(seed)
        self.target = None
        self.reached = False

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        hand = np.asarray(obs[HAND], np.float64)
        if self.target is None:
            self.target = hand + np.array([self.side * self.offset, 0.0, self.lift])
        if not self.reached:
            delta = self.target - hand
            if np.linalg.norm(delta) > self.tol:
                # Gripper open (-1), as every Meta-World expert starts.
                return np.append(np.clip(self.gain * delta, -1, 1), -1.0).astype(np.float32)
            self.reached = True
        return self.base.get_action(obs)


def via_point_side(seed: Any) -> int:
    """The side (+1 or -1) of [`ViaPointExpert`][]'s via-point on layout `seed`."""
    return 1 if np.random.default_rng([int(seed), 7]).random() < 0.5 else -1


class LimitedExpert:
    """A scripted expert whose every action is projected onto a constraint: the
    demonstrations of a policy meant to run under that limit.

    The action (clipped to the environment's [-1, 1] first) is projected as a chunk of
    one action by `limit.project`; the expert reacts to the state it then reaches, so a
    slower hand still closes the gripper where its script says, on the later schedule.

    **Arguments:**

    - `base`: the task's expert (see [`expert`][]), or another expert such as
        [`ViaPointExpert`][].
    - `limit`: a [`flowcorrect.constraints.AbstractConstraint`][] on one `(1, 4)` action.
    """

    def __init__(self, base: Any, limit: Any):
        import jax

        self.base, self.limit = base, limit
        self._project = jax.jit(lambda a: limit.project(a[None])[0])

    def reset(self, seed: Any) -> None:
        if hasattr(self.base, "reset"):
            self.base.reset(seed)

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(self.base.get_action(obs), np.float32), -1, 1)
        return np.asarray(self._project(a), np.float32)


def limit_tag(limit: Any) -> str:
    """A short, stable name of a constraint's kind and values, for cache keys (an
    Equinox repr shows arrays' shapes, not their values)."""
    import jax

    h = hashlib.sha1(type(limit).__name__.encode())
    for leaf in jax.tree_util.tree_leaves(limit):
        h.update(np.asarray(leaf).tobytes())
    h.update(repr(jax.tree_util.tree_structure(limit)).encode())
    return f"{type(limit).__name__}-{h.hexdigest()[:10]}"


def task_expert(task: str, via_point: float = 0.0, limit: Any = None) -> Any:
    """The task's scripted expert, through a via-point of that offset if `via_point > 0`,
    and with its actions projected onto `limit` if given ([`LimitedExpert`][])."""
    base = expert(task)
    base = ViaPointExpert(base, via_point) if via_point else base
    return base if limit is None else LimitedExpert(base, limit)


def run_expert(
    env: Any, policy: Any, seed: int | np.integer, max_steps: int
) -> tuple[list, list, bool]:
    if hasattr(policy, "reset"):
        policy.reset(seed)
    obs = reset_env(env, seed)
    observations, actions, success = [], [], False
    for _ in range(max_steps):
        a = np.clip(np.asarray(policy.get_action(obs), np.float32), -1, 1)
        observations.append(obs)
        actions.append(a)
        obs, _, _, truncated, info = env.step(a)
        obs = np.asarray(obs, np.float32)
        if info["success"]:
            success = True
            break
        if truncated:
            break
    return observations, actions, success


def collect_demos(
    task: str,
    num: int,
    *,
    seed: int = 0,
    max_steps: int = 500,
    successful_only: bool = True,
    cache: str | pathlib.Path | None = None,
    progress: bool = True,
    via_point: float = 0.0,
    limit: Any = None,
) -> Demos:
    """Scripted demonstrations of `task` on seeded layouts, cached as npz.

    Layout seeds are `seed * 1_000_000 + i` (kept apart from evaluation seeds, which
    start at 10_000_000 by default). Episodes stop at the expert's first success.

    **Arguments:**

    - `task`: a Meta-World v3 task name.
    - `num`: how many demonstrations to keep.
    - `seed`: picks the block of layouts.
    - `max_steps`: the episode limit (Meta-World's own is 500).
    - `successful_only`: keep only episodes the expert solved (the expert fails a few
        layouts on some tasks); seeds are skipped until `num` are kept.
    - `cache`: the cache directory (default [`default_cache`][]); `False`-y values of
        the string `"none"` disable it.
    - `progress`: show a progress bar.
    - `via_point`: if `> 0`, multimodal demonstrations: the expert first passes a
        via-point this far left or right of its start ([`ViaPointExpert`][]).
    - `limit`: a constraint every demonstrated action is projected onto
        ([`LimitedExpert`][]), for a policy meant to run under it; `None` (the
        default) demonstrates the expert as it is.
    """
    from tqdm.auto import tqdm

    cache_dir = default_cache() if cache is None else pathlib.Path(cache)
    key = dict(task=task, num=num, seed=seed, max_steps=max_steps, ok=successful_only, v=1)
    if via_point:
        key["via_point"] = via_point  # absent otherwise: earlier caches stay valid
    if limit is not None:
        key["limit"] = limit_tag(limit)
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir / f"demos-{_slug(task)}-{num}-{tag}.npz"
    if path.exists():
        with np.load(path) as f:
            return Demos(**{k: f[k] for k in f.files})
    env = make_env(task)
    pol = task_expert(task, via_point, limit)
    obs, act, ep, seeds, succ, length = [], [], [], [], [], []
    i = 0
    bar = tqdm(total=num, desc=f"demos {task}", disable=not progress)
    while len(seeds) < num:
        s = seed * 1_000_000 + i
        i += 1
        o, a, ok = run_expert(env, pol, s, max_steps)
        if successful_only and not ok:
            if i > 10 * num:
                raise RuntimeError(f"The expert of {task} failed too often ({i} tries).")
            continue
        ep.append(np.full(len(o), len(seeds), np.int32))
        obs.extend(o)
        act.extend(a)
        seeds.append(s)
        succ.append(ok)
        length.append(len(o))
        bar.update(1)
    bar.close()
    demos = Demos(
        obs=np.asarray(obs, np.float32),
        actions=np.asarray(act, np.float32),
        episode=np.concatenate(ep),
        seeds=np.asarray(seeds, np.int64),
        success=np.asarray(succ, bool),
        length=np.asarray(length, np.int32),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **dataclasses.asdict(demos))
    tmp.replace(path)
    return demos


def expert_success(
    task: str, seeds: np.ndarray, *, max_steps: int = 500, cache: Any = None,
    progress: bool = True, via_point: float = 0.0, limit: Any = None,
) -> np.ndarray:
    """The scripted expert's success on each evaluation seed (the ceiling), cached;
    through the via-point of [`collect_demos`][] if `via_point > 0`, and under `limit`
    if given ([`LimitedExpert`][])."""
    from tqdm.auto import tqdm

    cache_dir = default_cache() if cache is None else pathlib.Path(cache)
    seeds = np.asarray(seeds, np.int64)
    extra = (f"via{via_point}" if via_point else "") + (
        f"limit{limit_tag(limit)}" if limit is not None else "")
    tag = hashlib.sha1(seeds.tobytes() + str(max_steps).encode() + extra.encode()).hexdigest()[:10]
    path = cache_dir / f"expert-{_slug(task)}-{tag}.npy"
    if path.exists():
        return np.load(path)
    env = make_env(task)
    pol = task_expert(task, via_point, limit)
    out = np.array(
        [run_expert(env, pol, s, max_steps)[2]
         for s in tqdm(seeds, desc=f"expert {task}", disable=not progress)]
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def _slug(task: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", task.lower())
