"""A small flow-matching policy over action chunks, for vector observations.

An MLP encodes the (normalised) observation once per observation (`prefix`); a second
MLP maps the encoding, the noisy chunk and the flow time to the velocity. Trained with
flow matching in openpi's convention ([`flowcorrect.OpenPI`][]: `x_t = t * noise +
(1 - t) * actions`, target `noise - actions`), so `fc.sample` integrates it as openpi
integrates Pi0.
"""

import dataclasses
import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow.conventions import AbstractConvention, OpenPI
from .._policy import AbstractPolicy


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Architecture and training of [`FlowMLPPolicy`][], serialisable to JSON.

    - `obs_dim`, `action_dim`: the vector sizes (39 and 4 in Meta-World).
    - `horizon`: the chunk length, 1 to 16.
    - `width`, `depth`: hidden width and number of hidden layers of each MLP.
    - `steps`, `batch_size`, `learning_rate`: Adam on a cosine schedule.
    """

    obs_dim: int = 39
    action_dim: int = 4
    horizon: int = 8
    width: int = 256
    depth: int = 3
    time_features: int = 16
    steps: int = 5000
    batch_size: int = 256
    learning_rate: float = 1e-3

    def __post_init__(self):
        if not (isinstance(self.horizon, int) and 1 <= self.horizon <= 16):
            raise ValueError(f"`horizon` must be an int in 1..16; got {self.horizon!r}.")


def _time_embedding(t: Float[Array, ""], n: int) -> Float[Array, " n"]:
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(100.0), n // 2)).astype(t.dtype)
    return jnp.concatenate([jnp.sin(t * freqs), jnp.cos(t * freqs)])


class FlowMLPPolicy(AbstractPolicy):
    """A flow policy over `(horizon, action_dim)` chunks for a vector observation.

    - `prefix(observation)`: the normalised observation and its encoding (once per
        observation).
    - `velocity(prefix, x_t, t)`: the velocity of the noisy chunk at flow time `t`.
    - `energy_context(prefix)`: the raw observation vector (what a vector-observation
        energy or a hand-written constraint reads).
    """

    encoder: eqx.nn.MLP
    head: eqx.nn.MLP
    obs_mean: Float[Array, " obs_dim"]
    obs_std: Float[Array, " obs_dim"]
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    time_features: int = eqx.field(static=True)
    convention: AbstractConvention

    def __init__(self, config: PolicyConfig, obs_mean: Any, obs_std: Any, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        h, d = config.horizon, config.action_dim
        self.encoder = eqx.nn.MLP(
            config.obs_dim, config.width, config.width, config.depth - 1, jax.nn.gelu, key=k1
        )
        self.head = eqx.nn.MLP(
            config.width + h * d + config.time_features, h * d, config.width, config.depth,
            jax.nn.gelu, key=k2,
        )
        self.obs_mean = jnp.asarray(obs_mean, jnp.float32)
        self.obs_std = jnp.asarray(obs_std, jnp.float32)
        self.chunk_shape = (h, d)
        self.time_features = config.time_features
        self.convention = OpenPI()

    def prefix(self, observation: Float[Array, " obs_dim"]) -> Any:
        z = (observation - self.obs_mean) / self.obs_std
        return observation, self.encoder(z)

    def velocity(self, prefix: Any, x_t: Float[Array, "horizon action_dim"], t: Any):
        _, h = prefix
        t = jnp.asarray(t, x_t.dtype)
        inp = jnp.concatenate([h, x_t.reshape(-1), _time_embedding(t, self.time_features)])
        return self.head(inp).reshape(x_t.shape)

    def energy_context(self, prefix: Any) -> Float[Array, " obs_dim"]:
        return prefix[0]


def flow_matching_loss(policy: FlowMLPPolicy, obs, chunks, key) -> Array:
    """Mean squared error of the velocity against `noise - actions` (openpi's target)."""
    k_noise, k_t = jax.random.split(key)
    noise = jax.random.normal(k_noise, chunks.shape, chunks.dtype)
    t = jax.random.uniform(k_t, (chunks.shape[0],), chunks.dtype)
    conv = policy.convention
    x_t = jax.vmap(conv.interpolate)(noise, chunks, t)
    target = jax.vmap(conv.velocity_target)(noise, chunks)

    def one(o, x, s):
        return policy.velocity(policy.prefix(o), x, s)

    v = jax.vmap(one)(obs, x_t, t)
    return jnp.mean((v - target) ** 2)


def train_policy(
    obs: np.ndarray, chunks: np.ndarray, config: PolicyConfig, *, seed: int = 0,
    progress: bool = True,
) -> tuple[FlowMLPPolicy, list[float]]:
    """Trains a [`FlowMLPPolicy`][] by flow matching on `(obs, chunks)` with optax Adam.

    **Returns:** the policy and the loss every 100 steps.
    """
    from tqdm.auto import tqdm

    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    mean = obs.mean(0)
    std = obs.std(0) + 1e-3
    policy = FlowMLPPolicy(config, mean, std, key=k_init)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(200, config.steps // 10), config.steps, 1e-5
    )
    opt = optax.adamw(schedule, weight_decay=1e-4)
    state = opt.init(eqx.filter(policy, eqx.is_inexact_array))
    obs_j = jnp.asarray(obs, jnp.float32)
    chunks_j = jnp.asarray(chunks, jnp.float32)
    n = obs.shape[0]

    @eqx.filter_jit
    def step(policy, state, key):
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, n)
        loss, grads = eqx.filter_value_and_grad(flow_matching_loss)(
            policy, obs_j[idx], chunks_j[idx], k_loss
        )
        updates, state = opt.update(grads, state, eqx.filter(policy, eqx.is_inexact_array))
        return eqx.apply_updates(policy, updates), state, loss

    losses, window = [], []
    bar = tqdm(range(config.steps), desc="policy", disable=not progress, mininterval=2)
    for i in bar:
        policy, state, loss = step(policy, state, jax.random.fold_in(k_train, i))
        window.append(loss)
        if (i + 1) % 100 == 0:
            losses.append(float(np.mean(jax.device_get(window))))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return policy, losses


def save_policy(path: str | pathlib.Path, policy: FlowMLPPolicy, config: PolicyConfig) -> None:
    """Writes `<path>.eqx` (eqx.tree_serialise_leaves) and `<path>.json` (the config)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(path.with_suffix(".eqx"), policy)
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(config), indent=1))


def load_policy(path: str | pathlib.Path) -> tuple[FlowMLPPolicy, PolicyConfig]:
    """Reads what [`save_policy`][] wrote."""
    path = pathlib.Path(path)
    config = PolicyConfig(**json.loads(path.with_suffix(".json").read_text()))
    like = FlowMLPPolicy(
        config, np.zeros(config.obs_dim), np.ones(config.obs_dim), key=jax.random.key(0)
    )
    return eqx.tree_deserialise_leaves(path.with_suffix(".eqx"), like), config
