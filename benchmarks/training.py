"""Training cost: `fc.train.fit` against a minimal hand-written optax InfoNCE loop.

Both train the same small [`flowcorrect.MLPEnergy`][] (vector observations, hidden 64)
with InfoNCE over a batch of 256 with 8 noise negatives per row and a gradient penalty,
with the same optimiser (`fc.train.make_optimizer`: global-norm clipping, AdamW on warm-up +
cosine). The hand-written loop is what a user would write: one `jax.jit` step over
(params, opt_state, batch, key), batches drawn on the host and put on the device.

Measured, in this one process:

- compile: the time of the first step (tracing + XLA compilation + one run, plus any
  one-off set-up such as the optimiser's initial state) minus the median steady step,
  each loop in a fresh Python process of its own (so neither inherits the other's
  caches), the fastest of `--compile-repeats`;
- per step: wall time of `--steps` steps after warm-up, divided by the steps, the whole
  loop included (Python, data, transfers), ending with `block_until_ready`; repeated
  `--repeats` times, alternating the two loops, median and fastest reported.

Run: python benchmarks/training.py                  (about a minute on a CPU)
     python benchmarks/training.py --quick          (a few seconds)
     python benchmarks/training.py --out training.json
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flowcorrect as fc

OBS_DIM, HORIZON, ACTION_DIM = 39, 4, 4  # a Meta-World-sized state and a short chunk.


def make_data(num: int, seed: int = 0) -> fc.train.Batch:
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((num, OBS_DIM)).astype(np.float32)
    ramp = np.linspace(0.5, 1.5, HORIZON, dtype=np.float32)
    actions = ramp[None, :, None] * obs[:, None, :ACTION_DIM]
    actions = actions + 0.02 * rng.standard_normal(actions.shape).astype(np.float32)
    return fc.train.Batch(obs, actions)


def hand_written(model: Any, optimizer: Any, tau: float, gp: float, num_neg: int, scale: float):
    """A minimal jitted InfoNCE step, written directly against the MLP energy's split."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def energies(m, obs, actions, negatives):
        enc = jax.vmap(m.encode)(obs)  # (B, hidden)
        emb = jax.vmap(m.embed_actions)(actions)  # (B, hidden)
        e = jax.vmap(lambda s: jax.vmap(lambda a: m.score_embedded(s, a))(emb))(enc)
        emb_neg = jax.vmap(jax.vmap(m.embed_actions))(negatives)  # (B, K, hidden)
        e_neg = jax.vmap(lambda s, a: jax.vmap(lambda x: m.score_embedded(s, x))(a))(enc, emb_neg)
        return enc, e, e_neg

    def grad_norms(m, enc, chunks):
        def one(s, a):
            return jnp.linalg.norm(jax.grad(lambda x: m.score_embedded(s, m.embed_actions(x)))(a))

        return jax.vmap(lambda s, cs: jax.vmap(lambda a: one(s, a))(cs))(enc, chunks)

    def loss_fn(p, obs, actions, negatives):
        m = eqx.combine(p, static)
        enc, e, e_neg = energies(m, obs, actions, negatives)
        logits = -jnp.concatenate([e, e_neg], axis=1) / tau
        infonce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))
        chunks = jnp.concatenate([actions[:, None], negatives], axis=1)
        penalty = jnp.mean(jnp.square(grad_norms(m, enc, chunks)))
        return infonce + gp * penalty

    @jax.jit
    def step(p, opt_state, obs, actions, key):
        noise = jax.random.normal(key, (actions.shape[0], num_neg, *actions.shape[1:]))
        negatives = actions[:, None] + scale * noise
        loss, grads = jax.value_and_grad(loss_fn)(p, obs, actions, negatives)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    return params, static, step


