"""Write your own energy and corrector, check them with flowcorrect.testing, use them.

The energy is a cost a user knows and the demonstrations did not show: reach a goal with
the last action of the chunk, without jerky motion. It splits into `encode` (the goal's
work, once per observation) and `score` (per chunk), so correction steps pay for
`score` only. The corrector is heavy-ball momentum, a stateful update rule: its state
(the running step) is threaded through `init` / `step`, and the library's wrappers
(clipping, monotone backtracking, repetition) compose around it unchanged.

Run: python examples/custom_energy_corrector.py   (a few seconds on a CPU)
"""

import argparse

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import flowcorrect as fc
from flowcorrect.testing import check_corrector, check_energy

HORIZON, ACTION_DIM = 16, 4


class ReachSmoothly(fc.AbstractEnergy):
    """`w_goal * ||a_H - goal||^2 + w_jerk * sum_k ||a_{k+1} - 2 a_k + a_{k-1}||^2`.

    The context is the goal, `(action_dim,)`.
    """

    w_goal: Float[Array, ""]
    w_jerk: Float[Array, ""]

    def __init__(self, w_goal=1.0, w_jerk=0.5):
        # Arrays, not Python floats: new weights do not recompile a jitted correction.
        self.w_goal = jnp.asarray(w_goal, jnp.float32)
        self.w_jerk = jnp.asarray(w_jerk, jnp.float32)

    def encode(self, context):
        return context  # nothing to precompute for a goal vector; a VLM would go here

    def score(self, encoded, actions):
        reach = jnp.sum((actions[-1] - encoded) ** 2)
        jerk = jnp.sum((actions[2:] - 2 * actions[1:-1] + actions[:-2]) ** 2)
        return self.w_goal * reach + self.w_jerk * jerk


class HeavyBall(fc.AbstractCorrector):
    """`m <- beta * m + grad E(a)`, `a <- a - alpha * m` (Polyak's heavy ball).

    The state is `m`, shaped like the chunk; a stateless corrector would use `None`.
    """

    alpha: Float[Array, ""]
    beta: Float[Array, ""]

    def __init__(self, alpha=0.05, beta=0.8):
        self.alpha = jnp.asarray(alpha, jnp.float32)
        self.beta = jnp.asarray(beta, jnp.float32)

    def __check_init__(self):
        # Runs when the Module is built (not when jit rebuilds it from its leaves):
        # a bad value fails at once, saying how to fix the call.
        if not 0 <= float(self.beta) < 1:
            raise ValueError(f"HeavyBall(beta=...) must be in [0, 1), got {float(self.beta)}.")

    def init(self, energy, actions):
        return jnp.zeros_like(actions)

    def step(self, energy, actions, state, key):
        momentum = self.beta.astype(actions.dtype) * state + jax.grad(energy)(actions)
        new = actions - self.alpha.astype(actions.dtype) * momentum
        return new, momentum, jnp.asarray(1, jnp.int32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    k_goal, k_noise = jax.random.split(jax.random.key(0))
    goals = jax.random.uniform(k_goal, (args.batch, ACTION_DIM), minval=-1.0, maxval=1.0)
    ramp = jnp.linspace(0.0, 1.0, HORIZON)[:, None]
    # What a policy might hand us: a reach that stops short of the goal, with jitter.
    actions = 0.7 * ramp[None] * goals[:, None] + 0.05 * jax.random.normal(
        k_noise, (args.batch, HORIZON, ACTION_DIM)
    )
    energy = ReachSmoothly()

    # The laws flowcorrect holds its own energies and correctors to: finite, shaped,
    # encode/score consistent, jit == no jit, batch == per sample, no recompiles.
    check_energy(energy, goals[0], actions[0], other_energy=ReachSmoothly(2.0, 0.1))
    check_corrector(fc.Repeat(HeavyBall(), 3), energy, goals[0], actions[0])
    print("check_energy and check_corrector passed")

    correctors = {
        "reference recipe (K=3)": fc.reference_recipe(),
        "heavy ball x10": fc.Repeat(HeavyBall(), 10),
        "heavy ball x10, clipped, monotone": fc.Repeat(
            fc.Backtrack(fc.ClipStep(HeavyBall(), 0.2)), 10
        ),
    }
    print(f"\n{args.batch} chunks {HORIZON}x{ACTION_DIM}\n")
    print(f"{'corrector':36s} {'energy before -> after':>24s} {'miss before -> after':>22s}")
    for name, corrector in correctors.items():
        corrected, info = fc.correct(energy, goals, actions, corrector=corrector)
        miss0 = jnp.linalg.norm(actions[:, -1] - goals, axis=-1).mean()
        miss1 = jnp.linalg.norm(corrected[:, -1] - goals, axis=-1).mean()
        print(
            f"{name:36s} {float(info.energy_before.mean()):10.4f} -> "
            f"{float(info.energy_after.mean()):9.4f} {float(miss0):10.4f} -> {float(miss1):7.4f}"
        )


if __name__ == "__main__":
    main()
