"""Energies for the harness: a learned energy over the observation vector
([`flowcorrect.MLPEnergy`][]), trained with [`flowcorrect.train.fit`][] and the policy's own
samples as negatives ([`flowcorrect.train.policy_negatives`][]), and a hand-written speed
limit a user could write without any data.
"""

import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._correct import correct
from .._correctors.recipes import reference_recipe
from .._energy import AbstractEnergy
from .._model.mlp_energy import MLPEnergy, MLPEnergyConfig
from .._model.serialise import load_model, save_model
from .._sample import sample
from .._train.batch import Batch
from .._train.config import TrainConfig
from .._train.data import ShuffledBatches
from .._train.loop import fit
from .._train.negatives import policy_negatives
from .policy import FlowMLPPolicy

# The step sizes of the reference's own diagnostic ("energy landscape": energy after one
# clipped step for each alpha), extended at both ends.
DIRECTION_ALPHAS = (0.0, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class SpeedLimit(AbstractEnergy):
    """Penalises translation commands faster than `limit`:
    `weight * sum_k relu(||a_k[:3]|| - limit)^2` over the chunk.

    Meta-World moves the end effector by `a[:3] / 100` per step, so this is a limit on
    the hand's speed the demonstrations never respected (the experts saturate at 1 per
    axis). Zero inside the limit: a correction leaves compliant chunks unchanged.
    """

    limit: Float[Array, ""]
    weight: Float[Array, ""]

    def __init__(self, limit: Any = 0.8, weight: Any = 1.0):
        self.limit = jnp.asarray(limit, jnp.float32)
        self.weight = jnp.asarray(weight, jnp.float32)

    def encode(self, context: Any) -> Any:
        return None

    def score(self, encoded: Any, actions: Float[Array, "horizon action_dim"]):
        # sqrt(. + eps): the norm's gradient at a zero command would be 0/0.
        speed = jnp.sqrt(jnp.sum(actions[:, :3] ** 2, axis=-1) + 1e-12)
        excess = jax.nn.relu(speed - self.limit.astype(actions.dtype))
        return self.weight.astype(actions.dtype) * jnp.sum(excess**2)


def train_energy(
    policy: FlowMLPPolicy,
    obs: np.ndarray,
    chunks: np.ndarray,
    episode: np.ndarray,
    *,
    steps: int = 2000,
    num_negatives: int = 4,
    hidden: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    progress: bool = True,
) -> tuple[MLPEnergy, dict[str, Any]]:
    """Trains an [`flowcorrect.MLPEnergy`][] on the raw observation vector with
    [`flowcorrect.train.fit`][] (InfoNCE, the default gradient penalty), with `num_negatives`
    of the policy's own samples per demonstration state
    ([`flowcorrect.train.policy_negatives`][] through [`flowcorrect.sample`][]).

    Whole episodes are held out (the last `held_out_fraction` of them, at least one), so
    the held-out report is measured on layouts the energy never saw.

    **Returns:** the energy and a dict with the training history, the held-out report
    (pair accuracy, fraction of policy samples one reference step moves towards the
    expert, gradient cosine, ...) and [`direction_sweep`][] on the held-out states.
    """
    key = jax.random.key(seed)
    k_model, k_neg, k_fit, k_ho = jax.random.split(key, 4)
    num_episodes = int(episode.max()) + 1
    n_ho = max(1, round(held_out_fraction * num_episodes))
    ho = episode >= num_episodes - n_ho
    tr = ~ho
    draw = lambda k, o: sample(policy, o, k)[0]  # noqa: E731
    negatives = np.asarray(policy_negatives(
        draw, jnp.asarray(obs[tr]), num_negatives, k_neg, batch_size=1024))
    held_samples = policy_negatives(draw, jnp.asarray(obs[ho]), 8, k_ho, batch_size=1024)
    config = MLPEnergyConfig(
        obs_dim=obs.shape[1], action_dim=chunks.shape[2], horizon=chunks.shape[1],
        hidden=hidden,
    )
    model = MLPEnergy(config, key=k_model)
    batch_size = min(batch_size, int(tr.sum()))
    data = ShuffledBatches(Batch(obs[tr], chunks[tr], negatives), batch_size, seed=seed)
    held_out = Batch(jnp.asarray(obs[ho]), jnp.asarray(chunks[ho]))
    result = fit(
        model, data, key=k_fit, config=TrainConfig(num_steps=steps, log_every=100),
        held_out=held_out, held_out_policy_samples=held_samples, progress=progress,
    )
    report = {} if result.report is None else result.report.to_dict()
    direction = direction_sweep(result.model, held_out.context, held_samples, held_out.actions)
    meta = {"history": result.history, "report": report, "direction": direction,
            "config": config.to_dict(), "steps": steps, "num_negatives": num_negatives,
            "held_out_episodes": n_ho, "train_states": int(tr.sum())}
    return result.model, meta


def direction_sweep(
    energy: AbstractEnergy,
    obs: Float[Array, "batch obs_dim"],
    samples: Float[Array, "batch num horizon action_dim"],
    expert: Float[Array, "batch horizon action_dim"],
    alphas: tuple[float, ...] = DIRECTION_ALPHAS,
    clip_frac: float = 0.2,
) -> dict[str, Any]:
    """The energy along the correction direction: the reference's alpha sweep.

    For every policy sample, one reference step `a - alpha * grad_a E` (clipped to
    `clip_frac` of the chunk's norm, as the reference's diagnostic does) and one
    unclipped step, for each alpha; reports the mean energy and the mean distance to
    the expert chunk of the same state. The energy of the expert chunks is the level a
    correction would have to reach.

    **Returns:** a dict of lists over `alphas`: `energy_clipped`, `distance_clipped`,
    `energy_unclipped`, `distance_unclipped`, `fall_fraction_clipped` (samples whose
    energy fell), plus `energy_expert`, `grad_norm` (median) and `num_samples`.
    """
    obs = jnp.asarray(obs)
    samples = jnp.asarray(samples)
    expert = jnp.asarray(expert)
    num = samples.shape[1]
    ctx = jnp.repeat(obs, num, axis=0)
    flat = samples.reshape(-1, *samples.shape[2:])
    target = jnp.repeat(expert, num, axis=0)
    out = _sweep(energy, ctx, flat, target, jnp.asarray(alphas, jnp.float32),
                 jnp.asarray(clip_frac, jnp.float32))
    out = {k: np.asarray(v).tolist() for k, v in jax.device_get(out).items()}
    out["alphas"] = list(alphas)
    out["clip_frac"] = clip_frac
    out["num_samples"] = int(flat.shape[0])
    return out


@eqx.filter_jit
def _sweep(energy, ctx, flat, target, alphas, clip_frac):
    def e(c, a):
        return energy(c, a)

    energies0 = jax.vmap(e)(ctx, flat)
    grads = jax.vmap(jax.grad(e, argnums=1))(ctx, flat)

    def at(alpha):
        clipped, _ = correct(energy, ctx, flat, corrector=reference_recipe(1, alpha, clip_frac))
        raw = flat - alpha * grads
        res = {}
        for name, a in (("clipped", clipped), ("unclipped", raw)):
            en = jax.vmap(e)(ctx, a)
            dist = jnp.sqrt(jnp.sum((a - target) ** 2, axis=(1, 2)))
            res[f"energy_{name}"] = jnp.mean(en)
            res[f"distance_{name}"] = jnp.mean(dist)
            # Fell by more than float32 rounding: at alpha = 0 the chunk does not move,
            # but XLA may fuse the two evaluations differently (jax 0.5.3 did).
            tol = 4 * jnp.finfo(jnp.float32).eps * jnp.maximum(jnp.abs(energies0), 1.0)
            res[f"fall_fraction_{name}"] = jnp.mean((en < energies0 - tol).astype(jnp.float32))
        return res

    res = jax.lax.map(at, alphas)
    res["energy_expert"] = jnp.mean(jax.vmap(e)(ctx, target))
    res["grad_norm"] = jnp.median(jnp.sqrt(jnp.sum(grads**2, axis=(1, 2))))
    return res


def save_energy(path: str | pathlib.Path, energy: MLPEnergy, meta: dict) -> None:
    """Writes the model with [`flowcorrect.save_model`][] and `meta.json` beside it."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(energy, (path / "model").resolve())
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=float))


def load_energy(path: str | pathlib.Path) -> tuple[MLPEnergy, dict]:
    """Reads what [`save_energy`][] wrote."""
    path = pathlib.Path(path)
    model = load_model((path / "model").resolve())
    return model, json.loads((path / "meta.json").read_text())
