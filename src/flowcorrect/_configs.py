"""Placements as configs: frozen dataclasses of plain numbers, each field declared once
with its default and its allowed range.

A command line (tyro) builds them from flags, a served policy builds them from the
options a client sends (`{"placement": "best_of_n", "n": 8}`), and both check them the
same way: [`from_options`][] reads plain data, [`AbstractPlacementConfig.check`][]
checks a config against the bounds of one server and model, and
[`AbstractPlacementConfig.build`][] makes the placement.
"""

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from ._constraints.base import AbstractConstraint
from ._constraints.selection import FeasibleFirst
from ._correctors.recipes import reference_recipe
from ._flow.schedules import EveryStep, LastSteps
from ._flow.selection import ByEnergy, Medoid, NearMean
from ._placements.base import AbstractPlacement
from ._placements.best_of_n import BestOfN
from ._placements.denoised import Denoised
from ._placements.guided import Guided
from ._placements.post_hoc import PostHoc
from ._placements.rtc import RealTimeChunking
from ._rtc_training import PrefixConditioned

#: What a bound may be: a number, the name of a size in the bounds mapping (a server's
#: limit such as `"max_steps"`, or the model's `"horizon"` / `"num_steps"`), or a
#: function of that mapping and the fields already checked.
BoundLike = int | float | str | Callable[[Mapping[str, Any]], int | float]


class ConfigError(ValueError):
    """A placement config or option that is refused: the message names the option, the
    value seen and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range of one numeric option: `low <= value <= high` (`low < value` when
    `open_low`). `why` says what the option is, in the error message; it may name
    sizes of the bounds mapping in braces (`"at most {horizon}"`)."""

    low: BoundLike
    high: BoundLike | None = None
    open_low: bool = False
    why: str | None = None


_BOUND = "flowcorrect.bound"


def option(
    default: Any = dataclasses.MISSING,
    *,
    low: BoundLike | None = None,
    high: BoundLike | None = None,
    open_low: bool = False,
    why: str | None = None,
) -> Any:
    """A config field: its default and, for a number, its range (see [`Bound`][])."""
    metadata = {} if low is None else {_BOUND: Bound(low, high, open_low, why)}
    return dataclasses.field(default=default, metadata=metadata)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _resolve(bound: BoundLike | None, sizes: Mapping[str, Any], default: float) -> int | float:
    if bound is None:
        return default
    if isinstance(bound, str):
        return sizes.get(bound, default)
    if callable(bound):
        try:
            return bound(sizes)
        except KeyError:
            return default
    return bound


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """`(T, True)` for `T | None`, else `(kind, False)`."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return kind, False


# A config class's field types, read once per class (requests check every field).
_hints = functools.cache(typing.get_type_hints)


def _check_field(name: str, kind: Any, value: Any, meta: Bound | None, sizes: Mapping) -> Any:
    """One field's value as a Python number, bool or string, or a ConfigError."""
    kind, optional = _unwrap_optional(kind)
    if optional and value is None:
        return None
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(
                f"Correction option {name!r} must be one of {list(allowed)}; got {_shown(value)}."
            )
        return value
    if kind is bool:
        if not isinstance(value, bool | np.bool_):
            raise ConfigError(
                f"Correction option {name!r} must be true or false; got {_shown(value)}."
            )
        return bool(value)
    assert meta is not None, f"numeric option {name!r} declares no bound"
    why = "" if meta.why is None else f" ({_why(meta.why, sizes)})"
    if kind is int:
        low = _resolve(meta.low, sizes, -math.inf)
        high = _resolve(meta.high, sizes, math.inf)
        if not _is_int(value) or not low <= value <= high:
            raise ConfigError(
                f"Correction option {name!r} must be an int in [{low}, {high}]{why}; got "
                f"{_shown(value)}."
            )
        return int(value)
    low = float(_resolve(meta.low, sizes, -math.inf))
    high = float(_resolve(meta.high, sizes, math.inf))
    ok = _is_number(value) and math.isfinite(float(value))
    if ok:
        value = float(value)
        # Checked as the float32 the placement stores: 1e-99 > 0, but not in float32.
        stored = float(np.float32(value)) if abs(value) < 1e38 else value
        ok = (low < stored if meta.open_low else low <= stored) and value <= high
    if not ok:
        bracket = "(" if meta.open_low else "["
        raise ConfigError(
            f"Correction option {name!r} must be a finite number in {bracket}{low}, "
            f"{high}]{why}; got {_shown(value)}."
        )
    # Within float32 rounding of a closed lower bound (-1e-172 is -0.0 in float32, which
    # [0, ...] admits) the value is that bound, as the placement will store it.
    return value if meta.open_low else max(value, low)


