"""Consensus ranking and verifiers learned from the policy's own rollouts.

    python -m flowcorrect.metaworld.verifiers consensus --task pick-place-v3 --demos 10
    python -m flowcorrect.metaworld.verifiers collect --task pick-place-v3 --demos 10 \\
        --episodes 200
    python -m flowcorrect.metaworld.verifiers verify --task pick-place-v3 --demos 10

- `consensus`: the plain policy, lower noise temperature, and best-of-8 by the
    candidates' medoid and by the mean of their central cluster (no training), paired.
- `collect`: rolls the plain policy out with `N` candidates per query (the executed
    one is candidate 0, a plain sample) on training layouts (seeds from 20_000_000,
    disjoint from the evaluation layouts), and records every query with
    [`flowcorrect.verifiers.RolloutWriter`][] (resumable: a second call adds episodes).
- `verify`: trains verifiers on the collected rollouts (outcome classification,
    Bradley-Terry, discounted time to success), writes their calibration reports, and
    evaluates best-of-8 by the verifier, guarded by `NearMean`, against the plain
    policy and against the medoid, paired; optionally guidance by the verifier's
    gradient at the denoised estimate (`--guided W`).

Iterated rounds (`--round R`, R >= 2): `collect` executes, at every query, the
candidate that round R - 1's guarded verifier (`NearMean(k)` over its outcome
verifier, trained on rounds 1 .. R - 1) chooses, and `verify` trains on rounds 1 .. R.
`--explore-noise S` widens the executed actions: the executed chunk (candidate 0) is
drawn with its initial noise scaled by `S`, so outcomes depend on the action more than
the policy's own narrow spread allows.

Every episode's outcome is cached per (task, policy, setting, key) under
`<out>/episodes/`, so settings shared by two commands run once.
"""

import dataclasses
import json
import pathlib
import time
from typing import Annotated, Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm.auto import tqdm

from .._verifiers.rollouts import concatenate
from . import _cli, stats
from .envs import default_cache, expert_success
from .evaluate import EnvPool, Episodes, rollout
from .experiment import EVAL_SEED0, task_policy
from .settings import Setting, make_act

TRAIN_SEED0 = 20_000_000
LOSSES = ("outcome", "bradley-terry", "discounted")


