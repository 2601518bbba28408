"""Rollout records: what a verifier learns from.

One record per control query of the policy's own rollouts: the observation, the `N`
candidate chunks the policy proposed, which one was executed, and the episode's
outcome. Stored as NumPy arrays in numbered `.npz` parts plus a `meta.json` index,
each written to a temporary name and renamed, so a collector killed at any point
leaves a readable directory and a second run appends (resumes) after what is there.
Every part of a directory has the same layout (candidates per query, each observation
leaf's row shape and kind of dtype, chunk shapes), recorded in `meta.json`, so that
the parts always concatenate.

The observation is an array or a pytree of arrays (nested dicts with string keys,
lists and tuples), every leaf with the query axis first. A part stores it leaf by
leaf, each leaf as the member named by its path: `observation` for an array,
`observation/image/base_0_rgb` for `{"image": {"base_0_rgb": ...}}`, `observation/[0]`
and `observation/(0)` for the items of a list and of a tuple. The names alone rebuild
the pytree, so a part is readable without `meta.json` and nothing is pickled.
"""

import dataclasses
import json
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import PyTree

_FIELDS = ("observation", "candidates", "executed", "episode", "step", "success",
           "steps_to_success")  # fmt: skip
_ROWS = _FIELDS[1:]  # the fields that are always one array
# Path segments of list and tuple items; a dict key of this form would read back as one.
_INDEX = re.compile(r"\[(0|[1-9][0-9]*)\]|\((0|[1-9][0-9]*)\)")


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Records of the policy's rollouts, one row per control query (NumPy arrays).

    **Attributes:**

    - `observation`: the observation at the query: an array `(Q, ...)`, e.g.
        `(Q, obs_dim)`, or a pytree of them (nested dicts with string keys, lists,
        tuples), e.g. `{"image": {"base_0_rgb": uint8 (Q, 224, 224, 3)}, "state":
        float (Q, 32), "tokens": int (Q, 48)}`. Each leaf is a NumPy array of bools,
        integers or (finite) floats with the query axis first.
    - `candidates`: `(Q, N, horizon, action_dim)`, the chunks the policy proposed.
    - `executed`: `(Q,)` int, the index of the candidate that was executed.
    - `episode`: `(Q,)` int, the episode of the query (`0 ... E - 1`).
    - `step`: `(Q,)` int, the environment step at which the query was made.
    - `success`: `(Q,)` bool, whether the query's episode succeeded.
    - `steps_to_success`: `(Q,)` int, steps from the query to success; `-1` where the
        episode failed.
    - `episode_seed`: `(E,)` int, the layout (seed) of each episode.

    Build one from whole episodes with `Rollouts.from_episodes`; read
    a directory with [`flowcorrect.verifiers.load_rollouts`][].
    """

    observation: PyTree[Any]
    candidates: np.ndarray
    executed: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    success: np.ndarray
    steps_to_success: np.ndarray
    episode_seed: np.ndarray

    def __post_init__(self):
        q, source = None, "observation"
        for path, leaf in observation_leaves(self.observation):
            if not isinstance(leaf, np.ndarray) or leaf.ndim == 0 or (
                q is not None and len(leaf) != q
            ):
                rows = (f"one row per query ({q}, from `{source}`)" if q is not None
                        else "the query axis first")
                hint = ""
                if not isinstance(leaf, np.ndarray):
                    hint = (" (the leaves of an observation pytree are NumPy arrays, in "
                            "dicts, lists and tuples; convert with np.asarray)")
                raise ValueError(
                    f"Rollouts `{path}` must be a NumPy array with {rows}; got "
                    f"{_describe(leaf)}{hint}."
                )
            if q is None:
                q, source = len(leaf), path
            _check_dtype(path, leaf, observation=True)
        for name in _ROWS + ("episode_seed",):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or (
                name != "episode_seed" and (value.ndim == 0 or len(value) != q)
            ):
                rows = f"one row per query ({q}, from `{source}`)" if q is not None else "rows"
                raise ValueError(
                    f"Rollouts `{name}` must be a NumPy array with {rows}; got "
                    f"{_describe(value)}."
                )
            _check_dtype(name, value)
        if self.candidates.ndim != 4:
            raise ValueError(
                "Rollouts `candidates` must be (queries, N, horizon, action_dim); got "
                f"{self.candidates.shape}."
            )
        for name in _FIELDS[2:] + ("episode_seed",):
            if getattr(self, name).ndim != 1:
                raise ValueError(
                    f"Rollouts `{name}` must be one value per row, shape (rows,); got shape "
                    f"{getattr(self, name).shape}."
                )
        n = self.candidates.shape[1]
        if q and (self.executed.min() < 0 or self.executed.max() >= n):
            raise ValueError(
                f"Rollouts `executed` must index the {n} candidates; got values in "
                f"[{self.executed.min()}, {self.executed.max()}]."
            )
        if q and (self.episode.min() < 0 or self.episode.max() >= len(self.episode_seed)):
            raise ValueError(
                f"Rollouts `episode` must index the {len(self.episode_seed)} episodes of "
                f"`episode_seed`; got values up to {self.episode.max()}."
            )
        # `discounted` reads `steps_to_success` where `success` holds: a success needs a
        # count >= 0, and a failure is marked -1, so a value cannot pass for the other.
        bad = np.flatnonzero(np.where(self.success, self.steps_to_success < 0,
                                      self.steps_to_success != -1))
        if len(bad):
            i = bad[0]
            raise ValueError(
                f"Rollouts `steps_to_success` must be >= 0 where `success` is True and -1 "
                f"where it is False; row {i} has success={bool(self.success[i])} and "
                f"steps_to_success={int(self.steps_to_success[i])} ({len(bad)} such rows)."
            )
        if q:
            # One outcome per episode: queries of one episode cannot disagree on it.
            first = np.full(len(self.episode_seed), -1, np.int8)
            first[self.episode[::-1]] = self.success[::-1]
            mixed = np.flatnonzero(first[self.episode] != self.success)
            if len(mixed):
                raise ValueError(
                    "Rollouts `success` must be the same for every query of an episode; "
                    f"episode {int(self.episode[mixed[0]])} has both outcomes."
                )

    @property
    def num_queries(self) -> int:
        return len(self.candidates)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_seed)

    @property
    def executed_actions(self) -> np.ndarray:
        """`(Q, horizon, action_dim)`, the chunk executed at each query."""
        return self.candidates[np.arange(self.num_queries), self.executed]

    def discounted(self, gamma: float) -> np.ndarray:
        """`gamma ** steps_to_success` (0 where the episode failed): a Monte-Carlo value
        of the executed chunk under the policy, in `[0, 1]`."""
        if not 0 < gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], e.g. 0.99; got {gamma!r}.")
        t = np.maximum(self.steps_to_success, 0).astype(np.float64)
        return np.where(self.success, gamma**t, 0.0).astype(np.float32)

    def episodes(self, which: Any) -> "Rollouts":
        """The records of the episodes `which` (indices), renumbered from 0."""
        which = np.asarray(which, np.int64)
        new = np.full(self.num_episodes, -1, np.int64)
        new[which] = np.arange(len(which))
        rows = np.flatnonzero(np.isin(self.episode, which))
        return Rollouts(
            observation=tree_map(lambda x: x[rows], self.observation),
            **{name: getattr(self, name)[rows] for name in _ROWS if name != "episode"},
            episode=new[self.episode[rows]],
            episode_seed=self.episode_seed[which],
        )

    def split(self, held_out: float, seed: int = 0) -> tuple["Rollouts", "Rollouts"]:
        """`(train, held_out)`, split by episode (queries of one episode stay together)."""
        if not 0 < held_out < 1:
            raise ValueError(f"`held_out` must be a fraction in (0, 1); got {held_out!r}.")
        order = np.random.default_rng(seed).permutation(self.num_episodes)
        k = max(1, int(round(held_out * self.num_episodes)))
        if k >= self.num_episodes:
            raise ValueError(
                f"Splitting {self.num_episodes} episodes with held_out={held_out} leaves "
                "none to train on; collect more episodes."
            )
        return self.episodes(np.sort(order[k:])), self.episodes(np.sort(order[:k]))

    @staticmethod
    def from_episodes(
        observation: Any, candidates: Any, executed: Any, query_step: Any, length: Any,
        success: Any, seeds: Any,
    ) -> "Rollouts":
        """Records of a batch of `E` episodes run side by side, `T` queries each.

        **Arguments:**

        - `observation`: `(T, E, ...)`, the observation of every environment at
            every query (also for environments already done; they are dropped): an
            array, or nested dicts of them (each leaf `(T, E, ...)`; anything that is
            not a dict is one array, as `np.asarray` makes it). Float leaves are stored
            as float32; integer and bool leaves (uint8 images, tokens) as they are.
        - `candidates`: `(T, E, N, horizon, action_dim)`.
        - `executed`: `(T, E)` int.
        - `query_step`: `(T,)` int, the environment step of each query.
        - `length`: `(E,)` int, the steps each episode ran (to success or the limit).
        - `success`: `(E,)` bool.
        - `seeds`: `(E,)` int, the layouts.

        A query is kept when its step is before its episode's end.
        """
        obs = _dict_tree(observation)
        cand = np.asarray(candidates)
        step = np.asarray(query_step, np.int64)
        length = np.asarray(length, np.int64)
        success = np.asarray(success, bool)
        leaves = observation_leaves(obs)
        t, e = _leading(leaves[0][1], leaves[0][0])
        for path, leaf in leaves[1:]:
            if _leading(leaf, path) != (t, e):
                raise ValueError(
                    f"from_episodes: `{path}` must be (T, E, ...) = ({t}, {e}, ...) like "
                    f"`{leaves[0][0]}`; got shape {leaf.shape}."
                )
        live = step[:, None] < length[None, :]  # (T, E)
        ti, ei = np.nonzero(live)
        order = np.lexsort((ti, ei))  # episode-major, then time
        ti, ei = ti[order], ei[order]
        to_go = np.where(success[ei], length[ei] - step[ti], -1)
        return Rollouts(
            observation=tree_map(
                lambda x: x[ti, ei].astype(np.float32) if x.dtype.kind == "f" else x[ti, ei],
                obs,
            ),
            candidates=cand[ti, ei].astype(np.float32),
            executed=np.asarray(executed, np.int64)[ti, ei],
            episode=ei.astype(np.int64),
            step=step[ti],
            success=success[ei],
            steps_to_success=to_go.astype(np.int64),
            episode_seed=np.asarray(seeds, np.int64).reshape(e),
        )


def concatenate(parts: list[Rollouts]) -> Rollouts:
    """Joins records; episodes are renumbered so that each part's follow the last's."""
    if not parts:
        raise ValueError("Nothing to concatenate: no rollout parts.")
    for i, p in enumerate(parts[1:], 1):
        _check_layout(
            _layout(parts[0]), _layout(p), f"The rollouts of part {i} (of 0 ... {len(parts) - 1})"
        )
    offsets = np.cumsum([0] + [p.num_episodes for p in parts[:-1]])
    return Rollouts(
        observation=tree_map(lambda *xs: np.concatenate(xs), *[p.observation for p in parts]),
        **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _ROWS
           if name != "episode"},
        episode=np.concatenate([p.episode + o for p, o in zip(parts, offsets)]),
        episode_seed=np.concatenate([p.episode_seed for p in parts]),
    )


class RolloutWriter:
    """Appends rollout records to a directory, resumably.

    Each `append` writes one part, `part-00000.npz`, `part-00001.npz`, ...
    (written under a temporary name, then renamed) and then rewrites `meta.json` (the
    same way), which lists the parts and counts the episodes. A part whose name is not
    in `meta.json` (a crash between the two renames) is ignored and overwritten.

    **Arguments:**

    - `directory`: where the parts go (created).
    - `info`: a JSON-able dict describing the collection (task, policy, N...), stored
        in `meta.json`; a later writer on the same directory must pass the same.
    """

    def __init__(self, directory: str | pathlib.Path, info: dict[str, Any] | None = None):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        info = json.loads(json.dumps(info or {}))
        meta_path = self.directory / "meta.json"
        if meta_path.exists():
            self.meta = _read_meta(self.directory)
            if self.meta.get("info") != info:
                raise ValueError(
                    f"{self.directory} holds rollouts collected with {self.meta.get('info')}, "
                    f"not {info}. Use another directory, or the same settings to append."
                )
            if "layout" not in self.meta and self.meta["parts"]:
                # A directory written before layouts were recorded: its first part's.
                first = self.meta["parts"][0]
                self.meta["layout"] = _layout(_read_part(self.directory, first))
        else:
            self.meta = {"info": info, "parts": [], "episodes": 0, "queries": 0}

    @property
    def num_episodes(self) -> int:
        """Episodes already recorded: a resumed collector starts after them."""
        return int(self.meta["episodes"])

    def append(self, rollouts: Rollouts) -> None:
        """Writes `rollouts` as the next part.

        A part must have the layout of those already written: the same number of
        candidates `N` and `(horizon, action_dim)`, the same observation leaves (paths)
        with the same row shapes, and the same kinds of dtype. A mismatched part is
        refused before anything is written, so the directory stays readable as it was.
        """
        if not isinstance(rollouts, Rollouts):
            raise TypeError(f"append takes Rollouts; got {type(rollouts).__name__}.")
        layout = _layout(rollouts)
        if self.meta.get("layout") is not None:
            _check_layout(self.meta["layout"], layout, "The rollouts given to append")
        name = f"part-{len(self.meta['parts']):05d}.npz"
        tmp = self.directory / (name + ".tmp.npz")
        np.savez(tmp, **_members(rollouts))
        tmp.replace(self.directory / name)
        meta = dict(self.meta)
        meta["parts"] = self.meta["parts"] + [name]
        meta["layout"] = self.meta.get("layout") or layout
        meta["episodes"] = self.num_episodes + rollouts.num_episodes
        meta["queries"] = int(self.meta["queries"]) + rollouts.num_queries
        tmp_meta = self.directory / "meta.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1))
        tmp_meta.replace(self.directory / "meta.json")
        self.meta = meta


def load_rollouts(directory: str | pathlib.Path, *, skip_corrupt: bool = False) -> Rollouts:
    """Reads every part listed in `<directory>/meta.json` as one
    [`flowcorrect.verifiers.Rollouts`][].

    **Arguments:**

    - `directory`: a directory written by [`flowcorrect.verifiers.RolloutWriter`][].
    - `skip_corrupt`: `False` (default): a part that cannot be read (truncated, edited,
        deleted, or of another layout) is an error naming it. `True`: such parts are
        left out and named in a warning, and the intact ones are returned; if
        `meta.json` itself cannot be read, every `part-*.npz` of the directory is read
        instead, in order.

    **Returns:**

    The records of all (intact) parts, episodes renumbered from 0 in part order.
    """
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"No rollouts in {directory}: meta.json is missing (write them with "
            "fc.verifiers.RolloutWriter)."
        )
    skipped: list[str] = []
    try:
        meta = _read_meta(directory)
        names = meta["parts"]
    except RolloutFileError as e:
        if not skip_corrupt:
            raise
        names = sorted(p.name for p in directory.glob("part-[0-9][0-9][0-9][0-9][0-9].npz"))
        skipped.append(f"meta.json ({e.reason}; read the {len(names)} part files instead)")
        meta = {}
    parts: list[Rollouts] = []
    layout = meta.get("layout")
    for name in names:
        try:
            part = _read_part(directory, name)
            if layout is None:
                layout = _layout(part)
            _check_layout(layout, _layout(part), f"The rollouts in {directory / name}")
        except (RolloutFileError, ValueError) as e:
            if not skip_corrupt:
                raise
            skipped.append(f"{name} ({getattr(e, 'reason', e)})")
            continue
        parts.append(part)
    if skipped:
        warnings.warn(
            f"load_rollouts({str(directory)!r}, skip_corrupt=True) left out "
            f"{len(skipped)} unreadable file(s): " + "; ".join(skipped) + ". Move them "
            "out of the directory (or delete them) to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
    if not parts:
        raise RolloutFileError(
            f"No readable rollout part in {directory}"
            + (f": left out {', '.join(skipped)}." if skipped else ".")
        )
    return concatenate(parts)


class RolloutFileError(ValueError):
    """A rollout directory's `meta.json` or one of its parts cannot be read."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


