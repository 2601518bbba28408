"""Timing harness: ahead-of-time compiles, round-robin synchronised timing, memory and
FLOPs of compiled functions. Nothing here knows about policies or placements."""

import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np


@dataclasses.dataclass
class Compiled:
    """A zero-argument call of compiled code, and what compiling it told us."""

    call: Callable[[], Any]  # on the arguments it was compiled with
    compile_s: float
    memory: dict[str, int] | None  # XLA's compiled memory analysis, bytes
    xla_flops: float | None  # XLA's cost analysis (counts a loop body ONCE: see below)
    matmul_flops: float | None  # matrix-multiply FLOPs with loop trip counts (jaxpr)
    matmul_flops_min: float | None = None  # the same, cheapest branch of every cond
    run: Callable[..., Any] | None = None  # on new arguments of the same structure


def compile_fn(fn: Callable[..., Any], *args: Any, count_flops: bool = True) -> Compiled:
    """Compiles `fn(*args)` ahead of time, once: arrays are traced arguments, everything
    else (static config, Python numbers marked static by the caller's closure) is baked
    in. `count_flops=False` leaves the matmul counts out (a function whose loop is a
    `while` with a trip count the jaxpr does not know would be undercounted)."""
    dynamic, static = eqx.partition(args, eqx.is_array)

    def f(dynamic):
        return fn(*eqx.combine(dynamic, static))

    start = time.perf_counter()
    lowered = jax.jit(f).lower(dynamic)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    def run(*new_args):
        # Splitting the arguments is the dispatch work a `jax.jit` call does too.
        return compiled(eqx.partition(new_args, eqx.is_array)[0])

    # One more trace (not a compile) gives both FLOP counts.
    high, low = matmul_flops(f, dynamic, branch=(max, min)) if count_flops else (None, None)
    return Compiled(
        call=lambda: compiled(dynamic),
        run=run,
        compile_s=compile_s,
        memory=memory_analysis(compiled),
        xla_flops=xla_flops(compiled),
        matmul_flops=high,
        matmul_flops_min=low,
    )


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Not every backend reports it.
        return None
    if stats is None:
        return None
    return {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }


def xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def matmul_flops(fn: Callable[..., Any], *args: Any, branch: Any = max) -> Any:
    """Matrix-multiply FLOPs of `fn(*args)`, counted on its jaxpr: `2 * m * n * k` per
    `dot_general`, a `scan` body times its length, and of a `cond`'s branches the
    costlier (`branch=max`, an upper bound) or the cheaper (`branch=min`). The sampler's
    fallback (re-running the plain flow when a corrected chunk is not finite) is a
    `cond` that normally takes its cheap branch, so `min` is the usual cost of a
    post-hoc row; a schedule of interleaved steps lies between the two.

    XLA's `cost_analysis()` counts the body of a loop once whatever its trip count (10
    flow steps and 18 scanned layers count as one), so it cannot compare a sampler with
    a corrected one; this count can. Elementwise work is left out: at Pi0's sizes the
    matrix multiplies are the floor. A `while` loop (unknown trip count) counts once.

    `branch` may be a tuple of such choices: the jaxpr is traced once and a tuple of
    counts, one per choice, comes back."""
    choices = branch if isinstance(branch, tuple) else (branch,)
    try:
        jaxpr = jax.make_jaxpr(fn)(*args)
    except Exception:
        counts = [None] * len(choices)
    else:
        counts = [float(_jaxpr_flops(jaxpr.jaxpr, b)) for b in choices]
    return tuple(counts) if isinstance(branch, tuple) else counts[0]


def _jaxpr_flops(jaxpr: Any, branch: Callable = max) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
            total += 2 * math.prod(lhs) * math.prod(rhs_free)
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr, branch)
        elif name == "cond":
            total += branch(_jaxpr_flops(b.jaxpr, branch) for b in eqn.params["branches"])
        else:
            for sub in _sub_jaxprs(eqn.params):
                total += _jaxpr_flops(sub, branch)
    return total


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def time_round_robin(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each entry, timed round-robin: every round calls each entry
    once, so load from other processes falls on all rows alike. Each call is timed to
    `jax.block_until_ready` of its result (a timer stopped before the device finishes
    measures dispatch, not work). `warmup` untimed calls per entry come first."""
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


def summarise(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(statistics.median(ms)),
        "min_ms": float(ms.min()),
        "iqr_ms": float(np.percentile(ms, 75) - np.percentile(ms, 25)),
    }


def device_peak_bytes() -> int | None:
    """The device's process-wide peak memory (GPU/TPU); None where it is not reported
    (the CPU backend)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def environment() -> dict[str, Any]:
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {dev.device_kind}",
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_average(),
        "machine": platform.machine(),
        "node": platform.node(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "equinox": eqx.__version__,
        "flowcorrect": version("flowcorrect"),
    }


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
