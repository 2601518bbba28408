"""openpi's own Pi0 on Meta-World: trained on the scripted demonstrations, driven in
closed loop through [`flowcorrect.openpi.CorrectedPi0`][].

    python -m flowcorrect.metaworld.openpi_pi0 --task pick-place-v3 --demos 10 --episodes 100

The model is openpi's `Pi0` class at test size (`paligemma_variant="dummy"`,
`action_expert_variant="dummy"`, SigLIP `mu/14` through
[`flowcorrect.openpi.tiny_siglip`][]), trained with openpi's `compute_loss` the way
openpi's training loop does (nnx split, AdamW with clipping, warmup and cosine decay).

**Images.** MuJoCo's offscreen renderers (EGL, OSMesa) do not work on a machine without
a GPU or a software GL, so the camera views are drawn from the positions in the
observation vector: a top-down view (x, y) in `base_0_rgb` and a side view (y, z) in
`left_wrist_0_rgb`, with the goal as a blue disk, the object as a green square and the
hand as a red ring whose width grows with the gripper's opening; `right_wrist_0_rgb` is
black and masked out. The views are deterministic functions of the observation, so the
vision tower sees exactly what the state says.

**State and actions.** Pi0's state has `action_dim` entries; openpi's default 32 (what
released checkpoints use) holds the 25 informative entries of Meta-World's 39-d
observation (hand xyz, gripper opening, object xyz and quaternion, the same for the
previous frame, goal xyz; the second object's slots, zero on single-object tasks, are
dropped), z-scored with the demonstrations' mean and standard deviation (floored at
0.01 so that a nearly constant quaternion entry is not blown up), zero-padded like
openpi's `PadStatesAndActions`. With `state="proprio"` only the hand and gripper
entries (both frames) are in the state: object and goal reach the model through the
images alone. Actions are Meta-World's 4 dims, already in [-1, 1], used as they are
and zero-padded to `action_dim`; the model's first 4 output dims are the actions.

This module needs openpi and metaworld in one environment (docs/openpi.md).
"""

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from .._model.serialise import (
    CONFIG_FILE,
    read_meta,
    read_module,
    write_module,
)
from . import _cli
from .envs import ACTION_DIM, OBS_DIM, Demos, collect_demos, default_cache

IMAGE_SIZE = 224
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

# Meta-World v3 observation layout (SawyerXYZEnv._get_obs): the current frame is
# hand xyz (0:3), gripper opening (3), object xyz (4:7), object quaternion (7:11), a
# second object's position and quaternion (11:18, zero on single-object tasks); 18:36
# is the previous frame in the same layout; 36:39 is the goal.
HAND, GRIPPER, OBJECT, GOAL = slice(0, 3), 3, slice(4, 7), slice(36, 39)
STATE_DIMS = {
    "full": tuple(range(0, 11)) + tuple(range(18, 29)) + (36, 37, 38),
    "proprio": (0, 1, 2, 3, 18, 19, 20, 21),
}
EVAL_SEED0 = 10_000_000


