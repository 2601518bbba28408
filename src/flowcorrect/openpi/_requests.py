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

from .._constraints.base import AbstractConstraint
from .._constraints.selection import FeasibleFirst
from .._correctors.recipes import reference_recipe
from .._flow.schedules import LastSteps
from .._flow.selection import ByEnergy, Medoid, NearMean
from .._placements.base import AbstractPlacement
from .._placements.best_of_n import BestOfN
from .._placements.denoised import Denoised
from .._placements.guided import Guided
from .._placements.post_hoc import PostHoc
from .._placements.rtc import RealTimeChunking
from .._rtc_training import PrefixConditioned

#: The key of an observation dict that carries per-request correction settings.
OPTIONS_KEY = "flowcorrect"

PLACEMENTS = ("off", "post_hoc", "denoised", "guided", "best_of_n", "rtc", "trt", "feasible")
#: Placements that read no energy.
ENERGY_FREE = ("off", "rtc", "trt")
#: Placements that continue an episode's previous chunk (real-time chunking, by guidance
#: or by a model trained to take the committed actions).
CONTINUES = ("rtc", "trt")
#: Placements that read the server's constraint (guidance by its violation).
CONSTRAINED = ("feasible",)
SELECTIONS = ("energy", "medoid", "near_mean")
RTC_SCHEDULES = ("ones", "zeros", "linear", "exp")
#: Keys of `obs["flowcorrect"]` that are about the episode, not the placement.
EPISODE_KEYS = ("episode", "reset", "done", "success")