_FOREIGN = (
    "fc.verifiers.RolloutWriter replaces its files atomically, so a truncated or unreadable file "
    "was cut short or edited by something else (a copy, a sync, a full disk)."
)


def _read_meta(directory: pathlib.Path) -> dict[str, Any]:
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text())
        if not (isinstance(meta, dict) and isinstance(meta.get("parts"), list)
                and all(isinstance(n, str) for n in meta["parts"])):
            raise ValueError("it does not list the parts")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is one
        reason = f"{type(e).__name__}: {e}"
        raise RolloutFileError(
            f"{path} cannot be read ({reason}). {_FOREIGN} The parts may be intact: "
            "load them with fc.verifiers.load_rollouts(directory, skip_corrupt=True), which then "
            "reads every part-*.npz; to append again, restore meta.json from a backup or "
            "move the parts to a fresh directory with its own writer.",
            reason,
        ) from None
    return meta


def _read_part(directory: pathlib.Path, name: str) -> Rollouts:
    path = directory / name
    if pathlib.Path(name).name != name or not name.endswith(".npz"):
        raise RolloutFileError(
            f"{directory / 'meta.json'} lists the part {name!r}, which is not a file name "
            "of this directory; meta.json was edited. Restore it from a backup.",
            f"{name!r} is not a part of this directory",
        )
    try:
        # Opened here, so that the file is closed when NumPy fails to read the archive.
        with open(path, "rb") as raw, np.load(raw, allow_pickle=False) as f:
            fields = {k: f[k] for k in f.files}
        leaves = {k: fields.pop(k) for k in list(fields) if _is_observation(k)}
        return Rollouts(observation=_unflatten(leaves), **fields)
    # A damaged zip raises many kinds (BadZipFile, EOFError, zlib.error, struct.error,
    # NotImplementedError for a garbled compression method...): all mean "unreadable".
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise RolloutFileError(
            f"The rollout part {path} cannot be read ({reason}). {_FOREIGN} Delete or move "
            f"{name} out of the directory and load the rest with "
            f"fc.verifiers.load_rollouts({str(directory)!r}, skip_corrupt=True).",
            reason,
        ) from None


