"""What a client may send a served policy, checked in plain Python before any work.

Nothing here imports openpi: the checks are the same with or without it, so they are
tested (and fuzzed) wherever flowcorrect is installed. The served policy
([`flowcorrect.openpi.CorrectedPolicy`][]) calls [`parse_request`][] first, then
[`check_observation`][], and only then runs openpi's transforms and the model; a
refused request raises [`RequestError`][] and changes no state.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._configs import (
    PLACEMENT_CONFIGS,
    AbstractPlacementConfig,
    ConfigError,
    _is_int,
    _is_number,
    _shown,
    from_options,
)
from .._constraints.base import AbstractConstraint
from .._placements.base import AbstractPlacement

#: The key of an observation dict that carries per-request correction settings.
OPTIONS_KEY = "flowcorrect"

#: The placements a client may ask for: the kinds of `flowcorrect.configs`.
PLACEMENTS = tuple(PLACEMENT_CONFIGS)
#: Placements that read no energy.
ENERGY_FREE = tuple(k for k, c in PLACEMENT_CONFIGS.items()
                    if not c.reads_energy and not c.reads_constraint)  # fmt: skip
#: Placements that continue an episode's previous chunk (real-time chunking, by guidance
#: or by a model trained to take the committed actions).
CONTINUES = tuple(k for k, c in PLACEMENT_CONFIGS.items() if c.continues)
#: Placements that read the server's constraint (guidance by its violation).
CONSTRAINED = tuple(k for k, c in PLACEMENT_CONFIGS.items() if c.reads_constraint)
#: Keys of `obs["flowcorrect"]` that are about the episode, not the placement.
EPISODE_KEYS = ("episode", "reset", "done", "success", "executed")
_MAX_EPISODE_ID = 128


class RequestError(ValueError):
    """A request that the server refuses: the message names the option or observation
    key, the value seen and what is allowed. Raised before any model work."""


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of a server, fixed by whoever runs it.

    Counts that set compiled sizes (correction steps, candidates) are bounded, so that
    no request can run for minutes or exhaust memory; every bound is reported to
    clients in the server's metadata.

    **Arguments:**

    - `max_steps`: the most correction steps `steps` (K) of `post_hoc` / `denoised`.
    - `max_candidates`: the most candidates `n` of `best_of_n`.
    - `max_weight`: the largest guidance or denoised-correction `weight`, and RTC's
        `max_guidance_weight`.
    - `max_alpha`: the largest post-hoc / denoised step size `alpha`.
    - `max_episodes`: episodes whose state (RTC's leftover, a recording) is kept at
        once; beyond it the least recently used is dropped.
    - `episode_idle_s`: an episode with no request for this long is dropped.
    - `max_array_bytes`: the largest single array in an observation.
    - `max_observation_bytes`: the largest observation, all arrays together.
    - `max_string_chars`: the longest string in an observation (a prompt).
    - `max_recording_bytes`: the most memory a recording server holds for episodes not
        yet ended; an episode that would pass it is not recorded.
    """

    max_steps: int = 20
    max_candidates: int = 64
    max_weight: float = 100.0
    max_alpha: float = 10.0
    max_episodes: int = 256
    episode_idle_s: float = 900.0
    max_array_bytes: int = 32 * 2**20
    max_observation_bytes: int = 128 * 2**20
    max_string_chars: int = 10_000
    max_recording_bytes: int = 2**30

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int:
                ok = _is_int(value) and value >= 1
            else:
                ok = _is_number(value) and math.isfinite(value) and value > 0
            if not ok:
                raise ValueError(
                    f"ServerLimits `{field.name}` must be a finite {field.type.__name__} > 0; "
                    f"got {value!r}."
                )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Request:
    """A parsed, validated `obs["flowcorrect"]`.

    - `placement`: one of `PLACEMENTS`, or `None` for the server's default.
    - `config`: the placement's [`flowcorrect.configs.AbstractPlacementConfig`][],
        checked against the server's limits and the model's sizes, or `None`.
    - `episode`: the client's episode id (a string), or `None`.
    - `reset`: start the episode afresh (drop its state) before this request.
    - `done`: the episode ended; no model runs. `success` is its outcome (or `None`).
    - `executed`: how many actions of the episode's previous chunk the robot executed
        before this chunk's first action (so that the server's limits hold across the
        join), or `None` (the chunk's first action is free).
    """

    placement: str | None
    config: AbstractPlacementConfig | None = None
    episode: str | None = None
    reset: bool = False
    done: bool = False
    success: bool | None = None
    executed: int | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The placement's settings with defaults filled in, as Python numbers."""
        return {} if self.config is None else self.config.settings()


