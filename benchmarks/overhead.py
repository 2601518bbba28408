"""What each correction placement adds to a Pi0-shaped policy's sampler, and what the
reference's way of correcting adds.

Every row is one compiled function of the same inputs (the policy's weights, a batch of
observations with padding, the energy's weights, a PRNG key), timed in this one process
after warm-up, round-robin, each call synchronised with `block_until_ready`; compile
time is measured separately. The policy (see "Policies" below) has random weights; its
prefix pass runs once per call inside every row, as in openpi.

Rows:

- `plain`: `fc.sample` without an energy (10 Euler steps);
- `handwritten`: the same Euler loop written by hand (one prefix pass, a `lax.scan`):
  what `fc.sample` itself costs over the minimum;
- `posthoc_kK`: `PostHoc(reference_recipe(K))`, K clipped gradient steps after the flow;
- `denoised_last3` / `denoised_all`: `Denoised(reference_recipe(1))` on the last 3 / all
  10 flow steps; `guided_last3` / `guided_all`: `Guided` on the same steps;
- `best_of_N`: `BestOfN(N)`, N chains sharing one prefix pass, lowest energy kept;
- `best_of_N_medoid`: `BestOfN(N, select=Medoid())`, consensus, the energy unused;
- `early_best_of_N`: `BestOfN(N, rank_at=3)`, N chains for 3 of the 10 steps, ranked by
  the energy of their denoised estimates, one chain finished (these two rows run with
  `--full` or `--rows`, not in the quick set);
- `project_box`, `project_step`, `project_box_step`: `Project` of the plain chunk onto
  `Box(-0.5, 0.5)` (closed form), `MaxStepChange(0.05)` (iterative) and both
  (`AllOf`, Dykstra); `feasible_project`: guidance by the box's violation on every flow
  step, then the projection (these four run with `--full` or `--rows`);
- `reference_kK`: the reference's "method B" on the same model: openpi's sampler, then
  a second prefix pass for `prefix_out`, then K clipped steps in a Python loop, each a
  separate compiled call whose energy re-encodes the context;
- `openpi_sample_actions` (openpi's Pi0 only): openpi's own `Pi0.sample_actions`;
- `openpi_trt` (openpi's Pi0 only): training-time real-time chunking,
  `fc.rtc.PrefixConditioned` (delay 4) on `flowcorrect.openpi.Pi0TokenTimePolicy` of the
  same model (a flow time per action token, through openpi's own modules): what the
  committed prefix costs at inference, against `plain`.

The quick set (the default) has the rows that answer "what does this cost me": batch 1,
K in {1, 3}, denoised on all steps, guided on the last 3, best-of-8, method B at K = 1
and 3. `--full` runs the whole grid (K in {0, 1, 3, 5, 10}, both schedules of both
interleaved placements, best-of-{4, 8, 16}, batch 1 and 8).

Policies: `fc.Pi0ShapedPolicy` always; openpi's own Pi0 (`flowcorrect.openpi.Pi0Policy`)
too where openpi is importable, skipped with the reason printed where it is not.

Columns: `added ms` over `plain`; `x plain, paired`, the median over rounds of each call
over `plain`'s call of the same round; `added FLOPs / plain`, the physical floor (matrix
multiplies counted on the jaxpr with loop trip counts); `vs reference`, our added time
over `reference_kK`'s added time at the same K.

Run from the repository root:

    python -m benchmarks                           # the quick CPU set, a few minutes
    python -m benchmarks --full                    # every row, batch 1 and 8
    python -m benchmarks --preset pi0 --full --out pi0.json --plot pi0.png   # on a GPU
"""

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc

from . import harness, openpi_pi0, report

NUM_FLOW_STEPS = 10  # openpi's default

# Policy sizes and the energy model's (hidden, heads) for each preset.
PRESETS: dict[str, tuple[fc.Pi0ShapedConfig, tuple[int, int]]] = {
    # For the smoke test: seconds to compile, milliseconds to run.
    "tiny": (fc.Pi0ShapedConfig.cpu(depth=1, prefix_len=16), (32, 2)),
    # The CPU set: the quick rows in a few minutes on 2 cores, most of it compiling.
    "cpu": (
        fc.Pi0ShapedConfig.cpu(
            token_dim=256,
            width=256,
            depth=4,
            mlp_width=1024,
            head_dim=64,
            expert_width=128,
            expert_mlp_width=512,
            prefix_len=128,
        ),
        (128, 4),
    ),  # fmt: skip
    # Pi0's sizes, bfloat16 (about 4.6 GB of weights), and the reference's energy model.
    "pi0": (fc.Pi0ShapedConfig.pi0(), (512, 8)),
}


