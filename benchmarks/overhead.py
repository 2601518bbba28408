"""Overhead of flowcorrect's corrections against the plain flow sampler.

Every case is one compiled function of the same inputs (context tokens, padding mask,
noise), timed in this one process after warm-up: compile time is excluded, every call
ends with `jax.block_until_ready`, and the cases are timed round-robin (one call of
each case per round) so that load from other processes spreads evenly over them. The
table reports the median and the fastest call of each case and their ratios against
the plain sampler.

The policy is a stand-in, not Pi0: a small transformer "action expert" whose cost is
set by `--policy-size`, attending to a projection of the same context tokens the
energy reads (a stand-in for openpi's prefix KV cache). A real Pi0 runs a 2B-parameter
VLM over the prefix and a 300M-parameter action expert for every flow step, so it
costs far more than any size here and the ratio with a real policy is lower than the
ratio printed. The `added ms` column is the correction's own cost: divide it by your
policy's latency to get your overhead.

Run: python benchmarks/overhead.py                 (a few minutes on a CPU)
     python benchmarks/overhead.py --quick         (under a minute)
     python benchmarks/overhead.py --batch-size 1 8 --policy-size medium --out results.json
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc

HORIZON, ACTION_DIM = 50, 32  # openpi's chunk: 50 steps of 32 padded action dims.
NUM_FLOW_STEPS = 10  # openpi's default number of Euler steps.

# (width, layers) of the stand-in action expert. For scale: Pi0's action expert has
# width 1024 and 18 layers, and its prefix pass runs a 2B-parameter VLM that no size
# here models at all.
POLICY_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (32, 1),
    "small": (256, 2),
    "medium": (512, 4),
    "large": (1024, 8),
}


# ---------------------------------------------------------------------------------
# The policy stand-in.


def _dense(layer: eqx.nn.Linear, x: jax.Array) -> jax.Array:
    return jax.vmap(layer)(x)


def _norm(layer: eqx.nn.LayerNorm, x: jax.Array) -> jax.Array:
    return jax.vmap(layer)(x)


class PolicyKV(eqx.Module):
    """The stand-in's per-observation cache: keys and values of the prefix per layer."""

    keys: jax.Array  # (layers, seq, heads, head_dim)
    values: jax.Array  # (layers, seq, heads, head_dim)
    mask: jax.Array  # (seq,), True for real tokens


class _Block(eqx.Module):
    """A pre-norm transformer block whose queries attend to [prefix; actions] (as Pi0's
    action expert does), then an MLP."""

    norm1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, width: int, num_heads: int, *, key: jax.Array):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k1)
        self.out = eqx.nn.Linear(width, width, key=k2)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 4 * width, key=k3)
        self.down = eqx.nn.Linear(4 * width, width, key=k4)
        self.num_heads = num_heads

    def __call__(self, x, prefix_keys, prefix_values, prefix_mask):
        n, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = jnp.split(_dense(self.qkv, _norm(self.norm1, x)), 3, axis=-1)
        q, k, v = (y.reshape(n, self.num_heads, head_dim) for y in (q, k, v))
        keys = jnp.concatenate([prefix_keys, k], axis=0)
        values = jnp.concatenate([prefix_values, v], axis=0)
        mask = jnp.concatenate([prefix_mask, jnp.ones(n, bool)])
        scores = jnp.einsum("qhd,khd->hqk", q, keys) / math.sqrt(head_dim)
        scores = jnp.where(mask[None, None, :], scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), values)
        x = x + _dense(self.out, attended.reshape(n, width))
        return x + _dense(self.down, jax.nn.gelu(_dense(self.up, _norm(self.norm2, x))))