def bounds(limits: ServerLimits, horizon: int, num_steps: int) -> dict[str, Any]:
    """The sizes a request's ranges refer to: the server's limits and the model's
    action horizon and flow steps (see [`flowcorrect.configs.AbstractPlacementConfig`][])."""
    return {**limits.as_dict(), "horizon": int(horizon), "num_steps": int(num_steps)}


def _flag(options: Mapping, name: str, default: bool | None) -> bool | None:
    value = options.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, bool | np.bool_):
        raise RequestError(f"Correction option {name!r} must be true or false; got {value!r}.")
    return bool(value)


def check_served_placement(placement: Any, has_energy: bool) -> None:
    """Refuses a server's default placement that reads an energy the server lacks.

    Asks the placement (its `needs_energy`, see [`flowcorrect.AbstractPlacement`][]),
    never which placement it is, so that any energy-free placement, a user's own or
    [`flowcorrect.RealTimeChunking`][], is served without an energy.

    **Arguments:**

    - `placement`: the default placement, or `None` (no correction).
    - `has_energy`: whether the server has an energy or verifier.
    """
    if placement is not None and not has_energy and placement.needs_energy:
        raise ValueError(
            f"The default placement {type(placement).__name__} cannot run on this server "
            "without an energy: it reads one (its needs_energy is True). Give the server an "
            "`energy` or a `verifier`, or choose a placement that needs none "
            "(fc.BestOfN(n, select=fc.Medoid()), fc.RealTimeChunking(...))."
        )


def parse_request(
    options: Any,
    *,
    limits: ServerLimits,
    horizon: int,
    num_steps: int,
    has_energy: bool,
    has_constraint: bool = False,
) -> Request:
    """Validates `obs["flowcorrect"]` completely, in plain Python, before any work.

    **Arguments:**

    - `options`: what the client sent, or `None` (the server's default, no episode).
    - `limits`: the server's [`flowcorrect.openpi.ServerLimits`][].
    - `horizon`: the model's action horizon (checks RTC's `execution_horizon` and
        `inference_delay` against it).
    - `num_steps`: the flow steps (bounds `last`).
    - `has_energy`: whether the server has an energy or verifier; without one only the
        placements in `ENERGY_FREE` are served.
    - `has_constraint`: whether the server has a constraint; `"feasible"` (guidance by
        its violation) and best-of-N's `feasible_first` need one.

    **Returns:**

    A [`flowcorrect.openpi.Request`][]. Raises [`RequestError`][] naming the option, the
    value seen and the allowed range.
    """
    if options is None:
        return Request(placement=None)
    if not isinstance(options, Mapping):
        raise RequestError(
            f"obs[{OPTIONS_KEY!r}] must be a dict such as {{'placement': 'best_of_n', "
            f"'n': 8}}; got {type(options).__name__}."
        )
    bad_keys = [k for k in options if not isinstance(k, str)]
    if bad_keys:
        raise RequestError(f"obs[{OPTIONS_KEY!r}] keys must be strings; got {bad_keys[:3]!r}.")

    episode = options.get("episode")
    if episode is not None:
        if _is_int(episode):
            episode = str(int(episode))
        if not isinstance(episode, str) or not 0 < len(episode) <= _MAX_EPISODE_ID:
            raise RequestError(
                f"Correction option 'episode' must be a non-empty string (or an int) of at "
                f"most {_MAX_EPISODE_ID} characters naming the client's episode; got "
                f"{_shown(episode)}."
            )
    reset = _flag(options, "reset", False)
    done = _flag(options, "done", False)
    success = _flag(options, "success", None)
    if done:
        if episode is None:
            raise RequestError(
                "A request with 'done': true must name its 'episode' (the id its requests "
                "were sent with)."
            )
        extra = sorted(set(options) - {"episode", "done", "success"})
        if extra:
            raise RequestError(
                f"A 'done' request reports an episode's end and runs no model; it takes only "
                f"'episode' and 'success', got also {extra}."
            )
        return Request(placement=None, episode=episode, done=True, success=success)
    if success is not None:
        raise RequestError(
            "Correction option 'success' is an episode's outcome: send it with 'done': true "
            "(and the 'episode' id), in a request of its own."
        )
    executed = options.get("executed")
    if executed is not None:
        if not _is_int(executed) or not 1 <= executed <= horizon:
            raise RequestError(
                "Correction option 'executed' counts the actions of the episode's previous "
                f"chunk the robot executed before this one, an int from 1 to the horizon "
                f"{horizon}; got {_shown(executed)}."
            )
        if episode is None:
            raise RequestError(
                "Correction option 'executed' refers to the episode's previous chunk: name "
                "the 'episode' as well (the same id for every request of one episode)."
            )
        executed = int(executed)

    if "placement" not in options:
        unknown = sorted(set(options) - set(EPISODE_KEYS))
        if unknown:
            raise RequestError(
                f"Correction options {unknown} need 'placement', one of {list(PLACEMENTS)}."
            )
        return Request(placement=None, episode=episode, reset=reset, executed=executed)
    try:
        config = from_options(options, bounds(limits, horizon, num_steps), ignore=EPISODE_KEYS)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    check_request_config(config, has_energy=has_energy, has_constraint=has_constraint)
    if executed is not None and config.continues:
        raise RequestError(
            f"Placement {config.kind!r} reads what was executed from its own settings (the "
            "robot executes 'execution_horizon' + 'inference_delay' actions of the previous "
            "chunk, then this chunk from row 'inference_delay'); leave out 'executed'."
        )
    return Request(
        placement=config.kind, config=config, episode=episode, reset=reset, executed=executed
    )


