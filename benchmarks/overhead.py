"""What each correction placement adds to a Pi0-shaped policy's sampler, and what the
reference's way of correcting adds.

Every row is one compiled function of the same inputs (the policy's weights, a batch of
observations with padding, the energy's weights, a PRNG key), timed in this one process
after warm-up, round-robin, each call synchronised with `block_until_ready`; compile
time is measured separately. The policy is [`flowcorrect.Pi0ShapedPolicy`][] (random
weights): its prefix pass runs once per call inside every row, as in openpi.

Rows:

- `plain`: `fc.sample` without an energy (10 Euler steps);
- `handwritten`: the same Euler loop written by hand (one prefix pass, a `lax.scan`):
  what `fc.sample` itself costs over the minimum;
- `posthoc_kK`: `PostHoc(reference_recipe(K))`, K clipped gradient steps after the flow;
- `denoised_last3` / `denoised_all`: `Denoised(reference_recipe(1))` on the last 3 / all
  10 flow steps; `guided_last3` / `guided_all`: `Guided` on the same steps;
- `best_of_N`: `BestOfN(N)`, N chains sharing one prefix pass, lowest energy kept;
- `reference_kK`: the reference's "method B" on the same model: openpi's sampler, then
  a second prefix pass for `prefix_out`, then K clipped steps in a Python loop, each a
  separate compiled call whose energy re-encodes the context.

Columns: `added ms` over `plain`; `added FLOPs / plain`, the physical floor (matrix
multiplies counted on the jaxpr with loop trip counts); `vs reference`, our added time
over `reference_kK`'s added time at the same K.

Run from the repository root:

    python -m benchmarks                           # CPU set, a few minutes
    python -m benchmarks --preset pi0 --out pi0.json --plot pi0.png   # on a GPU
"""

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc

from . import harness, report

NUM_FLOW_STEPS = 10  # openpi's default

# Policy sizes and the energy model's (hidden, heads) for each preset.
PRESETS: dict[str, tuple[fc.Pi0ShapedConfig, tuple[int, int]]] = {
    # For the smoke test: seconds to compile, milliseconds to run.
    "tiny": (fc.Pi0ShapedConfig.cpu(depth=1, prefix_len=16), (32, 2)),
    # The CPU set: a few minutes for every row at batch 1 and 8 on 2 cores.
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
    prefix = policy.prefix(obs)
    batch = policy.batch_size(prefix)
    x = jax.random.normal(key, (batch, *policy.chunk_shape))
    dt = -1.0 / NUM_FLOW_STEPS

    def step(x, i):
        t = jnp.asarray(1.0 + i * dt, x.dtype)
        return x + dt * policy.velocity(prefix, x, t), None

    return jax.lax.scan(step, x, jnp.arange(NUM_FLOW_STEPS))[0]


def reference_prefix_out(policy, obs):
    """Method B's step 2: a second prefix pass, for the energy's context."""
    return policy.energy_context(policy.prefix(obs))


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


@dataclasses.dataclass
class Row:
    name: str
    description: str
    compile: Callable[[], harness.Compiled]
    k: int | None = None  # post-hoc and reference rows: their K


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
    return out


def row_names(args) -> list[str]:
    k_ref = [k for k in args.steps if k >= 1]
    return [
        "plain",
        "handwritten",
        *placements(args),
        *(f"reference_k{k}" for k in k_ref),
    ]


def build_rows(args, policy, energy, obs, key) -> list[Row]:
    every = {
        "plain": Row(
            "plain",
            f"fc.sample, no energy ({NUM_FLOW_STEPS} Euler steps)",
            lambda: harness.compile_fn(sample_plain, policy, obs, key),
        ),
        "handwritten": Row(
            "handwritten",
            "hand-written Euler loop, no fc.sample",
            lambda: harness.compile_fn(sample_handwritten, policy, obs, key),
        ),
    }
    for name, (description, placement) in placements(args).items():
        k = int(name.removeprefix("posthoc_k")) if name.startswith("posthoc_k") else None
        every[name] = Row(
            name,
            description,
            lambda p=placement: harness.compile_fn(sample_placed, policy, obs, key, energy, p()),
            k,
        )
    pieces = functools.cache(lambda: reference_pieces(policy, energy, obs, key))
    for k in (k for k in args.steps if k >= 1):
        every[f"reference_k{k}"] = Row(
            f"reference_k{k}",
            f"method B: sample, 2nd prefix pass, {k} re-encoding steps (Python loop)",
            lambda k=k: compile_reference(pieces(), energy, k),
            k,
        )
    return [every[name] for name in args.rows]


# The reference's defaults: alpha 0.1, clip_frac 0.2.
REFERENCE_HYPERPARAMETERS = (jnp.asarray(0.1), jnp.asarray(0.2))


def reference_pieces(policy, energy, obs, key) -> tuple[harness.Compiled, ...]:
    """Method B's three compiled functions (shared by its rows of every K). Its sampler
    is openpi's `sample_actions` loop (the hand-written row)."""
    sample = harness.compile_fn(sample_handwritten, policy, obs, key)
    prefix_out = harness.compile_fn(reference_prefix_out, policy, obs)
    context = jax.eval_shape(reference_prefix_out, policy, obs)
    actions = jax.eval_shape(sample_handwritten, policy, obs, key)
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
        compile_s=sample.compile_s + prefix_out.compile_s + step.compile_s,
        # The largest of the three programs (they run one after the other).
        memory=max(memories, key=lambda m: sum(m.values())) if memories else None,
        xla_flops=None,
        matmul_flops=None if None in flops else flops[0] + flops[1] + k * flops[2],
        matmul_flops_min=None if None in low else low[0] + low[1] + k * low[2],
    )


