"""Serving: correction inside openpi's own `Policy`, so its websocket server and the
`openpi-client` package work unchanged, with settings per server or per request."""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._correctors.recipes import reference_recipe
from .._energy import OnActionDims, as_energy
from .._flow.placements import AbstractPlacement, BestOfN, Denoised, Guided, PostHoc
from .._flow.sample import sample
from .._flow.schedules import EveryStep, LastSteps
from .._rtc import RealTimeChunking
from ._pi0 import Pi0Policy, _pi0, nnx  # ._pi0 checks for openpi first

try:
    from openpi.policies import policy as _policy
except ImportError as e:  # openpi's policy module also needs openpi-client
    from ._import import INSTALL_HINT

    raise ImportError(f"{INSTALL_HINT} (The import failed with: {e})") from e

#: The key of an observation dict that carries per-request correction settings.
OPTIONS_KEY = "flowcorrect"

_KINDS = ("off", "post_hoc", "denoised", "guided", "best_of_n", "rtc")
_KEYS = {
    "off": set(),
    "post_hoc": {"steps", "alpha", "clip_frac", "first_only"},
    "denoised": {"steps", "alpha", "clip_frac", "first_only", "weight", "last"},
    "guided": {"weight", "last", "cap"},
    "best_of_n": {"n"},
    "rtc": {
        "inference_delay",
        "execution_horizon",
        "prefix_attention_schedule",
        "max_guidance_weight",
        "hard_prefix",
    },
}
# Placements that need no energy.
_NO_ENERGY = (RealTimeChunking,)


class CorrectedPi0(nnx.Module):
    """openpi's JAX `Pi0` whose `sample_actions` places a correction: the model to
    hand openpi's `Policy`.

    `sample_actions(rng, observation, *, noise=None, energy=None, placement=None)`
    draws the noise exactly as openpi's `Pi0.sample_actions` does
    (`jax.random.normal(rng, (batch, *noise_shape))`) and runs
    [`flowcorrect.sample`][] on a [`flowcorrect.openpi.Pi0Policy`][] of the model: one
    prefix pass, the energy reading `prefix_out` from it. With `placement=None` the
    actions equal `model.sample_actions(rng, observation, num_steps=num_steps)` bit
    for bit in float32. `energy` and `placement` are ordinary arguments, so through
    openpi's `Policy` (which jits `sample_actions` with `jax.jit`) their arrays are
    traced: new energy weights or new step sizes do not recompile; a new kind of
    placement, or a new count (K steps, `n` candidates), compiles once and is cached.

    **Arguments:**

    - `model`: an `openpi.models.pi0.Pi0` (Pi0 or Pi0.5), checkpoint loaded unchanged.
    - `num_steps`: flow steps, fixed here (openpi's `sample_kwargs={"num_steps": ...}`
        would reach the jitted function as a traced value, which a fixed-length
        `lax.scan` cannot take).
    """

    def __init__(self, model: Any, *, num_steps: int = 10):
        if not isinstance(model, _pi0.Pi0):
            raise TypeError(
                "`model` must be openpi's JAX `openpi.models.pi0.Pi0` (Pi0 or Pi0.5); got "
                f"{type(model).__name__}."
            )
        if not (isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1):
            raise ValueError(
                f"`num_steps` must be an int >= 1 (openpi uses 10); got {num_steps!r}."
            )
        self.model = model
        self.num_steps = num_steps

    def sample_actions(
        self,
        rng: Any,
        observation: Any,
        *,
        num_steps: Any = None,
        noise: Any = None,
        energy: Any = None,
        placement: AbstractPlacement | None = None,
    ) -> Any:
        """openpi's `sample_actions`, with `placement` and `energy` as in `fc.sample`."""
        if num_steps is not None:
            raise ValueError(
                "Set the number of flow steps on the model, CorrectedPi0(model, "
                "num_steps=...) (or CorrectedPolicy(..., num_steps=...)), not in "
                "`sample_kwargs`: there it would reach the jitted function as a traced "
                "value."
            )
        if placement is None:
            energy = None
        elif energy is None and not isinstance(placement, _NO_ENERGY):
            raise ValueError(
                f"The placement {type(placement).__name__} needs an energy; give "
                "CorrectedPolicy an `energy`."
            )
        policy = Pi0Policy(self.model)
        batch = observation.state.shape[0]
        if noise is None:
            shape = (
                policy.chunk_shape
                if placement is None
                else placement.noise_shape(policy.chunk_shape)
            )
            noise = jax.random.normal(rng, (batch, *shape))
        # A key for stochastic correctors, not the one the noise came from.
        key = jax.random.fold_in(rng, 1)
        actions, _ = sample(
            policy,
            observation,
            key,
            noise=noise,
            num_steps=self.num_steps,
            placement=placement,
            energy=energy,
        )
        return actions


