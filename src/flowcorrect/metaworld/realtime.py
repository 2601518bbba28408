"""Real-time chunking on Meta-World: asynchronous execution with a simulated inference delay.

    python -m flowcorrect.metaworld.realtime --task pick-place-v3 --demos 10 \
        --settings sync,naive:2,naive:4,rtc:2,rtc:4 --episodes 100 --keys 3 \
        --out /work/mw-results/rtc

Every episode is driven by an [`flowcorrect.rtc.ActionQueue`][]: an inference is due every
`--execute` actions; the observation is taken then, and for `d` control steps (the
delay) the robot keeps executing the previous chunk before switching to the new one at
its row `d`. Settings, each `kind:d`:

- `sync`: `d = 0`, plain sampling: the synchronous receding-horizon baseline;
- `naive:d`: plain sampling, the new chunk replaces the old one after `d` steps;
- `rtc:d`: real-time chunking ([`flowcorrect.RealTimeChunking`][], 'exp' schedule);
- `prefix:d`: real-time chunking towards the committed `d` actions only ('zeros');
- `hard:d`: plain sampling but the first `d` actions copied from the leftover (never
  executed: a control that must equal `naive:d`), kept for completeness;
- `guided:0` is `rtc:0`: guidance over the overlap with no delay at all;
- `rtc:d@c`, `trt:d@c`: conditioned on delay `c` but arriving after `d >= c` steps (a
  late chunk: the queue switches at its row `d`);
- `trt:d`: training-time real-time chunking ([`flowcorrect.rtc.PrefixConditioned`][]): the
  policy fine-tuned from the plain one with [`flowcorrect.rtc.PrefixConditioning`][]
  (`--trt-steps`, `--trt-delays`; cached), the committed `d` actions given clean at the
  clean flow time, plain Euler steps. `trt:0` is that fine-tuned policy sampled plainly
  (a control for the fine-tuning itself).

All settings run on the same layouts (seeds) and, at query `q`, on the same noise
`normal(fold_in(key, q))`, so comparisons are paired. Reported: success (pooled over the
noise keys, exact McNemar against `sync` and between `rtc:d` / `naive:d`), the mean
jump `||a_t - a_{t-1}||` at chunk switches and at ordinary steps, and the mean jerk
`||a_t - 2 a_{t-1} + a_{t-2}||` (actions are velocity-like commands, so this is a
second difference), all on the clipped executed actions.
"""

import dataclasses
import json
import pathlib
import time
from typing import Annotated, Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from .._executor import ActionQueue
from .._placements.rtc import RealTimeChunking
from .._rtc_training import ExponentialDelays, PrefixConditioned, UniformDelays
from .._sample import sample
from . import _cli, stats
from .envs import default_cache, expert_success, reset_env
from .evaluate import EnvPool
from .experiment import EVAL_SEED0, task_policy

KINDS = ("sync", "naive", "rtc", "prefix", "hard", "guided", "trt")


@dataclasses.dataclass(frozen=True)
class RealtimeConfig:
    """One run of settings on one task, or (`merge`) one table from earlier runs' files
    (the flags of `python -m flowcorrect.metaworld.realtime`)."""

    # The Meta-World task.
    task: str = "pick-place-v3"
    # Scripted demonstrations the policy is trained on.
    demos: int = 10
    # Seed of the demonstrations' layouts.
    demo_seed: int = 0
    # Multimodal demonstrations: the expert first passes a via-point this far (metres)
    # left or right of its start, by layout; 0 = off.
    via_point: float = 0.0
    # Comma-separated settings kind:delay, kinds sync, naive, rtc, prefix, hard, guided,
    # trt (kind:d@c: conditioned on delay c, arriving after d).
    settings: str = "sync,naive:2,naive:4,rtc:2,rtc:4"
    # Evaluation episodes (layouts) per noise key.
    episodes: int = 100
    # Noise keys: 3 uses keys 0, 1, 2.
    keys: int = 3
    # Evaluation layouts start at 10_000_000 + this.
    seed_offset: int = 0
    # Chunk length of the policy.
    horizon: int = 8
    # Actions executed of each chunk: an inference is due every this many actions.
    execute: int = 4
    # Flow steps.
    num_steps: int = 10
    # RTC's max_guidance_weight.
    beta: float = 5.0
    # Fine-tuning steps of the training-time RTC policy (trt:d).
    trt_steps: int = 1000
    # Its peak learning rate.
    trt_lr: float = 3e-4
    # Its delay distribution over 0 .. max delay.
    trt_delays: Literal["exp", "uniform"] = "exp"
    # Decay rate of 'exp'.
    trt_rate: float = 0.5
    # The largest training delay; -1 = horizon - execute.
    trt_max_delay: int = -1
    # An episode stops at success or after this many steps.
    max_steps: int = 300
    # Training steps of the flow policy.
    policy_steps: int = 3000
    # Seed of the policy's training.
    train_seed: int = 0
    # Where demos and policies are cached (default ~/.cache/flowcorrect/metaworld).
    cache: str | None = None
    # Where the result JSON is written.
    out: str = "results/metaworld-realtime"
    # Suffix of the JSON file name.
    tag: str = ""
    # No progress bars.
    quiet: bool = False
    # Print one paired table from these result files (no rollouts); writes it to
    # --merged-out if given.
    merge: Annotated[tuple[str, ...] | None, tyro.conf.arg(metavar="JSON [JSON ...]")] = None
    # Where the merged table's JSON is written.
    merged_out: str | None = None


