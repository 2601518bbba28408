"""Energies for the harness: a learned energy over the observation vector, trained with
[`flowcorrect.fit`][] and the policy's own samples as negatives, and a hand-written
speed limit a user could write without any data.
"""

import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._energy import AbstractEnergy
from .._model.config import EnergyModelConfig
from .._model.context import TokenContext
from .._model.energy_model import EnergyModel
from .._model.serialise import load_model, save_model
from .._train.batch import Batch
from .._train.data import ShuffledBatches
from .._train.fit import TrainConfig, fit
from .policy import FlowMLPPolicy
from .settings import plain_euler


class ObsTokenEnergy(AbstractEnergy):
    """A [`flowcorrect.EnergyModel`][] over a normalised observation vector, given to
    the model as one context token.

    A stand-in until the library's vector-observation energy lands; context is the raw
    observation vector (what `FlowMLPPolicy.energy_context` returns).
    """

    model: EnergyModel
    mean: Float[Array, " obs_dim"]
    std: Float[Array, " obs_dim"]

    def encode(self, context: Float[Array, " obs_dim"]) -> Any:
        z = (context - self.mean) / self.std
        return self.model.encode(TokenContext(z[None]))

    def score(self, encoded: Any, actions: Float[Array, "horizon action_dim"]):
        return self.model.score(encoded, actions)


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


@eqx.filter_jit
def policy_samples(policy: FlowMLPPolicy, obs, key, num: int, num_steps: int = 10):
    """`num` plain samples of the policy for each observation, `(N, num, H, D)`."""
    shape = (obs.shape[0], num, *policy.chunk_shape)
    noise = jax.random.normal(key, shape, jnp.float32)
    rep = jnp.repeat(obs, num, axis=0)
    out = plain_euler(policy, rep, noise.reshape(-1, *policy.chunk_shape), num_steps)
    return out.reshape(shape)


def train_energy(
    policy: FlowMLPPolicy,
    obs: np.ndarray,
    chunks: np.ndarray,
    *,
    steps: int = 2000,
    num_negatives: int = 4,
    hidden: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    progress: bool = True,
) -> tuple[ObsTokenEnergy, dict[str, Any]]:
    """Trains an [`ObsTokenEnergy`][] with [`flowcorrect.fit`][] (InfoNCE, gradient
    penalty), with `num_negatives` of the policy's own samples per demonstration state.

    **Returns:** the energy and a dict with the training history and the held-out report
    (pair accuracy, fraction of policy samples one reference step moves towards the
    expert, gradient cosine, ...).
    """
    key = jax.random.key(seed)
    k_model, k_neg, k_fit, k_split = jax.random.split(key, 4)
    mean = jnp.asarray(obs.mean(0))
    std = jnp.asarray(obs.std(0) + 1e-3)
    negs = []
    for i in range(0, len(obs), 2048):
        negs.append(np.asarray(policy_samples(
            policy, jnp.asarray(obs[i : i + 2048]), jax.random.fold_in(k_neg, i), num_negatives
        )))
    negatives = np.concatenate(negs)
    order = np.random.default_rng(seed).permutation(len(obs))
    n_ho = max(8, int(held_out_fraction * len(obs)))
    ho, tr = order[:n_ho], order[n_ho:]
    config = EnergyModelConfig(
        context_dim=obs.shape[1], action_dim=chunks.shape[2], hidden=hidden, num_heads=4,
        dropout=0.0,
    )
    model = EnergyModel(config, key=k_model)

    def to_context(o):
        return TokenContext(((o - mean) / std)[:, None, :])

    batch_size = min(batch_size, len(tr))
    data = ShuffledBatches(Batch(obs[tr], chunks[tr], negatives[tr]), batch_size, seed=seed)
    result = fit(
        model, data, key=k_fit, config=TrainConfig(num_steps=steps, log_every=100),
        to_context=to_context, held_out=Batch(obs[ho], chunks[ho]),
        held_out_policy_samples=jnp.asarray(negatives[ho]), progress=progress,
    )
    report = {} if result.report is None else _report_dict(result.report)
    return ObsTokenEnergy(result.model, mean, std), {"history": result.history, "report": report}


def _report_dict(report: Any) -> dict[str, Any]:
    out = {}
    for name in dir(report):
        if name.startswith("_"):
            continue
        value = getattr(report, name)
        if callable(value):
            continue
        try:
            out[name] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out


def save_energy(path: str | pathlib.Path, energy: ObsTokenEnergy, meta: dict) -> None:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(energy.model, (path / "model").resolve())
    np.savez(path / "norm.npz", mean=np.asarray(energy.mean), std=np.asarray(energy.std))
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=float))


def load_energy(path: str | pathlib.Path) -> tuple[ObsTokenEnergy, dict]:
    path = pathlib.Path(path)
    model = load_model((path / "model").resolve())
    with np.load(path / "norm.npz") as f:
        mean, std = jnp.asarray(f["mean"]), jnp.asarray(f["std"])
    return ObsTokenEnergy(model, mean, std), json.loads((path / "meta.json").read_text())
