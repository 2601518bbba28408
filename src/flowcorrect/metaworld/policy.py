"""A small flow-matching policy over action chunks, for vector observations.

An MLP encodes the (normalised) observation once per observation (`condition`); a second
MLP maps the encoding, the noisy chunk and the flow time to the velocity. Trained with
flow matching in openpi's convention ([`flowcorrect.OpenPI`][]: `x_t = t * noise +
(1 - t) * actions`, target `noise - actions`), so `fc.sample` integrates it as openpi
integrates Pi0.
"""

import dataclasses
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._conventions import AbstractConvention, OpenPI
from .._model.serialise import (
    CONFIG_FILE,
    MAX_PARAMETERS,
    read_meta,
    read_module,
    write_module,
)
from .._policy import AbstractPolicy
from .._rtc_training import AbstractDelays, prefix_conditioned_loss


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

    - `condition(observation)`: the normalised observation and its encoding (once per
        observation).
    - `velocity(cond, x_t, t)`: the velocity of the noisy chunk at flow time `t`.
    - `energy_context(cond)`: the raw observation vector (what a vector-observation
        energy or a hand-written constraint reads).

    With `token_time=True` the velocity takes a flow time per action token (`t` of shape
    `(horizon,)`, or a scalar shared by all rows): the head reads one time embedding
    per row instead of one per chunk, which training-time real-time chunking needs
    ([`flowcorrect.rtc.PrefixConditioning`][]). [`with_token_time`][] turns a trained
    scalar-time policy into one with the same velocity at equal times.
    """

    encoder: eqx.nn.MLP
    head: eqx.nn.MLP
    obs_mean: Float[Array, " obs_dim"]
    obs_std: Float[Array, " obs_dim"]
    chunk_shape: tuple[int, int] = eqx.field(static=True)
    time_features: int = eqx.field(static=True)
    accepts_token_time: bool = eqx.field(static=True)
    convention: AbstractConvention

    def __init__(self, config: PolicyConfig, obs_mean: Any, obs_std: Any, *, key: PRNGKeyArray,
                 token_time: bool = False):
        if not isinstance(token_time, bool):
            raise TypeError(f"`token_time` must be True or False; got {token_time!r}.")
        k1, k2 = jax.random.split(key)
        h, d = config.horizon, config.action_dim
        self.encoder = eqx.nn.MLP(
            config.obs_dim, config.width, config.width, config.depth - 1, jax.nn.gelu, key=k1
        )
        times = h * config.time_features if token_time else config.time_features
        self.head = eqx.nn.MLP(
            config.width + h * d + times, h * d, config.width, config.depth,
            jax.nn.gelu, key=k2,
        )
        self.accepts_token_time = token_time
        self.obs_mean = jnp.asarray(obs_mean, jnp.float32)
        self.obs_std = jnp.asarray(obs_std, jnp.float32)
        self.chunk_shape = (h, d)
        self.time_features = config.time_features
        self.convention = OpenPI()

    def condition(self, observation: Float[Array, " obs_dim"]) -> Any:
        z = (observation - self.obs_mean) / self.obs_std
        return observation, self.encoder(z)

    def velocity(self, cond: Any, x_t: Float[Array, "horizon action_dim"], t: Any):
        _, h = cond
        t = jnp.asarray(t, x_t.dtype)
        horizon = x_t.shape[0]
        if self.accepts_token_time:
            if t.shape not in ((), (horizon,)):
                raise ValueError(
                    f"`t` must be a scalar or one time per row, ({horizon},); got {t.shape}."
                )
            t = jnp.broadcast_to(t, (horizon,))
            emb = jax.vmap(lambda s: _time_embedding(s, self.time_features))(t).reshape(-1)
        else:
            if t.shape != ():
                raise ValueError(
                    f"This policy takes one flow time per chunk (a scalar `t`); got {t.shape}. "
                    "For a time per action token use `with_token_time(policy)`."
                )
            emb = _time_embedding(t, self.time_features)
        inp = jnp.concatenate([h, x_t.reshape(-1), emb])
        return self.head(inp).reshape(x_t.shape)

    def energy_context(self, cond: Any) -> Float[Array, " obs_dim"]:
        return cond[0]


def _config_of(policy: FlowMLPPolicy) -> PolicyConfig:
    """The architecture fields of the config `policy` was built from (read off shapes)."""
    horizon, action_dim = policy.chunk_shape
    return PolicyConfig(
        obs_dim=policy.encoder.in_size, action_dim=action_dim, horizon=horizon,
        width=policy.encoder.out_size, depth=policy.encoder.depth + 1,
        time_features=policy.time_features,
    )


def with_token_time(policy: FlowMLPPolicy) -> FlowMLPPolicy:
    """A scalar-time [`FlowMLPPolicy`][] as one whose velocity takes a time per action
    token, with the same velocity whenever all tokens share one time.

    The head's first layer reads `horizon` time embeddings instead of one; its weights
    on each are the scalar policy's weights on the one embedding, divided by `horizon`,
    so equal times sum back to the scalar policy's input (equal up to float rounding).
    The starting point for fine-tuning with training-time real-time chunking
    ([`train_policy`][] with `rtc=`); the other weights are shared unchanged.
    """
    if policy.accepts_token_time:
        return policy
    config = _config_of(policy)
    horizon, tf = config.horizon, config.time_features
    fresh = FlowMLPPolicy(config, policy.obs_mean, policy.obs_std, key=jax.random.key(0),
                          token_time=True)
    first = policy.head.layers[0]
    split = first.weight.shape[1] - tf
    w_time = first.weight[:, split:]
    weight = jnp.concatenate([first.weight[:, :split]] + [w_time / horizon] * horizon, axis=1)
    head = eqx.tree_at(lambda m: m.layers[0].weight, fresh.head, weight)
    head = eqx.tree_at(lambda m: [layer.bias for layer in m.layers], head,
                       [layer.bias for layer in policy.head.layers])
    head = eqx.tree_at(lambda m: [layer.weight for layer in m.layers[1:]], head,
                       [layer.weight for layer in policy.head.layers[1:]])
    return eqx.tree_at(lambda p: (p.encoder, p.head), fresh, (policy.encoder, head))


def flow_matching_loss(policy: FlowMLPPolicy, obs, chunks, key) -> Array:
    """Mean squared error of the velocity against `noise - actions` (openpi's target)."""
    k_noise, k_t = jax.random.split(key)
    noise = jax.random.normal(k_noise, chunks.shape, chunks.dtype)
    t = jax.random.uniform(k_t, (chunks.shape[0],), chunks.dtype)
    conv = policy.convention
    x_t = jax.vmap(conv.interpolate)(noise, chunks, t)
    target = jax.vmap(conv.velocity_target)(noise, chunks)

    def one(o, x, s):
        return policy.velocity(policy.condition(o), x, s)

    v = jax.vmap(one)(obs, x_t, t)
    return jnp.mean((v - target) ** 2)


def train_policy(
    obs: np.ndarray, chunks: np.ndarray, config: PolicyConfig, *, seed: int = 0,
    progress: bool = True, init: FlowMLPPolicy | None = None, rtc: AbstractDelays | None = None,
) -> tuple[FlowMLPPolicy, list[float]]:
    """Trains a [`FlowMLPPolicy`][] by flow matching on `(obs, chunks)` with optax Adam.

    **Arguments:**

    - `obs`, `chunks`: `(n, obs_dim)` and `(n, horizon, action_dim)`.
    - `config`: the architecture (ignored with `init`) and `steps`, `batch_size`,
        `learning_rate` (warm-up then cosine decay).
    - `seed`, `progress`: the seed of the initialisation and batches; a progress bar.
    - `init`: a policy to fine-tune instead of a fresh one (its observation
        normalisation is kept).
    - `rtc`: a delay distribution ([`flowcorrect.rtc.ExponentialDelays`][],
        [`flowcorrect.rtc.UniformDelays`][]) to train with training-time real-time chunking
        ([`flowcorrect.rtc.prefix_conditioned_loss`][]: the first `d` actions clean at the
        clean flow time, the loss on the rest). The policy is made per-token-time first
        ([`with_token_time`][]); a fresh policy is built with per-token time.

    **Returns:** the policy and the loss every 100 steps.

    !!! example "Fine-tuning a trained policy for training-time RTC"

        ```python
        policy, config = load_policy("policy")
        tuned, losses = train_policy(obs, chunks, dataclasses.replace(config, steps=1000),
                                     init=policy, rtc=fc.rtc.ExponentialDelays(max_delay=4))
        ```
    """
    from tqdm.auto import tqdm

    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    if init is not None:
        policy = init
    else:
        mean = obs.mean(0)
        std = obs.std(0) + 1e-3
        policy = FlowMLPPolicy(config, mean, std, key=k_init, token_time=rtc is not None)
    if rtc is not None:
        if not isinstance(rtc, AbstractDelays):
            raise TypeError(
                "`rtc` must be a delay distribution such as fc.rtc.ExponentialDelays(4); got "
                f"{type(rtc).__name__}."
            )
        policy = with_token_time(policy)

        def loss_fn(policy, o, c, k):
            return prefix_conditioned_loss(policy, o, c, k, rtc)
    else:
        loss_fn = flow_matching_loss
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
        loss, grads = eqx.filter_value_and_grad(loss_fn)(
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


POLICY_FORMAT = "flowcorrect.metaworld.FlowMLPPolicy"
POLICY_VERSION = 1
_SAVE_HINT = "Save one with save_policy(path, policy, config)."


def save_policy(path: str | pathlib.Path, policy: FlowMLPPolicy, config: PolicyConfig) -> None:
    """Writes the policy to the folder `path` in flowcorrect's one model format (that of
    [`flowcorrect.save_model`][]): `config.json` (the config, checksummed) and
    `weights.npz` (named arrays, no pickle)."""
    meta = dataclasses.asdict(config)
    if policy.accepts_token_time:  # absent for scalar-time policies
        meta["token_time"] = True
    head = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "class": "FlowMLPPolicy",
            "config": meta}
    write_module(path, policy, head)


def policy_saved(path: str | pathlib.Path) -> bool:
    """Whether [`save_policy`][] finished writing a policy at `path`."""
    return (pathlib.Path(path) / CONFIG_FILE).is_file()


def load_policy(path: str | pathlib.Path) -> tuple[FlowMLPPolicy, PolicyConfig]:
    """Reads what [`save_policy`][] wrote, every array checked by name, shape and dtype."""
    path = pathlib.Path(path).absolute()
    meta = read_meta(path, (POLICY_FORMAT,), POLICY_VERSION, "harness policy", _SAVE_HINT)
    fields = dict(meta["config"])
    token_time = bool(fields.pop("token_time", False))
    config = PolicyConfig(**fields)

    def template():
        return eqx.filter_eval_shape(
            lambda: FlowMLPPolicy(config, np.zeros(config.obs_dim), np.ones(config.obs_dim),
                                  key=jax.random.key(0), token_time=token_time)
        )

    return read_module(path, meta, template, MAX_PARAMETERS), config