def parse_setting(text: str) -> tuple[str, int]:
    kind, _, d = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"Unknown setting kind {kind!r} in {text!r}; use one of {KINDS}.")
    d, at, cond = d.partition("@")
    delay = int(d) if d else 0
    if at and (kind not in ("rtc", "trt") or not 0 <= int(cond) <= delay):
        raise ValueError(
            f"{text!r}: `kind:d@c` (a chunk conditioned on delay c that arrives after d >= c "
            "steps) is for rtc and trt only."
        )
    if kind == "sync" and delay:
        raise ValueError("`sync` has no delay.")
    if kind == "guided":
        kind = "rtc"
    return kind, delay


@eqx.filter_jit
def _plain(policy, obs, noise, num_steps):
    return sample(policy, obs, noise=noise, num_steps=num_steps)[0]


@eqx.filter_jit
def _rtc(policy, obs, noise, placement, num_steps):
    return sample(policy, obs, noise=noise, num_steps=num_steps, placement=placement)[0]


def conditioned_delay(text: str) -> int | None:
    """`c` of a setting `kind:d@c` (conditioned on delay `c`, arriving after `d`), else None."""
    _, at, cond = text.partition("@")
    return int(cond) if at else None


def make_act(policy, kind: str, *, num_steps: int, beta: float, conditioned: int | None = None):
    """`act(obs [N, 39], key, request) -> chunks [N, H, 4]` for one setting kind; with
    `conditioned`, the chunk is conditioned on that delay instead of the request's."""
    shape = policy.chunk_shape

    def act(obs: np.ndarray, key: Any, request) -> np.ndarray:
        obs_j = jnp.asarray(obs, jnp.float32)
        noise = jax.random.normal(key, (len(obs), *shape), jnp.float32)
        left = request.prev_chunk_left_over
        if conditioned is not None:
            request = dataclasses.replace(request, inference_delay=conditioned)
        if kind == "trt" and left is not None:
            placement = PrefixConditioned(jnp.asarray(left, jnp.float32), request.inference_delay)
            return np.asarray(_rtc(policy, obs_j, noise, placement, num_steps))
        if left is None or kind in ("sync", "naive", "hard", "trt"):
            chunks = np.array(_plain(policy, obs_j, noise, num_steps))
            if kind == "hard" and left is not None:
                chunks[:, :request.inference_delay] = left[:, :request.inference_delay]
            return chunks
        placement = RealTimeChunking(
            jnp.asarray(left, jnp.float32), request.inference_delay, request.execution_horizon,
            prefix_attention_schedule="exp" if kind == "rtc" else "zeros",
            max_guidance_weight=beta,
        )
        return np.asarray(_rtc(policy, obs_j, noise, placement, num_steps))

    return act


def rollout(pool: EnvPool, seeds: np.ndarray, act, key: Any, *, execute: int, delay: int,
            max_steps: int, progress: bool = True, desc: str = "") -> dict[str, Any]:
    """One episode per seed, all at once, through an `ActionQueue` with delay `delay`."""
    from tqdm.auto import tqdm

    n = len(seeds)
    envs = pool.envs[:n]
    obs = np.stack([reset_env(e, s) for e, s in zip(envs, seeds)])
    done = np.zeros(n, bool)
    success = np.zeros(n, bool)
    steps = np.zeros(n, np.int32)
    queue = ActionQueue(execute, delay)
    prev = np.full((n, 2, 4), np.nan, np.float32)  # the last two executed actions
    jumps: list[float] = []
    ordinary: list[float] = []
    jerks: list[float] = []
    query = 0
    bar = tqdm(total=max_steps, desc=desc, disable=not progress, mininterval=5)
    for _ in range(max_steps):
        if done.all():
            break
        if queue.inference_due:
            request = queue.request()
            queue.submit(act(obs, jax.random.fold_in(key, query), request))
            query += 1
        actions, switched = queue.pop()
        for i in np.flatnonzero(~done):
            a = np.clip(actions[i], -1.0, 1.0)
            if np.isfinite(prev[i, 1]).all():
                (jumps if switched else ordinary).append(float(np.linalg.norm(a - prev[i, 1])))
                if np.isfinite(prev[i, 0]).all():
                    jerks.append(float(np.linalg.norm(a - 2 * prev[i, 1] + prev[i, 0])))
            prev[i, 0], prev[i, 1] = prev[i, 1], a
            o, _, _, truncated, info = envs[i].step(a)
            obs[i] = o
            steps[i] += 1
            if info["success"]:
                success[i] = done[i] = True
            elif truncated:
                done[i] = True
        bar.update(1)
        bar.set_postfix(success=int(success.sum()), live=int((~done).sum()))
    bar.close()
    return {
        "success": success.astype(int).tolist(), "steps": steps.tolist(),
        "jump_at_switch": float(np.mean(jumps)) if jumps else None,
        "jump_ordinary": float(np.mean(ordinary)) if ordinary else None,
        "jerk": float(np.mean(jerks)) if jerks else None,
        "num_switches": len(jumps),
    }


