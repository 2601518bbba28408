"""Train an energy on demonstrations, save and reload it, then correct a biased policy.

The task is the synthetic one the training tests use: each demonstration has a latent
`z`; its context is a handful of tokens carrying `z` (through a fixed projection, plus
noise) scattered among padding tokens full of large garbage; its expert chunk is
`ramp[t] * z`. The "policy" misses the expert by a systematic drift plus noise, so how
far each correction moves a chunk towards the expert can be read off exactly.

Run: python examples/train_and_correct.py   (about 35 s on a 2-core CPU; --quick: a
tiny run to check it works, without the gradient penalty, whose compile is slow)

It printed (after the progress bar):

    trained 300 steps in 22.1 s

    64 held-out contexts x 8 policy samples, chunk 4x4

    method                       energy before -> after   dist. before -> after  closer fallbacks
    reference recipe               -2.583 ->    -3.483     1.158 ->     0.798    100%         0
    monotone (backtrack) x3        -2.583 ->    -4.062     1.158 ->     0.609    100%         0
    best of 8 by energy            -2.583 ->    -2.933     1.158 ->     1.007     74%         0

    held-out report (one reference step from each policy sample):
    EvalReport(
      top1_accuracy            0.9844
      pairwise_accuracy        0.9998
      loss                     0.129
      e_pos                    -3.983
      e_neg                    1.57
      grad_norm_expert         0.7936
      num_contexts             64
      num_policy_samples       8
      e_policy                 -2.583
      energy_fall_fraction     1
      fell_back_fraction       0
      towards_expert_fraction  1
      distance_change          -0.1379
      gradient_cosine          0.7606
      grad_norm_policy         1.877
      best_of_n_distance       1.007
      mean_sample_distance     1.158
      oracle_distance          0.9572
    )

"closer" is the fraction of policy samples whose distance to the expert fell. For
best-of-N it compares the chunk picked for a context with each of its N samples; that
is capped well below 100% because the pick can only be one of the samples, while a
gradient step can leave the policy's drift behind.
"""

import argparse
import functools
import pathlib
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flowcorrect as fc

SEQ, CONTEXT_DIM, HORIZON, ACTION_DIM = 8, 16, 4, 4
NUM_POLICY_SAMPLES = 8