# ---------------------------------------------------------------------------------
# Running.


def run_batch(args, batch: int, policy, energy, key) -> dict[str, Any]:
    config = policy.config
    k_obs, k_sample = jax.random.split(key)
    # openpi pads its prompt to a fixed length: pad the last 1/16 of the tokens.
    obs = fc.Pi0ShapedObservation.random(config, k_obs, batch, num_padding=config.prefix_len // 16)
    rows = build_rows(args, policy, energy, obs, k_sample)
    compiled = {}
    for row in rows:
        compiled[row.name] = row.compile()
        if args.verbose:
            print(f"  compiled {row.name} (batch {batch}) in "
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
    plain = next(r for r in out if r["row"] == args.baseline)
    for r in out:
        r["added_ms"] = None if r is plain else r["median_ms"] - plain["median_ms"]
        r["ratio"] = r["median_ms"] / plain["median_ms"]
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
    return {"batch_size": batch, "rows": out}


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
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[0, 1, 3, 5, 10],
        help="K of the post-hoc and reference rows",
    )
    parser.add_argument("--best-of", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="which rows (default all); 'plain' is always run, first",
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
    if min(args.batch_size) < 1 or min(args.best_of) < 1 or min(args.steps) < 0:
        parser.error("--batch-size and --best-of must be >= 1, --steps >= 0")
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (the first call is slower)")
    known = row_names(args)
    rows = known if args.rows is None else args.rows
    unknown = [r for r in rows if r not in known]
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {known}")
    if args.baseline not in known:
        parser.error(f"unknown --baseline {args.baseline!r}; choose from {known}")
    args.rows = [args.baseline, *(r for r in dict.fromkeys(rows) if r != args.baseline)]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, returns (and optionally writes) the record."""
    args = parse_args(argv)
    config, (hidden, heads) = PRESETS[args.preset]
    k_policy, k_energy, k_data = jax.random.split(jax.random.key(args.seed), 3)
    policy = fc.Pi0ShapedPolicy(config, key=k_policy)
    energy_config = fc.EnergyModelConfig(
        context_dim=config.width, action_dim=config.action_dim, hidden=hidden, num_heads=heads
    )
    energy = eqx.nn.inference_mode(fc.EnergyModel(energy_config, key=k_energy))
    env = harness.environment()
    settings = {
        "preset": args.preset,
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
    runs = [
        run_batch(args, batch, policy, energy, jax.random.fold_in(k_data, i))
        for i, batch in enumerate(args.batch_size)
    ]
    result = {
        "environment": env,
        "settings": settings,
        "runs": runs,
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
        print("(no plot: matplotlib is not installed)", file=sys.stderr)
    return result