@dataclasses.dataclass(frozen=True)
class VerifiersConfig:
    """The flags of `python -m flowcorrect.metaworld.verifiers`, shared by its three
    commands ([`Consensus`][], [`Collect`][], [`Verify`][]); each reads those it needs."""

    #: The command's name (the subcommand).
    command: ClassVar[str]

    # The Meta-World task.
    task: str = "pick-place-v3"
    # Scripted demonstrations the policy is trained on.
    demos: int = 10
    # Seed of the demonstrations' layouts.
    demo_seed: int = 0
    # Evaluation episodes per noise key, or (collect) the rollouts to collect.
    episodes: int = 100
    # collect: episodes run side by side (one part on disk each).
    batch: int = 100
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
    # Seed of the policy's and the verifiers' training.
    train_seed: int = 0
    # The k of the central cluster (ClusterMean) and of the guard (NearMean).
    cluster_k: int = 4
    # Candidates per query: best-of-N's N, and the candidates recorded by collect.
    candidates: int = 8
    # consensus: comma-separated setting names to run (plain always runs).
    only: str = ""
    # verify: comma-separated verifiers to train (outcome, bradley-terry, discounted).
    losses: str = ",".join(LOSSES)
    # verify: comma-separated verifiers to evaluate in closed loop.
    evaluate: str = "outcome"
    # verify: also run the guard with a uniform choice (no verifier).
    control: bool = False
    # verify: comma-separated weights of guidance by the first --evaluate verifier's
    # gradient (cap 1, every step).
    guided: str = ""
    # verify: comma-separated flow steps after which best-of-N ranks the denoised
    # candidates by the guarded verifier.
    early: str = ""
    # verify: also rank by a pessimistic ensemble of this many outcome verifiers
    # (fc.Ensemble).
    ensemble: int = 1
    # verify: fc.Ensemble's weight of the members' spread.
    pessimism: float = 1.0
    # collect: execute round R-1's guarded verifier choice (R >= 2); verify: train on
    # rounds 1..R.
    round: int = 1
    # collect: the executed candidate's initial noise is scaled by this.
    explore_noise: float = 1.0
    # verify: plain and guided chunks per held-out query for the offline guidance check
    # (two half-data outcome verifiers judging each other); 0 skips the check.
    guidance_samples: int = 2
    # Training steps of each verifier.
    verifier_steps: int = 2000
    # Discount of the `discounted` verifier's target.
    gamma: float = 0.99
    # Bradley-Terry: the largest distance between the states of a pair.
    pair_distance: float = 1.0
    # Where demos and policies are cached (default ~/.cache/flowcorrect/metaworld).
    cache: str | None = None
    # Where the tables, the episodes, the rollouts and the verifiers are written.
    out: str = "results/verifiers"
    # No progress bars.
    quiet: bool = False

    def to_json(self) -> dict[str, Any]:
        """The command and every field, as the reports record them (`"args"`)."""
        return {"command": self.command, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Consensus(VerifiersConfig):
    """The plain policy, lower noise temperature, and best-of-8 by the candidates' medoid
    and by the mean of their central cluster (no training), paired."""

    command: ClassVar[str] = "consensus"


@dataclasses.dataclass(frozen=True)
class Collect(VerifiersConfig):
    """Rolls the plain policy out with N candidates per query on training layouts and
    records every query (resumable: a second call adds episodes)."""

    command: ClassVar[str] = "collect"


@dataclasses.dataclass(frozen=True)
class Verify(VerifiersConfig):
    """Trains verifiers on the collected rollouts, reports their calibration, and
    evaluates best-of-N by the guarded verifier against plain and the medoid, paired."""

    command: ClassVar[str] = "verify"


#: The command line: one subcommand per command, each with every flag.
Command = (
    Annotated[Consensus, tyro.conf.subcommand("consensus")]
    | Annotated[Collect, tyro.conf.subcommand("collect")]
    | Annotated[Verify, tyro.conf.subcommand("verify")]
)


def _fc():
    import flowcorrect as fc

    return fc


def consensus_suite(n: int = 8, k: int = 4) -> list[Setting]:
    """The plain policy, half the noise, and best-of-`n` by consensus (no energy)."""
    fc = _fc()
    return [
        Setting("plain"),
        Setting("plain noise x0.5", noise_scale=0.5),
        Setting(f"best-of-{n} medoid", placement=fc.BestOfN(n, select=fc.Medoid())),
        Setting(f"best-of-{n} cluster-mean k={k}",
                placement=fc.BestOfN(n, select=fc.ClusterMean(k))),
    ]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


@dataclasses.dataclass
class Harness:
    task: str
    policy: Any
    policy_tag: str
    seeds: np.ndarray
    expert: np.ndarray
    pool: EnvPool
    config: VerifiersConfig

    def episodes(self, setting: Setting, energies: dict[str, Any], tag: str = "") -> list[Episodes]:
        """The setting's episodes under each noise key, from the cache or run now."""
        out = []
        act = None
        root = pathlib.Path(self.config.out) / "episodes"
        root.mkdir(parents=True, exist_ok=True)
        for k in range(self.config.keys):
            path = root / (f"{self.policy_tag}-n{len(self.seeds)}-x{self.config.execute}-"
                           f"m{self.config.max_steps}-{_slug(setting.name)}{tag}-key{k}.json")
            if path.exists():
                d = json.loads(path.read_text())
                out.append(Episodes(np.asarray(d["seeds"]), np.asarray(d["success"], bool),
                                    np.asarray(d["steps"]), np.asarray(d["speed_violations"]),
                                    np.asarray(d["max_speed"]), d["diagnostics"]))
                continue
            if act is None:
                act = make_act(self.policy, setting, energies)
            t0 = time.time()
            ep = rollout(self.pool, self.seeds, act, jax.random.key(1000 + k),
                         execute=self.config.execute, max_steps=self.config.max_steps,
                         progress=not self.config.quiet, desc=f"{setting.name} key {k}")
            d = ep.to_json()
            d["seconds"] = time.time() - t0
            path.write_text(json.dumps(d, default=float))
            out.append(ep)
        return out


def harness(config: VerifiersConfig) -> Harness:
    cache = pathlib.Path(config.cache) if config.cache else default_cache()
    progress = not config.quiet
    demos, policy = task_policy(
        config.task, config.demos, cache, demo_seed=config.demo_seed, horizon=config.horizon,
        policy_steps=config.policy_steps, train_seed=config.train_seed, progress=progress,
    )
    tag = (f"{config.task}-{config.demos}-h{config.horizon}-s{config.policy_steps}-"
           f"{config.train_seed}")
    seeds = EVAL_SEED0 + np.arange(config.episodes)
    expert = expert_success(config.task, seeds, max_steps=config.max_steps, cache=cache,
                            progress=progress)
    return Harness(config.task, policy, tag, seeds, expert,
                   EnvPool(config.task, config.episodes), config)


def paired_rows(results: dict[str, list[Episodes]], baseline: str) -> list[dict[str, Any]]:
    """Pooled successes and exact McNemar against `baseline` for every setting."""
    base = results[baseline]
    rows = []
    for name, eps in results.items():
        wins = losses = 0
        for b, e in zip(base, eps):
            w, l_ = stats.paired_counts(b.success, e.success)
            wins, losses = wins + w, losses + l_
        succ = np.concatenate([e.success for e in eps])
        rows.append({"name": name, "success": int(succ.sum()), "total": int(succ.size),
                     "per_key": [int(e.success.sum()) for e in eps], "wins": wins,
                     "losses": losses, "p": stats.mcnemar(wins, losses)})
    return rows


def report(h: Harness, results: dict[str, list[Episodes]], baselines: list[str],
           extra: dict[str, Any], stem: str, t0: float) -> dict[str, Any]:
    config = h.config
    null = [int(e.success.sum()) for e in results["plain"]]
    tables = {}
    for b in baselines:
        if b in results:
            tables[b] = stats.format_table(
                paired_rows(results, b), baseline=b, null_spread=null,
                expert=int(h.expert.sum()), episodes_per_key=len(h.seeds),
                num_settings=len(results) - 1,
            )
    header = (f"task {h.task}, {config.demos} demos, horizon {config.horizon} (execute "
              f"{config.execute}), {len(h.seeds)} episodes x {config.keys} noise keys, max "
              f"{config.max_steps} steps")
    out = {
        "args": config.to_json(), "header": header, "tables": tables,
        "rows": {b: paired_rows(results, b) for b in baselines if b in results},
        "null_spread": null, "expert_success": int(h.expert.sum()),
        "settings_compared": len(results) - 1,
        "episodes": {name: [e.to_json() for e in eps] for name, eps in results.items()},
        "seconds": time.time() - t0, **extra,
    }
    path = pathlib.Path(config.out) / f"{stem}-{h.task}-{config.demos}demos.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float))
    return out


def run_consensus(config: VerifiersConfig) -> dict[str, Any]:
    t0 = time.time()
    h = harness(config)
    results: dict[str, list[Episodes]] = {}
    suite = consensus_suite(8, config.cluster_k)
    if config.only:
        keep = set(config.only.split(","))
        suite = [s for s in suite if s.name == "plain" or s.name in keep]
    for setting in suite:
        results[setting.name] = h.episodes(setting, {})
        print(f"[{time.time() - t0:.0f}s] {paired_rows(results, 'plain')[-1]}", flush=True)
        out = report(h, results, ["plain"], {}, "consensus", t0)
    print(out["header"])
    print(out["tables"]["plain"])
    return out


def _rollout_dir(config: VerifiersConfig, tag: str, round_: int | None = None) -> pathlib.Path:
    """Where round `round_` (default `config.round`) of the rollouts lives; round 1 with
    plain exploration keeps the original name."""
    r = config.round if round_ is None else round_
    suffix = (f"-e{config.explore_noise:g}" if config.explore_noise != 1 else "") + (
        f"-round{r}" if r > 1 else "")
    return (pathlib.Path(config.out) / "rollouts"
            / f"{tag}-N{config.candidates}-x{config.execute}{suffix}")


@eqx.filter_jit
def candidate_chunks(policy: Any, obs: jax.Array, key: jax.Array, num: int,
                     explore_noise: float = 1.0) -> jax.Array:
    """`num` plain samples of the policy per observation, `(N, num, H, D)`; candidate 0's
    initial noise is scaled by `explore_noise` (1: all candidates are plain samples)."""
    fc = _fc()
    n = obs.shape[0]
    noise = jax.random.normal(key, (n, num, *policy.chunk_shape), jnp.float32)
    noise = noise.at[:, 0].multiply(explore_noise)
    flat = fc.sample(policy, jnp.repeat(obs, num, axis=0), key,
                     noise=noise.reshape(n * num, *policy.chunk_shape))[0]
    return flat.reshape(noise.shape)


@eqx.filter_jit
def _guarded_choice(verifier: Any, obs: jax.Array, candidates: jax.Array, key: jax.Array,
                    k: int) -> jax.Array:
    """The index `fc.NearMean(k)` picks among each query's candidates by `verifier`."""
    fc = _fc()
    rule = fc.NearMean(k)

    def one(o, cands, key):
        energy = jax.vmap(lambda a: verifier(o, a))(cands)
        ok = jnp.all(jnp.isfinite(cands), axis=(1, 2)) & jnp.isfinite(energy)
        return rule.select(cands, jnp.where(ok, energy, jnp.inf), ok, key).index

    keys = jax.random.split(key, obs.shape[0])
    return jax.vmap(one)(obs, candidates, keys)


def run_collect(config: VerifiersConfig) -> dict[str, Any]:
    """Rolls the policy out on training layouts, `N` candidates per query, and appends
    the records (resumable). Round 1 executes candidate 0 (a plain sample, or a wider
    one with `--explore-noise`); round R >= 2 executes the guarded choice of the
    outcome verifier trained on rounds 1 .. R - 1. Each round has its own layouts."""
    fc = _fc()
    t0 = time.time()
    # The pool holds one batch of environments.
    h = harness(dataclasses.replace(config, episodes=config.batch))
    chooser = None
    if config.round > 1:
        previous = dataclasses.replace(config, round=config.round - 1, losses="outcome")
        chooser = train_verifiers(previous, h.policy_tag)[0]["outcome"]
    path = _rollout_dir(config, h.policy_tag)
    info = {"task": config.task, "policy": h.policy_tag, "candidates": config.candidates,
            "execute": config.execute, "max_steps": config.max_steps}
    if config.explore_noise != 1 or config.round > 1:
        info.update(explore_noise=config.explore_noise, round=config.round,
                    executed="candidate 0" if chooser is None else
                    f"NearMean({config.cluster_k}) by round {config.round - 1}'s outcome verifier")
    writer = fc.verifiers.RolloutWriter(path, info)
    # Rounds draw disjoint training layouts: round r starts r - 1 blocks of 100,000 on.
    seed0 = TRAIN_SEED0 + 100_000 * (config.round - 1)
    while writer.num_episodes < config.episodes:
        start = writer.num_episodes
        size = min(config.batch, config.episodes - start)
        seeds = seed0 + start + np.arange(size)
        record_obs: list[np.ndarray] = []
        record_cand: list[np.ndarray] = []
        record_exec: list[np.ndarray] = []

        def act(obs, key):
            obs_j = jnp.asarray(obs, jnp.float32)
            cand = candidate_chunks(h.policy, obs_j, key, config.candidates, config.explore_noise)
            if chooser is None:
                chosen = np.zeros(len(obs), np.int64)
            else:
                chosen = np.asarray(_guarded_choice(chooser, obs_j, cand,
                                                    jax.random.fold_in(key, 1), config.cluster_k))
            cand = np.asarray(cand)
            record_obs.append(np.array(obs))
            record_cand.append(cand)
            record_exec.append(chosen.astype(np.int64))
            return cand[np.arange(len(obs)), chosen], {}

        ep = rollout(h.pool, seeds, act, jax.random.key(7_000_000 + 100_000 * (config.round - 1)
                                                        + start),
                     execute=config.execute, max_steps=config.max_steps,
                     progress=not config.quiet, desc=f"collect {start}")
        t = len(record_obs)
        roll = fc.verifiers.Rollouts.from_episodes(
            np.stack(record_obs), np.stack(record_cand), np.stack(record_exec),
            np.arange(t) * config.execute, ep.steps, ep.success, seeds,
        )
        writer.append(roll)
        print(f"[{time.time() - t0:.0f}s] collected episodes {start}..{start + size - 1}: "
              f"{int(ep.success.sum())}/{size} succeeded, {roll.num_queries} queries",
              flush=True)
    return writer.meta


def train_verifiers(config: VerifiersConfig, tag: str, member: int = 0
                    ) -> tuple[dict[str, Any], dict]:
    """Trains one verifier per loss on the collected rollouts (80% of the episodes) and
    reports each on the other 20%; cached under the rollout directory. `member > 0`
    trains another ensemble member: other initial weights and batch order, same data."""
    fc = _fc()
    path = _rollout_dir(config, tag)
    rollouts = concatenate([fc.verifiers.load_rollouts(_rollout_dir(config, tag, r))
                            for r in range(1, config.round + 1)])
    train, held = rollouts.split(0.2, seed=0)
    verifiers: dict[str, Any] = {}
    reports: dict[str, Any] = {"rounds": config.round, "explore_noise": config.explore_noise,
                               "rollout_episodes": rollouts.num_episodes,
                               "rollout_queries": rollouts.num_queries,
                               "train_episodes": train.num_episodes,
                               "held_out_episodes": held.num_episodes,
                               "rollout_success_rate": float(
                                   np.mean([rollouts.success[rollouts.episode == e][0]
                                            for e in range(rollouts.num_episodes)]))}
    for name in config.losses.split(","):
        if name not in LOSSES:
            raise ValueError(f"Unknown loss {name!r}; choose from {LOSSES}.")
        result = _fit_one(config, name, train, path / (f"verifier-{name}" + (
            f"-m{member}" if member else "")), member)
        verifiers[name] = result.model
        rep = fc.verifiers.verifier_report(result.model, held).to_dict()
        rep["final_train_metrics"] = result.history[-1]
        reports[name] = rep
        print(f"verifier {name}: {json.dumps(rep, default=float)}", flush=True)
    return verifiers, reports


def _fit_one(config: VerifiersConfig, name: str, train: Any, directory: pathlib.Path,
             member: int = 0) -> Any:
    """One verifier of loss `name` on `train`, checkpointed (and resumed) in `directory`."""
    fc = _fc()
    train_config = fc.train.TrainConfig(
        num_steps=config.verifier_steps, learning_rate=1e-3, warmup_steps=100, log_every=100,
        grad_penalty=0.0, checkpoint_every=config.verifier_steps,
    )
    h, d = train.candidates.shape[2:]
    model = fc.MLPEnergy(fc.MLPEnergyConfig(obs_dim=train.observation.shape[1],
                                            action_dim=d, horizon=h, hidden=256),
                         key=jax.random.key(config.train_seed + 1000 * member))
    if name == "bradley-terry":
        data = fc.verifiers.pair_batches(train, min(256, train.num_queries // 4),
                               max_distance=config.pair_distance, seed=member)
        loss: Any = fc.verifiers.BradleyTerryLoss()
    else:
        target = "success" if name == "outcome" else "discounted"
        data = fc.verifiers.outcome_batches(train, min(256, train.num_queries), target=target,
                                  gamma=config.gamma, seed=member)
        loss = fc.verifiers.OutcomeLoss()
    return fc.verifiers.fit_verifier(model, data, loss, key=jax.random.key(1),
                                     config=train_config, checkpoint_dir=directory.absolute(),
                                     progress=not config.quiet)


@eqx.filter_jit
def _plain_and_guided(policy: Any, energy: Any, obs: jax.Array, key: jax.Array, num: int,
                      weight: float) -> tuple[jax.Array, jax.Array]:
    """`num` plain and guided chunks per observation from the same noise, `(N, num, H, D)`
    each; guidance as the closed loop's (`fc.Guided(fc.EveryStep(), weight)`, cap 1)."""
    fc = _fc()
    n = obs.shape[0]
    noise = jax.random.normal(key, (n * num, *policy.chunk_shape), jnp.float32)
    o = jnp.repeat(obs, num, axis=0)
    plain = fc.sample(policy, o, key, noise=noise)[0]
    guided = fc.sample(policy, o, key, noise=noise, energy=energy,
                       placement=fc.Guided(fc.EveryStep(), weight=weight))[0]
    return plain.reshape(n, num, *policy.chunk_shape), guided.reshape(n, num,
                                                                       *policy.chunk_shape)


def guidance_check(config: VerifiersConfig, h: Harness, deployed: Any) -> dict[str, Any]:
    """Offline checks of guidance by the outcome verifier on the held-out episodes.

    The training episodes are split in two halves, A and B, and one outcome verifier is
    trained on each (the deployed one is trained on both). Each half's verifier guides
    the policy's sampler at the held-out observations (`--guidance-samples` chunks per
    query, the first `--guided` weight, or 1) and is judged by the other half's, which
    never saw its episodes; the deployed verifier gets the self-graded checks and the
    gradient at pairs of similar held-out states."""
    fc = _fc()
    path = _rollout_dir(config, h.policy_tag)
    rollouts = concatenate([fc.verifiers.load_rollouts(_rollout_dir(config, h.policy_tag, r))
                            for r in range(1, config.round + 1)])
    train, held = rollouts.split(0.2, seed=0)
    half_a, half_b = train.split(0.5, seed=1)
    halves = {name: _fit_one(config, "outcome", part, path / f"verifier-outcome-half{name}"
                             ).model for name, part in (("A", half_a), ("B", half_b))}
    weights = [float(x) for x in config.guided.split(",") if x] or [1.0]
    obs = jnp.asarray(held.observation, jnp.float32)
    key = jax.random.key(config.train_seed + 5_000_000)
    out: dict[str, Any] = {
        "half_episodes": [half_a.num_episodes, half_b.num_episodes],
        "weight": weights[0],
        "samples_per_query": config.guidance_samples,
        "deployed": fc.verifiers.verifier_report(deployed, held, guidance=True).to_dict()[
            "guidance"
        ],
    }
    block = 512
    for guide, judge in (("A", "B"), ("B", "A")):
        plain, guided = [], []
        for i in tqdm(range(0, held.num_queries, block), disable=config.quiet,
                      desc=f"guided by {guide}"):
            p, g = _plain_and_guided(h.policy, halves[guide], obs[i:i + block],
                                     jax.random.fold_in(key, i), config.guidance_samples,
                                     weights[0])
            plain.append(np.asarray(p))
            guided.append(np.asarray(g))
        rep = fc.verifiers.verifier_report(halves[guide], held, judge=halves[judge],
                                 guided=np.concatenate(guided), plain=np.concatenate(plain))
        out[f"{guide} judged by {judge}"] = rep.to_dict()
        print(f"guidance check, {guide} judged by {judge}: "
              f"{json.dumps(rep.guidance.to_dict(), default=float)}", flush=True)
    return out


def run_verify(config: VerifiersConfig) -> dict[str, Any]:
    fc = _fc()
    t0 = time.time()
    h = harness(config)
    verifiers, reports = train_verifiers(config, h.policy_tag)
    if config.guidance_samples > 0 and "outcome" in verifiers:
        reports["guidance_check"] = guidance_check(config, h, verifiers["outcome"])
    n, k = config.candidates, config.cluster_k
    suite = [s for s in consensus_suite(n, k) if s.name in ("plain", f"best-of-{n} medoid")]
    for name in config.evaluate.split(","):
        if not name:
            continue
        suite.append(Setting(f"best-of-{n} {name} verifier argmin", energy=name,
                             placement=fc.BestOfN(n)))
        suite.append(Setting(f"best-of-{n} {name} verifier NearMean({k})", energy=name,
                             placement=fc.BestOfN(n, select=fc.NearMean(k))))
    for r in [int(x) for x in config.early.split(",") if x]:
        # FM-Steer's saving: rank the candidates' denoised estimates after r of the flow
        # steps and finish only the chosen one, with the same guard.
        name = config.evaluate.split(",")[0]
        suite.append(Setting(f"early best-of-{n} {name} verifier NearMean({k}) rank_at={r}",
                             energy=name,
                             placement=fc.BestOfN(n, select=fc.NearMean(k), rank_at=r)))
    for w in [float(x) for x in config.guided.split(",") if x]:
        # Guidance by the verifier's gradient at the denoised estimate, through the
        # policy's velocity (one VJP a step), bounded by the velocity's norm (cap 1).
        name = config.evaluate.split(",")[0]
        suite.append(Setting(f"guided by {name} verifier w={w:g}", energy=name,
                             placement=fc.Guided(fc.EveryStep(), weight=w)))
    if config.ensemble > 1:
        # A pessimistic ensemble of outcome verifiers that differ in initial weights and
        # batch order: fc.Ensemble scores mean + pessimism * spread.
        members = [verifiers["outcome"]] + [
            train_verifiers(dataclasses.replace(config, losses="outcome"), h.policy_tag,
                            member=i)[0]["outcome"]
            for i in range(1, config.ensemble)]
        name = f"ensemble{config.ensemble}"
        verifiers[name] = fc.Ensemble(members, config.pessimism)
        suite.append(Setting(f"best-of-{n} ensemble of {config.ensemble} outcome verifiers "
                             f"pessimism {config.pessimism:g} argmin", energy=name,
                             placement=fc.BestOfN(n)))
    if config.control:
        # The guard without the verifier: a uniform draw among the same k candidates
        # (a softmax at a temperature far above the energies' spread), to tell the
        # verifier's contribution from the guard's.
        name = config.evaluate.split(",")[0]
        suite.append(Setting(f"best-of-{n} NearMean({k}) uniform", energy=name,
                             placement=fc.BestOfN(n, select=fc.NearMean(
                                 k, fc.SoftmaxSample(1e6)))))
    results: dict[str, list[Episodes]] = {}
    rounds = {"verifiers": reports}
    for setting in suite:
        data_tag = (f"-r{reports['rollout_episodes']}"
                    + (f"-e{config.explore_noise:g}" if config.explore_noise != 1 else "")
                    + (f"-R{config.round}" if config.round > 1 else ""))
        results[setting.name] = h.episodes(setting, verifiers,
                                           tag="" if setting.energy is None else data_tag)
        print(f"[{time.time() - t0:.0f}s] {paired_rows(results, 'plain')[-1]}", flush=True)
        stem = "verify" + (f"-e{config.explore_noise:g}" if config.explore_noise != 1 else "") + (
            f"-round{config.round}" if config.round > 1 else "")
        out = report(h, results, ["plain", f"best-of-{n} medoid"], rounds, stem, t0)
    for table in out["tables"].values():
        print(table)
    return out


def parse_cli(argv: list[str] | None = None) -> VerifiersConfig:
    """The command (a [`Consensus`][], [`Collect`][] or [`Verify`][]) that the command line
    `argv` names."""
    return _cli.parse(Command, argv, description=__doc__.splitlines()[0])


RUN = {"consensus": run_consensus, "collect": run_collect, "verify": run_verify}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_cli(argv)
    return RUN[config.command](config)


if __name__ == "__main__":
    main()