# ---------------------------------------------------------------------------------
# The timed functions. Each takes only pytrees whose arrays are traced: placements and
# correctors keep alpha, clip fractions and weights as arrays, so new values reuse the
# compiled function.


def sample_plain(policy, obs, key):
    return fc.sample(policy, obs, key, num_steps=NUM_FLOW_STEPS)[0]


def sample_placed(policy, obs, key, energy, placement):
    return fc.sample(
        policy, obs, key, num_steps=NUM_FLOW_STEPS, placement=placement, energy=energy
    )[0]


def sample_handwritten(policy, obs, key):
    """openpi's `sample_actions` loop, by hand: one prefix pass, Euler from t = 1."""
    cond = policy.condition(obs)
    batch = policy.batch_size(cond)
    x = jax.random.normal(key, (batch, *policy.chunk_shape))
    dt = -1.0 / NUM_FLOW_STEPS

    def step(x, i):
        t = jnp.asarray(1.0 + i * dt, x.dtype)
        return x + dt * policy.velocity(cond, x, t), None

    return jax.lax.scan(step, x, jnp.arange(NUM_FLOW_STEPS))[0]


def reference_prefix_out(policy, obs):
    """Method B's step 2: a second prefix pass, for the energy's context."""
    return policy.energy_context(policy.condition(obs))


def reference_step(energy, context, actions, alpha, clip_frac):
    """One step of the reference's `multi_step_energy_correction`: the energy is
    called on (context, actions), so it encodes the context again at every step."""
    grad = jax.vmap(jax.grad(lambda c, a: energy(c, a), argnums=1))(context, actions)
    step = alpha * grad
    norm = jnp.sqrt(jnp.sum(step**2, axis=(1, 2), keepdims=True))
    limit = clip_frac * jnp.sqrt(jnp.sum(actions**2, axis=(1, 2), keepdims=True))
    return actions - step * jnp.minimum(1.0, limit / (norm + 1e-12))


# ---------------------------------------------------------------------------------
# Rows.

# Which rows run: the quick set by default, every row with --full. Explicit --steps,
# --best-of, --batch-size or --rows override either.
QUICK = {"steps": [1, 3], "best_of": [8], "batch_size": [1], "schedules": ["denoised_all",
         "guided_last3"], "ranking": False}  # fmt: skip
FULL = {"steps": [0, 1, 3, 5, 10], "best_of": [4, 8, 16], "batch_size": [1, 8],
        "schedules": ["denoised_last3", "guided_last3", "denoised_all", "guided_all"],
        "ranking": True}  # fmt: skip
EARLY_RANK_AT = 3  # of NUM_FLOW_STEPS: early_best_of_N's ranking point


@dataclasses.dataclass
class Row:
    name: str
    description: str
    compile: Callable[[], harness.Compiled]
    k: int | None = None  # post-hoc and reference rows: their K


@dataclasses.dataclass
class Setup:
    """One policy the rows run on, with its energy and how to make its observations."""

    name: str  # "shaped" or "openpi"
    policy: Any
    energy: Any
    observation: Callable[[int, jax.Array], Any]  # (batch, key) -> observation
    settings: dict[str, Any]
    extra_rows: dict[str, tuple[str, Callable[..., Any], bool]]  # name -> (what, fn, FLOPs?)
    context: Callable[[], Any] = contextlib.nullcontext
    # Rows the quick set leaves out for this policy (where a call takes seconds).
    quick_skip: frozenset[str] = frozenset()


