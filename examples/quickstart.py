"""Quickstart: correct a biased flow policy with a hand-written energy, every placement.

The policy is a flow-matching velocity field whose samples are known in closed form
(Gaussian around a chunk that misses the goal by a fixed bias), so the effect of each
placement can be read off exactly. The energy is a cost a user could write by hand:
reach the goal with the last actions, stay inside the action bounds.

Run: python examples/quickstart.py
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc

HORIZON, ACTION_DIM = 16, 4


class GaussianPolicy(fc.AbstractPolicy):
    """The exact velocity of openpi's flow from N(0, I) to N(mean, std^2 I).

    With x_t = t * eps + (1 - t) * a, the velocity is E[eps - a | x_t], which for
    Gaussians is linear in x_t. An observation is a pair: the chunk the policy centres
    on, and the goal's chunk, which is what the energy reads (in a real policy, the
    once-per-observation pass over images and text would produce both).
    """

    std: jax.Array
    chunk_shape: tuple[int, int] = eqx.field(static=True, default=(HORIZON, ACTION_DIM))
    convention: fc.AbstractConvention = fc.OpenPI()

    def condition(self, observation):
        return observation  # nothing expensive to do once per observation here

    def velocity(self, cond, x, t):
        mean, _ = cond
        var = t**2 + (1 - t) ** 2 * self.std**2
        centred = x - (1 - t) * mean
        eps_hat = t / var * centred
        a_hat = mean + (1 - t) * self.std**2 / var * centred
        return eps_hat - a_hat

    def energy_context(self, cond):
        _, goal_chunk = cond
        return goal_chunk


def expert_chunk(goal):
    # A smooth reach from the origin to `goal` over the horizon.
    s = jnp.linspace(0.0, 1.0, HORIZON)[:, None]
    return (3 * s**2 - 2 * s**3) * goal[None, :]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="observations to average over")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    key_goal, key_sample = jax.random.split(jax.random.key(args.seed))
    goals = jax.random.uniform(key_goal, (args.batch, ACTION_DIM), minval=-0.8, maxval=0.8)
    experts = jax.vmap(expert_chunk)(goals)
    bias = jnp.linspace(0.0, 0.25, HORIZON)[:, None]  # the policy drifts off the goal
    policy_means = experts + bias[None]
    policy = GaussianPolicy(std=jnp.array(0.05))

    # Energy: squared distance of the last four actions to the goal's chunk, plus a
    # penalty outside the bounds [-1, 1]. Its context is the expert chunk (what a goal
    # cost knows); the policy's context is its own mean.
    weight = jnp.zeros((HORIZON, ACTION_DIM)).at[-4:].set(4.0)
    energy = fc.SumEnergy([fc.SquaredDistance(weight=weight), fc.BoundsPenalty(-1.0, 1.0)])
    corrector = fc.reference_recipe(num_steps=3, alpha=0.1, clip_frac=0.2)

    placements = {
        "none": fc.Plain(),
        "post-hoc (reference recipe)": fc.PostHoc(corrector),
        "denoised, last 3 steps": fc.Denoised(corrector, schedule=fc.LastSteps(3)),
        "guided, last 3 steps": fc.Guided(schedule=fc.LastSteps(3), weight=0.5),
        "best of 8": fc.BestOfN(8),
        "best of 8, then post-hoc": fc.PostHoc(corrector, inner=fc.BestOfN(8)),
    }
    print(f"{args.batch} observations, chunk {HORIZON}x{ACTION_DIM}, 10 Euler steps\n")
    print(f"{'placement':30s} {'energy':>8s} {'dist. to expert':>16s} {'fallbacks':>9s}")
    for name, placement in placements.items():
        actions, info = fc.sample(
            policy,
            (policy_means, experts),
            key_sample,
            batch_size=args.batch,
            placement=placement,
            energy=energy,  # with Plain() it only scores
        )
        e = jax.vmap(energy)(experts, actions)
        dist = jnp.linalg.norm(actions - experts, axis=(1, 2))
        print(
            f"{name:30s} {float(e.mean()):8.4f} {float(dist.mean()):16.4f} "
            f"{int(info.fell_back.sum()):9d}"
        )


if __name__ == "__main__":
    main()