_OPTIONS = {
    "off": (),
    "post_hoc": ("steps", "alpha", "clip_frac", "first_only"),
    "denoised": ("steps", "alpha", "clip_frac", "first_only", "weight", "last"),
    "guided": ("weight", "last", "cap"),
    "best_of_n": ("n", "select", "k", "feasible_first"),
    "rtc": (
        "inference_delay",
        "execution_horizon",
        "prefix_attention_schedule",
        "max_guidance_weight",
        "hard_prefix",
    ),
    "trt": ("inference_delay", "execution_horizon"),
    "feasible": ("weight", "last", "cap"),
}
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
    - `settings`: the placement's options with defaults filled in, as Python numbers.
    - `episode`: the client's episode id (a string), or `None`.
    - `reset`: start the episode afresh (drop its state) before this request.
    - `done`: the episode ended; no model runs. `success` is its outcome (or `None`).
    """

    placement: str | None
    settings: Mapping[str, Any]
    episode: str | None = None
    reset: bool = False
    done: bool = False
    success: bool | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _count(options: Mapping, name: str, default: Any, low: int, high: int, why: str) -> int:
    value = options.get(name, default)
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(
            f"Correction option {name!r} must be an int in [{low}, {high}] ({why}); "
            f"got {value!r}."
        )
    return int(value)


def _number(
    options: Mapping, name: str, default: float, low: float, high: float, *, open_low=False
) -> float:
    value = options.get(name, default)
    ok = _is_number(value) and math.isfinite(float(value))
    if ok:
        value = float(value)
        # Checked as the float32 the placement stores: 1e-99 > 0, but not in float32.
        stored = float(np.float32(value)) if abs(value) < 1e38 else value
        ok = (low < stored if open_low else low <= stored) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise RequestError(
            f"Correction option {name!r} must be a finite number in {bracket}{low}, {high}]; "
            f"got {value!r}."
        )
    # Within float32 rounding of a closed lower bound (-1e-172 is -0.0 in float32, which
    # [0, ...] admits) the value is that bound, as the placement will store it.
    return value if open_low else max(value, low)


def _flag(options: Mapping, name: str, default: bool | None) -> bool | None:
    value = options.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, bool | np.bool_):
        raise RequestError(f"Correction option {name!r} must be true or false; got {value!r}.")
    return bool(value)


def _choice(options: Mapping, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = options.get(name, default)
    if not isinstance(value, str) or value not in allowed:
        raise RequestError(
            f"Correction option {name!r} must be one of {list(allowed)}; got {value!r}."
        )
    return value


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
        return Request(placement=None, settings={})
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
        return Request(placement=None, settings={}, episode=episode, done=True, success=success)
    if success is not None:
        raise RequestError(
            "Correction option 'success' is an episode's outcome: send it with 'done': true "
            "(and the 'episode' id), in a request of its own."
        )

    if "placement" not in options:
        unknown = sorted(set(options) - set(EPISODE_KEYS))
        if unknown:
            raise RequestError(
                f"Correction options {unknown} need 'placement', one of {list(PLACEMENTS)}."
            )
        return Request(placement=None, settings={}, episode=episode, reset=reset)
    kind = options["placement"]
    if not isinstance(kind, str) or kind not in PLACEMENTS:
        raise RequestError(
            f"Correction option 'placement' must be one of {list(PLACEMENTS)}; got "
            f"{_shown(kind)}."
        )
    unknown = sorted(set(options) - {"placement", *EPISODE_KEYS, *_OPTIONS[kind]})
    if unknown:
        raise RequestError(
            f"Unknown correction options for placement {kind!r}: {unknown}; it takes "
            f"{sorted(_OPTIONS[kind]) or 'no other options'}."
        )
    settings = _settings(kind, options, limits, horizon, num_steps)
    if not has_constraint and (kind in CONSTRAINED or settings.get("feasible_first")):
        what = "Placement 'feasible'" if kind in CONSTRAINED else "'feasible_first'"
        raise RequestError(
            f"{what} reads the server's constraint, and this server has none; its owner "
            "sets one (CorrectedPolicy(..., constraint=...))."
        )
    consensus = kind == "best_of_n" and settings["select"] == "medoid"
    if not has_energy and kind not in (*ENERGY_FREE, *CONSTRAINED) and not consensus:
        raise RequestError(
            f"Placement {kind!r} needs an energy or verifier, and this server has none; it "
            f"serves {list(ENERGY_FREE)} and 'best_of_n' with select='medoid' (consensus)"
            + (" and 'feasible'." if has_constraint else ".")
        )
    return Request(placement=kind, settings=settings, episode=episode, reset=reset)


def _settings(
    kind: str, options: Mapping, limits: ServerLimits, horizon: int, num_steps: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind in ("post_hoc", "denoised"):
        out["steps"] = _count(options, "steps", 3, 0, limits.max_steps, "correction steps K")
        out["alpha"] = _number(options, "alpha", 0.1, 0.0, limits.max_alpha)
        out["clip_frac"] = _number(options, "clip_frac", 0.2, 0.0, 1.0, open_low=True)
        out["first_only"] = _flag(options, "first_only", False)
    if kind in ("denoised", "guided", "feasible"):
        out["weight"] = _number(options, "weight", 1.0, 0.0, limits.max_weight)
        out["last"] = _count(
            options, "last", num_steps, 1, num_steps, "the final flow steps to correct"
        )
    if kind == "guided":
        out["cap"] = _number(options, "cap", 1.0, 0.0, 1e6, open_low=True)
    if kind == "feasible":
        # The violation's gradient is zero inside the feasible set and of order one
        # outside it: a larger default weight and cap than an energy's.
        out["weight"] = _number(options, "weight", 10.0, 0.0, limits.max_weight)
        out["cap"] = _number(options, "cap", 1e3, 0.0, 1e6, open_low=True)
    if kind == "best_of_n":
        out["n"] = _count(options, "n", 8, 1, limits.max_candidates, "candidates")
        out["select"] = _choice(options, "select", "energy", SELECTIONS)
        if out["select"] == "near_mean":
            out["k"] = _count(
                options, "k", min(4, out["n"]), 1, out["n"], "candidates nearest the mean "
                "kept before ranking by energy"
            )
        elif "k" in options:
            raise RequestError(
                "Correction option 'k' belongs to select='near_mean'; got select="
                f"{out['select']!r}."
            )
        out["feasible_first"] = _flag(options, "feasible_first", False)
    if kind in CONTINUES:
        for name in ("inference_delay", "execution_horizon"):
            if name not in options:
                raise RequestError(
                    f"Placement {kind!r} needs 'inference_delay' and 'execution_horizon' "
                    f"(control steps); got {sorted(options)}."
                )
        s = _count(
            options, "execution_horizon", None, 1, horizon,
            "actions executed from each chunk; at most the chunk's horizon",
        )
        d = _count(
            options, "inference_delay", None, 0, horizon - s,
            f"control steps run from the previous chunk while this one is computed; at "
            f"most horizon - execution_horizon = {horizon} - {s}",
        )
        out["execution_horizon"], out["inference_delay"] = s, d
    if kind == "rtc":
        out["prefix_attention_schedule"] = _choice(
            options, "prefix_attention_schedule", "exp", RTC_SCHEDULES
        )
        out["max_guidance_weight"] = _number(
            options, "max_guidance_weight", 5.0, 0.0, limits.max_weight
        )
        out["hard_prefix"] = _flag(options, "hard_prefix", False)
    return out


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
    kind, o = request.placement, request.settings
    if kind in (None, "off"):
        return None
    if kind in CONTINUES:
        if previous is None:
            return None
        previous = np.asarray(previous)
        s = o["execution_horizon"]
        leftover = np.zeros_like(previous)
        leftover[:, : previous.shape[1] - s] = previous[:, s:]
        if kind == "trt":
            # Only the first `d <= horizon - s` rows are committed; the zero rows after
            # them keep every request's shapes the same.
            return PrefixConditioned(leftover, o["inference_delay"])
        return RealTimeChunking(
            leftover,
            o["inference_delay"],
            s,
            prefix_attention_schedule=o["prefix_attention_schedule"],
            max_guidance_weight=o["max_guidance_weight"],
            hard_prefix=o["hard_prefix"],
        )
    if kind in ("post_hoc", "denoised"):
        recipe = reference_recipe(
            o["steps"],
            o["alpha"],
            o["clip_frac"],
            first_only=o["first_only"],
            action_dims=action_dims,
        )
        if kind == "post_hoc":
            return PostHoc(recipe)
        return Denoised(recipe, schedule=LastSteps(o["last"]), weight=o["weight"])
    if kind in ("guided", "feasible"):
        return Guided(schedule=LastSteps(o["last"]), weight=o["weight"], cap=o["cap"])
    select = {"energy": ByEnergy, "medoid": Medoid}.get(o["select"])
    rule = select() if select else NearMean(o["k"])
    if o["feasible_first"]:
        if constraint is None:
            raise RequestError("'feasible_first' needs the server's constraint; it has none.")
        rule = FeasibleFirst(constraint, inner=rule)
    return BestOfN(o["n"], select=rule)


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

    - `options`: a dict with `"placement"`, one of `"off"`, `"post_hoc"`,
        `"denoised"`, `"guided"`, `"best_of_n"`, `"rtc"`, `"trt"`, and that placement's
        settings:
        - `post_hoc`: `steps` (K, default 3, at most `limits.max_steps`), `alpha`
          (0.1), `clip_frac` (0.2, in (0, 1]), `first_only` (False):
          [`flowcorrect.reference_recipe`][];
        - `denoised`: the same, plus `weight` (1.0) and `last` (correct the last
          `last` flow steps, 1 to `num_steps`; default every step);
        - `guided`: `weight` (1.0), `last` (default every step), `cap` (1.0);
        - `best_of_n`: `n` (8, at most `limits.max_candidates`) and `select`:
          `"energy"` (the lowest energy, default), `"medoid"` (consensus, reads no
          energy) or `"near_mean"` with `k` (the lowest energy among the `k`
          candidates nearest the candidates' mean); `feasible_first` (False) keeps only
          candidates feasible for `constraint` before that rule
          ([`flowcorrect.constraints.FeasibleFirst`][]);
        - `rtc`: real-time chunking ([`flowcorrect.RealTimeChunking`][], needs no
          energy): `inference_delay` (`d`, control steps the robot executes from the
          previous chunk while this one is computed), `execution_horizon` (`s`, actions
          executed from each chunk before the next request), with
          `1 <= s <= horizon` and `0 <= d <= horizon - s`, and optionally
          `prefix_attention_schedule` ("exp"), `max_guidance_weight` (5.0),
          `hard_prefix` (False). The names are LeRobot's. The previous chunk's
          leftover is `previous[:, s:]` (zero-padded to the horizon, so the shapes
          never change), in the model's own action space;
        - `trt`: training-time real-time chunking ([`flowcorrect.rtc.PrefixConditioned`][]
          on [`flowcorrect.openpi.Pi0TokenTimePolicy`][], needs no energy): the first
          `inference_delay` actions of the previous chunk's leftover go in clean and
          come back exactly; plain Euler steps, no guidance. `inference_delay` and
          `execution_horizon` as for `rtc`. For a Pi0 fine-tuned with
          [`flowcorrect.openpi.pi0_prefix_conditioned_loss`][]; Pi0.5 is refused;
        - `feasible`: guidance by `constraint`'s violation inside the flow steps
          (needs no energy; pass `fc.constraints.ViolationEnergy(constraint)` as the energy):
          `weight` (10.0), `last` (default every step), `cap` (1000.0). A server
          projects every chunk onto its constraint as well, whatever the placement.
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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
