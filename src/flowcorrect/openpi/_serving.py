"""Serving: correction inside openpi's own `Policy`, so its websocket server and the
`openpi-client` package work unchanged, with settings per server or per request."""

import dataclasses
import hashlib
import json
import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._configs import PLACEMENT_CONFIGS, AbstractPlacementConfig
from .._constraints.base import AbstractConstraint
from .._constraints.continuing import Continuing
from .._constraints.energy import ViolationEnergy
from .._constraints.robot import InRobotSpace
from .._energy import OnActionDims, as_energy
from .._model.context import TokenContext
from .._model.pooled import PooledContext, pool_tokens
from .._placements.base import AbstractPlacement
from .._placements.plain import Plain
from .._placements.project import Project, ProjectInfo
from .._policy import AbstractBatchedPolicy
from .._rtc_training import PrefixConditioned
from .._sample import sample
from ._episodes import Episodes
from ._pi0 import Pi0Policy, _pi0, nnx  # ._pi0 checks for openpi first
from ._recording import Recorder
from ._requests import (
    CONSTRAINED,
    CONTINUES,
    ENERGY_FREE,
    EPISODE_KEYS,
    OPTIONS_KEY,
    PLACEMENTS,
    RequestError,
    ServerLimits,
    bounds,
    check_observation,
    check_served_placement,
    parse_request,
    placement_from_request,
)
from ._rtc_training import Pi0TokenTimePolicy

try:
    from openpi.policies import policy as _policy
except ImportError as e:  # openpi's policy module also needs openpi-client
    from ._import import INSTALL_HINT

    raise ImportError(f"{INSTALL_HINT} (The import failed with: {e})") from e



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
        record: "Record | None" = None,
        report: "Report | None" = None,
    ) -> Any:
        """openpi's `sample_actions`, with `placement` and `energy` as in `fc.sample`.

        With `record` (a [`flowcorrect.openpi.Record`][]) or `report` (a `Report()`,
        a marker with no arrays, so that it passes openpi's `jit` unchanged) it returns
        `(actions, extras)`: with `record`, the pooled prefix features (`"context"`)
        and the candidate chunks of each sample (`"candidates"`); with `report` and a
        [`flowcorrect.Project`][] placement, its diagnostics per sample
        (`"constraint"`: violation before and after, distance moved, feasible)."""
        if num_steps is not None:
            raise ValueError(
                "Set the number of flow steps on the model, CorrectedPi0(model, "
                "num_steps=...) (or CorrectedPolicy(..., num_steps=...)), not in "
                "`sample_kwargs`: there it would reach the jitted function as a traced "
                "value."
            )
        # A placement that needs an energy and has none is refused by fc.sample itself,
        # at trace time, naming the placement; energy-free ones (real-time chunking,
        # consensus ranking) need none.
        if placement is None:
            placement, energy = Plain(), None  # openpi's own sampler
        policy = Pi0Policy(self.model)
        if isinstance(placement, PrefixConditioned):
            # Training-time real-time chunking: the committed actions go in at the clean
            # flow time, which takes the action expert's time per token.
            policy = Pi0TokenTimePolicy(policy)
        if record is not None:
            # One prefix pass for the sample, its extra candidates and the context.
            policy = _FixedPrefix(policy, policy.condition(observation))
        batch = observation.state.shape[0]
        if noise is None:
            shape = placement.noise_shape(policy.chunk_shape)
            noise = jax.random.normal(rng, (batch, *shape))
        # A key for stochastic correctors, not the one the noise came from.
        key = jax.random.fold_in(rng, 1)
        actions, info = sample(
            policy,
            observation,
            key,
            noise=noise,
            num_steps=self.num_steps,
            placement=placement,
            energy=energy,
        )
        if record is None and report is None:
            return actions
        extras = {} if record is None else record.extras(policy, actions, rng, self.num_steps)
        if report is not None and isinstance(info.placement, ProjectInfo):
            project = info.placement
            extras["constraint"] = {
                "violation_before": project.violation_before,
                "violation_after": project.violation_after,
                "distance": project.distance,
                "feasible": project.feasible,
                "fell_back": project.fell_back | project.kept,
            }
        return actions, extras


class Report(eqx.Module):
    """Asks [`flowcorrect.openpi.CorrectedPi0.sample_actions`][] for the projection's
    diagnostics beside the actions."""