class StandInPolicy(eqx.Module):
    """A flow policy's velocity field `v(kv, x_t, t)` with a per-observation prefix pass.

    `prefix` projects the context tokens once per observation into per-layer keys and
    values (the stand-in for openpi's prefix KV cache); the velocity embeds the noisy
    chunk and the flow time and runs `layers` transformer blocks over it.
    """

    prefix_proj: eqx.nn.Linear
    prefix_kv: tuple[eqx.nn.Linear, ...]
    action_in: eqx.nn.Linear
    time_mlp: eqx.nn.Linear
    blocks: tuple[_Block, ...]
    final_norm: eqx.nn.LayerNorm
    action_out: eqx.nn.Linear
    width: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)

    def __init__(self, context_dim: int, width: int, layers: int, *, key: jax.Array):
        keys = jax.random.split(key, 5 + 2 * layers)
        self.width = width
        self.num_heads = max(1, width // 64)
        self.prefix_proj = eqx.nn.Linear(context_dim, width, key=keys[0])
        self.prefix_kv = tuple(eqx.nn.Linear(width, 2 * width, key=k) for k in keys[5 : 5 + layers])
        self.action_in = eqx.nn.Linear(ACTION_DIM, width, key=keys[1])
        self.time_mlp = eqx.nn.Linear(width, width, key=keys[2])
        self.blocks = tuple(
            _Block(width, self.num_heads, key=k) for k in keys[5 + layers : 5 + 2 * layers]
        )
        self.final_norm = eqx.nn.LayerNorm(width)
        self.action_out = eqx.nn.Linear(width, ACTION_DIM, key=keys[3])

    def prefix(self, tokens: jax.Array, mask: jax.Array) -> PolicyKV:
        """Once per observation: tokens `(seq, context_dim)`, mask True for real tokens."""
        seq = tokens.shape[0]
        head_dim = self.width // self.num_heads
        h = _dense(self.prefix_proj, jnp.where(mask[:, None], tokens, 0))
        kv = [
            _dense(layer, h).reshape(seq, 2, self.num_heads, head_dim) for layer in self.prefix_kv
        ]
        kv = jnp.stack(kv)
        return PolicyKV(kv[:, :, 0], kv[:, :, 1], mask)

    def __call__(self, kv: PolicyKV, x: jax.Array, t: jax.Array) -> jax.Array:
        half = self.width // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
        t_emb = jnp.concatenate([jnp.sin(t * 1000 * freqs), jnp.cos(t * 1000 * freqs)])
        t_emb = jax.nn.swish(self.time_mlp(jnp.pad(t_emb, (0, self.width - 2 * half))))
        h = _dense(self.action_in, x) + t_emb[None, :]
        for i, block in enumerate(self.blocks):
            h = block(h, kv.keys[i], kv.values[i], kv.mask)
        return _dense(self.action_out, _norm(self.final_norm, h))


def num_parameters(module: eqx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(module, eqx.is_array)))


# ---------------------------------------------------------------------------------
# The cases.


@dataclasses.dataclass
class Case:
    """One timed function. `group` says what its ratio means."""

    name: str
    group: str  # "sampler" (policy + correction) or "alone" (correction without policy)
    description: str
    fn: Callable[..., Any]
    args: Callable[[], tuple]  # built only for the cases that run


def _sample(policy, energy, tokens, mask, noise, **kwargs):
    # The policy's prefix pass runs once per observation, inside the timed function, as
    # it does in openpi's `sample_actions`.
    kv = jax.vmap(policy.prefix)(tokens, mask)
    if energy is None:
        return fc.sample(policy, kv, noise=noise, num_steps=NUM_FLOW_STEPS)
    return fc.sample(
        policy,
        kv,
        noise=noise,
        num_steps=NUM_FLOW_STEPS,
        energy=energy,
        energy_context=fc.TokenContext(tokens, mask),
        **kwargs,
    )


def _plain(policy, tokens, mask, noise):
    return _sample(policy, None, tokens, mask, noise)


def _corrected(policy, energy, tokens, mask, noise, options):
    return _sample(policy, energy, tokens, mask, noise, **options)