class ChunkingRow(fc.AbstractPlacement):
    """Real-time chunking as a benchmark row, inference-time (`"rtc"`,
    `fc.RealTimeChunking`) or training-time (`"trt"`, `fc.rtc.PrefixConditioned`): the
    previous chunk's leftover is made from the noise (any values time the same), delay
    4 and execution horizon `H // 2`, so the row needs no per-policy setup."""

    kind: str = eqx.field(static=True)
    needs_energy = False

    def noise_shape(self, chunk_shape):
        return chunk_shape

    def sample(self, flow, noise, keys):
        horizon = noise.shape[1]
        s = max(1, horizon // 2)
        left, d = 0.5 * noise[:, : horizon - s], min(4, horizon - s)
        if self.kind == "rtc":
            placement = fc.RealTimeChunking(left, d, s)
        else:
            placement = fc.rtc.PrefixConditioned(left, d)
        return placement.sample(flow, noise, keys)


def sample_openpi_trt(policy, obs, key):
    from flowcorrect.openpi import Pi0TokenTimePolicy

    return fc.sample(Pi0TokenTimePolicy(policy), obs, key, num_steps=NUM_FLOW_STEPS,
                     placement=ChunkingRow("trt"))[0]  # fmt: skip


def placements(args) -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (description, placement factory) of every row of ours with an energy."""
    out: dict[str, tuple[str, Callable[[], Any]]] = {}
    for k in args.steps:
        out[f"posthoc_k{k}"] = (
            f"PostHoc(reference_recipe({k}))",
            lambda k=k: fc.PostHoc(corrector=fc.reference_recipe(k)),
        )
    for label, schedule in (("last3", lambda: fc.LastSteps(3)), ("all", fc.EveryStep)):
        steps = "last 3" if label == "last3" else f"all {NUM_FLOW_STEPS}"
        out[f"denoised_{label}"] = (
            f"Denoised(reference_recipe(1)), {steps} flow steps",
            lambda s=schedule: fc.Denoised(fc.reference_recipe(1), schedule=s()),
        )
        out[f"guided_{label}"] = (
            f"Guided, {steps} flow steps (one VJP each)",
            lambda s=schedule: fc.Guided(schedule=s()),
        )
    for n in args.best_of:
        out[f"best_of_{n}"] = (f"BestOfN({n}), one prefix pass", lambda n=n: fc.BestOfN(n))
        out[f"best_of_{n}_medoid"] = (
            f"BestOfN({n}, select=Medoid()), consensus, no energy",
            lambda n=n: fc.BestOfN(n, select=fc.Medoid()),
        )
        out[f"early_best_of_{n}"] = (
            f"BestOfN({n}, rank_at={EARLY_RANK_AT}): ranked at step {EARLY_RANK_AT}, one finished",
            lambda n=n: fc.BestOfN(n, rank_at=EARLY_RANK_AT),
        )
    out["rtc"] = (
        "RealTimeChunking (delay 4, execution horizon H/2): guided every step, one VJP each",
        lambda: ChunkingRow("rtc"),
    )
    # Hard constraints: the projection after the flow (closed form, iterative, and both
    # by Dykstra's method), and guidance by the violation then projection. A factory may
    # return (placement, energy) for a row that reads its own energy.
    box = lambda: fc.constraints.Box(-0.5, 0.5)  # noqa: E731
    steps = lambda: fc.constraints.MaxStepChange(0.05)  # noqa: E731
    out["project_box"] = ("Project(Box): closed form", lambda: fc.Project(box()))
    out["project_step"] = (
        "Project(MaxStepChange): dual proximal-gradient rounds",
        lambda: fc.Project(steps()),
    )
    out["project_box_step"] = (
        "Project(AllOf(Box, MaxStepChange)): Dykstra's alternating projections",
        lambda: fc.Project(fc.constraints.AllOf(box(), steps())),
    )
    out["feasible_project"] = (
        f"Project(Box, Guided by its violation, all {NUM_FLOW_STEPS} flow steps)",
        lambda: (fc.Project(box(), fc.Guided(weight=10.0, cap=1e3)),
                 fc.constraints.ViolationEnergy(box())),
    )
    return out


def row_names(args) -> list[str]:
    """Every row the arguments select, in table order (a policy runs those it has)."""
    k_ref = [k for k in args.steps if k >= 1]
    ours = [
        name
        for name in placements(args)
        if (not name.startswith(("denoised_", "guided_")) or name in args.schedules)
        and (args.ranking or not (name.startswith(("early_", "project_", "feasible_"))
                                  or name.endswith("_medoid")))
    ]
    return [
        "plain",
        "handwritten",
        "openpi_sample_actions",
        "openpi_trt",
        *ours,
        *(f"reference_k{k}" for k in k_ref),
    ]


def known_row_names(args) -> list[str]:
    """Every row that can be asked for with these --steps and --best-of."""
    every = {**vars(args), "schedules": FULL["schedules"], "ranking": True}
    return row_names(argparse.Namespace(**every))


def build_rows(args, setup: Setup, obs, key) -> list[Row]:
    policy, energy = setup.policy, setup.energy
    # Method B's sampler is the hand-written loop: compile it once for both.
    handwritten = functools.cache(lambda: harness.compile_fn(sample_handwritten, policy, obs, key))
    every = {
        "plain": Row(
            "plain",
            f"fc.sample, no energy ({NUM_FLOW_STEPS} Euler steps)",
            lambda: harness.compile_fn(sample_plain, policy, obs, key),
        ),
        "handwritten": Row("handwritten", "hand-written Euler loop, no fc.sample", handwritten),
    }
    for name, (description, fn, count_flops) in setup.extra_rows.items():
        every[name] = Row(
            name,
            description,
            lambda fn=fn, c=count_flops: harness.compile_fn(fn, policy, obs, key, count_flops=c),
        )
    for name, (description, placement) in placements(args).items():
        k = int(name.removeprefix("posthoc_k")) if name.startswith("posthoc_k") else None
        every[name] = Row(
            name,
            description,
            lambda p=placement: harness.compile_fn(sample_placed, policy, obs, key,
                                                   *_energy_and_placement(energy, p())),
            k,
        )
    pieces = functools.cache(lambda: reference_pieces(handwritten(), policy, energy, obs))
    for k in (k for k in args.steps if k >= 1):
        every[f"reference_k{k}"] = Row(
            f"reference_k{k}",
            f"method B: sample, 2nd prefix pass, {k} re-encoding steps (Python loop)",
            lambda k=k: compile_reference(pieces(), energy, k),
            k,
        )
    return [every[name] for name in rows_to_run(args, setup) if name in every]


def _energy_and_placement(energy, made):
    """A placement factory's result as (energy, placement): its own energy if it gave one."""
    if isinstance(made, tuple):
        placement, own = made
        return own, placement
    return energy, made


def rows_to_run(args, setup: Setup) -> list[str]:
    """The selected rows, less those the quick set leaves out for this policy (unless
    --full or --rows asked for them)."""
    if args.full or args.rows_given:
        return list(args.rows)
    return [n for n in args.rows if n == args.baseline or n not in setup.quick_skip]


# The reference's defaults: alpha 0.1, clip_frac 0.2.
REFERENCE_HYPERPARAMETERS = (jnp.asarray(0.1), jnp.asarray(0.2))


def reference_pieces(sample: harness.Compiled, policy, energy, obs) -> tuple[harness.Compiled, ...]:
    """Method B's three compiled functions (shared by its rows of every K). Its sampler
    `sample` is openpi's `sample_actions` loop (the hand-written row, compiled once)."""
    prefix_out = harness.compile_fn(reference_prefix_out, policy, obs)
    context = jax.eval_shape(reference_prefix_out, policy, obs)
    actions = jax.eval_shape(sample_handwritten, policy, obs, jax.random.key(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (context, actions))
    step = harness.compile_fn(reference_step, energy, *zeros, *REFERENCE_HYPERPARAMETERS)
    return sample, prefix_out, step


def compile_reference(pieces, energy, k: int) -> harness.Compiled:
    """Method B with K steps: its three compiled functions, called one after the other."""
    sample, prefix_out, step = pieces
    alpha, clip = REFERENCE_HYPERPARAMETERS

    def call():
        actions = sample.call()
        context = prefix_out.call()
        for _ in range(k):
            actions = step.run(energy, context, actions, alpha, clip)
        return actions

    memories = [c.memory for c in (sample, prefix_out, step) if c.memory is not None]
    flops = [sample.matmul_flops, prefix_out.matmul_flops, step.matmul_flops]
    low = [sample.matmul_flops_min, prefix_out.matmul_flops_min, step.matmul_flops_min]
    return harness.Compiled(
        call=call,
        # What method B compiles: its sampler (shared with `handwritten`), the second
        # prefix pass and the step.
        compile_s=sample.compile_s + prefix_out.compile_s + step.compile_s,
        # The largest of the three programs (they run one after the other).
        memory=max(memories, key=lambda m: sum(m.values())) if memories else None,
        xla_flops=None,
        matmul_flops=None if None in flops else flops[0] + flops[1] + k * flops[2],
        matmul_flops_min=None if None in low else low[0] + low[1] + k * low[2],
    )


# ---------------------------------------------------------------------------------
# Policies.


def shaped_setup(args, key) -> Setup:
    config, (hidden, heads) = PRESETS[args.preset]
    k_policy, k_energy = jax.random.split(key)
    policy = fc.Pi0ShapedPolicy(config, key=k_policy)
    energy_config = fc.EnergyModelConfig(
        context_dim=config.width, action_dim=config.action_dim, hidden=hidden, num_heads=heads
    )
    energy = eqx.nn.inference_mode(fc.EnergyModel(energy_config, key=k_energy))
    settings = {
        "policy": (
            f"Pi0ShapedPolicy {config.dtype}, prefix {config.prefix_len} tokens "
            f"({config.prefix_len // 16} padding) x width {config.width}, depth {config.depth}, "
            f"action expert width {config.expert_width}, {policy.num_parameters():,} "
            f"parameters; chunk {policy.chunk_shape}; {NUM_FLOW_STEPS} Euler steps"
        ),
        "policy_config": dataclasses.asdict(config),
        "policy_parameters": policy.num_parameters(),
        "energy": f"EnergyModel hidden {hidden}, {heads} heads, "
        f"{energy.num_parameters():,} parameters",
        "energy_config": energy_config.to_dict(),
        "energy_parameters": energy.num_parameters(),
    }

    def observation(batch, key):
        # openpi pads its prompt to a fixed length: pad the last 1/16 of the tokens.
        return fc.Pi0ShapedObservation.random(
            config, key, batch, num_padding=config.prefix_len // 16
        )

    return Setup("shaped", policy, energy, observation, settings, extra_rows={})


def openpi_setup(args, key) -> Setup:
    context = openpi_pi0.allowances

    with context():
        config, policy, energy, settings = openpi_pi0.build(args.preset, key)
    extra = {
        "openpi_sample_actions": (
            "openpi's own Pi0.sample_actions (a while_loop: FLOPs not counted)",
            functools.partial(openpi_pi0.sample_actions, num_steps=NUM_FLOW_STEPS),
            False,
        ),
        "openpi_trt": (
            "training-time RTC: PrefixConditioned (delay 4) on Pi0TokenTimePolicy",
            sample_openpi_trt,
            True,
        ),
    }
    return Setup(
        "openpi",
        policy,
        energy,
        lambda batch, key: openpi_pi0.observation(config, batch, key),
        settings,
        extra_rows=extra,
        context=context,
        # A test-size Pi0 call takes about a second on 2 CPU cores (SigLIP over three
        # 224 x 224 images): the quick set keeps plain, openpi's own sampler, K = 3,
        # guided, best-of-8 and method B at K = 3.
        quick_skip=frozenset({"handwritten", "denoised_all", "posthoc_k1", "reference_k1"}),
    )


# ---------------------------------------------------------------------------------
# Running.


def run_batch(args, setup: Setup, batch: int, key) -> dict[str, Any]:
    k_obs, k_sample = jax.random.split(key)
    obs = setup.observation(batch, k_obs)
    rows = build_rows(args, setup, obs, k_sample)
    compiled = {}
    for row in rows:
        compiled[row.name] = row.compile()
        if args.verbose:
            print(f"  compiled {setup.name} {row.name} (batch {batch}) in "
                  f"{compiled[row.name].compile_s:.1f} s", file=sys.stderr)  # fmt: skip
    times = harness.time_round_robin(
        {name: c.call for name, c in compiled.items()}, args.repeats, args.warmup
    )
    out = []
    for row in rows:
        c = compiled[row.name]
        stats = harness.summarise(times[row.name])
        out.append(
            {
                "row": row.name,
                "description": row.description,
                "k": row.k,
                **stats,
                "compile_s": c.compile_s,
                "temp_bytes": None if c.memory is None else c.memory["temp_bytes"],
                "total_bytes": None if c.memory is None else sum(c.memory.values()),
                "matmul_flops": c.matmul_flops,
                "matmul_flops_min": c.matmul_flops_min,
                "xla_flops": c.xla_flops,
                "times_ms": [t * 1e3 for t in times[row.name]],
            }
        )
    add_ratios(out, args.baseline)
    # Rows the quick set left out for this policy (--full runs them).
    left_out = [n for n in args.rows if n not in rows_to_run(args, setup)]
    return {"policy": setup.name, "batch_size": batch, "rows": out, "rows_left_out": left_out}


def add_ratios(out: list[dict[str, Any]], baseline: str) -> None:
    """Adds each row's figures against the baseline row and against method B, in place
    (also used to recompute a saved record's)."""
    plain = next(r for r in out if r["row"] == baseline)
    for r in out:
        r["added_ms"] = None if r is plain else r["median_ms"] - plain["median_ms"]
        r["ratio"] = r["median_ms"] / plain["median_ms"]
        # Round by round, each call against the baseline's call of the same round (the
        # two ran seconds apart, under the same load): the median of those ratios.
        r["paired_ratio"] = statistics.median(
            t / b for t, b in zip(r["times_ms"], plain["times_ms"], strict=True)
        )
        flops, base = r["matmul_flops"], plain["matmul_flops"]
        r["added_flops_ratio"] = (
            None if r is plain or flops is None or not base else (flops - base) / base
        )
        low, base_low = r["matmul_flops_min"], plain["matmul_flops_min"]
        r["added_flops_ratio_min"] = (
            None if r is plain or low is None or not base_low else (low - base_low) / base_low
        )
    by_name = {r["row"]: r for r in out}
    for r in out:
        ref = by_name.get(f"reference_k{r['k']}")
        if r["row"].startswith("posthoc_k") and ref is not None and ref["added_ms"]:
            r["vs_reference"] = r["added_ms"] / ref["added_ms"]
        else:
            r["vs_reference"] = None


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="policy and energy sizes (default cpu; pi0 for a GPU)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every row at batch 1 and 8 (default: the quick set; see the module doc)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=["shaped", "openpi"],
        default=["shaped", "openpi"],
        help="fc.Pi0ShapedPolicy and/or openpi's Pi0 (skipped, saying why, where openpi "
        "is not importable)",
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="default 1 (quick) or 1 8 (--full)")  # fmt: skip
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="K of the post-hoc and reference rows (default 1 3, or 0 1 3 5 10 with --full)",
    )
    parser.add_argument("--best-of", type=int, nargs="+", default=None,
                        help="N of best-of-N (default 8, or 4 8 16 with --full)")  # fmt: skip
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="which rows (default: the quick set, or all with --full); the baseline is "
        "always run, first",
    )
    parser.add_argument(
        "--baseline", default="plain", help="the row every ratio is taken against (default plain)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON record here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--plot", help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--verbose", action="store_true", help="report each compile")
    args = parser.parse_args(argv)  # fmt: skip
    grid = FULL if args.full else QUICK
    for name in ("steps", "best_of", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, list(grid[name]))
    args.schedules = list(grid["schedules"])
    args.ranking = grid["ranking"]
    if min(args.batch_size) < 1 or min(args.best_of) < 1 or min(args.steps) < 0:
        parser.error("--batch-size and --best-of must be >= 1, --steps >= 0")
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (the first call is slower)")
    known = known_row_names(args)
    args.rows_given = args.rows is not None
    rows = row_names(args) if args.rows is None else args.rows
    unknown = [r for r in rows if r not in known]
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {known}")
    if args.baseline not in ("plain", "handwritten"):
        parser.error(
            f"unknown --baseline {args.baseline!r}; choose plain or handwritten (the rows "
            "every policy has)"
        )
    args.rows = [args.baseline, *(r for r in dict.fromkeys(rows) if r != args.baseline)]
    args.policies = list(dict.fromkeys(args.policies))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, returns (and optionally writes) the record."""
    args = parse_args(argv)
    k_shaped, k_openpi, k_data = jax.random.split(jax.random.key(args.seed), 3)
    env = harness.environment()
    setups, skipped = [], {}
    if "shaped" in args.policies:
        setups.append(shaped_setup(args, k_shaped))
    if "openpi" in args.policies:
        reason = openpi_pi0.unavailable()
        if reason is None:
            setups.append(openpi_setup(args, k_openpi))
        else:
            skipped["openpi"] = reason
            print(f"openpi Pi0 rows skipped: {reason}.", file=sys.stderr)
    settings = {
        "preset": args.preset,
        "full": args.full,
        "policies": {s.name: s.settings for s in setups},
        "flow_steps": NUM_FLOW_STEPS,
        "steps": args.steps,
        "best_of": args.best_of,
        "batch_sizes": args.batch_size,
        "rows": args.rows,
        "baseline": args.baseline,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    start = time.perf_counter()
    runs = []
    for setup in setups:
        with setup.context():
            for i, batch in enumerate(args.batch_size):
                runs.append(run_batch(args, setup, batch, jax.random.fold_in(k_data, i)))
    result = {
        "environment": env,
        "settings": settings,
        "runs": runs,
        "skipped": skipped,
        "device_peak_bytes": harness.device_peak_bytes(),
        "load_average_1m_end": harness.load_average(),
        "wall_s": time.perf_counter() - start,
    }
    table = report.markdown_table(result)
    print(report.header(result), "", table, f"(wall time {result['wall_s']:.0f} s)", sep="\n")
    if args.out:
        report.write_json(result, args.out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.header(result) + "\n\n" + table)
    if args.plot and not report.plot(result, args.plot):
        print("(no plot: matplotlib is not installed, or no row ran)", file=sys.stderr)
    return result