def placement_from_options(
    options: Mapping[str, Any], action_dims: int | None = None, previous: Any = None
):
    """Builds a placement from plain settings (what a client can send in a request).

    **Arguments:**

    - `options`: a dict with `"placement"`, one of `"off"`, `"post_hoc"`,
        `"denoised"`, `"guided"`, `"best_of_n"`, and that placement's settings:
        - `post_hoc`: `steps` (K, default 3), `alpha` (0.1), `clip_frac` (0.2),
          `first_only` (False): [`flowcorrect.reference_recipe`][];
        - `denoised`: the same, plus `weight` (1.0) and `last` (correct the last
          `last` flow steps; default every step);
        - `guided`: `weight` (1.0), `last` (default every step), `cap` (1.0);
        - `best_of_n`: `n` (8).
        - `rtc`: real-time chunking ([`flowcorrect.RealTimeChunking`][], needs no
          energy): `inference_delay` (`d`, control steps the robot executes from the
          previous chunk while this one is computed), `execution_horizon` (`s`,
          actions executed from each chunk before the next request), and optionally
          `prefix_attention_schedule` ("exp"), `max_guidance_weight` (5.0),
          `hard_prefix` (False). The names are LeRobot's. The previous chunk's
          leftover is `previous[:, s:]` (zero-padded to the horizon, so the shapes
          never change), in the model's own action space.
    - `action_dims`: the post-hoc and denoised recipes change only the first
        `action_dims` dims.
    - `previous`: for `rtc`, the previous call's chunks `(batch, horizon, action_dim)`
        in the model's action space; `None` (the first call) gives `None` (plain).

    **Returns:**

    An [`flowcorrect.AbstractPlacement`][], or `None` for `"off"`.
    """
    if not isinstance(options, Mapping):
        raise TypeError(
            f"Correction options must be a dict such as {{'placement': 'best_of_n', 'n': 8}}; "
            f"got {type(options).__name__}."
        )
    kind = options.get("placement")
    if kind not in _KINDS:
        raise ValueError(
            f"Correction options need 'placement', one of {list(_KINDS)}; got {kind!r}."
        )
    unknown = set(options) - {"placement"} - _KEYS[kind]
    if unknown:
        raise ValueError(
            f"Unknown correction options for placement {kind!r}: {sorted(unknown)}; it takes "
            f"{sorted(_KEYS[kind]) or 'no other options'}."
        )

    def count(name: str, default: int) -> int:
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"Correction option {name!r} must be an int >= 0; got {value!r}.")
        return int(value)

    def number(name: str, default: float) -> float:
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"Correction option {name!r} must be a number; got {value!r}.")
        return float(value)

    def recipe():
        first_only = options.get("first_only", False)
        if not isinstance(first_only, bool | np.bool_):
            raise ValueError(
                f"Correction option 'first_only' must be true or false; got {first_only!r}."
            )
        return reference_recipe(
            count("steps", 3),
            number("alpha", 0.1),
            number("clip_frac", 0.2),
            first_only=bool(first_only),
            action_dims=action_dims,
        )

    def schedule():
        if "last" not in options:
            return EveryStep()
        return LastSteps(count("last", 0))

    if kind == "off":
        return None
    if kind == "rtc":
        if "execution_horizon" not in options or "inference_delay" not in options:
            raise ValueError(
                "Correction option 'rtc' needs 'inference_delay' and 'execution_horizon' "
                f"(control steps); got {sorted(options)}."
            )
        if previous is None:
            return None
        previous = np.asarray(previous)
        s = count("execution_horizon", 1)
        horizon = previous.shape[1]
        if not 1 <= s <= horizon:
            raise ValueError(
                f"Correction option 'execution_horizon' must be in [1, {horizon}] (the "
                f"chunk's horizon); got {s}."
            )
        leftover = np.zeros_like(previous)
        leftover[:, : horizon - s] = previous[:, s:]
        hard = options.get("hard_prefix", False)
        if not isinstance(hard, bool | np.bool_):
            raise ValueError(
                f"Correction option 'hard_prefix' must be true or false; got {hard!r}."
            )
        schedule = options.get("prefix_attention_schedule", "exp")
        return RealTimeChunking(
            leftover,
            count("inference_delay", 0),
            s,
            prefix_attention_schedule=schedule,
            max_guidance_weight=number("max_guidance_weight", 5.0),
            hard_prefix=bool(hard),
        )
    if kind == "post_hoc":
        return PostHoc(recipe())
    if kind == "denoised":
        return Denoised(recipe(), schedule=schedule(), weight=number("weight", 1.0))
    if kind == "guided":
        return Guided(schedule=schedule(), weight=number("weight", 1.0), cap=number("cap", 1.0))
    return BestOfN(count("n", 8))