class Record(eqx.Module):
    """What a recording server keeps of each request, computed in the same compiled
    call as the actions and from the same prefix pass.

    - `candidates`: extra plain chunks drawn per request (beside the executed one,
        which is candidate 0), for the verifier's report of within-state spread.
    - `action_dims`: the chunk dims recorded (what the energy reads); `None`, all.
    """

    candidates: int = eqx.field(static=True)
    action_dims: int | None = eqx.field(static=True)

    def extras(self, policy: "_FixedPrefix", actions: Any, rng: Any, num_steps: int) -> dict:
        context = pool_tokens(policy.energy_context(policy.value))
        chunks = actions[:, None]
        if self.candidates:
            noise = jax.random.normal(
                jax.random.fold_in(rng, 2), (actions.shape[0], self.candidates, *actions.shape[1:])
            )

            def plain(z):
                return sample(policy, None, None, noise=z, num_steps=num_steps)[0]

            extra = jax.vmap(plain, in_axes=1, out_axes=1)(noise)
            chunks = jnp.concatenate([chunks, extra.astype(actions.dtype)], axis=1)
        if self.action_dims is not None:
            chunks = chunks[..., : self.action_dims]
        return {"context": context, "candidates": chunks.astype(jnp.float32)}


class _FixedPrefix(AbstractBatchedPolicy):
    """A batched policy whose prefix pass has already run: `condition` returns it."""

    policy: AbstractBatchedPolicy
    value: Any

    @property
    def chunk_shape(self) -> tuple[int, int]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.chunk_shape

    @property
    def convention(self) -> Any:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.convention

    def condition(self, observations: Any) -> Any:
        return self.value

    def batch_size(self, prefix: Any) -> int:
        return self.policy.batch_size(prefix)

    def velocity(self, prefix: Any, x_t: Any, t: Any) -> Any:
        return self.policy.velocity(prefix, x_t, t)

    def energy_context(self, prefix: Any) -> Any:
        return self.policy.energy_context(prefix)

    def repeat(self, prefix: Any, n: int) -> Any:
        return self.policy.repeat(prefix, n)