def _pooled(per_key: list[dict[str, Any]], name: str) -> float | None:
    values = [k[name] for k in per_key if k[name] is not None]
    return float(np.mean(values)) if values else None


def table(results: dict[str, list[dict[str, Any]]], episodes: int) -> tuple[str, list[dict]]:
    """The paired table against `sync` (or the first setting) plus RTC-vs-naive pairs."""
    names = list(results)
    base = "sync" if "sync" in results else names[0]

    def succ(name) -> list[bool]:  # stats.paired_counts takes sequences of bools
        return [bool(x) for k in results[name] for x in k["success"]]

    rows = []
    for name in names:
        wins, losses = stats.paired_counts(succ(base), succ(name))
        r = results[name]
        extra = "jump@switch {} ordinary {} jerk {}".format(
            *(f"{v:.3f}" if v is not None else "-" for v in (
                _pooled(r, "jump_at_switch"), _pooled(r, "jump_ordinary"), _pooled(r, "jerk"))))
        rows.append({"name": name, "success": sum(succ(name)), "total": len(succ(name)),
                     "per_key": [int(np.sum(k["success"])) for k in r], "wins": wins,
                     "losses": losses, "p": stats.mcnemar(wins, losses), "extra": extra})
    null = [int(np.sum(k["success"])) for k in results[base]]
    text = stats.format_table(rows, baseline=base, null_spread=null, episodes_per_key=episodes,
                              num_settings=len(names) - 1)
    pairs = []
    for name in names:
        kind, d = parse_setting(name)
        others = {"rtc": ("naive",), "prefix": ("naive",), "trt": ("naive", "rtc")}
        for other in (f"{o}:{d}" for o in others.get(kind, ()) if d):
            if other in results:
                w, l_ = stats.paired_counts(succ(other), succ(name))
                pairs.append(f"{name} vs {other}: +{w}/-{l_}, p = {stats.mcnemar(w, l_):.2g}")
    if pairs:
        text += "\n" + "\n".join(pairs)
    return text, rows


def trt_policy(config: RealtimeConfig, cache: pathlib.Path, demos, policy) -> tuple[Any, dict]:
    """The plain policy fine-tuned with training-time RTC (cached next to it), and what the
    fine-tuning cost (steps and seconds of the run that trained it)."""
    import hashlib

    from .policy import PolicyConfig, load_policy, policy_saved, save_policy, train_policy

    max_delay = (config.trt_max_delay if config.trt_max_delay >= 0
                 else config.horizon - config.execute)
    delays = (ExponentialDelays(max_delay, config.trt_rate) if config.trt_delays == "exp"
              else UniformDelays(max_delay))
    key = {k: getattr(config, k) for k in (
        "task", "demos", "demo_seed", "via_point", "horizon", "policy_steps", "train_seed",
        "trt_steps", "trt_lr", "trt_delays", "trt_rate")}
    key["max_delay"] = max_delay
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = cache / f"trt-policy-{config.task}-{config.demos}-{tag}"
    meta_path = path.with_name(path.name + "-cost.json")
    if policy_saved(path) and meta_path.exists():
        return load_policy(path)[0], json.loads(meta_path.read_text())
    obs, chunks = demos.chunks(config.horizon)
    policy_config = dataclasses.replace(PolicyConfig(horizon=config.horizon),
                                        steps=config.trt_steps, learning_rate=config.trt_lr)
    t0 = time.time()
    tuned, losses = train_policy(obs, chunks, policy_config, seed=config.train_seed + 1,
                                 progress=not config.quiet, init=policy, rtc=delays)
    jax.block_until_ready(eqx.filter(tuned, eqx.is_array))
    meta = {"fine_tune_steps": config.trt_steps, "base_steps": config.policy_steps,
            "seconds": time.time() - t0, "delays": repr(delays), "learning_rate": config.trt_lr,
            "batch_size": policy_config.batch_size, "losses": losses, **key}
    save_policy(path, tuned, policy_config)
    meta_path.write_text(json.dumps(meta, indent=1))
    return tuned, meta


