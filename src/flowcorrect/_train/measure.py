"""Measurements quoted in the docs: the bounded energy's flat tails, InfoNCE's memory.

Run: `python -m flowcorrect._train.measure [--steps 600] [--batch 64]` (CPU, ~6 min), and
`python -m flowcorrect._train.measure --memory` (compiles only, ~1 min).

The bounded energy of the reference is `E = mean_t (2 sigmoid(h_t / 2) + 0.1)`, so
`dE/dh_t = sigmoid(h_t / 2) (1 - sigmoid(h_t / 2)) / horizon`: a quarter at `h = 0`, and
`4 s (1 - s)` of that elsewhere. This script prints where that factor falls below 10%,
1% and 0.1% of its peak, then trains three models of the same architecture on the
synthetic matching task (bounded; unbounded; unbounded with a gradient penalty) and
reports, on held-out data, how far the trained heads sit in the flat tails for expert
chunks, in-batch mismatches and noisy "policy" samples, together with the held-out
[`flowcorrect.train.evaluate`][] figures.
"""

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._model.config import EnergyModelConfig
from .._model.context import TokenContext
from .._model.energy_model import EnergyModel
from .config import TrainConfig
from .data import ShuffledBatches
from .infonce import embed_batch, encode_batch, info_nce
from .loop import fit
from .negatives import NoiseNegatives
from .synthetic import matching_task, noisy_policy


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """What to measure (the flags of `python -m flowcorrect._train.measure`)."""

    # Training steps of each of the three models.
    steps: int = 600
    # Batch size of training and of the held-out set; with --memory, InfoNCE's batch.
    batch: int = 64
    # Seed of the data, the models and their training.
    seed: int = 0
    # Only the memory table (compiles, runs nothing).
    memory: bool = False


def slope_threshold(ratio: float) -> float:
    """`|h|` beyond which `sigmoid'(h/2)` is below `ratio` times its peak."""
    s = (1 - math.sqrt(1 - ratio)) / 2
    return -2 * math.log(s / (1 - s))


def _head_values(model: EnergyModel, batch, chunks) -> np.ndarray:
    """Head outputs `h`, shape `(contexts, chunks_per_context, horizon)`."""
    encoded = encode_batch(model, batch.context)
    emb = embed_batch(model, chunks)
    return np.asarray(
        jax.vmap(lambda e, c: jax.vmap(lambda x: model.head_values(e, x))(c))(encoded, emb)
    )


def _saturation(h: np.ndarray, ratio: float) -> float:
    return float(np.mean(np.abs(h) > slope_threshold(ratio)))