def _members(rollouts: Rollouts) -> dict[str, np.ndarray]:
    """The arrays of a part, by member name: observation leaves by path, then fields."""
    return {**dict(observation_leaves(rollouts.observation)),
            **{name: getattr(rollouts, name) for name in _ROWS + ("episode_seed",)}}


def _layout(rollouts: Rollouts) -> dict[str, list]:
    """Per observation leaf (by path) and per field, the shape of one row and the
    dtype's kind: what parts must share to concatenate."""
    arrays = [*observation_leaves(rollouts.observation),
              *((name, getattr(rollouts, name)) for name in _ROWS)]
    return {name: [list(x.shape[1:]), x.dtype.kind] for name, x in arrays}


def _check_layout(want: dict[str, list], got: dict[str, list], what: str) -> None:
    rows = {"observation": "(obs_dim,)", "candidates": "(N, horizon, action_dim)"}
    want_obs = [k for k in want if _is_observation(k)]
    got_obs = [k for k in got if _is_observation(k)]
    missing = [k for k in want_obs if k not in got]
    extra = [k for k in got_obs if k not in want]
    if want_obs and (missing or extra):
        which = (f"`{missing[0]}` is missing (rows of shape {tuple(want[missing[0]][0])}, "
                 f"dtype kind {want[missing[0]][1]!r} in the parts already written)"
                 if missing else f"`{extra[0]}` is not in the parts already written")
        raise ValueError(
            f"{what} do not fit the directory's layout: {which}. Their observation has "
            f"the leaves {got_obs}; the parts already written have {want_obs}. Parts of "
            "one directory must concatenate: write these to another directory (or record "
            "the same observation leaves)."
        )
    for name in [*want_obs, *_ROWS]:
        w, g = want.get(name), got.get(name)
        if w is not None and [list(w[0]), w[1]] != [list(g[0]), g[1]]:
            raise ValueError(
                f"{what} do not fit the directory's layout: `{name}` rows have shape "
                f"{tuple(g[0])} (dtype kind {g[1]!r}) {rows.get(name, '')}, but the parts "
                f"already written have {tuple(w[0])} (dtype kind {w[1]!r}). Parts of one "
                "directory must concatenate: write these to another directory (or collect "
                "them with the same settings)."
            )