def _encode(energy, tokens, mask):
    return jax.vmap(energy.encode)(fc.TokenContext(tokens, mask))


def _correct(energy, tokens, mask, actions, corrector):
    return fc.correct(energy, fc.TokenContext(tokens, mask), actions, corrector=corrector)


class Unsplit(eqx.Module):
    """The same energy without its encode/score split: every call re-encodes the context,
    as an energy that is a plain function of `(context, actions)` does."""

    model: fc.EnergyModel

    def __call__(self, context, actions):
        return self.model(context, actions)


def _correct_encoded(energy, encoded, actions, corrector):
    def one(enc, a, k):
        return fc.correct_prepared(fc.BoundEnergy(energy.score, enc), a, corrector, k)

    keys = jax.random.split(jax.random.key(0), actions.shape[0])
    return jax.vmap(one)(encoded, actions, keys)


def build_cases(policy, energy, tokens, mask, noise, noise_n, actions, encoded, ks, n_best):
    """Every case, in table order; all share the same arrays.

    `actions` (the chunks the correction-alone rows correct) and `encoded` (the encoded
    context) are functions, called only when a case that needs them is compiled.
    """
    lean = dict(step_energies=False, track_uncorrected=False)
    last3 = fc.LastSteps(3)
    k_mid = mid_steps(ks)

    def sampler(name, description, options, noise=noise):
        return Case(
            name,
            "sampler",
            description,
            _corrected,
            lambda: (policy, energy, tokens, mask, noise, options),
        )

    cases = [
        Case(
            "plain",
            "sampler",
            f"fc.sample, no energy ({NUM_FLOW_STEPS} Euler steps)",
            _plain,
            lambda: (policy, tokens, mask, noise),
        ),
    ]
    for k in ks:
        cases.append(
            sampler(
                f"posthoc_k{k}",
                f"+ PostHoc, reference_recipe(K={k})",
                dict(placement=fc.PostHoc(), corrector=fc.reference_recipe(k), **lean),
            )
        )
    backtrack = fc.Repeat(fc.Backtrack(fc.ClipStep(fc.GradientStep(0.1), 0.2)), num_steps=k_mid)
    cases += [
        sampler(
            f"posthoc_k{k_mid}_backtrack",
            f"+ PostHoc, Repeat(Backtrack(ClipStep(GradientStep)), K={k_mid})",
            dict(placement=fc.PostHoc(), corrector=backtrack, **lean),
        ),
        sampler(
            f"posthoc_k{k_mid}_diagnostics",
            f"+ PostHoc K={k_mid}, step_energies=True (the default)",
            dict(placement=fc.PostHoc(), corrector=fc.reference_recipe(k_mid), step_energies=True),
        ),
        sampler(
            "denoised_last3",
            "+ Denoised(LastSteps(3)), reference_recipe(K=1) per step",
            dict(placement=fc.Denoised(last3), corrector=fc.reference_recipe(1), **lean),
        ),
        sampler(
            "denoised_last3_tracked",
            "same, track_uncorrected=True, step_energies=True (defaults)",
            dict(placement=fc.Denoised(last3), corrector=fc.reference_recipe(1)),
        ),
        sampler(
            "guided_last3",
            "+ Guided(LastSteps(3)), VJP through the policy",
            dict(placement=fc.Guided(last3), **lean),
        ),
        sampler(
            "guided_last3_tracked",
            "same, track_uncorrected=True, step_energies=True (defaults)",
            dict(placement=fc.Guided(last3)),
        ),
        sampler(
            f"best_of_{n_best}",
            f"BestOfN({n_best}): {n_best} plain samples, lowest energy kept",
            dict(placement=fc.BestOfN(n_best), **lean),
            noise=noise_n,
        ),
        Case(
            "encode_alone",
            "alone",
            "EnergyModel.encode of the context only",
            _encode,
            lambda: (energy, tokens, mask),
        ),
    ]
    for k in ks:
        cases.append(
            Case(
                f"correct_k{k}_alone",
                "alone",
                f"fc.correct K={k}, encode included",
                _correct,
                lambda k=k: (energy, tokens, mask, actions(), fc.reference_recipe(k)),
            )
        )
    cases.append(
        Case(
            f"correct_k{k_mid}_reencode",
            "alone",
            f"fc.correct K={k_mid}, energy without encode/score split",
            _correct,
            lambda: (Unsplit(energy), tokens, mask, actions(), fc.reference_recipe(k_mid)),
        )
    )
    cases.append(
        Case(
            f"correct_k{k_mid}_pre_encoded",
            "alone",
            f"fc.correct_prepared K={k_mid}, context already encoded",
            _correct_encoded,
            lambda: (energy, encoded(), actions(), fc.reference_recipe(k_mid)),
        )
    )
    return cases


