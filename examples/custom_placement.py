"""Write your own placement: `Trace` records the flow's path and wraps any other.

A placement decides what happens at each Euler step of the flow. `Trace(inner)` lets
`inner` take the step and keeps every intermediate `x_t` in its state, so you can see
where a correction acts: `Trace(fc.Guided(...))` bends the whole path,
`Trace(fc.Denoised(...))` shifts it at the scheduled steps, `Trace(fc.Plain())` is the
policy alone. The docs' placement figure is drawn from these paths
(docs/scripts/make_figures.py).

Run: python examples/custom_placement.py   (a few seconds on a CPU)
"""

import argparse
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc

HORIZON, ACTION_DIM = 8, 2


class TraceInfo(eqx.Module):
    """`path`: `(batch, num_steps + 1, horizon, action_dim)`, `x_t` from the noise to the
    final chunk; `inner`: the wrapped placement's own diagnostics."""

    path: jax.Array
    inner: Any


class Trace(fc.AbstractInterleaved):
    """Takes each step with `inner` and records the samples after it."""

    inner: fc.AbstractInterleaved

    @property
    def needs_energy(self):
        return self.inner.needs_energy

    def init(self, flow, x):
        path = jnp.zeros((flow.num_steps + 1, *x.shape), x.dtype).at[0].set(x)
        return self.inner.init(flow, x), path

    def step(self, flow, x, t, dt, index, state, keys):
        inner_state, path = state
        x_next, v, inner_state = self.inner.step(flow, x, t, dt, index, inner_state, keys)
        return x_next, v, (inner_state, path.at[index + 1].set(x_next))

    def info(self, flow, state):
        inner_state, path = state
        return TraceInfo(jnp.swapaxes(path, 0, 1), self.inner.info(flow, inner_state))


class LinearPolicy(fc.AbstractPolicy):
    """The exact velocity of openpi's flow from N(0, I) to N(mean, std^2 I) (the
    observation is the mean chunk); the energy's context is the goal chunk."""

    std: jax.Array
    goal: jax.Array
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(HORIZON, ACTION_DIM))
    convention: fc.AbstractConvention = fc.OpenPI()

    def condition(self, observation):
        return observation

    def velocity(self, cond, x, t):
        var = t**2 + (1 - t) ** 2 * self.std**2
        centred = x - (1 - t) * cond
        return t / var * centred - (cond + (1 - t) * self.std**2 / var * centred)

    def energy_context(self, cond):
        return self.goal


def traces(policy, observation, key, energy, batch_size=4, num_steps=10):
    """The path of each placement, from the same noise, as `{name: TraceInfo}`."""
    placements = {
        "plain": fc.Plain(),
        "denoised, last 3 steps": fc.Denoised(fc.reference_recipe(), fc.LastSteps(3)),
        "guided, every step": fc.Guided(weight=0.5),
    }
    out = {}
    for name, placement in placements.items():
        _, info = fc.sample(
            policy,
            observation,
            key,
            batch_size=batch_size,
            num_steps=num_steps,
            placement=Trace(placement),
            energy=energy,
        )
        out[name] = info.placement.placement
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    mean = jnp.broadcast_to(jnp.linspace(0.0, 1.0, HORIZON)[:, None], (HORIZON, ACTION_DIM))
    goal = mean + 0.5  # the energy wants the chunk half a unit higher than the policy
    policy = LinearPolicy(std=jnp.array(0.1), goal=goal)
    energy = fc.SquaredDistance(weight=1.0)
    observation = jnp.broadcast_to(mean, (args.batch, HORIZON, ACTION_DIM))
    key = jax.random.key(0)

    # Trace(Plain()) changes nothing: the same chunks as the plain sampler.
    plain, _ = fc.sample(policy, observation, key, batch_size=args.batch)
    traced, info = fc.sample(policy, observation, key, batch_size=args.batch,
                             placement=Trace(fc.Plain()))  # fmt: skip
    assert bool(jnp.all(plain == traced))
    assert bool(jnp.all(info.placement.placement.path[:, -1] == plain))

    paths = traces(policy, observation, key, energy, batch_size=args.batch)
    print("mean shift of x_t from the plain path, after each flow step (the energy wants +0.5)")
    print(f"{'placement':24s} " + " ".join(f"{i:6d}" for i in range(11)))
    for name, trace in paths.items():
        offset = (trace.path - paths["plain"].path).mean(axis=(0, 2, 3))
        print(f"{name:24s} " + " ".join(f"{float(o):6.3f}" for o in offset))


if __name__ == "__main__":
    main()