def memory(batch: int = 64, seq: int = 816, horizon: int = 50) -> None:
    """Peak temporary memory that XLA plans for one InfoNCE value-and-gradient.

    The default model at openpi's sizes (context width 2048, 32 action dims), compiled
    for the current backend but not run. The reference's replicated inputs alone would
    take `batch^2 * seq * 2048 * 4` bytes.
    """
    print(
        f"InfoNCE value_and_grad, B={batch}, S={seq}, D=2048, H={horizon}, A=32, "
        f"gradient penalty on; backend {jax.default_backend()}"
    )
    naive = batch * batch * seq * 2048 * 4
    print(f"  reference's replicated context input alone: {naive / 1e9:.1f} GB")
    tokens = jax.ShapeDtypeStruct((batch, seq, 2048), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    actions = jax.ShapeDtypeStruct((batch, horizon, 32), jnp.float32)
    for pool in (1, 8):
        config = EnergyModelConfig(context_dim=2048, action_dim=32, context_pool=pool)
        model = EnergyModel(config, key=jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_array)
        for chunk in (None, 8):

            def loss(p, t, m, a, chunk=chunk):
                def f(p):
                    model = eqx.combine(p, static)
                    context = TokenContext(t, m)
                    return info_nce(model, context, a, pair_chunk=chunk, grad_penalty=0.1,
                                    key=jax.random.key(0))[0]  # fmt: skip

                return jax.value_and_grad(f)(p)

            compiled = jax.jit(loss).lower(params, tokens, mask, actions).compile()
            stats = compiled.memory_analysis()
            print(f"  context_pool={pool} pair_chunk={chunk}: temporaries "
                  f"{stats.temp_size_in_bytes / 1e9:.2f} GB, inputs "
                  f"{stats.argument_size_in_bytes / 1e9:.2f} GB")  # fmt: skip


def run(config: MeasureConfig) -> None:
    """Prints the measurements `config` asks for (see the module docstring)."""
    if config.memory:
        memory(batch=config.batch)
        return

    print("Slope of the bounded energy, sigmoid'(h/2), relative to its peak at h = 0:")
    for r in (0.1, 0.01, 0.001):
        print(f"  below {r:>6.1%} for |h| > {slope_threshold(r):.2f}")
    floor = math.log(1 + (config.batch - 1) * math.exp(-(2.1 - 0.1) / 0.5))
    print(f"InfoNCE floor of a bounded energy (tau 0.5, batch {config.batch}): {floor:.3f}")

    key = jax.random.key(config.seed)
    k_train, k_held, k_pol, k_model, k_fit = jax.random.split(key, 5)
    shapes = dict(seq=8, context_dim=16, horizon=4, action_dim=4)
    train = matching_task(k_train, 4096, **shapes)
    held = matching_task(k_held, config.batch, **shapes)
    policy = noisy_policy(k_pol, held.actions, 8, scale=0.3)
    runs = {
        "bounded": (dict(energy="bounded"), 0.0),
        "unbounded": (dict(energy="unbounded"), 0.0),
        "unbounded+gp": (dict(energy="unbounded"), 0.1),
    }
    for name, (options, gp) in runs.items():
        model_config = EnergyModelConfig(context_dim=16, action_dim=4, hidden=64, num_heads=4,
                                         **options)
        model = EnergyModel(model_config, key=k_model)
        train_config = TrainConfig(
            num_steps=config.steps,
            learning_rate=1e-3,
            warmup_steps=50,
            grad_penalty=gp,
            grad_margin=0.0,
            log_every=config.steps,
        )
        t0 = time.time()
        result = fit(
            model,
            ShuffledBatches(train, config.batch, seed=config.seed),
            key=k_fit,
            config=train_config,
            negatives=[NoiseNegatives(4, 0.3)],
            held_out=held,
            held_out_policy_samples=policy,
            progress=False,
        )
        trained = result.model
        mismatched = jnp.roll(held.actions, 1, axis=0)[:, None]
        h_pos = _head_values(trained, held, held.actions[:, None])
        h_neg = _head_values(trained, held, mismatched)
        h_pol = _head_values(trained, held, policy)
        rep = result.report
        print(f"\n== {name} (grad_penalty {gp}, {time.time() - t0:.0f} s)")
        print(f"  final train loss {result.history[-1]['infonce']:.3f}")
        for label, h in (("expert", h_pos), ("mismatched", h_neg), ("policy", h_pol)):
            q = np.percentile(h, [5, 50, 95])
            print(
                f"  head h at {label:10s}: 5/50/95% {q[0]:7.2f} {q[1]:7.2f} {q[2]:7.2f}; "
                f"slope <10%: {_saturation(h, 0.1):5.1%}, <1%: {_saturation(h, 0.01):5.1%}"
            )
        for field in (
            "top1_accuracy",
            "pairwise_accuracy",
            "e_pos",
            "e_neg",
            "e_policy",
            "grad_norm_expert",
            "grad_norm_policy",
            "gradient_cosine",
            "energy_fall_fraction",
            "towards_expert_fraction",
            "best_of_n_distance",
            "mean_sample_distance",
        ):
            print(f"  {field:24s} {getattr(rep, field):.4g}")


def parse_cli(argv: list[str] | None = None) -> MeasureConfig:
    """The `MeasureConfig` that the command line `argv` names."""
    import tyro

    return tyro.cli(MeasureConfig, args=argv, description=__doc__.splitlines()[0],
                    config=(tyro.conf.FlagCreatePairsOff,))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run(parse_cli(argv))


if __name__ == "__main__":
    main()