def mid_steps(ks: list[int]) -> int:
    """The K of the single-K rows: 3 (the reference's default) when measured."""
    return 3 if 3 in ks else ks[0]


def case_names(ks: list[int], n_best: int, quick: bool) -> list[str]:
    """The default selection: every case, or for `--quick` the essential ones."""
    k = mid_steps(ks)
    core = [
        "plain",
        *(f"posthoc_k{j}" for j in ks),
        "denoised_last3",
        "guided_last3",
        f"best_of_{n_best}",
        "encode_alone",
        f"correct_k{k}_alone",
    ]
    if quick:
        return core
    return [
        "plain",
        *(f"posthoc_k{j}" for j in ks),
        f"posthoc_k{k}_backtrack",
        f"posthoc_k{k}_diagnostics",
        "denoised_last3",
        "denoised_last3_tracked",
        "guided_last3",
        "guided_last3_tracked",
        f"best_of_{n_best}",
        "encode_alone",
        *(f"correct_k{j}_alone" for j in ks),
        f"correct_k{k}_reencode",
        f"correct_k{k}_pre_encoded",
    ]


# ---------------------------------------------------------------------------------
# Timing.


def compile_case(case: Case):
    """Compiles once, ahead of time; returns a zero-argument call and compile facts."""
    dynamic, static = eqx.partition(case.args(), eqx.is_array)

    def f(dynamic):
        return case.fn(*eqx.combine(dynamic, static))

    start = time.perf_counter()
    compiled = jax.jit(f).lower(dynamic).compile()
    compile_s = time.perf_counter() - start
    memory = None
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Not every backend reports it.
        stats = None
    if stats is not None:
        memory = {
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
        }
    return (lambda: compiled(dynamic)), compile_s, memory


def time_cases(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int):
    """Round-robin timing: each round calls every case once."""
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return times


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


