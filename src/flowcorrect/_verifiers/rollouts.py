"""Rollout records: what a verifier learns from.

One record per control query of the policy's own rollouts: the observation, the `N`
candidate chunks the policy proposed, which one was executed, and the episode's
outcome. Stored as NumPy arrays in numbered `.npz` parts plus a `meta.json` index,
each written to a temporary name and renamed, so a collector killed at any point
leaves a readable directory and a second run appends (resumes) after what is there.
Every part of a directory has the same layout (candidates per query, observation and
chunk shapes), recorded in `meta.json`, so that the parts always concatenate.
"""

import dataclasses
import json
import pathlib
import warnings
from typing import Any

import numpy as np

_FIELDS = ("observation", "candidates", "executed", "episode", "step", "success",
           "steps_to_success")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Records of the policy's rollouts, one row per control query (NumPy arrays).

    **Attributes:**

    - `observation`: `(Q, obs_dim)`, the observation at the query.
    - `candidates`: `(Q, N, horizon, action_dim)`, the chunks the policy proposed.
    - `executed`: `(Q,)` int, the index of the candidate that was executed.
    - `episode`: `(Q,)` int, the episode of the query (`0 ... E - 1`).
    - `step`: `(Q,)` int, the environment step at which the query was made.
    - `success`: `(Q,)` bool, whether the query's episode succeeded.
    - `steps_to_success`: `(Q,)` int, steps from the query to success; `-1` where the
        episode failed.
    - `episode_seed`: `(E,)` int, the layout (seed) of each episode.

    Build one from whole episodes with `Rollouts.from_episodes`; read
    a directory with [`flowcorrect.load_rollouts`][].
    """

    observation: np.ndarray
    candidates: np.ndarray
    executed: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    success: np.ndarray
    steps_to_success: np.ndarray
    episode_seed: np.ndarray

    def __post_init__(self):
        q = len(self.observation) if isinstance(self.observation, np.ndarray) else None
        for name in _FIELDS + ("episode_seed",):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or (
                name != "episode_seed" and (value.ndim == 0 or len(value) != q)
            ):
                rows = f"one row per query ({q}, from `observation`)" if q is not None else "rows"
                raise ValueError(
                    f"Rollouts `{name}` must be a NumPy array with {rows}; got "
                    f"{_describe(value)}."
                )
            _check_dtype(name, value)
        if self.observation.ndim != 2:
            raise ValueError(
                f"Rollouts `observation` must be (queries, obs_dim); got {self.observation.shape}."
            )
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
        return len(self.observation)

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
            **{name: getattr(self, name)[rows] for name in _FIELDS if name != "episode"},
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

        - `observation`: `(T, E, obs_dim)`, the observation of every environment at
            every query (also for environments already done; they are dropped).
        - `candidates`: `(T, E, N, horizon, action_dim)`.
        - `executed`: `(T, E)` int.
        - `query_step`: `(T,)` int, the environment step of each query.
        - `length`: `(E,)` int, the steps each episode ran (to success or the limit).
        - `success`: `(E,)` bool.
        - `seeds`: `(E,)` int, the layouts.

        A query is kept when its step is before its episode's end.
        """
        obs = np.asarray(observation)
        cand = np.asarray(candidates)
        step = np.asarray(query_step, np.int64)
        length = np.asarray(length, np.int64)
        success = np.asarray(success, bool)
        t, e = obs.shape[:2]
        live = step[:, None] < length[None, :]  # (T, E)
        ti, ei = np.nonzero(live)
        order = np.lexsort((ti, ei))  # episode-major, then time
        ti, ei = ti[order], ei[order]
        to_go = np.where(success[ei], length[ei] - step[ti], -1)
        return Rollouts(
            observation=obs[ti, ei].astype(np.float32),
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
        **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS
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
        candidates `N`, observation size and `(horizon, action_dim)`, and the same kinds
        of dtype. A mismatched part is refused before anything is written, so the
        directory stays readable as it was.
        """
        if not isinstance(rollouts, Rollouts):
            raise TypeError(f"append takes Rollouts; got {type(rollouts).__name__}.")
        layout = _layout(rollouts)
        if self.meta.get("layout") is not None:
            _check_layout(self.meta["layout"], layout, "The rollouts given to append")
        name = f"part-{len(self.meta['parts']):05d}.npz"
        tmp = self.directory / (name + ".tmp.npz")
        np.savez(tmp, **dataclasses.asdict(rollouts))
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
    """Reads every part listed in `<directory>/meta.json` as one [`flowcorrect.Rollouts`][].

    **Arguments:**

    - `directory`: a directory written by [`flowcorrect.RolloutWriter`][].
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
            "fc.RolloutWriter)."
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
    "fc.RolloutWriter replaces its files atomically, so a truncated or unreadable file "
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
            "load them with fc.load_rollouts(directory, skip_corrupt=True), which then "
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
        return Rollouts(**fields)
    # A damaged zip raises many kinds (BadZipFile, EOFError, zlib.error, struct.error,
    # NotImplementedError for a garbled compression method...): all mean "unreadable".
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise RolloutFileError(
            f"The rollout part {path} cannot be read ({reason}). {_FOREIGN} Delete or move "
            f"{name} out of the directory and load the rest with "
            f"fc.load_rollouts({str(directory)!r}, skip_corrupt=True).",
            reason,
        ) from None


def _layout(rollouts: Rollouts) -> dict[str, list]:
    """Per field, the shape of one row and the dtype's kind: what parts must share to
    concatenate. Written per array, so that it applies leaf by leaf to a pytree."""
    return {
        name: [list(getattr(rollouts, name).shape[1:]), getattr(rollouts, name).dtype.kind]
        for name in _FIELDS
    }


def _check_layout(want: dict[str, list], got: dict[str, list], what: str) -> None:
    rows = {"observation": "(obs_dim,)", "candidates": "(N, horizon, action_dim)"}
    for name in _FIELDS:
        w, g = want.get(name), got.get(name)
        if w is not None and [list(w[0]), w[1]] != [list(g[0]), g[1]]:
            raise ValueError(
                f"{what} do not fit the directory's layout: `{name}` rows have shape "
                f"{tuple(g[0])} (dtype kind {g[1]!r}) {rows.get(name, '')}, but the parts "
                f"already written have {tuple(w[0])} (dtype kind {w[1]!r}). Parts of one "
                "directory must concatenate: write these to another directory (or collect "
                "them with the same settings)."
            )


def _check_dtype(name: str, value: np.ndarray) -> None:
    """Each field's kind of dtype, and finite values where they are floats."""
    if value.dtype.hasobject or value.dtype.kind not in "biuf":
        raise ValueError(
            f"Rollouts `{name}` must be a numeric NumPy array; got dtype {value.dtype} (an "
            "object or string array would be pickled on saving and could not be loaded). "
            "Convert it, e.g. np.asarray(x, np.float32)."
        )
    if name in ("observation", "candidates"):
        if value.dtype.kind != "f":
            raise ValueError(
                f"Rollouts `{name}` must be a float array; got dtype {value.dtype}. Convert "
                "it with .astype(np.float32)."
            )
        finite = np.isfinite(value)
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