def _check_dtype(name: str, value: np.ndarray, observation: bool = False) -> None:
    """Each field's kind of dtype, and finite values where they are floats. An
    observation leaf may be of any numeric kind (uint8 images, int tokens, bool masks)."""
    if value.dtype.hasobject or value.dtype.kind not in "biuf":
        raise ValueError(
            f"Rollouts `{name}` must be a numeric NumPy array (bool, integer or float); got "
            f"dtype {value.dtype} (an object or string array would be pickled on saving and "
            "could not be loaded). Convert it, e.g. np.asarray(x, np.float32), or leave it "
            "out of the observation."
        )
    if observation or name == "candidates":
        if value.dtype.kind != "f" and not observation:
            raise ValueError(
                f"Rollouts `{name}` must be a float array; got dtype {value.dtype}. Convert "
                "it with .astype(np.float32)."
            )
        finite = np.isfinite(value) if value.dtype.kind == "f" else np.ones((), bool)
        if not finite.all():
            bad = np.argwhere(~finite)
            raise ValueError(
                f"Rollouts `{name}` must be finite; got {int((~finite).sum())} NaN or inf "
                f"entries, the first at index {tuple(int(i) for i in bad[0])} "
                f"({value[tuple(bad[0])]}). Drop those queries or fix the recording."
            )
    elif name == "success":
        if value.dtype.kind != "b":
            raise ValueError(
                f"Rollouts `success` must be a bool array; got dtype {value.dtype}. Convert "
                "it with np.asarray(x, bool) (after checking what its values mean)."
            )
    elif value.dtype.kind not in "iu":
        extra = ""
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            extra = " with NaN or inf entries"
        raise ValueError(
            f"Rollouts `{name}` must be an integer array; got dtype {value.dtype}{extra}. "
            "Convert it with .astype(np.int64) (steps_to_success is -1 for a failed "
            "episode, never NaN)."
        )


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__


