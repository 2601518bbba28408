"""Serving: correction inside openpi's own `Policy`, so its websocket server and the
`openpi-client` package work unchanged, with settings per server or per request."""

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._energy import OnActionDims, as_energy
from .._flow.placements import AbstractPlacement
from .._flow.sample import sample
from .._rtc import RealTimeChunking
from ._episodes import Episodes
from ._pi0 import Pi0Policy, _pi0, nnx  # ._pi0 checks for openpi first
from ._requests import (
    ENERGY_FREE,
    OPTIONS_KEY,
    PLACEMENTS,
    RequestError,
    ServerLimits,
    check_observation,
    parse_request,
    placement_from_request,
)

try:
    from openpi.policies import policy as _policy
except ImportError as e:  # openpi's policy module also needs openpi-client
    from ._import import INSTALL_HINT

    raise ImportError(f"{INSTALL_HINT} (The import failed with: {e})") from e

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
    which placement ran (and the episode and its request index, when one is named).

    A request is checked completely before any work, the same way on the first
    request as on the thousandth: its options against the server's
    [`flowcorrect.openpi.ServerLimits`][] (counts that set compiled sizes are bounded),
    its observation for type, size and finiteness, and, after openpi's input
    transforms, for the shapes the model takes. A refused request raises
    [`flowcorrect.openpi.RequestError`][] with one message naming the option or key,
    the value and what is allowed, and changes no state; through openpi's server the
    client receives that message and the server keeps serving.

    State belongs to episodes the client names (`obs["flowcorrect"]["episode"]`, any
    string id), never to the server process: real-time chunking continues the
    episode's own previous chunk (the first request of an episode is plain), and an
    episode's noise comes from its own key, so two clients interleaving requests on one
    server get exactly the chunks each would get alone. `"reset": true` starts the
    episode afresh; `{"episode": id, "done": true}` ends it without running the model.
    Episodes never ended are dropped after `limits.episode_idle_s` idle, or when more
    than `limits.max_episodes` are open. A request without an episode uses the
    server's own key, exactly as openpi's `Policy` does.

    Build it from the policy openpi builds for the checkpoint,
    [`flowcorrect.openpi.CorrectedPolicy.from_policy`][], or directly like openpi's
    `Policy`.

    **Arguments:**

    - `model`: openpi's JAX `Pi0` (Pi0 or Pi0.5).
    - `energy`: any [`flowcorrect.EnergyFn`][] over
        `fc.TokenContext(prefix_out, prefix_mask)` and one chunk in the model's
        normalised action space, e.g. `fc.load_model(energy_dir)`; `None` serves
        the plain policy (then only `"off"` and `"rtc"` are accepted).
    - `placement`: the server's default placement; `None` is no correction.
    - `action_dims`: the energy sees, and the recipes change, only the first
        `action_dims` of the model's action dims (LIBERO: 7 of 32): the energy is
        wrapped in [`flowcorrect.OnActionDims`][].
    - `num_steps`: flow steps (openpi's default 10).
    - `limits`: what one request may ask, [`flowcorrect.openpi.ServerLimits`][].
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
        limits: ServerLimits | None = None,
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
        if limits is None:
            limits = ServerLimits()
        if not isinstance(limits, ServerLimits):
            raise TypeError(
                f"`limits` must be a flowcorrect.openpi.ServerLimits; got {type(limits).__name__}."
            )
        if energy is not None:
            energy = as_energy(energy)
            if action_dims is not None:
                energy = OnActionDims(energy, action_dims)
        self.energy = energy
        self.placement = placement
        self.action_dims = action_dims
        self.limits = limits
        _policy.Policy.__init__(
            self,
            CorrectedPi0(model, num_steps=num_steps),
            rng=rng,
            transforms=transforms,
            output_transforms=output_transforms,
            metadata=metadata,
        )
        self._episodes = Episodes(jax.random.fold_in(self._rng, 0x5EED), limits)
        self._lock = threading.Lock()
        self._last_actions = None
        jitted = self._sample_actions

        def sample_and_keep(*args: Any, **kwargs: Any) -> Any:
            actions = jitted(*args, **kwargs)
            self._last_actions = actions
            return actions

        self._sample_actions = sample_and_keep
        transform = self._input_transform

        def checked_transform(inputs: Any) -> Any:
            try:
                out = transform(inputs)
            except Exception as e:
                raise RequestError(
                    "The policy's input transforms could not read this observation "
                    f"({_describe(inputs)}): {type(e).__name__}: {e}. Send the keys and "
                    "shapes this policy's data config expects."
                ) from e
            return self._check_model_inputs(out)

        self._input_transform = checked_transform

    @classmethod
    def from_policy(
        cls,
        policy: Any,
        energy: Any = None,
        *,
        placement: AbstractPlacement | None = None,
        action_dims: int | None = None,
        num_steps: int | None = None,
        limits: ServerLimits | None = None,
    ) -> "CorrectedPolicy":
        """The same policy (model, transforms, metadata) with correction.

        For the policy openpi builds from a train config and a checkpoint,
        `openpi.policies.policy_config.create_trained_policy(train_config, ckpt_dir)`.
        It reads the attributes openpi's `Policy` keeps its model, transforms and
        settings in; if a future openpi renames them, this raises and says to build
        [`flowcorrect.openpi.CorrectedPolicy`][] directly.

        **Arguments:**

        - `policy`: an openpi `Policy` of a JAX Pi0 / Pi0.5.
        - `energy`, `placement`, `action_dims`, `limits`: as for the class.
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
            limits=limits,
            transforms=[policy._input_transform],
            output_transforms=[policy._output_transform],
            metadata=dict(policy._metadata),
        )

    @property
    def _pi0(self) -> Any:
        return self._model.model

    def _check_model_inputs(self, inputs: Any) -> Any:
        """After openpi's input transforms: the arrays the model takes, at its sizes."""
        from openpi.models import model as _model

        model = self._pi0
        if not isinstance(inputs, Mapping) or not {"image", "image_mask", "state"} <= set(inputs):
            raise RequestError(
                "After the policy's input transforms the observation must give 'image', "
                f"'image_mask' and 'state'; got {_keys(inputs)}. Check the observation's keys "
                "against the policy's transforms (its train config's data config)."
            )
        images, masks = inputs["image"], inputs["image_mask"]
        missing = [k for k in _model.IMAGE_KEYS if k not in images or k not in masks]
        if missing:
            raise RequestError(
                f"After the input transforms the images lack {missing} (the model takes "
                f"{list(_model.IMAGE_KEYS)}); got images {_keys(images)}, masks {_keys(masks)}."
            )
        size = (*_model.IMAGE_RESOLUTION, 3)
        for key in _model.IMAGE_KEYS:
            image = np.asarray(images[key])
            if image.shape != size or image.dtype.kind not in "uf":
                raise RequestError(
                    f"Image {key!r} is {image.dtype}{list(image.shape)} after the input "
                    f"transforms; the model takes {list(size)} (uint8, or float in [-1, 1]). "
                    "Resize on the client (openpi_client.image_tools.resize_with_pad(image, "
                    f"{size[0]}, {size[1]})), as openpi's examples do."
                )
            if image.dtype.kind == "f" and not np.isfinite(image).all():
                raise RequestError(f"Image {key!r} has non-finite values.")
            if np.shape(masks[key]) != ():
                raise RequestError(
                    f"Image mask {key!r} must be one bool; got shape {np.shape(masks[key])}."
                )
        state = np.asarray(inputs["state"])
        if state.shape != (model.action_dim,) or state.dtype.kind not in "fiu":
            raise RequestError(
                f"The state is {state.dtype}{list(state.shape)} after the input transforms; "
                f"the model takes a float vector of {model.action_dim}. Send the state the "
                "policy's transforms expect (its length for this robot)."
            )
        if not np.isfinite(state).all():
            raise RequestError("The state has non-finite values after the input transforms.")
        if "tokenized_prompt" in inputs:
            tokens = np.asarray(inputs["tokenized_prompt"])
            if tokens.shape != (model.max_token_len,):
                raise RequestError(
                    f"The tokenized prompt has shape {tokens.shape}; the model takes "
                    f"({model.max_token_len},)."
                )
        return inputs

    def infer(self, obs: dict, *, noise: np.ndarray | None = None) -> dict:  # type: ignore[override]
        """openpi's `Policy.infer`, with `obs["flowcorrect"]` settings for this call.

        Raises [`flowcorrect.openpi.RequestError`][] (and changes no state) for a request
        the server refuses."""
        with self._lock:
            return self._infer(obs, noise)

    def _infer(self, obs: Any, noise: Any) -> dict:
        if not isinstance(obs, Mapping):
            raise RequestError(f"The observation must be a dict; got {type(obs).__name__}.")
        obs = dict(obs)
        request = parse_request(
            obs.pop(OPTIONS_KEY, None),
            limits=self.limits,
            horizon=self._pi0.action_horizon,
            num_steps=self._model.num_steps,
            has_energy=self.energy is not None,
        )
        if request.done:
            self._episodes.close(request.episode)
            return {OPTIONS_KEY: {"episode": request.episode, "done": True}}
        if request.placement == "rtc" and request.episode is None:
            raise RequestError(
                "Placement 'rtc' continues the previous chunk of an episode: name the "
                "episode with 'episode' (any string id, the same for every request of one "
                "episode), so that its leftover is never another client's chunk."
            )
        check_observation(obs, self.limits)
        if noise is not None:
            noise = _checked_noise(noise)
        episode = None
        if request.episode is not None:
            episode = self._episodes.peek(request.episode, reset=request.reset)
        previous = None if episode is None else episode.previous
        if request.placement is None:
            placement = self.placement
        else:
            placement = placement_from_request(request, self.action_dims, previous)
        self._sample_kwargs = (
            {} if placement is None else {"energy": self.energy, "placement": placement}
        )
        server_rng = self._rng
        if episode is not None:
            self._rng = episode.next_rng()
        self._last_actions = None
        try:
            outputs = _policy.Policy.infer(self, obs, noise=noise)
        except Exception:
            self._rng = server_rng  # a failed request changes no state
            raise
        finally:
            chunk, self._last_actions = self._last_actions, None
        if episode is not None:
            self._rng = server_rng
        actions = outputs.get("actions")
        if actions is None or not np.all(np.isfinite(np.asarray(actions, float))):
            raise RequestError(
                "The policy produced non-finite actions for this observation; none are "
                "sent. Check the observation's values (state scale, images)."
            )
        info: dict[str, Any] = {"placement": _name(placement)}
        if episode is not None:
            info["episode"] = request.episode
            info["request"] = episode.requests
            self._episodes.commit(request.episode, episode, np.asarray(chunk))
        outputs[OPTIONS_KEY] = info
        return outputs

    @property
    def metadata(self) -> dict[str, Any]:
        meta = dict(self._metadata)
        meta[OPTIONS_KEY] = {
            "placements": list(PLACEMENTS) if self.energy is not None else list(ENERGY_FREE),
            "default": _name(self.placement),
            "action_dims": self.action_dims,
            "limits": self.limits.as_dict(),
            "num_steps": self._model.num_steps,
            "action_horizon": self._pi0.action_horizon,
        }
        return meta


def _checked_noise(noise: Any) -> np.ndarray:
    noise = np.asarray(noise)
    if noise.dtype.kind != "f" or not np.isfinite(noise).all():
        raise RequestError(
            f"`noise` must be a finite float array; got {noise.dtype}{list(noise.shape)}."
        )
    return noise


def _describe(tree: Any) -> str:
    def one(x: Any) -> str:
        return repr(x)[:40] if isinstance(x, str) else f"{np.asarray(x).dtype}{list(np.shape(x))}"

    return ", ".join(
        f"{'/'.join(str(getattr(k, 'key', k)) for k in path)}: {one(x)}"
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    )


def _keys(tree: Any) -> Any:
    return sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__


def _name(placement: AbstractPlacement | None) -> str:
    return "off" if placement is None else type(placement).__name__