def check_request_config(
    config: AbstractPlacementConfig, *, has_energy: bool, has_constraint: bool
) -> None:
    """Refuses a config that reads what the server lacks: an energy or verifier, or a
    constraint (for `"feasible"` and best-of-N's `feasible_first`)."""
    kind = config.kind
    feasible_first = getattr(config, "feasible_first", False)
    if not has_constraint and (config.reads_constraint or feasible_first):
        what = f"Placement {kind!r}" if config.reads_constraint else "'feasible_first'"
        raise RequestError(
            f"{what} reads the server's constraint, and this server has none; its owner "
            "sets one (CorrectedPolicy(..., constraint=...))."
        )
    if not has_energy and config.needs_energy:
        raise RequestError(
            f"Placement {kind!r} needs an energy or verifier, and this server has none; it "
            f"serves {list(ENERGY_FREE)} and 'best_of_n' with select='medoid' (consensus)"
            + (" and 'feasible'." if has_constraint else ".")
        )


def placement_from_request(
    request: Request,
    action_dims: int | None = None,
    previous: Any = None,
    constraint: AbstractConstraint | None = None,
) -> AbstractPlacement | None:
    """The placement a validated [`flowcorrect.openpi.Request`][] asks for.

    **Arguments:**

    - `request`: from [`flowcorrect.openpi.parse_request`][] (its settings are already
        checked against the server's limits and the model's sizes).
    - `action_dims`: the post-hoc and denoised recipes change only the first
        `action_dims` dims.
    - `previous`: for `rtc` and `trt`, the episode's previous chunks `(batch, horizon,
        action_dim)` in the model's action space; `None` (the episode's first request)
        gives `None`: the first chunk of an episode continues nothing and is plain.
    - `constraint`: the server's constraint, which best-of-N's `feasible_first` reads
        (`"feasible"` guides by its violation, which the server passes as the energy).
        The server projects every chunk onto it around whatever this returns.

    **Returns:**

    An [`flowcorrect.AbstractPlacement`][], or `None` for `"off"` (and for the server's
    default, which the caller fills in).
    """
    if request.config is None:
        return None
    try:
        return request.config.build(
            action_dims=action_dims, previous=previous, constraint=constraint
        )
    except ConfigError as e:
        raise RequestError(str(e)) from None