def observation_leaves(observation: Any, path: str = "observation") -> list[tuple[str, Any]]:
    """`(path, leaf)` of every leaf of an observation pytree, dict keys sorted (the
    order of `jax.tree.leaves`); the path names each dict key, `[i]` each list item and
    `(i)` each tuple item. Containers other than plain dicts, lists and tuples are
    leaves (and refused by `Rollouts` for not being arrays)."""
    kind = type(observation)
    if kind is dict:
        if not observation:
            raise ValueError(
                f"Rollouts `{path}` is an empty dict: an observation needs at least one "
                "array. Leave the key out."
            )
        bad = [k for k in observation if not isinstance(k, str) or not k or "/" in k
               or _INDEX.fullmatch(k)]
        if bad:
            raise ValueError(
                f"Rollouts `{path}` has the key {bad[0]!r}: the keys of an observation dict "
                "are non-empty strings without '/' (they name the members of the .npz "
                "parts), and not of the form '[0]' or '(0)' (the names of list and tuple "
                "items). Rename it."
            )
        return [leaf for k in sorted(observation)
                for leaf in observation_leaves(observation[k], f"{path}/{k}")]
    if kind is list or kind is tuple:
        if not observation:
            raise ValueError(
                f"Rollouts `{path}` is an empty {kind.__name__}: an observation needs at "
                "least one array. Leave it out."
            )
        form = "[{}]" if kind is list else "({})"
        return [leaf for i, x in enumerate(observation)
                for leaf in observation_leaves(x, f"{path}/{form.format(i)}")]
    return [(path, observation)]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """`fn` applied leaf by leaf to observation pytrees of one structure."""
    if type(tree) is dict:
        return {k: tree_map(fn, tree[k], *(r[k] for r in rest)) for k in tree}
    if type(tree) is list or type(tree) is tuple:
        return type(tree)(tree_map(fn, *xs) for xs in zip(tree, *rest, strict=True))
    return fn(tree, *rest)


