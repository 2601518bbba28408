"""Overhead of correction on openpi's Pi0 / Pi0.5, against its own `sample_actions`.

Needs openpi in the environment (see docs/openpi.md). Without `--checkpoint` it builds
a test-size model (`dummy` Gemma variants, SigLIP's `mu/14` swapped in for openpi's
`So400m/14`) with random weights and a random energy model: the numbers then measure
the machinery, not a real policy. Every row runs in this process, on the same inputs,
after a warm-up call, and reports the median of `--repeats` calls (the rows take
turns):

    python examples/openpi_overhead.py                  # test-size Pi0, CPU
    python examples/openpi_overhead.py --pi05 --batch 4
    python examples/openpi_overhead.py --config pi05_libero --checkpoint CKPT --energy EDIR

Rows: openpi's `sample_actions` (jitted as openpi's `Policy` does); `fc.sample` with
no correction; post-hoc K=3 (the reference recipe); guided over the last 3 steps;
denoised over the last 3 steps; best-of-8; and the reference's "method B" (sample,
then a second prefix pass for the energy's context, then the K=3 correction).
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import flowcorrect as fc


def build(args):
    from openpi.models import pi0_config

    from flowcorrect.openpi import tiny_siglip

    if args.checkpoint:
        from openpi.models import model as _model
        from openpi.training import config as _config

        config = _config.get_config(args.config).model
        params = _model.restore_params(f"{args.checkpoint}/params", dtype=jnp.bfloat16)
        model = config.load(params)
        energy = fc.load_model(args.energy) if args.energy else None
    else:
        config = pi0_config.Pi0Config(paligemma_variant="dummy", action_expert_variant="dummy",
                                      pi05=args.pi05, dtype=args.dtype)
        with tiny_siglip():
            model = config.create(jax.random.key(0))
        energy = None
    if energy is None:
        width = 64 if not args.checkpoint else 2048
        energy = fc.EnergyModel(
            fc.EnergyModelConfig(context_dim=width, action_dim=config.action_dim, hidden=128,
                                 num_heads=4),
            key=jax.random.key(1),
        )
    energy = eqx.nn.inference_mode(energy)
    observation = jax.tree.map(
        lambda x: jax.random.uniform(jax.random.key(2), x.shape, minval=-1, maxval=1).astype(
            x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        config.fake_obs(args.batch),
    )
    return config, model, energy, observation


def timed(rows, repeats):
    """Median seconds per row; the rows take turns, so that a load that comes and goes
    on a shared machine falls on every row alike."""
    for fn in rows.values():
        jax.block_until_ready(fn())  # compile and warm up
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pi05", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--config", default="pi05_libero")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--energy", default=None)
    args = parser.parse_args(argv)

    from openpi.shared import nnx_utils

    from flowcorrect.openpi import Pi0Policy

    config, model, energy, observation = build(args)
    policy = Pi0Policy(model)
    noise = jax.random.normal(jax.random.key(3), (args.batch, *policy.chunk_shape))
    noise8 = jax.random.normal(jax.random.key(4), (args.batch, 8, *policy.chunk_shape))
    key = jax.random.key(5)
    recipe = fc.reference_recipe()

    sample_actions = nnx_utils.module_jit(model.sample_actions)

    @eqx.filter_jit
    def second_pass_and_correct(policy, energy, observation, actions):
        # The reference's method B after sampling: the prefix again, for the context.
        context = policy.energy_context(policy.condition(observation))
        return fc.correct(energy, context, actions, corrector=recipe)[0]

    def method_b():
        actions = sample_actions(key, observation, noise=noise)
        return second_pass_and_correct(policy, energy, observation, actions)

    rows = {
        "openpi sample_actions": lambda: sample_actions(key, observation, noise=noise),
        "fc.sample, no correction": lambda: fc.sample(policy, observation, key, noise=noise)[0],
        "post-hoc K=3": lambda: fc.sample(policy, observation, key, noise=noise, energy=energy,
                                          placement=fc.PostHoc(recipe))[0],
        "guided, last 3 steps": lambda: fc.sample(
            policy, observation, key, noise=noise, energy=energy,
            placement=fc.Guided(schedule=fc.LastSteps(3)))[0],
        "denoised, last 3 steps": lambda: fc.sample(
            policy, observation, key, noise=noise, energy=energy,
            placement=fc.Denoised(recipe, schedule=fc.LastSteps(3)))[0],
        "best of 8": lambda: fc.sample(policy, observation, key, noise=noise8, energy=energy,
                                       placement=fc.BestOfN(8))[0],
        "method B (second prefix pass)": method_b,
    }
    medians = timed(rows, args.repeats)
    base = medians["openpi sample_actions"]
    print(f"{'row':32s} {'ms':>9s} {'x plain':>8s}   "
          f"({jax.devices()[0].platform}, batch {args.batch}, {args.dtype})")
    for name, seconds in medians.items():
        print(f"{name:32s} {1e3 * seconds:9.1f} {seconds / base:8.2f}")


if __name__ == "__main__":
    main()
