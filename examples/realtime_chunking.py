"""Real-time chunking on a toy bimodal policy: the robot keeps moving while the policy thinks.

The policy is the exact flow of a two-mode chunk distribution (pass an obstacle on the
left or on the right, equally likely). Executed asynchronously with an inference delay,
naive switching draws each new chunk independently, so the robot hops between the
two modes at chunk switches; real-time chunking guides each new chunk towards the
actions already committed, so it keeps its mode and switches smoothly.

Run: python examples/realtime_chunking.py
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc

HORIZON, ACTION_DIM = 8, 2


class TwoModePolicy(fc.AbstractPolicy):
    """The exact velocity of openpi's flow from N(0, I) to an equal mixture of
    N(+offset, std^2) and N(-offset, std^2) in the second action dimension (the first
    dimension moves forward at a constant speed)."""

    offset: jax.Array
    std: jax.Array
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(HORIZON, ACTION_DIM))
    convention: fc.AbstractConvention = fc.OpenPI()

    def condition(self, observation):
        return observation

    def velocity(self, cond, x, t):
        means = jnp.stack([jnp.stack([jnp.ones(HORIZON), s * self.offset * jnp.ones(HORIZON)],
                                     axis=-1) for s in (1.0, -1.0)])  # (2, H, A)
        var = t**2 + (1 - t) ** 2 * self.std**2
        centred = x[None] - (1 - t) * means
        logp = -0.5 * jnp.sum(centred**2, axis=(1, 2)) / var
        p = jax.nn.softmax(logp)[:, None, None]
        eps_hat = t / var * centred
        a_hat = means + (1 - t) * self.std**2 / var * centred
        return jnp.sum(p * (eps_hat - a_hat), axis=0)

    def energy_context(self, cond):
        return cond


@eqx.filter_jit
def plain_chunk(policy, key):
    return fc.sample(policy, jnp.zeros(()), key, num_steps=10)[0]


@eqx.filter_jit
def rtc_chunk(policy, key, placement):
    return fc.sample(policy, jnp.zeros(()), key, num_steps=10, placement=placement)[0]


def run(policy, method: str, delay: int, execute: int, steps: int, seed: int):
    queue = fc.rtc.ActionQueue(execution_horizon=execute, inference_delay=delay)
    key = jax.random.key(seed)
    previous, jumps, flips = None, [], 0
    for _ in range(steps):
        if queue.inference_due:
            request = queue.request()
            key, sub = jax.random.split(key)
            if method == "rtc" and request.prev_chunk_left_over is not None:
                placement = fc.RealTimeChunking(
                    jnp.asarray(request.prev_chunk_left_over), request.inference_delay,
                    request.execution_horizon, max_guidance_weight=5.0)
                chunk = rtc_chunk(policy, sub, placement)
            else:
                chunk = plain_chunk(policy, sub)
            queue.submit(np.asarray(chunk))
        action, switched = queue.pop()
        if switched:
            jumps.append(float(np.linalg.norm(action - previous)))
            flips += int(np.sign(action[1]) != np.sign(previous[1]))
        previous = action
    return np.mean(jumps), flips, len(jumps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=int, default=2)
    parser.add_argument("--execute", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    policy = TwoModePolicy(jnp.asarray(1.0), jnp.asarray(0.1))
    print(f"horizon {HORIZON}, execute {args.execute}, delay {args.delay}, {args.steps} steps")
    results = {}
    for method in ("naive", "rtc"):
        jump, flips, switches = run(policy, method, args.delay, args.execute, args.steps,
                                    args.seed)
        results[method] = (jump, flips)
        print(f"{method:>6}: mean jump at a switch {jump:.3f}; mode flips {flips} of "
              f"{switches} switches")
    return results


if __name__ == "__main__":
    main()