def _is_observation(name: str) -> bool:
    return name == "observation" or name.startswith("observation/")


def _unflatten(leaves: dict[str, np.ndarray]) -> Any:
    """The observation pytree whose `observation_leaves` are `leaves` (member names)."""
    if not leaves:
        raise ValueError("the part has no observation (no member named observation...)")
    if "observation" in leaves:
        if len(leaves) > 1:
            raise ValueError("the part has both an `observation` array and observation leaves")
        return leaves["observation"]
    root: dict[str, Any] = {}
    for name, value in leaves.items():
        *parents, last = name.split("/")[1:]
        node = root
        for segment in parents:
            node = node.setdefault(segment, {})
            if not isinstance(node, dict):
                raise ValueError(f"the member {name!r} is inside the array of another member")
        if last in node:
            raise ValueError(f"the member {name!r} is also a container of other members")
        node[last] = value
    return _build(root, "observation")


def _build(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    forms = {k[0] if _INDEX.fullmatch(k) else "" for k in node}
    if len(forms) > 1:
        raise ValueError(f"`{path}` mixes dict keys and list or tuple items")
    form = forms.pop()
    if not form:
        return {k: _build(v, f"{path}/{k}") for k, v in node.items()}
    close = "]" if form == "[" else ")"
    names = [f"{form}{i}{close}" for i in range(len(node))]
    if set(names) != set(node):
        raise ValueError(f"the items of `{path}` are not numbered 0 ... {len(node) - 1}")
    items = [_build(node[n], f"{path}/{n}") for n in names]
    return items if form == "[" else tuple(items)


def _dict_tree(observation: Any) -> Any:
    """Nested dicts of `np.asarray` leaves (a list or tuple is one array here)."""
    if type(observation) is dict:
        return {k: _dict_tree(v) for k, v in observation.items()}
    return np.asarray(observation)


def _leading(leaf: np.ndarray, path: str) -> tuple[int, int]:
    if leaf.ndim < 2:
        raise ValueError(
            f"from_episodes: `{path}` must be (T, E, ...), one row per query time and "
            f"environment; got shape {leaf.shape}."
        )
    return leaf.shape[0], leaf.shape[1]