def run_hand(hand: Any, optimizer: Any, data: fc.train.ShuffledBatches, steps: int, start: int,
             state: Any = None) -> tuple[float, Any]:  # fmt: skip
    params, _, step = hand
    if state is None:
        state = (params, optimizer.init(params))
    p, o = state
    key = jax.random.key(0)
    t0 = time.perf_counter()
    for i in range(start, start + steps):
        batch = data(i)
        p, o, loss = step(p, o, jnp.asarray(batch.context), jnp.asarray(batch.actions),
                          jax.random.fold_in(key, i))  # fmt: skip
    jax.block_until_ready(p)
    return time.perf_counter() - t0, (p, o)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument("--first-step-only", choices=["fit", "hand"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.compile_repeats = 10, 1, 1

    config = fc.MLPEnergyConfig(
        obs_dim=OBS_DIM, action_dim=ACTION_DIM, horizon=HORIZON, hidden=args.hidden, depth=2
    )
    model = fc.MLPEnergy(config, key=jax.random.key(0))
    data = fc.train.ShuffledBatches(make_data(args.batch * 16), args.batch)
    train = fc.train.TrainConfig(num_steps=10**6, grad_penalty=0.1, log_every=50, warmup_steps=10)
    optimizer = fc.train.make_optimizer(train)
    hand = hand_written(model, optimizer, train.tau, train.grad_penalty, args.negatives, 0.3)
    negatives = [fc.train.NoiseNegatives(args.negatives, 0.3)]

    def fit_steps(n: int) -> float:
        cfg = fc.train.TrainConfig(**{**train.to_dict(), "num_steps": n})
        t0 = time.perf_counter()
        fc.train.fit(model, data, key=jax.random.key(1), config=cfg, optimizer=optimizer,
               negatives=negatives, progress=False)  # fmt: skip
        return time.perf_counter() - t0

    if args.first_step_only == "fit":
        print(json.dumps({"first": fit_steps(1)}))
        return {}
    if args.first_step_only == "hand":
        print(json.dumps({"first": run_hand(hand, optimizer, data, 1, 0)[0]}))
        return {}

    def first_step(which: str) -> float:
        cmd = [sys.executable, __file__, "--first-step-only", which, "--batch", str(args.batch),
               "--hidden", str(args.hidden), "--negatives", str(args.negatives)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["first"]

    # Fresh processes, alternating, the fastest of each.
    firsts: dict[str, list[float]] = {"fit": [], "hand": []}
    for _ in range(args.compile_repeats):
        for which in firsts:
            firsts[which].append(first_step(which))
    first_fit, first_hand = min(firsts["fit"]), min(firsts["hand"])
    fit_steps(1)  # warm this process's cache
    _, state = run_hand(hand, optimizer, data, 1, 0)
    fit_times, hand_times = [], []
    for _ in range(args.repeats):
        # A fit of n steps includes its own set-up; the difference of two lengths cancels it.
        a, b = fit_steps(args.steps + 1), fit_steps(1)
        fit_times.append((a - b) / args.steps)
        t, state = run_hand(hand, optimizer, data, args.steps, 1, state)
        hand_times.append(t / args.steps)
    fit_step, hand_step = statistics.median(fit_times), statistics.median(hand_times)
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "batch": args.batch,
        "hidden": args.hidden,
        "negatives": args.negatives,
        "parameters": model.num_parameters(),
        "fit": {
            "step_ms": 1e3 * fit_step,
            "min_step_ms": 1e3 * min(fit_times),
            "compile_s": first_fit - fit_step,
        },  # fmt: skip
        "hand_written": {
            "step_ms": 1e3 * hand_step,
            "min_step_ms": 1e3 * min(hand_times),
            "compile_s": first_hand - hand_step,
        },  # fmt: skip
    }
    result["step_ratio"] = fit_step / hand_step
    result["compile_ratio"] = result["fit"]["compile_s"] / result["hand_written"]["compile_s"]
    print(f"InfoNCE training, MLPEnergy hidden {args.hidden} ({result['parameters']} params), "
          f"batch {args.batch}, {args.negatives} negatives, gradient penalty on; "
          f"{result['backend']}: {result['device']}")  # fmt: skip
    print(f"{'loop':14s} {'step ms':>9s} {'min ms':>9s} {'compile s':>10s}")
    for name in ("fit", "hand_written"):
        r = result[name]
        print(f"{name:14s} {r['step_ms']:9.2f} {r['min_step_ms']:9.2f} {r['compile_s']:10.2f}")
    print(f"fit / hand-written: step {result['step_ratio']:.2f}x, "
          f"compile {result['compile_ratio']:.2f}x")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