def placement_from_options(
    options: Mapping[str, Any],
    action_dims: int | None = None,
    previous: Any = None,
    *,
    horizon: int = 50,
    num_steps: int = 10,
    limits: ServerLimits | None = None,
    constraint: AbstractConstraint | None = None,
) -> AbstractPlacement | None:
    """Builds a placement from plain settings (what a client can send in a request).

    **Arguments:**

    - `options`: a dict with `"placement"` and that placement's settings, the fields
        of its config in [`flowcorrect.configs`](configs.md), where each is declared with its
        default and range:
        - `"off"`: [`flowcorrect.configs.OffConfig`][] (no correction);
        - `"post_hoc"`: [`flowcorrect.configs.PostHocConfig`][] (`steps`, `alpha`,
          `clip_frac`, `first_only`: [`flowcorrect.reference_recipe`][]);
        - `"denoised"`: [`flowcorrect.configs.DenoisedConfig`][] (the same, plus
          `weight` and `last`);
        - `"guided"`: [`flowcorrect.configs.GuidedConfig`][] (`weight`, `last`, `cap`);
        - `"best_of_n"`: [`flowcorrect.configs.BestOfNConfig`][] (`n`, `select` one of
          `"energy"`, `"medoid"` (consensus, reads no energy), `"near_mean"` with `k`;
          `feasible_first` keeps only candidates feasible for `constraint`);
        - `"rtc"`: [`flowcorrect.configs.RTCConfig`][] (real-time chunking by guidance,
          reads no energy: `inference_delay`, `execution_horizon`, with `1 <= s <=
          horizon` and `0 <= d <= horizon - s`, `prefix_attention_schedule`,
          `max_guidance_weight`, `hard_prefix`; LeRobot's names);
        - `"trt"`: [`flowcorrect.configs.TRTConfig`][] (training-time real-time
          chunking, [`flowcorrect.rtc.PrefixConditioned`][] on
          [`flowcorrect.openpi.Pi0TokenTimePolicy`][]: `inference_delay`,
          `execution_horizon`; for a Pi0 fine-tuned with
          [`flowcorrect.openpi.pi0_prefix_conditioned_loss`][], Pi0.5 is refused);
        - `"feasible"`: [`flowcorrect.configs.FeasibleConfig`][] (guidance by
          `constraint`'s violation, reads no energy; pass
          `fc.constraints.ViolationEnergy(constraint)` as the energy). A server projects
          every chunk onto its constraint as well, whatever the placement.
    - `action_dims`: the post-hoc and denoised recipes change only the first
        `action_dims` dims.
    - `previous`: for `rtc` and `trt`, the previous call's chunks `(batch, horizon, action_dim)`
        in the model's action space; `None` (the first call) gives `None` (plain).
    - `horizon`, `num_steps`: the model's action horizon and flow steps, which bound
        RTC's options and `last`; `horizon` is read from `previous` when given.
    - `limits`: the bounds on counts and weights, default
        [`flowcorrect.openpi.ServerLimits`][]`()`.
    - `constraint`: an [`flowcorrect.constraints.AbstractConstraint`][] for `feasible` and
        `feasible_first`; `None` refuses them.

    Every option is checked before anything is built; a bad one raises
    [`flowcorrect.openpi.RequestError`][] (a `ValueError`) naming it, the value seen and
    the allowed range.

    **Returns:**

    An [`flowcorrect.AbstractPlacement`][], or `None` for `"off"`.
    """
    if previous is not None:
        horizon = int(np.shape(previous)[1])
    request = parse_request(
        options,
        limits=ServerLimits() if limits is None else limits,
        horizon=horizon,
        num_steps=num_steps,
        has_energy=True,
        has_constraint=constraint is not None,
    )
    if request.placement is None:
        raise RequestError(
            f"Correction options need 'placement', one of {list(PLACEMENTS)}; got "
            f"{sorted(options)}."
        )
    return placement_from_request(request, action_dims, previous, constraint)


def _leaves(tree: Any, path: str = "obs"):
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise RequestError(f"{path} has a key {_shown(key)}: keys must be strings.")
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


