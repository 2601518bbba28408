"""One InfoNCE training step: ours against the reference's replicated computation.

The reference scores every (context i, chunk j) pair of a batch by materialising the
pairs: each context's tokens are repeated `B` times and every pair is encoded from
scratch, so a step holds `B^2 * S * D` context values and encodes `B^2` contexts.
[`flowcorrect.train.info_nce`][] encodes each context once, embeds each chunk once and scores
the pairs by broadcasting. Both compute the same loss (the test checks it, with the
gradient); this benchmark times one value-and-gradient step of each, at batch sizes
`B`, and reports XLA's planned memory and where the replicated one does not fit.

Same process, same inputs, both compiled ahead of time (compile reported apart), two
warm-up calls, then `--repeats` calls of each, alternating, each synchronised with
`block_until_ready`; median and fastest. On CPU the sizes are scaled down (`--seq`,
`--dim`); on a GPU pass `--seq 816 --dim 2048` (openpi's prefix). A replicated step whose
materialised pairs alone exceed `--memory-limit-gb` is not run (reported as out of
memory: the bytes it would need); one that fails to allocate on the device is reported
the same way.

Run: python benchmarks/infonce.py                      (CPU, scaled; about a minute)
     python benchmarks/infonce.py --seq 816 --dim 2048 --out infonce.json    (GPU)
"""

import argparse
import json
import platform
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc

HORIZON, ACTION_DIM, TAU = 50, 32, 0.5


def make_model(dim: int, hidden: int, key: Any) -> fc.EnergyModel:
    config = fc.EnergyModelConfig(context_dim=dim, action_dim=ACTION_DIM, hidden=hidden,
                                  num_heads=4)  # fmt: skip
    # Dropout off (inference mode) so both ways compute the same deterministic loss.
    return eqx.nn.inference_mode(fc.EnergyModel(config, key=key))


def make_inputs(batch: int, seq: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((batch, seq, dim)).astype(np.float32)
    mask = np.ones((batch, seq), bool)
    mask[:, seq - seq // 8 :] = False  # a padded tail, as openpi's prompt has
    actions = rng.standard_normal((batch, HORIZON, ACTION_DIM)).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(actions)


def ours(params, static, tokens, mask, actions):
    """`fc.train.info_nce`: contexts encoded once, pairs scored by broadcasting."""

    def loss(p):
        model = eqx.combine(p, static)
        return fc.train.info_nce(model, fc.TokenContext(tokens, mask), actions, tau=TAU)[0]

    return jax.value_and_grad(loss)(params)


def replicated(params, static, tokens, mask, actions):
    """The reference's way: every pair materialised and encoded from scratch."""
    batch = tokens.shape[0]

    def loss(p):
        model = eqx.combine(p, static)
        rep_tokens = jnp.repeat(tokens, batch, axis=0)  # (B*B, S, D): context i, B times
        rep_mask = jnp.repeat(mask, batch, axis=0)
        rep_actions = jnp.tile(actions, (batch, 1, 1))  # chunk j for every context
        energy = jax.vmap(lambda t, m, a: model.score(model.encode(fc.TokenContext(t, m)), a))(
            rep_tokens, rep_mask, rep_actions
        ).reshape(batch, batch)
        logits = -energy / TAU
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    return jax.value_and_grad(loss)(params)


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=1).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else memory.temp_size_in_bytes
    return compiled, seconds, temp


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(batch: int, args, model) -> dict[str, Any]:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tokens, mask, actions = make_inputs(batch, args.seq, args.dim, args.seed)
    inputs = (params, static, tokens, mask, actions)
    pairs_bytes = batch * batch * args.seq * args.dim * 4
    row: dict[str, Any] = {"batch": batch, "replicated_pairs_bytes": pairs_bytes}
    fns = {"ours": ours}
    if pairs_bytes > args.memory_limit_gb * 1e9:
        row["replicated"] = {"out_of_memory": True,
                             "reason": f"its pairs alone need {pairs_bytes / 1e9:.1f} GB > "
                                       f"--memory-limit-gb {args.memory_limit_gb}"}  # fmt: skip
    else:
        fns["replicated"] = replicated
    compiled = {}
    for name, fn in fns.items():
        try:
            compiled[name], seconds, temp = _compile(fn, *inputs)
            for _ in range(2):
                jax.block_until_ready(compiled[name](params, tokens, mask, actions))
        except Exception as error:  # a device allocation failure is a result here
            if not _is_oom(error):
                raise
            row[name] = {"out_of_memory": True, "reason": str(error).splitlines()[0][:200]}
            compiled.pop(name, None)
            continue
        row[name] = {"compile_s": seconds, "temp_bytes": temp, "times_s": []}
    for _ in range(args.repeats):  # alternating, so load falls on both alike
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, tokens, mask, actions))
            row[name]["times_s"].append(time.perf_counter() - start)
    for name in compiled:
        times = row[name]["times_s"]
        row[name]["median_s"] = statistics.median(times)
        row[name]["min_s"] = min(times)
    if "median_s" in row.get("replicated", {}):
        row["speedup"] = row["replicated"]["median_s"] / row["ours"]["median_s"]
    return row


def _cell(entry: dict[str, Any], key: str, scale: float, fmt: str) -> str:
    if entry.get("out_of_memory"):
        return "OOM"
    value = entry.get(key)
    return "" if value is None else format(value * scale, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| B | ours ms | replicated ms | replicated / ours | ours temp MiB | "
        "replicated temp MiB | replicated pairs GB |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        o, p = r["ours"], r["replicated"]
        speed = f"{r['speedup']:.1f}" if "speedup" in r else ""
        lines.append(
            f"| {r['batch']} | {_cell(o, 'median_s', 1e3, '.1f')} | "
            f"{_cell(p, 'median_s', 1e3, '.1f')} | {speed} | "
            f"{_cell(o, 'temp_bytes', 2**-20, '.1f')} | {_cell(p, 'temp_bytes', 2**-20, '.1f')} | "
            f"{r['replicated_pairs_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--seq", type=int, default=128, help="context tokens (openpi: 816)")
    parser.add_argument("--dim", type=int, default=256, help="token width (openpi: 2048)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-limit-gb", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = make_model(args.dim, args.hidden, jax.random.key(args.seed))
    device = jax.devices()[0]
    header = (
        f"InfoNCE value-and-grad, S={args.seq}, D={args.dim}, H={HORIZON}, A={ACTION_DIM}, "
        f"EnergyModel hidden {args.hidden}; {device.platform} ({device.device_kind}), "
        f"jax {jax.__version__}; median of {args.repeats} alternating calls"
    )
    print(header)
    rows = []
    for batch in args.batches:
        rows.append(measure(batch, args, model))
        print(f"  B={batch} done", flush=True)
    print(table(rows))
    record = {
        "machine": platform.platform(), "processor": platform.processor(),
        "device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
        "equinox": eqx.__version__, "settings": vars(args), "header": header, "rows": rows,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