def model_fingerprint(model: Any) -> str:
    """A hash of a model's weights (every array of its `nnx.state`, with its path, dtype
    and shape): recorded contexts name the checkpoint that produced them."""
    digest = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    for path, leaf in leaves:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


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
    - `default_options`: instead of `placement`, the server's default as a config
        (`fc.configs.BestOfNConfig(n=8)`) or as the options a client would send
        (`{"placement": "best_of_n", "n": 8}`, or `{"placement": "rtc", ...}`, which
        needs no energy), checked like a request's
        when the policy is built and applied to every request that names no
        placement of its own (a request's `episode` and other keys still apply).
    - `action_dims`: the energy sees, and the recipes change, only the first
        `action_dims` of the model's action dims (LIBERO: 7 of 32): the energy is
        wrapped in [`flowcorrect.OnActionDims`][].
    - `num_steps`: flow steps (openpi's default 10).
    - `limits`: what one request may ask, [`flowcorrect.openpi.ServerLimits`][].
    - `verifier`: instead of `energy`, a verifier over the policy's pooled prefix
        features (one vector per observation, e.g. an [`flowcorrect.MLPEnergy`][]
        trained by [`flowcorrect.verifiers.fit_verifier`][] on this server's recording), or the
        directory [`flowcorrect.save_model`][] wrote it to. It is served as
        `fc.PooledContext(verifier)` (so ranking and guidance read it through the same
        pooling as the recording), checked against the model's sizes here, at start,
        and named in the metadata (its directory, a hash of its files, and the
        headline numbers of a `report.json` beside it).
    - `record_dir`: record every request that names an episode, and write the episode
        to this [`flowcorrect.verifiers.RolloutWriter`][] directory when the client reports its
        outcome (`{"episode": id, "done": true, "success": ...}`): the pooled prefix
        features (`observation`), the executed chunk in the model's action space (its
        first `action_dims` dims) as candidate 0, and `record_candidates` more plain
        chunks from other noise, all from the request's own prefix pass. The
        directory's `meta.json` names the model's fingerprint, so that training on a
        recording made by another checkpoint is refused
        ([`flowcorrect.openpi.recorded_rollouts`][]).
    - `record_candidates`: extra plain candidates recorded per request (default 7).
    - `record_observation`: what each recorded request's `observation` is:
        `"context"` (default: the pooled prefix features, one vector, tied to this
        checkpoint) or `"inputs"` (the model's inputs after openpi's transforms, as a
        pytree: the three images, their masks, the state and the prompt tokens; about
        20 to 50 times larger, and usable with any later checkpoint or encoder).
    - `constraint`: limits every chunk the server sends must satisfy, an
        [`flowcorrect.constraints.AbstractConstraint`][]
        (`fc.constraints.AllOf(fc.constraints.Box(...), fc.constraints.MaxStepChange(...))`).
        Fixed by the server's owner: every chunk, whatever placement the request asks
        for, is projected onto it
        ([`flowcorrect.Project`][] around the placement), and no request option can
        loosen or remove it. A step or jerk limit holds across an episode's chunks
        too when the request says how many actions of the previous chunk the robot
        executed (`"executed": k`; real-time chunking reads it from its own
        settings): the constraint is continued after them
        ([`flowcorrect.constraints.AbstractConstraint.after`][]). The reply's
        `obs["flowcorrect"]["constraint"]` says
        whether and how much the chunk was changed (`changed`, `distance`,
        `violation_before`, `violation_after`, `feasible`). Requests may also ask for
        guidance by its violation (`{"placement": "feasible"}`, so that the projection
        has less to do) or best-of-N among feasible candidates (`"feasible_first":
        true`).
    - `constraint_units`: `"robot"` (the default): the constraint is in the units of
        the actions after the output transforms' `Unnormalize` (openpi's own
        normalisation statistics, quantile or z-score, padded as openpi pads them), and
        is applied through [`flowcorrect.constraints.InRobotSpace`][]; `"model"`: in the model's
        normalised action space, as given. Output transforms after `Unnormalize`
        (absolute-action conversions, a robot's own dims) are not modelled: state
        limits in the units `Unnormalize` produces.
    - `rng`, `transforms`, `output_transforms`, `metadata`: as for openpi's `Policy`.
    """

    def __init__(
        self,
        model: Any,
        energy: Any = None,
        *,
        placement: AbstractPlacement | None = None,
        default_options: Mapping[str, Any] | AbstractPlacementConfig | None = None,
        action_dims: int | None = None,
        num_steps: int = 10,
        limits: ServerLimits | None = None,
        verifier: Any = None,
        record_dir: Any = None,
        record_candidates: int = 7,
        record_observation: str = "context",
        constraint: Any = None,
        constraint_units: str = "robot",
        rng: Any = None,
        transforms: Sequence[Any] = (),
        output_transforms: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
    ):
        self._verifier_info = None
        if verifier is not None:
            if energy is not None:
                raise ValueError(
                    "Give CorrectedPolicy an `energy` or a `verifier`, not both: both are "
                    "what the placements read."
                )
            energy, self._verifier_info = _load_verifier(verifier)
        if placement is not None and not isinstance(placement, AbstractPlacement):
            raise TypeError(
                "`placement` must be a flowcorrect placement such as fc.BestOfN(8) or None; "
                f"got {type(placement).__name__}. Per-request settings go in the "
                f"observation dict under {OPTIONS_KEY!r}."
            )
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
        self.constraint = None
        self._constraint_info = None
        if constraint is not None:
            self.constraint = self._served_constraint(constraint, constraint_units)
            self._constraint_info = {
                "constraint": repr(constraint),
                "units": constraint_units,
                "fixed": True,
            }
        if self.energy is not None:
            self._check_energy_fits(verifier is not None)
        check_served_placement(placement, self.energy is not None)
        self.default_options = None
        if isinstance(default_options, AbstractPlacementConfig):
            default_options = default_options.options()
        if default_options is not None:
            if placement is not None:
                raise ValueError(
                    "Give CorrectedPolicy a `placement` or `default_options`, not both."
                )
            request = parse_request(
                default_options,
                limits=limits,
                horizon=self._pi0.action_horizon,
                num_steps=num_steps,
                has_energy=self.energy is not None,
                has_constraint=self.constraint is not None,
            )
            extra = sorted(set(default_options) & set(EPISODE_KEYS))
            if request.placement is None or extra:
                raise ValueError(
                    "`default_options` must name a 'placement' and no episode keys "
                    f"(those are each client's); got {dict(default_options)!r}."
                )
            _check_token_time(request.placement, self._pi0.pi05)
            self.default_options = dict(default_options)
        self._recorder = None
        self._record = None
        if record_dir is not None:
            if isinstance(record_candidates, bool) or not isinstance(
                record_candidates, int | np.integer
            ) or not 0 <= record_candidates <= limits.max_candidates:
                raise ValueError(
                    f"`record_candidates` must be an int in [0, {limits.max_candidates}] "
                    f"(ServerLimits.max_candidates); got {record_candidates!r}."
                )
            if record_observation not in ("context", "inputs"):
                raise ValueError(
                    "`record_observation` must be 'context' (pooled prefix features) or "
                    f"'inputs' (the model's inputs after the transforms); got "
                    f"{record_observation!r}."
                )
            self._record_observation = record_observation
            self._record = Record(int(record_candidates), action_dims)
            self._recorder = Recorder(
                record_dir, self._record_info(), limits.max_recording_bytes
            )
        self._episodes = Episodes(
            jax.random.fold_in(self._rng, 0x5EED), limits, on_drop=self._dropped
        )
        self._lock = threading.Lock()
        self._last_actions = None
        self._last_extras = None
        self._last_inputs = None
        jitted = self._sample_actions

        def sample_and_keep(*args: Any, **kwargs: Any) -> Any:
            actions = jitted(*args, **kwargs)
            if "record" in kwargs or "report" in kwargs:
                actions, self._last_extras = actions
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
            self._last_inputs = self._check_model_inputs(out)
            return self._last_inputs

        self._input_transform = checked_transform

    @classmethod
    def from_policy(
        cls,
        policy: Any,
        energy: Any = None,
        *,
        placement: AbstractPlacement | None = None,
        default_options: Mapping[str, Any] | AbstractPlacementConfig | None = None,
        action_dims: int | None = None,
        num_steps: int | None = None,
        limits: ServerLimits | None = None,
        verifier: Any = None,
        record_dir: Any = None,
        record_candidates: int = 7,
        record_observation: str = "context",
        constraint: Any = None,
        constraint_units: str = "robot",
    ) -> "CorrectedPolicy":
        """The same policy (model, transforms, metadata) with correction.

        For the policy openpi builds from a train config and a checkpoint,
        `openpi.policies.policy_config.create_trained_policy(train_config, ckpt_dir)`.
        It reads the attributes openpi's `Policy` keeps its model, transforms and
        settings in; if a future openpi renames them, this raises and says to build
        [`flowcorrect.openpi.CorrectedPolicy`][] directly.

        **Arguments:**

        - `policy`: an openpi `Policy` of a JAX Pi0 / Pi0.5.
        - `energy`, `placement`, `default_options`, `action_dims`, `limits`,
            `verifier`, `record_dir`, `record_candidates`, `record_observation`,
            `constraint`, `constraint_units`: as for the class.
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
            default_options=default_options,
            action_dims=action_dims,
            num_steps=int(steps),
            limits=limits,
            verifier=verifier,
            record_dir=record_dir,
            record_candidates=record_candidates,
            record_observation=record_observation,
            constraint=constraint,
            constraint_units=constraint_units,
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
        options = obs.pop(OPTIONS_KEY, None)
        if self.default_options is not None and (
            options is None
            or (isinstance(options, Mapping) and not {"placement", "done"} & set(options))
        ):
            options = {**self.default_options, **(options or {})}
        request = parse_request(
            options,
            limits=self.limits,
            horizon=self._pi0.action_horizon,
            num_steps=self._model.num_steps,
            has_energy=self.energy is not None,
            has_constraint=self.constraint is not None,
        )
        if request.done:
            self._episodes.close(request.episode)
            reply: dict[str, Any] = {"episode": request.episode, "done": True}
            if self._recorder is not None:
                reply["recorded_queries"] = self._recorder.finish(
                    request.episode, request.success
                )
                if request.success is None:
                    reply["note"] = "no 'success' given: the episode was not recorded"
                reply["recording"] = self._recorder.status()
            return {OPTIONS_KEY: reply}
        if request.placement in CONTINUES and request.episode is None:
            raise RequestError(
                f"Placement {request.placement!r} continues the previous chunk of an "
                "episode: name the "
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
        recording = (
            self._recorder is not None
            and self._recorder.error is None
            and request.episode is not None
        )
        placement, self._sample_kwargs = self._sample_kwargs_for(request, previous, recording)
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
            extras, self._last_extras = self._last_extras, None
        if episode is not None:
            self._rng = server_rng
        actions = outputs.get("actions")
        if actions is None or not np.all(np.isfinite(np.asarray(actions, float))):
            raise RequestError(
                "The policy produced non-finite actions for this observation; none are "
                "sent. Check the observation's values (state scale, images)."
            )
        info: dict[str, Any] = {"placement": _name(placement)}
        if self.constraint is not None:
            info["constraint"] = _constraint_reply(extras["constraint"])
        if episode is not None:
            info["episode"] = request.episode
            info["request"] = episode.requests
            if request.reset:
                self._dropped(request.episode, None)
            self._episodes.commit(request.episode, episode, np.asarray(chunk))
            if recording:
                if self._record_observation == "context":
                    observation = np.asarray(extras["context"][0])
                else:
                    observation = _numeric_arrays(self._last_inputs)
                self._recorder.add(
                    request.episode, observation, np.asarray(extras["candidates"][0])
                )
        outputs[OPTIONS_KEY] = info
        return outputs

    def _sample_kwargs_for(
        self, request: Any, previous: Any, recording: bool
    ) -> tuple[AbstractPlacement | None, dict[str, Any]]:
        """The placement a request runs and the keyword arguments of `sample_actions`."""
        _check_token_time(request.placement, self._pi0.pi05)
        constraint = self._constraint_for(request, previous)
        if request.placement is None:
            placement = self.placement
        else:
            placement = placement_from_request(request, self.action_dims, previous, constraint)
        energy = self.energy
        if request.placement in CONSTRAINED:
            energy = ViolationEnergy(constraint)
        if constraint is not None:
            # The server's guarantee, around whatever the request asked for.
            placement = Project(constraint, Plain() if placement is None else placement)
        kwargs: dict[str, Any] = (
            {} if placement is None else {"energy": energy, "placement": placement}
        )
        if self.constraint is not None:
            kwargs["report"] = Report()
        if recording:
            kwargs["record"] = self._record
        return placement, kwargs

    def _constraint_for(self, request: Any, previous: Any) -> AbstractConstraint | None:
        """The server's constraint on this request's chunk: continued after the actions
        the episode executed, when the request says how many (`executed`) or its
        placement continues the previous chunk (after `execution_horizon +
        inference_delay` of them, from row `inference_delay`)."""
        constraint = self.constraint
        if constraint is None or previous is None:
            return constraint
        config = request.config
        if config is not None and config.continues:
            s, d = config.execution_horizon, config.inference_delay
            return Continuing(constraint, jnp.asarray(previous[0, : s + d]), d)
        if request.executed is not None:
            return constraint.after(jnp.asarray(previous[0, : request.executed]))
        return constraint

    def warm_up(self) -> list[str]:
        """Compiles what the server's default requests run, before the first client
        connects: a request that compiles for a minute would block openpi's server
        loop, and its client's keep-alive would time out. The default placement (for
        real-time chunking, both an episode's first, plain, chunk and a continuing
        one), with the projection and the recording the server applies, on an
        observation of the model's input shapes. Returns the placements compiled.
        Requests for other placements compile at their first use."""
        from openpi.models import model as _model

        model = self._pi0
        fake = _fake_observation(model)
        observation = _model.Observation(
            images={k: jnp.zeros(v.shape, jnp.float32) for k, v in fake.images.items()},
            image_masks={k: jnp.ones(v.shape, bool) for k, v in fake.image_masks.items()},
            state=jnp.zeros(fake.state.shape, jnp.float32),
            tokenized_prompt=jnp.zeros(fake.tokenized_prompt.shape, jnp.int32),
            tokenized_prompt_mask=jnp.ones(fake.tokenized_prompt_mask.shape, bool),
        )
        request = parse_request(
            self.default_options, limits=self.limits, horizon=model.action_horizon,
            num_steps=self._model.num_steps, has_energy=self.energy is not None,
            has_constraint=self.constraint is not None,
        )
        zeros = np.zeros((1, model.action_horizon, model.action_dim), np.float32)
        variants = [(request, None)]
        if request.placement in CONTINUES:
            variants.append((request, zeros))
        elif self.constraint is not None and _reads_past(self.constraint, zeros):
            # A continuing episode's request (`executed`) joins the limits to its past.
            variants.append((dataclasses.replace(request, executed=1), zeros))
        compiled = []
        for req, prev in variants:
            for recording in {False, self._recorder is not None}:
                placement, kwargs = self._sample_kwargs_for(req, prev, recording)
                self._sample_actions(jax.random.key(0), observation, **kwargs)
                name = _name(placement) + (" (continued)" if req.executed else "")
                compiled.append(name + (" (recording)" if recording else ""))
        self._last_actions = self._last_extras = None
        return compiled

    @property
    def metadata(self) -> dict[str, Any]:
        meta = dict(self._metadata)
        meta[OPTIONS_KEY] = {
            # Without an energy: the energy-free ones, and best_of_n by consensus only.
            "placements": [
                kind
                for kind in (
                    PLACEMENTS if self.energy is not None else (*ENERGY_FREE, "best_of_n")
                )
                if not (kind == "trt" and self._pi0.pi05)  # one flow time per sample
            ],
            "energy": self.energy is not None,
            "default": self.default_options or _name(self.placement),
            "action_dims": self.action_dims,
            "limits": self.limits.as_dict(),
            # Each served placement's settings: type, default and range on this server.
            "options": {},
            "num_steps": self._model.num_steps,
            "action_horizon": self._pi0.action_horizon,
            "verifier": self._verifier_info,
            "recording": None if self._recorder is None else self._recorder.status(),
            "constraint": self._constraint_info,
        }
        if self.constraint is not None:
            meta[OPTIONS_KEY]["placements"] = [
                *meta[OPTIONS_KEY]["placements"], *CONSTRAINED
            ]
        sizes = bounds(self.limits, self._pi0.action_horizon, self._model.num_steps)
        meta[OPTIONS_KEY]["options"] = {
            kind: PLACEMENT_CONFIGS[kind].schema(sizes)
            for kind in meta[OPTIONS_KEY]["placements"]
        }
        return meta

    def _dropped(self, episode: str, _: Any) -> None:
        if self._recorder is not None:
            self._recorder.discard(episode)

    def _record_info(self) -> dict[str, Any]:
        model = self._pi0
        return {
            "source": "flowcorrect.openpi.CorrectedPolicy",
            "observation": (
                "pooled prefix features (fc.pool_tokens of prefix_out)"
                if self._record_observation == "context"
                else "the model's inputs after the policy's input transforms"
            ),
            "model_fingerprint": model_fingerprint(model),
            "action_horizon": int(model.action_horizon),
            "action_dims": int(self.action_dims or model.action_dim),
            "record_candidates": self._record.candidates,
        }

    def _served_constraint(self, constraint: Any, units: str) -> AbstractConstraint:
        """The constraint in the model's action space: `InRobotSpace` of the output
        transforms' normalisation for `units="robot"`; checked on the model's chunk
        shape here, at start."""
        if not isinstance(constraint, AbstractConstraint):
            raise TypeError(
                "`constraint` must be a flowcorrect constraint such as "
                "fc.constraints.Box(-1.0, 1.0) or fc.constraints.AllOf(...); got "
                f"{type(constraint).__name__}."
            )
        if units not in ("robot", "model"):
            raise ValueError(
                "`constraint_units` must be 'robot' (after the output transforms' "
                f"Unnormalize) or 'model' (the normalised action space); got {units!r}."
            )
        model = self._pi0
        if units == "robot":
            constraint = robot_space(constraint, self._output_transform, model.action_dim)
        chunk = jnp.zeros((model.action_horizon, model.action_dim), jnp.float32)
        try:
            jax.eval_shape(constraint.project, chunk)
            jax.eval_shape(constraint.violation, chunk)
        except Exception as e:
            raise ValueError(
                f"The constraint cannot act on this model's chunks {tuple(chunk.shape)} "
                f"(horizon, action_dim): {type(e).__name__}: {e}. State its dims within "
                f"the model's {model.action_dim} action dims."
            ) from e
        return constraint

    def _check_energy_fits(self, is_verifier: bool) -> None:
        """Runs the energy on the model's context and chunk shapes, abstractly, so that
        one that cannot read them is refused now, not at the first request."""
        model = self._pi0
        policy = Pi0Policy(model)
        spec = jax.eval_shape(
            lambda: policy.energy_context(policy.condition(_fake_observation(model)))
        )
        context = TokenContext(
            jnp.zeros(spec.tokens.shape[1:], jnp.float32), jnp.ones(spec.mask.shape[1:], bool)
        )
        try:
            out = jax.eval_shape(self.energy, context, jnp.zeros(policy.chunk_shape, jnp.float32))
        except Exception as e:
            what = "verifier" if is_verifier else "energy"
            raise ValueError(
                f"The {what} cannot score this model's contexts and chunks (contexts of "
                f"{spec.tokens.shape[-1]} features, chunks of {policy.chunk_shape}, of which "
                f"it reads the first {self.action_dims or model.action_dim} dims): "
                f"{type(e).__name__}: {e}. Train it on this model's features (a recording "
                "of this server) or give `action_dims`."
            ) from e
        if out.shape != ():
            raise ValueError(f"The energy must return a scalar; it returns shape {out.shape}.")


def recorded_rollouts(directory: Any, model: Any) -> Any:
    """The rollouts a [`flowcorrect.openpi.CorrectedPolicy`][] recorded, for training a
    verifier of `model`: refused when they were recorded from another checkpoint.

    **Arguments:**

    - `directory`: the server's `record_dir`.
    - `model`: the openpi `Pi0` the verifier will serve with (its weights'
        fingerprint must be the recording's).

    **Returns:**

    [`flowcorrect.verifiers.Rollouts`][] whose `observation` is the pooled prefix features: train
    an [`flowcorrect.MLPEnergy`][] on them with [`flowcorrect.verifiers.fit_verifier`][].
    """
    from .._verifiers.rollouts import load_rollouts

    directory = pathlib.Path(directory).absolute()
    meta = directory / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(
            f"{directory} holds no recording (no meta.json): serve with "
            "CorrectedPolicy(..., record_dir=...) and report episodes' outcomes first."
        )
    info = json.loads(meta.read_text()).get("info", {})
    if isinstance(model, CorrectedPi0):
        model = model.model
    expected = model_fingerprint(model)
    if info.get("model_fingerprint") != expected:
        raise ValueError(
            f"{directory} was recorded from a model with fingerprint "
            f"{info.get('model_fingerprint')!r}, not this one ({expected}): its contexts are "
            "another checkpoint's features, so a verifier trained on them would read the "
            "wrong ones. Record again with this checkpoint, or load the one that recorded."
        )
    return load_rollouts(directory)


def _fake_observation(model: Any) -> Any:
    """An abstract batch of one in the model's input shapes (for `eval_shape`)."""
    from openpi.models import model as _model

    h, w = _model.IMAGE_RESOLUTION
    images = {k: jnp.zeros((1, h, w, 3), jnp.float32) for k in _model.IMAGE_KEYS}
    return _model.Observation(
        images=images,
        image_masks={k: jnp.ones((1,), bool) for k in _model.IMAGE_KEYS},
        state=jnp.zeros((1, model.action_dim), jnp.float32),
        tokenized_prompt=jnp.zeros((1, model.max_token_len), jnp.int32),
        tokenized_prompt_mask=jnp.ones((1, model.max_token_len), bool),
    )


def _load_verifier(verifier: Any) -> tuple[Any, dict[str, Any]]:
    """The served verifier (pooled) and what the metadata says of it."""
    from .._model.serialise import load_model

    info: dict[str, Any] = {"path": None, "hash": None, "report": None}
    if isinstance(verifier, str | pathlib.Path):
        directory = pathlib.Path(verifier).absolute()
        model = load_model(directory)
        digest = hashlib.blake2b(digest_size=16)
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(directory)).encode())
            digest.update(file.read_bytes())
        info.update(path=str(directory), hash=digest.hexdigest())
        report = directory / "report.json"
        if report.exists():
            text = json.loads(report.read_text())
            info["report"] = {k: text[k] for k in _REPORT_HEADLINE if k in text}
        verifier = model
    info["class"] = type(verifier).__name__
    return PooledContext(verifier), info


_REPORT_HEADLINE = ("success_auc", "action_advantage_auc", "spread_ratio", "num_episodes")


def _numeric_arrays(tree: Any) -> Any:
    """The numeric and boolean arrays of a nested dict (strings such as a raw prompt,
    which the tokenized prompt already holds, are left out)."""
    if isinstance(tree, Mapping):
        out = {str(k): _numeric_arrays(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (v is None or isinstance(v, dict) and not v)}
    array = np.asarray(tree)
    return array if array.dtype.kind in "biuf" else None


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


def _reads_past(constraint: AbstractConstraint, zeros: np.ndarray) -> bool:
    """Whether the constraint continued after an episode's actions is another program
    (its `after` adds arrays), so a warm-up compiles it too."""
    after = constraint.after(jnp.asarray(zeros[0, :1]))
    return jax.tree.structure(after) != jax.tree.structure(constraint)


def robot_space(constraint: Any, output_transform: Any, action_dim: int) -> InRobotSpace:
    """`constraint`, stated in the units the output transforms' `Unnormalize` gives,
    as an [`flowcorrect.constraints.InRobotSpace`][] over the model's normalised chunks.

    The affine map is openpi's own: for quantile statistics `robot = (a + 1) / 2 *
    (q99 - q01 + 1e-6) + q01` on the first `len(q01)` dims (the rest pass through), for
    z-score statistics `robot = a * (std + 1e-6) + mean` (padded with mean 0, std 1).

    **Arguments:**

    - `constraint`: in robot units.
    - `output_transform`: the policy's output transform (a `CompositeTransform` holding
        an `Unnormalize` whose statistics include `"actions"`).
    - `action_dim`: the model's action dim.
    """
    from openpi import transforms as _transforms

    found = []

    def walk(t: Any) -> None:
        if isinstance(t, _transforms.Unnormalize):
            found.append(t)
        for inner in getattr(t, "transforms", ()) or ():
            walk(inner)

    walk(output_transform)
    found = [t for t in found if t.norm_stats and "actions" in t.norm_stats]
    if not found:
        raise ValueError(
            "`constraint_units='robot'` reads the output transforms' Unnormalize statistics "
            "for 'actions', and this policy's output transforms have none; state the "
            "constraint in the model's normalised units with constraint_units='model' (or "
            "wrap it in fc.constraints.InRobotSpace yourself)."
        )
    unnormalize = found[0]
    stats = unnormalize.norm_stats["actions"]
    scale = np.ones(action_dim, np.float64)
    offset = np.zeros(action_dim, np.float64)
    if unnormalize.use_quantiles:
        q01, q99 = np.asarray(stats.q01, np.float64), np.asarray(stats.q99, np.float64)
        k = min(len(q01), action_dim)
        scale[:k] = (q99[:k] - q01[:k] + 1e-6) / 2
        offset[:k] = q01[:k] + scale[:k]
    else:
        mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
        k = min(len(mean), action_dim)
        offset[:k] = mean[:k]
        scale[:k] = std[:k]
        scale += 1e-6
    return InRobotSpace(constraint, scale.astype(np.float32), offset.astype(np.float32))


def _constraint_reply(extras: Mapping[str, Any]) -> dict[str, Any]:
    """The first sample's projection diagnostics as plain Python (a batch of one)."""
    distance = float(np.asarray(extras["distance"])[0])
    return {
        "changed": distance > 0,
        "distance": distance,
        "violation_before": float(np.asarray(extras["violation_before"])[0]),
        "violation_after": float(np.asarray(extras["violation_after"])[0]),
        "feasible": bool(np.asarray(extras["feasible"])[0]),
        "fell_back": bool(np.asarray(extras["fell_back"])[0]),
    }


def _check_token_time(kind: str | None, pi05: bool) -> None:
    if kind == "trt" and pi05:
        raise RequestError(
            "Placement 'trt' (training-time real-time chunking) needs a flow time per "
            "action token, which Pi0.5's adaRMS time conditioning does not take; serve "
            "a Pi0 fine-tuned with flowcorrect.openpi.pi0_prefix_conditioned_loss, or "
            "use 'rtc' (inference-time real-time chunking) with Pi0.5."
        )


def _name(placement: AbstractPlacement | None) -> str:
    if isinstance(placement, Project):
        return f"Project({_name(placement.inner)})"
    return "off" if placement is None else type(placement).__name__