def _fail(name: str, value: Any, want: str) -> ValueError:
    return ValueError(f"`{name}` must be {want}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Pi0TaskConfig:
    """The Pi0 model and its training for one Meta-World task, serialisable to JSON.

    - `horizon`: Pi0's `action_horizon` (the harness policy's default chunk, 8).
    - `action_dim`: Pi0's `action_dim`, which is also the state's length (32, openpi's
        default); at least the state's informative entries.
    - `state`: `"full"` (the 25 informative observation entries) or `"proprio"` (hand
        and gripper only; object and goal through the images).
    - `max_token_len`: prompt length; the prompt is a fixed token sequence per task.
    - `num_steps`: Euler steps of the flow at inference (openpi's 10).
    - `steps`, `batch_size`, `peak_lr`, `warmup_steps`, `end_lr`: openpi's optimiser
        (AdamW b1 0.9, b2 0.95, weight decay 1e-10, gradient clip 1.0; warmup then
        cosine decay to `end_lr`), at a learning rate for training from scratch.
    - `augment`: `compute_loss(..., train=True)`: openpi's image augmentation (crop,
        rotation and colour jitter of the base view, colour jitter of the wrist views).
    - `view_low`, `view_high`: the xyz box (metres) the views show.
    """

    horizon: int = 8
    action_dim: int = 32
    state: str = "full"
    max_token_len: int = 16
    num_steps: int = 10
    steps: int = 2000
    batch_size: int = 32
    peak_lr: float = 3e-4
    warmup_steps: int = 100
    end_lr: float = 1e-5
    augment: bool = True
    view_low: tuple[float, float, float] = (-0.35, 0.35, -0.05)
    view_high: tuple[float, float, float] = (0.35, 1.05, 0.45)

    def __post_init__(self):
        if self.state not in STATE_DIMS:
            raise _fail("state", self.state, f"one of {sorted(STATE_DIMS)}")
        if not (isinstance(self.horizon, int) and 1 <= self.horizon <= 64):
            raise _fail("horizon", self.horizon, "an int in 1..64 (the harness uses 8)")
        need = max(len(STATE_DIMS[self.state]), ACTION_DIM)
        if not (isinstance(self.action_dim, int) and self.action_dim >= need):
            raise _fail("action_dim", self.action_dim,
                        f"an int >= {need}, the state's length for state={self.state!r}")
        if not (isinstance(self.max_token_len, int) and self.max_token_len >= 1):
            raise _fail("max_token_len", self.max_token_len, "an int >= 1 (16 is plenty)")
        for name in ("steps", "batch_size", "num_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise _fail(name, v, "an int >= 1")
        if not all(h > lo for lo, h in zip(self.view_low, self.view_high)):
            raise _fail("view_high", self.view_high,
                        f"above view_low={self.view_low} on every axis")

    def pi0_config(self) -> Any:
        """openpi's `Pi0Config` of this task (float32, dummy Gemmas)."""
        from openpi.models import pi0_config

        return pi0_config.Pi0Config(
            paligemma_variant="dummy", action_expert_variant="dummy", dtype="float32",
            action_dim=self.action_dim, action_horizon=self.horizon,
            max_token_len=self.max_token_len,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Pi0TaskConfig":
        data = dict(data)
        for k in ("view_low", "view_high"):
            data[k] = tuple(data[k])
        return cls(**data)


# ----------------------------------------------------------------------------- views


_GOAL_RGB = np.array([40, 70, 220], np.uint8)
_OBJECT_RGB = np.array([30, 170, 60], np.uint8)
_HAND_RGB = np.array([220, 40, 40], np.uint8)


def _pixels(v: Any, lo: Any, hi: Any, flip: bool) -> Any:
    u = (v - lo) / (hi - lo) * (IMAGE_SIZE - 1)
    return (IMAGE_SIZE - 1) - u if flip else u


def _view(obs: np.ndarray, cols: int, rows: int, low: Any, high: Any,
          background: Any) -> np.ndarray:
    n = obs.shape[0]
    r = np.arange(IMAGE_SIZE, dtype=np.float32)[None, :, None]
    c = np.arange(IMAGE_SIZE, dtype=np.float32)[None, None, :]
    canvas = np.broadcast_to(background, (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()

    def at(pos):
        pc = _pixels(pos[:, cols], low[cols], high[cols], flip=False)[:, None, None]
        pr = _pixels(pos[:, rows], low[rows], high[rows], flip=True)[:, None, None]
        return pr, pc

    gr, gc = at(obs[:, GOAL])
    canvas[(r - gr) ** 2 + (c - gc) ** 2 <= 8.0**2] = _GOAL_RGB
    orow, ocol = at(obs[:, OBJECT])
    canvas[np.maximum(np.abs(r - orow), np.abs(c - ocol)) <= 6.0] = _OBJECT_RGB
    hr, hc = at(obs[:, HAND])
    d2 = (r - hr) ** 2 + (c - hc) ** 2
    outer = 7.0 + 7.0 * np.clip(obs[:, GRIPPER], 0.0, 1.0)[:, None, None]
    # A ring, so that the object in the gripper stays visible.
    canvas[(d2 <= outer**2) & (d2 >= 5.0**2)] = _HAND_RGB
    return canvas


def render_views(
    obs: np.ndarray, config: Pi0TaskConfig = Pi0TaskConfig()
) -> dict[str, np.ndarray]:
    """The synthetic camera views of a batch of Meta-World observations.

    **Arguments:**

    - `obs`: `(N, 39)` observations.
    - `config`: gives the box the views show (`view_low`, `view_high`).

    **Returns:** `{"base_0_rgb": top-down (x right, y up), "left_wrist_0_rgb": side
    (y right, z up), "right_wrist_0_rgb": black}`, each `(N, 224, 224, 3)` uint8.
    """
    obs = np.asarray(obs, np.float32)
    if obs.ndim != 2 or obs.shape[1] != OBS_DIM:
        raise ValueError(f"`obs` must be (N, {OBS_DIM}) Meta-World observations; got shape "
                         f"{obs.shape}.")
    low = np.asarray(config.view_low, np.float32)
    high = np.asarray(config.view_high, np.float32)
    top = _view(obs, 0, 1, low, high, np.array([190, 190, 190], np.uint8))
    side = _view(obs, 1, 2, low, high, np.array([215, 215, 230], np.uint8))
    # The table (z < 0) in the side view.
    table_row = int(round(_pixels(0.0, low[2], high[2], flip=True)))
    side[:, table_row + 1:] = np.array([140, 110, 80], np.uint8)
    return {"base_0_rgb": top, "left_wrist_0_rgb": side,
            "right_wrist_0_rgb": np.zeros_like(top)}


# ----------------------------------------------------------------------- observations


def prompt_tokens(task: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed prompt for `task`: BOS and up to 7 token ids drawn from the task's name,
    padded to `length`. **Returns:** `(tokens, mask)` of shape `(length,)`."""
    n = min(length, 8)
    seed = int(hashlib.sha1(task.encode()).hexdigest()[:8], 16)
    ids = np.random.default_rng(seed).integers(3, 250_000, n - 1)
    tokens = np.zeros(length, np.int32)
    tokens[:n] = np.concatenate([[2], ids])
    return tokens, np.arange(length) < n


@dataclasses.dataclass
class Normaliser:
    """The state's z-scoring (`mean`, `std` over the chosen observation entries)."""

    dims: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_demos(cls, demos: Demos, config: Pi0TaskConfig) -> "Normaliser":
        dims = STATE_DIMS[config.state]
        x = demos.obs[:, dims]
        return cls(dims, x.mean(0).astype(np.float32),
                   np.maximum(x.std(0), 1e-2).astype(np.float32))

    def state(self, obs: np.ndarray, action_dim: int) -> np.ndarray:
        z = (np.asarray(obs, np.float32)[:, self.dims] - self.mean) / self.std
        return np.pad(z, ((0, 0), (0, action_dim - z.shape[1])))


def make_observation(obs: np.ndarray, task: str, config: Pi0TaskConfig, norm: Normaliser) -> Any:
    """openpi's `Observation` for a batch of Meta-World observations: the synthetic views
    (as openpi converts uint8 images: to [-1, 1]), masks (the right wrist absent), the
    normalised padded state and the task's fixed prompt."""
    from openpi.models import model as _model

    obs = np.asarray(obs, np.float32)
    n = obs.shape[0]
    views = render_views(obs, config)
    tokens, mask = prompt_tokens(task, config.max_token_len)
    return _model.Observation(
        images={k: jnp.asarray(v.astype(np.float32) / 255.0 * 2.0 - 1.0) for k, v in views.items()},
        image_masks={k: jnp.full((n,), k != "right_wrist_0_rgb") for k in IMAGE_KEYS},
        state=jnp.asarray(norm.state(obs, config.action_dim)),
        tokenized_prompt=jnp.asarray(np.tile(tokens, (n, 1))),
        tokenized_prompt_mask=jnp.asarray(np.tile(mask, (n, 1))),
    )


def pad_actions(chunks: np.ndarray, action_dim: int) -> np.ndarray:
    """`(N, H, 4)` Meta-World chunks zero-padded to `(N, H, action_dim)`."""
    return np.pad(np.asarray(chunks, np.float32),
                  ((0, 0), (0, 0), (0, action_dim - chunks.shape[-1])))


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainedPi0:
    """openpi's Pi0 trained on one task's demonstrations.

    - `model`: the `openpi.models.pi0.Pi0` (in eval mode).
    - `task`, `config`, `norm`: what [`make_observation`][] needs.
    - `losses`: the mean flow-matching loss over each `log_every` steps.
    - `train_seconds`: wall time of training (0 when loaded from the cache).
    - `path`: the cache files' stem, or `None`.
    """

    model: Any
    task: str
    config: Pi0TaskConfig
    norm: Normaliser
    losses: list[float]
    train_seconds: float
    path: pathlib.Path | None = None


def _create(config: Pi0TaskConfig, key: Any, *, abstract: bool = False) -> Any:
    from flax import nnx

    from ..openpi import tiny_siglip

    pc = config.pi0_config()
    # openpi's Gemma relies on implicit rank promotion (RMSNorm's (b, t, d) * (d,)).
    with tiny_siglip(), jax.numpy_rank_promotion("allow"):
        if abstract:
            return nnx.eval_shape(pc.create, key)
        return pc.create(key)


def _optimizer(config: Pi0TaskConfig) -> Any:
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=config.peak_lr / (config.warmup_steps + 1), peak_value=config.peak_lr,
        warmup_steps=config.warmup_steps, decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.end_lr,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-10),
    )


def cache_stem(task: str, demos: Demos, config: Pi0TaskConfig, seed: int) -> str:
    """The cache file stem: task, demonstration count and a hash of the layouts, the
    demonstrations' contents, the config and the seed."""
    h = hashlib.sha1(json.dumps([task, demos.seeds.tolist(), config.to_json(), seed, "v1"],
                                sort_keys=True).encode())
    h.update(np.ascontiguousarray(demos.actions).tobytes())
    return f"pi0-{task}-{len(demos.seeds)}demos-{h.hexdigest()[:12]}"


def train_pi0(
    task: str, demos: Demos, config: Pi0TaskConfig = Pi0TaskConfig(), *, seed: int = 0,
    cache: str | pathlib.Path | None = None, progress: bool = True, log_every: int = 50,
) -> TrainedPi0:
    """Trains openpi's Pi0 on `demos` by its own `compute_loss`, or loads it from the cache.

    openpi's training step, in small: the model is split once (`nnx.split`), each step
    merges it inside `jax.jit`, takes `mean(model.compute_loss(rng, observation, actions,
    train=augment))` and its gradient with respect to the `nnx.Param`s, and applies
    openpi's AdamW ([`Pi0TaskConfig`][]). Batches are drawn uniformly from every
    demonstration step, with the expert's next `horizon` actions as the chunk (the last
    action repeated past the end of an episode, as the harness's policy is trained).

    **Arguments:**

    - `task`: the Meta-World task (names the prompt and the cache file).
    - `demos`: from [`flowcorrect.metaworld.envs.collect_demos`][].
    - `config`: model and training settings.
    - `seed`: initialisation, batches, noise and augmentation.
    - `cache`: directory of `<stem>.npz` (the weights) and `<stem>.json` (config,
        normalisation, losses, wall time); default the harness's cache; `"none"`
        disables it.
    - `progress`: a tqdm bar with the running loss.
    - `log_every`: the loss is averaged over this many steps.
    """
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    if cache == "none":
        cache_dir = None
    else:
        cache_dir = default_cache() if cache is None else pathlib.Path(cache)
    norm = Normaliser.from_demos(demos, config)
    stem = cache_stem(task, demos, config, seed)
    if cache_dir is not None and (cache_dir / stem / CONFIG_FILE).is_file():
        return load_pi0(cache_dir / stem)

    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    model = _create(config, k_init)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(config)
    opt_state = tx.init(params)
    obs_all, chunks_all = demos.chunks(config.horizon)
    actions_all = pad_actions(chunks_all, config.action_dim)

    @jax.jit
    def step(params, opt_state, rng, observation, actions):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            m.train()
            return jnp.mean(m.compute_loss(rng, observation, actions, train=config.augment))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses: list[float] = []
    window: list[Any] = []
    t0 = time.perf_counter()
    with jax.numpy_rank_promotion("allow"):
        bar = tqdm(range(config.steps), desc=f"pi0 {task}", disable=not progress, mininterval=2)
        for i in bar:
            idx = rng.integers(0, len(obs_all), config.batch_size)
            observation = make_observation(obs_all[idx], task, config, norm)
            params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_train, i),
                                           observation, jnp.asarray(actions_all[idx]))
            window.append(loss)
            if (i + 1) % log_every == 0 or i + 1 == config.steps:
                losses.append(float(np.mean(jax.device_get(window))))
                window = []
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    trained = TrainedPi0(model, task, config, norm, losses, seconds)
    if cache_dir is not None:
        trained.path = cache_dir / stem
        save_pi0(trained.path, trained)
    return trained


PI0_FORMAT = "flowcorrect.metaworld.Pi0"
PI0_VERSION = 1
_SAVE_HINT = "Save one with save_pi0(path, trained)."
# A full-size Pi0 has about 3.3 billion parameters.
PI0_MAX_PARAMETERS = 2**33


def save_pi0(path: str | pathlib.Path, trained: TrainedPi0) -> None:
    """Writes the folder `path` in flowcorrect's one model format (that of
    [`flowcorrect.save_model`][]): `weights.npz`, the arrays of `nnx.state(model)` by
    name, and `config.json`, the task config, normaliser and losses, checksummed."""
    from flax import nnx

    meta = {
        "task": trained.task, "config": trained.config.to_json(),
        "norm": {"dims": list(trained.norm.dims), "mean": trained.norm.mean.tolist(),
                 "std": trained.norm.std.tolist()},
        "losses": trained.losses, "train_seconds": trained.train_seconds,
    }
    head = {"format": PI0_FORMAT, "version": PI0_VERSION, "class": "Pi0", "config": meta}
    write_module(path, nnx.state(trained.model), head)


def load_pi0(path: str | pathlib.Path) -> TrainedPi0:
    """Reads what [`save_pi0`][] wrote (the model's structure from `nnx.eval_shape`, so
    nothing is initialised), every array checked by name, shape and dtype."""
    from flax import nnx

    path = pathlib.Path(path).absolute()
    saved = read_meta(path, (PI0_FORMAT,), PI0_VERSION, "harness Pi0", _SAVE_HINT)
    meta = saved["config"]
    config = Pi0TaskConfig.from_json(meta["config"])
    abstract = _create(config, jax.random.key(0), abstract=True)
    graphdef, template = nnx.split(abstract)
    state = read_module(path, saved, lambda: template, PI0_MAX_PARAMETERS)
    model = nnx.merge(graphdef, state)
    model.eval()
    n = meta["norm"]
    norm = Normaliser(tuple(n["dims"]), np.asarray(n["mean"], np.float32),
                      np.asarray(n["std"], np.float32))
    return TrainedPi0(model, meta["task"], config, norm, meta["losses"], 0.0, path)


# ---------------------------------------------------------------------------- acting


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


@eqx.filter_jit
def _sample(graphdef: _Static, state, rng, observation, noise, energy, placement):
    from flax import nnx

    corrected = nnx.merge(graphdef.value, state)
    with jax.numpy_rank_promotion("allow"):
        return corrected.sample_actions(rng, observation, noise=noise, energy=energy,
                                        placement=placement)


def make_act(trained: TrainedPi0, *, placement: Any = None, energy: Any = None):
    """The batched act function of `trained` for [`flowcorrect.metaworld.evaluate.rollout`][].

    `act(obs [N, 39], key) -> (chunks [N, horizon, 4], {})`: the synthetic views and the
    normalised state as openpi's `Observation`, the starting noise drawn from `key`
    (`jax.random.normal(key, (N, *shape))`, the shape the placement asks for), then
    `CorrectedPi0(model).sample_actions(key, observation, noise=noise, energy=energy,
    placement=placement)`, compiled once per placement kind and count (`eqx.filter_jit`
    over the split model: the weights, the placement's and the energy's arrays are
    traced). The chunks are the model's first 4 action dims (actions are not
    normalised), not clipped (the rollout clips what it executes). At query `q` the
    harness passes `fold_in(key, q)`, so every placement starts from the same noise.

    **Arguments:**

    - `trained`: from [`train_pi0`][] or [`load_pi0`][].
    - `placement`: a flowcorrect placement, or `None` for openpi's plain sampler.
    - `energy`: the energy the placement needs, or `None`.
    """
    from flax import nnx

    from ..openpi import CorrectedPi0

    corrected = CorrectedPi0(trained.model, num_steps=trained.config.num_steps)
    graphdef, state = nnx.split(corrected)
    static = _Static(graphdef)
    chunk_shape = (trained.config.horizon, trained.config.action_dim)
    shape = chunk_shape if placement is None else tuple(placement.noise_shape(chunk_shape))

    def act(obs: np.ndarray, key: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        observation = make_observation(obs, trained.task, trained.config, trained.norm)
        noise = jax.random.normal(key, (obs.shape[0], *shape), jnp.float32)
        actions = _sample(static, state, key, observation, noise, energy, placement)
        return np.asarray(actions)[:, :, :ACTION_DIM], {}

    return act


def parse_placement(text: str) -> tuple[Any, Any]:
    """`"plain"` or `"best_of_n:8"` (consensus: `fc.BestOfN(8, select=fc.Medoid())`).
    **Returns:** `(placement, energy)`."""
    import flowcorrect as fc

    name, _, arg = text.partition(":")
    if name == "plain" and not arg:
        return None, None
    if name == "best_of_n":
        try:
            n = int(arg)
        except ValueError:
            raise _fail("--placement", text,
                        "'best_of_n:N' with an int N >= 2, e.g. best_of_n:8") from None
        # Consensus needs no energy; CorrectedPi0 asks for one with any placement but
        # real-time chunking, so a zero energy is passed, which the medoid never reads.
        return fc.BestOfN(n, select=fc.Medoid()), _zero_energy
    raise _fail("--placement", text, "'plain' or 'best_of_n:N'")


def _zero_energy(context: Any, actions: Any) -> Any:
    return jnp.zeros((), actions.dtype)


# ------------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class Pi0RunConfig:
    """One run: train (or load) the Pi0 of a task and evaluate it in closed loop under
    each placement (the flags of `python -m flowcorrect.metaworld.openpi_pi0`)."""

    # The Meta-World task.
    task: str = "pick-place-v3"
    # Scripted demonstrations Pi0 is trained on.
    demos: int = 10
    # Seed of the demonstrations' layouts.
    demo_seed: int = 0
    # Evaluation episodes (layouts, seeds from 10_000_000).
    episodes: int = 100
    # The noise key (the harness's key k is 1000 + k).
    key: int = 1000
    # Actions executed of each chunk before the next query.
    execute: int = 4
    # An episode stops at success or after this many steps.
    max_steps: int = 300
    # Pi0's action horizon.
    horizon: int = Pi0TaskConfig.horizon
    # What the state holds: the informative observation entries, or hand and gripper only.
    state: Literal["full", "proprio"] = Pi0TaskConfig.state
    # Training steps.
    steps: int = Pi0TaskConfig.steps
    # Training batch size.
    batch_size: int = Pi0TaskConfig.batch_size
    # Peak learning rate.
    lr: float = Pi0TaskConfig.peak_lr
    # Learning-rate warmup steps.
    warmup: int = Pi0TaskConfig.warmup_steps
    # Train without openpi's image augmentation.
    no_augment: bool = False
    # Seed of the initialisation, batches, noise and augmentation.
    train_seed: int = 0
    # 'plain' (default) or 'best_of_n:N'; may be repeated.
    placement: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    # Where demos and models are cached (default ~/.cache/flowcorrect/metaworld).
    cache: str | None = None
    # Where the result JSON is written.
    out: str = "results/metaworld-pi0"
    # Train (or load) the model, evaluate nothing.
    train_only: bool = False
    # No progress bars.
    quiet: bool = False

    def task_config(self) -> Pi0TaskConfig:
        """The model and its training, as [`train_pi0`][] takes them."""
        return Pi0TaskConfig(horizon=self.horizon, state=self.state, steps=self.steps,
                             batch_size=self.batch_size, peak_lr=self.lr,
                             warmup_steps=self.warmup, augment=not self.no_augment)


def run(config: Pi0RunConfig) -> dict[str, Any]:
    """Trains (or loads from the cache) the Pi0 that `config` names, evaluates it under
    each of `config.placement` on the same layouts and noise key, and writes
    `<model>-key<key>.json` under `config.out`. **Returns:** that report."""
    from .evaluate import EnvPool, rollout

    progress = not config.quiet
    cache = pathlib.Path(config.cache) if config.cache else default_cache()
    task_config = config.task_config()
    demos = collect_demos(config.task, config.demos, seed=config.demo_seed, cache=cache,
                          progress=progress)
    trained = train_pi0(config.task, demos, task_config, seed=config.train_seed, cache=cache,
                        progress=progress)
    meta = read_meta(trained.path, (PI0_FORMAT,), PI0_VERSION, "harness Pi0",
                      _SAVE_HINT)["config"] if trained.path else {}
    losses = meta.get("losses", trained.losses)
    seconds = meta.get("train_seconds", trained.train_seconds)
    print(f"model {trained.path}; trained {seconds:.0f} s, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} logs)", flush=True)
    report: dict[str, Any] = {
        "task": config.task, "demos": config.demos, "config": task_config.to_json(),
        "model": str(trained.path), "train_seconds": meta.get("train_seconds"),
        "losses": losses, "settings": {},
    }
    if config.train_only:
        return report
    seeds = EVAL_SEED0 + np.arange(config.episodes)
    pool = EnvPool(config.task, config.episodes)
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for text in config.placement or ("plain",):
        placement, energy = parse_placement(text)
        inner = make_act(trained, placement=placement, energy=energy)
        timing = {"queries": 0, "seconds": 0.0, "first": None}

        def act(obs, key, inner=inner, timing=timing):
            t = time.perf_counter()
            chunks, diag = inner(obs, key)
            dt = time.perf_counter() - t
            if timing["first"] is None:
                timing["first"] = dt  # includes compilation
            else:
                timing["queries"] += 1
                timing["seconds"] += dt
            return chunks, diag

        with jax.numpy_rank_promotion("allow"):
            ep = rollout(pool, seeds, act, jax.random.key(config.key), execute=config.execute,
                         max_steps=config.max_steps, progress=progress, desc=text)
        per_query = timing["seconds"] / max(timing["queries"], 1)
        print(f"{text}: success {int(ep.success.sum())}/{len(seeds)}; "
              f"{per_query:.2f} s per query of {len(seeds)} observations "
              f"({timing['queries']} queries after the first, which took "
              f"{timing['first']:.1f} s with compilation)", flush=True)
        report["settings"][text] = {
            "episodes": ep.to_json(), "success": int(ep.success.sum()),
            "seconds_per_query": per_query, "batch": len(seeds),
            "first_query_seconds": timing["first"], "queries": timing["queries"] + 1,
        }
    stem = trained.path.name if trained.path else f"pi0-{config.task}-{config.demos}demos"
    path = out / f"{stem}-key{config.key}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


def parse_cli(argv: list[str] | None = None) -> Pi0RunConfig:
    """The `Pi0RunConfig` that the command line `argv` names."""
    return _cli.parse(Pi0RunConfig, argv, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_cli(argv))


if __name__ == "__main__":
    main()