# ---------------------------------------------------------------------------------
# Reporting.


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "device": f"{dev.platform}: {dev.device_kind}",
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": None if load is None else round(load[0], 2),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "equinox": eqx.__version__,
        "flowcorrect": fc.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One table per batch size: ms, ratio to the plain sampler, XLA working memory."""
    lines = []
    for run in result["runs"]:
        lines.append(f"**batch size {run['batch_size']}**")
        lines.append("")
        lines.append(
            "| case | what | median ms | min ms | added ms | ratio (median) | ratio (min) "
            "| XLA temp MiB | total MiB |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for row in run["rows"]:
            added = row["added_ms"]
            lines.append(
                f"| {row['case']} | {row['description']} | {_ms(row['median_ms'])} "
                f"| {_ms(row['min_ms'])} | {'' if added is None else _ms(added)} "
                f"| {row['ratio_median']:.3f} | {row['ratio_min']:.3f} "
                f"| {_mib(row['temp_bytes'])} | {_mib(row['total_bytes'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["setup"]
    peak = result["device_peak_bytes"]
    return "\n".join(
        [
            f"device: {env['device']} ({env['cpu_count']} CPUs visible, 1-min load average "
            f"{env['load_average_1m']} at start, {env['load_average_1m_end']} at end); "
            f"jax {env['jax']}, equinox {env['equinox']}, flowcorrect {env['flowcorrect']}",
            f"policy stand-in: {setup['policy_size']} (width {setup['policy_width']}, "
            f"{setup['policy_layers']} layers, {setup['policy_parameters']:,} parameters); "
            f"{setup['flow_steps']} Euler steps; chunk {setup['chunk']}",
            f"energy: EnergyModel hidden {setup['energy_hidden']}, {setup['energy_heads']} heads, "
            f"{setup['energy_parameters']:,} parameters; context {setup['context_tokens']} tokens "
            f"x {setup['context_dim']} ({setup['padding_tokens']} of them padding)",
            f"timing: median / min of {setup['repeats']} round-robin calls after "
            f"{setup['warmup']} warm-up calls; compile excluded",
            "device peak memory: "
            + (
                "not available on this backend"
                if peak is None
                else f"{_mib(peak)} MiB (process-wide peak over all cases)"
            ),
        ]
    )


# ---------------------------------------------------------------------------------
# Main.


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller context and policy, fewer repeats (< 1 min on a CPU)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        help="one or more batch sizes (default 1; --quick: 1)",
    )
    parser.add_argument(
        "--policy-size",
        choices=sorted(POLICY_SIZES),
        default=None,
        help="cost of the stand-in policy (default small)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help="context tokens per observation (default 816, openpi's prefix; --quick: 256)",
    )
    parser.add_argument(
        "--context-dim",
        type=int,
        default=None,
        help="context token width (default 2048, PaliGemma's; --quick: 512)",
    )
    parser.add_argument(
        "--energy-hidden", type=int, default=512, help="EnergyModel hidden width (reference: 512)"
    )
    parser.add_argument(
        "--energy-heads", type=int, default=8, help="EnergyModel attention heads (reference: 8)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[1, 3, 5],
        help="correction steps K of the post-hoc rows (default 1 3 5)",
    )
    parser.add_argument("--best-of", type=int, default=8, help="N of the BestOfN row")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per case (default 15; --quick: 5)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="which rows to run (default: all; --quick: the essential ones); "
        "'plain' is always run, first",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--markdown", type=str, default=None, help="write the markdown table here too"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.batch_size is None:
        args.batch_size = [1]
    if args.policy_size is None:
        args.policy_size = "small"
    if args.context_tokens is None:
        args.context_tokens = 256 if quick else 816
    if args.context_dim is None:
        args.context_dim = 512 if quick else 2048
    if args.repeats is None:
        args.repeats = 5 if quick else 15
    for name in (
        "context_tokens",
        "context_dim",
        "energy_hidden",
        "energy_heads",
        "repeats",
        "best_of",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch_size) or any(k < 1 for k in args.steps):
        parser.error("--batch-size and --steps must be >= 1")
    known = case_names(args.steps, args.best_of, quick=False)
    if args.cases is None:
        args.cases = case_names(args.steps, args.best_of, quick=quick)
    unknown = [name for name in args.cases if name not in known]
    if unknown:
        parser.error(f"unknown --cases {unknown}; choose from {known}")
    args.cases = ["plain", *(name for name in dict.fromkeys(args.cases) if name != "plain")]
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call of a compiled function is slower)")
    return args


def run_batch(args, batch: int, policy, energy, key) -> dict[str, Any]:
    s, d = args.context_tokens, args.context_dim
    k_tokens, k_noise = jax.random.split(key)
    tokens = jax.random.normal(k_tokens, (batch, s, d))
    # openpi pads the prompt to a fixed length; pad the last 1/16 of the tokens.
    padding = s // 16
    mask = jnp.broadcast_to(jnp.arange(s) < s - padding, (batch, s))
    noise_n = jax.random.normal(k_noise, (batch, args.best_of, HORIZON, ACTION_DIM))
    noise = noise_n[:, 0]
    calls, compile_s, memory = {}, {}, {}

    # The chunks the correction-alone rows correct: the plain sampler's own output.
    @functools.cache
    def actions():
        return calls["plain"]()[0]

    @functools.cache
    def encoded():
        return eqx.filter_jit(_encode)(energy, tokens, mask)

    every = build_cases(
        policy, energy, tokens, mask, noise, noise_n, actions, encoded, args.steps, args.best_of
    )
    by_name = {case.name: case for case in every}
    cases = [by_name[name] for name in args.cases]  # "plain" first: checked in parse_args
    for case in cases:
        calls[case.name], compile_s[case.name], memory[case.name] = compile_case(case)
    times = time_cases(calls, args.repeats, args.warmup)

    plain_median = statistics.median(times["plain"]) * 1e3
    plain_min = min(times["plain"]) * 1e3
    rows = []
    for case in cases:
        t = np.asarray(times[case.name]) * 1e3
        median, fastest = float(np.median(t)), float(np.min(t))
        mem = memory[case.name]
        rows.append(
            {
                "case": case.name,
                "group": case.group,
                "description": case.description,
                "median_ms": median,
                "min_ms": fastest,
                "iqr_ms": float(np.percentile(t, 75) - np.percentile(t, 25)),
                "added_ms": None
                if case.group == "alone" or case.name == "plain"
                else median - plain_median,
                "ratio_median": median / plain_median,
                "ratio_min": fastest / plain_min,
                "compile_s": compile_s[case.name],
                "temp_bytes": None if mem is None else mem["temp_bytes"],
                "total_bytes": None if mem is None else sum(mem.values()),
                "times_ms": [float(x) for x in t],
            }
        )
    return {"batch_size": batch, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns the results as a dict."""
    args = parse_args(argv)
    key = jax.random.key(args.seed)
    k_policy, k_energy, k_data = jax.random.split(key, 3)
    width, layers = POLICY_SIZES[args.policy_size]
    policy = StandInPolicy(args.context_dim, width, layers, key=k_policy)
    config = fc.EnergyModelConfig(
        context_dim=args.context_dim,
        action_dim=ACTION_DIM,
        hidden=args.energy_hidden,
        num_heads=args.energy_heads,
    )
    energy = eqx.nn.inference_mode(fc.EnergyModel(config, key=k_energy))
    env = environment()
    setup = {
        "quick": args.quick,
        "policy_size": args.policy_size,
        "policy_width": width,
        "policy_layers": layers,
        "policy_parameters": num_parameters(policy),
        "flow_steps": NUM_FLOW_STEPS,
        "chunk": [HORIZON, ACTION_DIM],
        "context_tokens": args.context_tokens,
        "context_dim": args.context_dim,
        "padding_tokens": args.context_tokens // 16,
        "energy_hidden": args.energy_hidden,
        "energy_heads": args.energy_heads,
        "energy_parameters": energy.num_parameters(),
        "steps": args.steps,
        "best_of": args.best_of,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "command": " ".join(
            ["python benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    start = time.perf_counter()
    runs = []
    for i, batch in enumerate(args.batch_size):
        runs.append(run_batch(args, batch, policy, energy, jax.random.fold_in(k_data, i)))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["load_average_1m_end"] = None if load is None else round(load[0], 2)
    result = {
        "environment": env,
        "setup": setup,
        "device_peak_bytes": device_peak_bytes(),
        "wall_s": time.perf_counter() - start,
        "runs": runs,
    }
    table = markdown_table(result)
    print(header(result))
    print()
    print(table)
    print(f"(benchmark wall time {result['wall_s']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header(result) + "\n\n" + table)
    return result


if __name__ == "__main__":
    main()