@functools.partial(jax.jit, static_argnums=1)  # eager, its dozen ops each compile
def demonstrations(key, num, proj):
    """Contexts (a TokenContext, mask True = real token) and expert chunks."""
    kz, kt, kc, kp, kg, ka = jax.random.split(key, 6)
    z = jax.random.normal(kz, (num, ACTION_DIM))
    tokens = (z @ proj)[:, None, :] + 0.5 * jax.random.normal(kt, (num, SEQ, CONTEXT_DIM))
    # Between half and all of the tokens are real, at random positions; the padding
    # holds values 20x larger than the signal, so a model that let it leak in would fail.
    count = jax.random.randint(kc, (num, 1), SEQ // 2, SEQ + 1)
    mask = jnp.argsort(jax.random.uniform(kp, (num, SEQ)), axis=1) < count
    junk = 10.0 * jax.random.normal(kg, (num, SEQ, CONTEXT_DIM))
    tokens = jnp.where(mask[:, :, None], tokens, junk)
    ramp = jnp.linspace(0.5, 1.5, HORIZON)
    expert = ramp[None, :, None] * z[:, None, :]
    expert = expert + 0.02 * jax.random.normal(ka, expert.shape)
    return fc.TokenContext(tokens, mask), expert


def policy_samples(key, expert, num):
    """A stand-in for a flow policy's chunks: the expert's, drifting off, plus noise."""
    drift = jnp.linspace(0.0, 0.4, HORIZON)[:, None] * jnp.ones((1, ACTION_DIM))
    noise = 0.15 * jax.random.normal(key, (expert.shape[0], num, *expert.shape[1:]))
    return expert[:, None] + drift[None, None] + noise


@eqx.filter_jit
def energies(model, contexts, actions):
    return jax.vmap(model)(contexts, actions)


def distance(a, b):
    return jnp.linalg.norm(a - b, axis=(-2, -1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--quick", action="store_true", help="a tiny run (a few seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps
    num_train, num_held = (256, 16) if args.quick else (2048, 64)

    keys = jax.random.split(jax.random.key(args.seed), 8)
    # Train and held-out data must share the projection: it is the rule to be learned.
    proj = jax.random.normal(keys[0], (ACTION_DIM, CONTEXT_DIM))
    contexts, experts = demonstrations(keys[1], num_train + num_held, proj)
    train_ctx, held_ctx = (jax.tree.map(lambda x: x[:num_train], contexts),
                           jax.tree.map(lambda x: x[num_train:], contexts))  # fmt: skip
    train_expert, held_expert = experts[:num_train], experts[num_train:]

    # In-batch negatives only teach which demonstration is which; the policy's own near
    # misses (sampled offline here, into Batch.negatives) teach what a correction has to
    # undo, and noise around the expert shapes the energy near its minimum.
    train = fc.train.Batch(train_ctx, train_expert, policy_samples(keys[3], train_expert, 2))
    held = fc.train.Batch(held_ctx, held_expert)

    config = fc.EnergyModelConfig(
        context_dim=CONTEXT_DIM, action_dim=ACTION_DIM, hidden=32, num_heads=2
    )
    start = time.perf_counter()
    result = fc.train.fit(
        fc.EnergyModel(config, key=keys[4]),
        fc.train.ShuffledBatches(train, 64),
        key=keys[5],
        # grad_penalty keeps ||grad_a E|| small enough for clipped steps to help; the
        # default learning rate is tuned for long runs, this one for a few hundred steps.
        config=fc.train.TrainConfig(
            num_steps=steps,
            learning_rate=3e-3,
            warmup_steps=min(20, steps // 5),
            grad_penalty=0.0 if args.quick else 0.1,
            log_every=max(1, steps // 5),
        ),
        negatives=[fc.train.NoiseNegatives(2, scale=0.15)],
    )
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        path = fc.save_model(result.model, pathlib.Path(tmp) / "energy")
        # `action_dim=` makes loading fail loudly if the file is for another robot.
        model = fc.load_model(path, action_dim=ACTION_DIM)
    e_trained = energies(result.model, held_ctx, held_expert)
    e_loaded = energies(model, held_ctx, held_expert)
    np.testing.assert_allclose(e_loaded, e_trained, rtol=1e-5, atol=1e-5)

    # Flatten (context, sample) pairs into one batch; each context is repeated so the
    # corrector sees the observation its sample was drawn for.
    n = NUM_POLICY_SAMPLES
    samples = policy_samples(keys[6], held_expert, n)
    flat = samples.reshape(num_held * n, HORIZON, ACTION_DIM)
    flat_ctx = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), held_ctx)
    flat_expert = jnp.repeat(held_expert, n, axis=0)
    d_before = distance(flat, flat_expert)

    correctors = {
        "reference recipe": fc.reference_recipe(),
        # Backtrack keeps a step only if the energy falls, so the energy never rises;
        # that safety is what lets it take steps 3x the reference's before clipping.
        "monotone (backtrack) x3": fc.Repeat(
            fc.Backtrack(fc.ClipStep(fc.GradientStep(0.3), 0.2)), 3
        ),
    }
    rows = {}
    for name, corrector in correctors.items():
        out, info = fc.correct(model, flat_ctx, flat, corrector=corrector)
        rows[name] = (info.energy_before, info.energy_after, d_before,
                      distance(out, flat_expert), info.fell_back)  # fmt: skip

    # Best-of-N needs no gradient: rank the N samples of each context by energy and
    # keep the lowest; every sample of that context is then replaced by the winner.
    ranked = energies(model, flat_ctx, flat).reshape(num_held, n)
    best = samples[jnp.arange(num_held), jnp.argmin(ranked, axis=1)]
    e_best = jnp.repeat(jnp.min(ranked, axis=1), n)
    d_best = distance(jnp.repeat(best, n, axis=0), flat_expert)
    fell = ~jnp.isfinite(e_best)
    rows[f"best of {n} by energy"] = (ranked.reshape(-1), e_best, d_before, d_best, fell)

    print(f"\n{num_held} held-out contexts x {n} policy samples, chunk {HORIZON}x{ACTION_DIM}\n")
    print(f"{'method':26s} {'energy before -> after':>24s} {'dist. before -> after':>23s} "
          f"{'closer':>7s} {'fallbacks':>9s}")  # fmt: skip
    for name, (e0, e1, d0, d1, fb) in rows.items():
        print(
            f"{name:26s} {float(e0.mean()):10.3f} -> {float(e1.mean()):9.3f} "
            f"{float(d0.mean()):9.3f} -> {float(d1.mean()):9.3f} "
            f"{float(jnp.mean(d1 < d0)):7.0%} {int(fb.sum()):9d}"
        )

    print("\nheld-out report (one reference step from each policy sample):")
    print(fc.train.evaluate(model, held, policy_samples=samples))


if __name__ == "__main__":
    main()