class CorrectedPolicy(_policy.Policy):
    """openpi's `Policy` with a placed correction: serve it with openpi's
    `WebsocketPolicyServer`, query it with the `openpi-client` package, unchanged.

    Inference is openpi's own (`Policy.infer`: the input transforms, a batch of one,
    its jitted `sample_actions`, the output transforms); the model is a
    [`flowcorrect.openpi.CorrectedPi0`][] of the same checkpoint. Settings apply per
    server (`placement` here) or per request: an observation dict may carry
    `obs["flowcorrect"] = {"placement": "best_of_n", "n": 8}` (see
    [`flowcorrect.openpi.placement_from_options`][]), which is removed before openpi's
    input transforms and overrides the server's placement for that call. New numbers
    (step size, clip, guidance weight) do not recompile; each new kind of placement
    or count compiles once. The output dict gains `"flowcorrect": {"placement": ...}`,
    which placement ran.

    Build it from the policy openpi builds for the checkpoint,
    [`flowcorrect.openpi.CorrectedPolicy.from_policy`][], or directly like openpi's
    `Policy`.

    **Arguments:**

    - `model`: openpi's JAX `Pi0` (Pi0 or Pi0.5).
    - `energy`: any [`flowcorrect.EnergyFn`][] over
        `fc.TokenContext(prefix_out, prefix_mask)` and one chunk in the model's
        normalised action space, e.g. `fc.load_model(energy_dir)`; `None` serves
        the plain policy (then only `"off"` is accepted).
    - `placement`: the server's default placement; `None` is no correction.
    - `action_dims`: the energy sees, and the recipes change, only the first
        `action_dims` of the model's action dims (LIBERO: 7 of 32): the energy is
        wrapped in [`flowcorrect.OnActionDims`][].
    - `num_steps`: flow steps (openpi's default 10).
    - `rng`, `transforms`, `output_transforms`, `metadata`: as for openpi's `Policy`.
    """

    def __init__(
        self,
        model: Any,
        energy: Any = None,
        *,
        placement: AbstractPlacement | None = None,
        action_dims: int | None = None,
        num_steps: int = 10,
        rng: Any = None,
        transforms: Sequence[Any] = (),
        output_transforms: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
    ):
        if placement is not None and not isinstance(placement, AbstractPlacement):
            raise TypeError(
                "`placement` must be a flowcorrect placement such as fc.BestOfN(8) or None; "
                f"got {type(placement).__name__}. Per-request settings go in the "
                f"observation dict under {OPTIONS_KEY!r}."
            )
        if placement is not None and energy is None:
            raise ValueError(f"The placement {type(placement).__name__} needs an `energy`.")
        if energy is not None:
            energy = as_energy(energy)
            if action_dims is not None:
                energy = OnActionDims(energy, action_dims)
        self.energy = energy
        self.placement = placement
        self.action_dims = action_dims
        _policy.Policy.__init__(
            self,
            CorrectedPi0(model, num_steps=num_steps),
            rng=rng,
            transforms=transforms,
            output_transforms=output_transforms,
            metadata=metadata,
        )
        # The last chunk in the model's action space, for real-time chunking's leftover.
        self._previous = None
        jitted = self._sample_actions

        def sample_and_keep(*args: Any, **kwargs: Any) -> Any:
            actions = jitted(*args, **kwargs)
            self._previous = actions
            return actions

        self._sample_actions = sample_and_keep

    @classmethod
    def from_policy(
        cls,
        policy: Any,
        energy: Any = None,
        *,
        placement: AbstractPlacement | None = None,
        action_dims: int | None = None,
        num_steps: int | None = None,
    ) -> "CorrectedPolicy":
        """The same policy (model, transforms, metadata) with correction.

        For the policy openpi builds from a train config and a checkpoint,
        `openpi.policies.policy_config.create_trained_policy(train_config, ckpt_dir)`.
        It reads the attributes openpi's `Policy` keeps its model, transforms and
        settings in; if a future openpi renames them, this raises and says to build
        [`flowcorrect.openpi.CorrectedPolicy`][] directly.

        **Arguments:**

        - `policy`: an openpi `Policy` of a JAX Pi0 / Pi0.5.
        - `energy`, `placement`, `action_dims`: as for the class.
        - `num_steps`: defaults to the policy's `sample_kwargs["num_steps"]`, else 10.
        """
        if not isinstance(policy, _policy.Policy):
            raise TypeError(f"`policy` must be an openpi `Policy`; got {type(policy).__name__}.")
        names = ("_model", "_input_transform", "_output_transform", "_sample_kwargs", "_metadata")
        missing = [n for n in names if not hasattr(policy, n)]
        if missing or getattr(policy, "_is_pytorch_model", False):
            raise TypeError(
                "CorrectedPolicy.from_policy needs an openpi `Policy` of a JAX model as "
                f"openpi builds it (attributes {list(names)}); this one lacks {missing} or "
                "is a PyTorch policy. Build CorrectedPolicy(model, energy, transforms=..., "
                "output_transforms=...) directly."
            )
        kwargs = dict(policy._sample_kwargs)
        steps = kwargs.pop("num_steps", 10) if num_steps is None else num_steps
        if kwargs.keys() - {"noise"}:
            raise ValueError(
                f"The policy's sample_kwargs {sorted(kwargs)} are not supported; only num_steps is."
            )
        model = policy._model
        if isinstance(model, CorrectedPi0):
            model = model.model
        return cls(
            model,
            energy,
            placement=placement,
            action_dims=action_dims,
            num_steps=int(steps),
            transforms=[policy._input_transform],
            output_transforms=[policy._output_transform],
            metadata=dict(policy._metadata),
        )

    def infer(self, obs: dict, *, noise: np.ndarray | None = None) -> dict:  # type: ignore[override]
        """openpi's `Policy.infer`, with `obs["flowcorrect"]` settings for this call."""
        obs = dict(obs)
        options = obs.pop(OPTIONS_KEY, None)
        if options is None:
            placement = self.placement
        else:
            placement = placement_from_options(options, self.action_dims, self._previous)
        if placement is not None and self.energy is None and not isinstance(placement, _NO_ENERGY):
            raise ValueError(
                "This CorrectedPolicy has no energy, so it serves only "
                f"{{'placement': 'off'}} and {{'placement': 'rtc', ...}}; got {options!r}."
            )
        self._sample_kwargs = (
            {} if placement is None else {"energy": self.energy, "placement": placement}
        )
        outputs = _policy.Policy.infer(self, obs, noise=noise)
        outputs[OPTIONS_KEY] = {"placement": _name(placement)}
        return outputs

    @property
    def metadata(self) -> dict[str, Any]:
        meta = dict(self._metadata)
        meta[OPTIONS_KEY] = {
            "placements": list(_KINDS) if self.energy is not None else ["off", "rtc"],
            "default": _name(self.placement),
            "action_dims": self.action_dims,
        }
        return meta


def _name(placement: AbstractPlacement | None) -> str:
    return "off" if placement is None else type(placement).__name__