def _why(text: str, sizes: Mapping) -> str:
    try:
        return text.format(**sizes)
    except (KeyError, IndexError, ValueError):
        return text.split(";")[0]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class AbstractPlacementConfig:
    """A placement as plain settings. Subclasses are frozen dataclasses whose fields are
    declared with [`option`][] and which set:

    - `kind`: the name a client sends as `"placement"` (and a command line's
        subcommand);
    - `reads_energy`: whether the placement reads an energy or verifier;
    - `reads_constraint`: whether it reads the server's constraint;
    - `continues`: whether it continues an episode's previous chunk (it is built from
        `previous`, and an episode's first chunk is plain).

    and implement `build`. The bounds mapping that [`check`][] and [`from_options`][]
    read names the sizes a range may refer to: a server's limits (`max_steps`,
    `max_candidates`, `max_weight`, `max_alpha`) and the model's `horizon` and
    `num_steps`. A size missing from it is unbounded, so a config checked with no
    bounds is checked for type and sign only.
    """

    kind: ClassVar[str]
    reads_energy: ClassVar[bool] = True
    reads_constraint: ClassVar[bool] = False
    continues: ClassVar[bool] = False

    def __post_init__(self):
        _check_all(type(self), self._given(), {})

    def _given(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @property
    def needs_energy(self) -> bool:
        """Whether the placement this config builds reads an energy or verifier."""
        return self.reads_energy

    def options(self) -> dict[str, Any]:
        """The options a client would send for this config, as plain JSON data: the
        `"placement"` kind and every field that is set (`None` left out)."""
        out: dict[str, Any] = {"placement": self.kind}
        for name, value in self._given().items():
            if value is not None:
                out[name] = value.item() if isinstance(value, np.generic) else value
        return out

    def settings(self) -> dict[str, Any]:
        """The fields that are set, without the kind."""
        out = self.options()
        del out["placement"]
        return out

    @classmethod
    def schema(cls, bounds: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Each field's type, default and range under `bounds`, as plain JSON data (a
        server reports it to clients): `{"n": {"type": "int", "default": 8, "low": 1,
        "high": 64}, "select": {"type": "str", "choices": [...], ...}}`. A field with no
        default is `"required"`; a bound that depends on another field is left out."""
        sizes = dict(bounds or {})
        hints = _hints(cls)
        out: dict[str, dict[str, Any]] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind, _ = _unwrap_optional(hints[field.name])
            entry: dict[str, Any] = {}
            if typing.get_origin(kind) is Literal:
                entry["type"], entry["choices"] = "str", list(typing.get_args(kind))
            else:
                entry["type"] = kind.__name__
            required = field.default is dataclasses.MISSING
            entry["default"] = "required" if required else field.default
            bound = field.metadata.get(_BOUND)
            if bound is not None:
                for side in ("low", "high"):
                    given = getattr(bound, side)
                    if given is None or callable(given):
                        continue
                    value = _resolve(given, sizes, math.nan)
                    if not (isinstance(value, float) and math.isnan(value)):
                        entry[side] = value
                if bound.open_low:
                    entry["open_low"] = True
            out[field.name] = entry
        return out

    def check(self, bounds: Mapping[str, Any] | None = None) -> "AbstractPlacementConfig":
        """This config checked against `bounds` (a server's limits, the model's
        `horizon` and `num_steps`), with the defaults that depend on them filled in
        (such as `last`: every flow step). Raises [`ConfigError`][] naming the option,
        the value seen and the allowed range."""
        sizes = dict(bounds or {})
        checked = _check_all(type(self), self._given(), sizes)
        return type(self)(**self._fill(checked, sizes))

    def _fill(self, fields: dict[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
        return fields

    def build(
        self,
        *,
        action_dims: int | None = None,
        previous: Any = None,
        constraint: AbstractConstraint | None = None,
    ) -> AbstractPlacement | None:
        """The placement: `None` for no correction (and for a continuing placement
        with no `previous` chunk: an episode's first chunk is plain).

        - `action_dims`: the recipes change only the first `action_dims` dims.
        - `previous`: for a continuing placement, the previous chunks
            `(batch, horizon, action_dim)` in the model's action space.
        - `constraint`: for best-of-N's `feasible_first`.
        """
        raise NotImplementedError


def _check_all(cls: type, given: Mapping[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    out = {}
    context = dict(sizes)
    # Fields whose range depends on other fields come last.
    fields = sorted(dataclasses.fields(cls), key=lambda f: callable(_bound_high(f)))
    for field in fields:
        value = _check_field(
            field.name, hints[field.name], given[field.name], field.metadata.get(_BOUND), context
        )
        out[field.name] = value
        if value is not None:
            context[field.name] = value
    return {f.name: out[f.name] for f in dataclasses.fields(cls)}


def _bound_high(field: dataclasses.Field) -> Any:
    bound = field.metadata.get(_BOUND)
    return None if bound is None else bound.high


@dataclasses.dataclass(frozen=True)
class OffConfig(AbstractPlacementConfig):
    """No correction: the policy's own chunk."""

    kind: ClassVar[str] = "off"
    reads_energy: ClassVar[bool] = False

    def build(self, *, action_dims=None, previous=None, constraint=None) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class PostHocConfig(AbstractPlacementConfig):
    """The reference recipe after the flow ([`flowcorrect.PostHoc`][] with
    [`flowcorrect.reference_recipe`][]): `steps` gradient steps of size `alpha`, each
    clipped to `clip_frac` of the action norm."""

    kind: ClassVar[str] = "post_hoc"
    # Correction steps K.
    steps: int = option(3, low=0, high="max_steps", why="correction steps K")
    # Step size.
    alpha: float = option(0.1, low=0.0, high="max_alpha")
    # Each step is clipped to this fraction of the action norm.
    clip_frac: float = option(0.2, low=0.0, high=1.0, open_low=True)
    # Correct only the chunk's first action.
    first_only: bool = False

    def _recipe(self, action_dims):
        return reference_recipe(
            self.steps, self.alpha, self.clip_frac, first_only=self.first_only,
            action_dims=action_dims,
        )  # fmt: skip

    def build(self, *, action_dims=None, previous=None, constraint=None) -> AbstractPlacement:
        return PostHoc(self._recipe(action_dims))


def _schedule(last: int | None):
    return EveryStep() if last is None else LastSteps(last)


def _fill_last(fields: dict[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
    if fields["last"] is None and "num_steps" in sizes:
        fields = {**fields, "last": int(sizes["num_steps"])}
    return fields


_LAST = dict(low=1, high="num_steps", why="the final flow steps to correct")


@dataclasses.dataclass(frozen=True)
class DenoisedConfig(PostHocConfig):
    """The reference recipe on the denoised chunk inside the last flow steps
    ([`flowcorrect.Denoised`][])."""

    kind: ClassVar[str] = "denoised"
    # Weight of the correction's velocity change.
    weight: float = option(1.0, low=0.0, high="max_weight")
    # Correct the last `last` flow steps (default: every step).
    last: int | None = option(None, **_LAST)

    def _fill(self, fields, sizes):
        return _fill_last(fields, sizes)

    def build(self, *, action_dims=None, previous=None, constraint=None) -> AbstractPlacement:
        return Denoised(self._recipe(action_dims), schedule=_schedule(self.last),
                        weight=self.weight)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GuidedConfig(AbstractPlacementConfig):
    """Guidance through the velocity inside the last flow steps
    ([`flowcorrect.Guided`][])."""

    kind: ClassVar[str] = "guided"
    # Guidance weight.
    weight: float = option(1.0, low=0.0, high="max_weight")
    # Guide the last `last` flow steps (default: every step).
    last: int | None = option(None, **_LAST)
    # The guidance's velocity change is clipped to this norm.
    cap: float = option(1.0, low=0.0, high=1e6, open_low=True)

    def _fill(self, fields, sizes):
        return _fill_last(fields, sizes)

    def build(self, *, action_dims=None, previous=None, constraint=None) -> AbstractPlacement:
        return Guided(schedule=_schedule(self.last), weight=self.weight, cap=self.cap)


@dataclasses.dataclass(frozen=True)
class FeasibleConfig(GuidedConfig):
    """Guidance by the server's constraint's violation inside the flow steps (needs no
    energy: the violation is the energy). The violation's gradient is zero inside the
    feasible set and of order one outside it: a larger default weight and cap than an
    energy's."""

    kind: ClassVar[str] = "feasible"
    reads_energy: ClassVar[bool] = False
    reads_constraint: ClassVar[bool] = True
    weight: float = option(10.0, low=0.0, high="max_weight")
    last: int | None = option(None, **_LAST)
    cap: float = option(1e3, low=0.0, high=1e6, open_low=True)


def _near_mean_k(n: int) -> int:
    """Best-of-N's default `k` for select="near_mean": the 4 candidates nearest the
    mean, or all `n` if fewer."""
    return min(4, n)


@dataclasses.dataclass(frozen=True)
class BestOfNConfig(AbstractPlacementConfig):
    """`n` candidates, one kept ([`flowcorrect.BestOfN`][]) by `select`: `"energy"` (the
    lowest energy), `"medoid"` (consensus, reads no energy) or `"near_mean"` (the
    lowest energy among the `k` candidates nearest the candidates' mean)."""

    kind: ClassVar[str] = "best_of_n"
    # Candidates.
    n: int = option(8, low=1, high="max_candidates", why="candidates")
    # The ranking rule.
    select: Literal["energy", "medoid", "near_mean"] = "energy"
    # For select="near_mean": candidates nearest the mean kept (default min(4, n)).
    k: int | None = option(
        None, low=1, high="n", why="candidates nearest the mean kept before ranking by energy"
    )
    # Keep only candidates feasible for the server's constraint before the rule.
    feasible_first: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.k is not None and self.select != "near_mean":
            raise ConfigError(
                f"Correction option 'k' belongs to select='near_mean'; got select="
                f"{self.select!r}."
            )

    @property
    def needs_energy(self) -> bool:
        return self.select != "medoid"

    def _fill(self, fields, sizes):
        if fields["select"] == "near_mean" and fields["k"] is None:
            fields = {**fields, "k": _near_mean_k(fields["n"])}
        return fields

    def build(self, *, action_dims=None, previous=None, constraint=None) -> AbstractPlacement:
        if self.select == "near_mean":
            rule = NearMean(_near_mean_k(self.n) if self.k is None else self.k)
        else:
            rule = ByEnergy() if self.select == "energy" else Medoid()
        if self.feasible_first:
            if constraint is None:
                raise ConfigError(
                    "'feasible_first' needs the server's constraint; it has none."
                )
            rule = FeasibleFirst(constraint, inner=rule)
        return BestOfN(self.n, select=rule)


_HORIZON = dict(
    low=1, high="horizon", why="actions executed from each chunk; at most the chunk's horizon"
)
_DELAY = dict(
    low=0,
    high=lambda c: c["horizon"] - c["execution_horizon"],
    why="control steps run from the previous chunk while this one is computed; at most "
    "horizon - execution_horizon = {horizon} - {execution_horizon}",
)


def _leftover(previous: Any, s: int) -> np.ndarray:
    """The previous chunks' unexecuted actions `previous[:, s:]`, zero-padded to the
    horizon so that every request's shapes are the same."""
    previous = np.asarray(previous)
    leftover = np.zeros_like(previous)
    leftover[:, : previous.shape[1] - s] = previous[:, s:]
    return leftover


@dataclasses.dataclass(frozen=True)
class RTCConfig(AbstractPlacementConfig):
    """Real-time chunking by guidance ([`flowcorrect.RealTimeChunking`][], reads no
    energy). The names are LeRobot's."""

    kind: ClassVar[str] = "rtc"
    reads_energy: ClassVar[bool] = False
    continues: ClassVar[bool] = True
    # Control steps the robot executes from the previous chunk while this one is
    # computed (d).
    inference_delay: int = option(**_DELAY)
    # Actions executed from each chunk before the next request (s).
    execution_horizon: int = option(**_HORIZON)
    # How the guidance weight decays over the leftover.
    prefix_attention_schedule: Literal["ones", "zeros", "linear", "exp"] = "exp"
    # The guidance weight's clip (beta).
    max_guidance_weight: float = option(5.0, low=0.0, high="max_weight")
    # Overwrite the committed actions after every step.
    hard_prefix: bool = False

    def build(self, *, action_dims=None, previous=None, constraint=None):
        if previous is None:
            return None
        return RealTimeChunking(
            _leftover(previous, self.execution_horizon),
            self.inference_delay,
            self.execution_horizon,
            prefix_attention_schedule=self.prefix_attention_schedule,
            max_guidance_weight=self.max_guidance_weight,
            hard_prefix=self.hard_prefix,
        )


@dataclasses.dataclass(frozen=True)
class TRTConfig(AbstractPlacementConfig):
    """Training-time real-time chunking ([`flowcorrect.rtc.PrefixConditioned`][]): the
    first `inference_delay` actions of the previous chunk's leftover go in clean and come
    back exactly; plain Euler steps, no guidance. For a policy trained to take them."""

    kind: ClassVar[str] = "trt"
    reads_energy: ClassVar[bool] = False
    continues: ClassVar[bool] = True
    # Control steps the robot executes from the previous chunk while this one is
    # computed (d).
    inference_delay: int = option(**_DELAY)
    # Actions executed from each chunk before the next request (s).
    execution_horizon: int = option(**_HORIZON)

    def build(self, *, action_dims=None, previous=None, constraint=None):
        if previous is None:
            return None
        # Only the first `d <= horizon - s` rows are committed; the zero rows after
        # them keep every request's shapes the same.
        return PrefixConditioned(_leftover(previous, self.execution_horizon),
                                 self.inference_delay)  # fmt: skip


#: The configs by kind, in the order clients see them.
PLACEMENT_CONFIGS: dict[str, type[AbstractPlacementConfig]] = {
    c.kind: c
    for c in (
        OffConfig, PostHocConfig, DenoisedConfig, GuidedConfig, BestOfNConfig, RTCConfig,
        TRTConfig, FeasibleConfig,
    )  # fmt: skip
}

#: Any one of the placement configs (a command line's choice of subcommand).
PlacementConfig = (
    OffConfig
    | PostHocConfig
    | DenoisedConfig
    | GuidedConfig
    | BestOfNConfig
    | RTCConfig
    | TRTConfig
    | FeasibleConfig
)


def from_options(
    options: Mapping[str, Any],
    bounds: Mapping[str, Any] | None = None,
    *,
    ignore: tuple[str, ...] = (),
) -> AbstractPlacementConfig:
    """The config that plain options name: `{"placement": kind, **fields}`, checked
    field by field (types, ranges against `bounds`, unknown and missing keys) before
    anything is built.

    **Arguments:**

    - `options`: a mapping with `"placement"`, one of `PLACEMENT_CONFIGS`, and that
        config's fields.
    - `bounds`: the sizes ranges refer to (see [`AbstractPlacementConfig`][]).
    - `ignore`: other keys allowed in `options` and not read (a server's episode keys).

    **Returns:**

    The checked config, with bound-dependent defaults filled in. Raises
    [`ConfigError`][] naming the option, the value seen and what is allowed.
    """
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"Correction options must be a dict such as {{'placement': 'best_of_n', 'n': 8}}; "
            f"got {type(options).__name__}."
        )
    kinds = list(PLACEMENT_CONFIGS)
    kind = options.get("placement")
    if not isinstance(kind, str) or kind not in PLACEMENT_CONFIGS:
        raise ConfigError(
            f"Correction option 'placement' must be one of {kinds}; got {_shown(kind)}."
        )
    cls = PLACEMENT_CONFIGS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - {"placement", *ignore, *fields})
    if unknown:
        raise ConfigError(
            f"Unknown correction options for placement {kind!r}: {unknown}; it takes "
            f"{sorted(fields) or 'no other options'}."
        )
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in options]
    if missing:
        raise ConfigError(
            f"Placement {kind!r} needs {' and '.join(map(repr, required))}; got "
            f"{sorted(options)}."
        )
    given = {n: options[n] if n in options else f.default for n, f in fields.items()}
    sizes = dict(bounds or {})
    checked = _check_all(cls, given, sizes)
    return cls(**cls._fill(cls, checked, sizes))  # type: ignore[arg-type]
