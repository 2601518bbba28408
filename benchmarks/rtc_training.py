"""Training-time real-time chunking: its inference cost against plain sampling, and its
training step against plain flow matching, measured in one process.

The policy is the Meta-World harness policy (`flowcorrect.metaworld.policy`, the default
architecture: width 256, depth 3, horizon 8, 4 action dims, 39 observation dims) with
random weights (cost does not depend on the weights), converted with `with_token_time`
where per-token time is needed. Rows, all one `fc.sample` call on a batch of observations
with 10 Euler steps, compiled ahead of time, timed round-robin after warm-up (so load
from other processes falls on every row alike):

- `plain`: plain sampling of the scalar-time policy;
- `plain_token_time`: plain sampling of the per-token-time policy (its larger first
  layer);
- `plain_through_placement`: the same through a placement of one's own that takes the
  plain step (what every placement but `fc.Plain()` itself adds: the fallback's branch;
  the plain sampler is its own fallback);
- `trt`: [`flowcorrect.rtc.PrefixConditioned`][] on the per-token-time policy, delay 2 (the
  committed prefix in clean, no guidance);
- `rtc`: inference-time [`flowcorrect.RealTimeChunking`][] on the plain policy, delay 2,
  execution horizon 4 (one VJP per flow step).

Ratios are against `plain` in the same run. Training: one Adam step (value, gradient,
update) of plain flow matching and of [`flowcorrect.rtc.prefix_conditioned_loss`][] on a
batch of 256, timed the same way.

Run: python benchmarks/rtc_training.py                       (about a minute on a CPU)
     python benchmarks/rtc_training.py --out benchmarks/results/cpu_rtc_training.json
"""

import argparse
import json
import pathlib
import sys

import equinox as eqx
import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flowcorrect as fc  # noqa: E402
from benchmarks.harness import compile_fn, environment, summarise, time_round_robin  # noqa: E402
from flowcorrect.metaworld.policy import (  # noqa: E402
    FlowMLPPolicy,
    PolicyConfig,
    flow_matching_loss,
    with_token_time,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=100, help="observations per call (the "
                   "harness steps 100 environments at once)")
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--delay", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    config = PolicyConfig()
    plain = FlowMLPPolicy(config, np.zeros(config.obs_dim), np.ones(config.obs_dim),
                          key=jax.random.key(0))
    token = with_token_time(plain)
    h, a = plain.chunk_shape
    obs = jax.random.normal(jax.random.key(1), (args.batch, config.obs_dim))
    noise = jax.random.normal(jax.random.key(2), (args.batch, h, a))
    left = jax.random.normal(jax.random.key(3), (args.batch, h - 4, a))
    key = jax.random.key(4)

    def sampler(policy, placement):
        def f(policy, obs, noise, placement):
            return fc.sample(policy, obs, key, noise=noise, num_steps=args.num_steps,
                             placement=placement)[0]
        return compile_fn(f, policy, obs, noise, placement)

    class PlainStep(fc.Plain):
        pass

    rows = {
        "plain": sampler(plain, fc.Plain()),
        "plain_token_time": sampler(token, fc.Plain()),
        "plain_through_placement": sampler(token, PlainStep()),
        "trt": sampler(token, fc.rtc.PrefixConditioned(left, args.delay)),
        "rtc": sampler(plain, fc.RealTimeChunking(left, args.delay, 4)),
    }
    times = time_round_robin({k: v.call for k, v in rows.items()}, args.repeats, args.warmup)
    inference = {}
    base = summarise(times["plain"])["median_ms"]
    for name, c in rows.items():
        s = summarise(times[name])
        inference[name] = {**s, "ratio_to_plain": s["median_ms"] / base,
                           "compile_s": c.compile_s, "matmul_flops": c.matmul_flops}

    # Training: one optimiser step of each loss on a batch of 256.
    n = 256
    t_obs = jax.random.normal(jax.random.key(5), (n, config.obs_dim))
    t_chunks = jax.random.normal(jax.random.key(6), (n, h, a))
    opt = optax.adamw(1e-3, weight_decay=1e-4)
    delays = fc.rtc.ExponentialDelays(h - 4)

    def trainer(policy, loss):
        state = opt.init(eqx.filter(policy, eqx.is_inexact_array))

        def f(policy, state, o, c, k):
            value, grads = eqx.filter_value_and_grad(loss)(policy, o, c, k)
            updates, state = opt.update(grads, state, eqx.filter(policy, eqx.is_inexact_array))
            new = eqx.apply_updates(policy, updates)
            return eqx.filter(new, eqx.is_array), state, value
        return compile_fn(f, policy, state, t_obs, t_chunks, key, count_flops=False)

    train_rows = {
        "flow_matching": trainer(plain, flow_matching_loss),
        "prefix_conditioned": trainer(
            token, lambda pol, o, c, k: fc.rtc.prefix_conditioned_loss(pol, o, c, k, delays)),
    }
    ttimes = time_round_robin({k: v.call for k, v in train_rows.items()}, args.repeats,
                              args.warmup)
    tbase = summarise(ttimes["flow_matching"])["median_ms"]
    training = {name: {**summarise(ttimes[name]),
                       "ratio_to_flow_matching": summarise(ttimes[name])["median_ms"] / tbase}
                for name in train_rows}
    record = {"args": vars(args), "environment": environment(), "inference": inference,
              "training_step": training}
    print(f"{'row':<20} {'median ms':>10} {'ratio':>7}")
    for name, r in inference.items():
        print(f"{name:<20} {r['median_ms']:>10.2f} {r['ratio_to_plain']:>7.3f}")
    for name, r in training.items():
        print(f"train {name:<14} {r['median_ms']:>10.2f} {r['ratio_to_flow_matching']:>7.3f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