def check_observation(obs: Any, limits: ServerLimits) -> None:
    """Refuses an observation no model should see, before any transform runs.

    Every leaf must be a string (a prompt, at most `limits.max_string_chars`), a
    number, a boolean, or a NumPy array of a numeric or boolean dtype (not an object
    array), each at most `limits.max_array_bytes` and all at most
    `limits.max_observation_bytes` together; floating values must be finite. Shapes are
    the model's business: the served policy checks them after openpi's transforms.
    """
    if not isinstance(obs, Mapping):
        raise RequestError(f"The observation must be a dict; got {type(obs).__name__}.")
    total = 0
    for path, leaf in _leaves(obs):
        if isinstance(leaf, str):
            if len(leaf) > limits.max_string_chars:
                raise RequestError(
                    f"{path} is a string of {len(leaf)} characters; this server takes at most "
                    f"{limits.max_string_chars} (ServerLimits.max_string_chars)."
                )
            continue
        if leaf is None:
            raise RequestError(f"{path} is None; leave the key out instead.")
        if isinstance(leaf, bool | int | float | np.generic):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, np.ndarray):
            raise RequestError(
                f"{path} is a {type(leaf).__name__}; observations hold arrays, numbers and "
                "strings."
            )
        kind = leaf.dtype.kind
        if kind not in "biuf":
            raise RequestError(
                f"{path} has dtype {leaf.dtype}; observations hold numeric or boolean "
                "arrays (uint8 images, float state)."
            )
        if leaf.nbytes > limits.max_array_bytes:
            raise RequestError(
                f"{path} has shape {leaf.shape} ({leaf.nbytes} bytes); this server takes "
                f"arrays of at most {limits.max_array_bytes} bytes (ServerLimits."
                "max_array_bytes)."
            )
        total += leaf.nbytes
        if total > limits.max_observation_bytes:
            raise RequestError(
                f"The observation is over {limits.max_observation_bytes} bytes "
                "(ServerLimits.max_observation_bytes)."
            )
        if kind == "f" and not np.isfinite(leaf).all():
            bad = int((~np.isfinite(leaf)).sum())
            raise RequestError(
                f"{path} (shape {leaf.shape}) has {bad} non-finite value(s) (NaN or inf); "
                "no action is computed from it."
            )


_CONSTRAINT_KINDS = {
    "box": ("Box", ("low", "high"), ("dims",)),
    "ball": ("Ball", ("centre", "radius"), ("dims",)),
    "outside_ball": ("OutsideBall", ("centre", "radius"), ("dims",)),
    "half_space": ("HalfSpace", ("normal", "offset"), ("dims",)),
    "max_step_change": ("MaxStepChange", ("max_change",), ("dims",)),
    "max_jerk": ("MaxJerk", ("max_jerk",), ("order", "dims")),
}


def constraint_from_spec(spec: Any) -> AbstractConstraint:
    """A server's constraint from plain data (a serve command's JSON): a dict of kinds,
    each the keyword arguments of one constraint, all of which must hold.

    Kinds: `box` ([`flowcorrect.constraints.Box`][]: `low`, `high`, `dims`), `ball` and
    `outside_ball` (`centre`, `radius`, `dims`), `half_space` (`normal`, `offset`,
    `dims`), `max_step_change` (`max_change`, `dims`), `max_jerk` (`max_jerk`, `order`,
    `dims`). For example `{"box": {"low": -1.0, "high": 1.0, "dims": 7},
    "max_step_change": {"max_change": 0.05, "dims": 7}}`; a kind may also be a list
    of such dicts. One constraint is returned as itself, several as
    [`flowcorrect.constraints.AllOf`][].
    """
    import flowcorrect as fc

    example = '{"box": {"low": -1.0, "high": 1.0, "dims": 7}}'
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(
            f"A constraint spec is a non-empty dict of kinds, e.g. {example}; got "
            f"{_shown(spec)}."
        )
    parts = []
    for kind, value in spec.items():
        if kind not in _CONSTRAINT_KINDS:
            raise ValueError(
                f"Unknown constraint kind {kind!r}; the kinds are {sorted(_CONSTRAINT_KINDS)}."
            )
        name, required, optional = _CONSTRAINT_KINDS[kind]
        for args in value if isinstance(value, list) else [value]:
            if not isinstance(args, Mapping):
                raise ValueError(
                    f"Constraint {kind!r} takes a dict of {list(required + optional)}; got "
                    f"{_shown(args)}."
                )
            missing = [k for k in required if k not in args]
            unknown = sorted(set(args) - set(required) - set(optional))
            if missing or unknown:
                raise ValueError(
                    f"Constraint {kind!r} needs {list(required)} (and may take "
                    f"{list(optional)}); got {sorted(args)}."
                )
            parts.append(getattr(fc.constraints, name)(**args))
    return parts[0] if len(parts) == 1 else fc.constraints.AllOf(*parts)