def run(config: RealtimeConfig) -> dict[str, Any]:
    """Runs every setting of `config.settings` on the same layouts and noise, prints the
    paired table and writes it (updated after each setting) as
    `realtime-<task>-<demos>demos[-via<v>]-h<H>-e<s>[-<tag>].json` under `config.out`; its
    `"args"` are the config's fields, which [`merge`][] compares."""
    cache = pathlib.Path(config.cache) if config.cache else default_cache()
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not config.quiet
    t0 = time.time()
    demos, policy = task_policy(
        config.task, config.demos, cache, demo_seed=config.demo_seed, horizon=config.horizon,
        policy_steps=config.policy_steps, train_seed=config.train_seed,
        via_point=config.via_point, progress=progress,
    )
    seeds = EVAL_SEED0 + config.seed_offset + np.arange(config.episodes)
    expert = expert_success(config.task, seeds, max_steps=config.max_steps, cache=cache,
                            progress=progress, via_point=config.via_point)
    pool = EnvPool(config.task, config.episodes)
    settings = [s.strip() for s in config.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    results: dict[str, list[dict[str, Any]]] = {}
    stem = (f"realtime-{config.task}-{config.demos}demos"
            + (f"-via{config.via_point:g}" if config.via_point else "")
            + f"-h{config.horizon}-e{config.execute}" + (f"-{config.tag}" if config.tag else ""))
    report: dict[str, Any] = {}
    tuned, trt_cost = None, None
    if any(parse_setting(s)[0] == "trt" for s in settings):
        tuned, trt_cost = trt_policy(config, cache, demos, policy)
    for name in settings:
        kind, delay = parse_setting(name)
        act = make_act(tuned if kind == "trt" else policy, kind, num_steps=config.num_steps,
                       beta=config.beta, conditioned=conditioned_delay(name))
        results[name] = [
            rollout(pool, seeds, act, jax.random.key(1000 + k), execute=config.execute,
                    delay=delay, max_steps=config.max_steps, progress=progress,
                    desc=f"{name} key {k}")
            for k in range(config.keys)
        ]
        text, rows = table(results, config.episodes)
        print(f"[{time.time() - t0:.0f}s] {rows[-1]}", flush=True)
        report = {
            "args": dataclasses.asdict(config), "expert_success": int(expert.sum()), "table": text,
            "rows": rows, "settings": results, "seconds": time.time() - t0,
            "trt_training": trt_cost,
            "partial": name != settings[-1],
        }
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"task {config.task}, {config.demos} demos, horizon {config.horizon}, execute "
          f"{config.execute}, {config.episodes} episodes x {config.keys} keys; expert "
          f"{int(expert.sum())}/{config.episodes}")
    print(report.get("table", ""))
    return report


def merge(paths: list[str], out: str | None = None) -> dict[str, Any]:
    """One paired table from the JSON files of several runs of the same task, layouts,
    keys and chunking (settings run in separate processes are still paired: layouts and
    noise keys are deterministic)."""
    same = ("task", "demos", "episodes", "keys", "seed_offset", "horizon", "execute",
            "num_steps", "beta", "max_steps", "policy_steps", "train_seed", "demo_seed",
            "via_point")
    results: dict[str, list[dict[str, Any]]] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        report = json.loads(pathlib.Path(path).read_text())
        args = report["args"]
        if first is None:
            first = args
        differ = [k for k in same if args.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{path} differs from {paths[0]} in {differ}; not paired.")
        for name, per_key in report["settings"].items():
            results.setdefault(name, per_key)
    assert first is not None
    order = sorted(results, key=lambda n: (n != "sync", parse_setting(n)[1], n))
    results = {n: results[n] for n in order}
    text, rows = table(results, first["episodes"])
    merged = {"args": first, "sources": paths, "table": text, "rows": rows,
              "settings": results}
    if out:
        pathlib.Path(out).write_text(json.dumps(merged, indent=1))
    print(text)
    return merged


def parse_cli(argv: list[str] | None = None) -> RealtimeConfig:
    """The `RealtimeConfig` that the command line `argv` names."""
    return _cli.parse(RealtimeConfig, argv, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_cli(argv)
    if config.merge:
        return merge(list(config.merge), config.merged_out)
    return run(config)


if __name__ == "__main__":
    main()
