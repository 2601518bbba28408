"""Rollout records: what a verifier learns from (issue 11 section 1).

One record per control query of the policy's own rollouts: the observation, the `N`
candidate chunks the policy proposed, which one was executed, and the episode's
outcome. Stored as NumPy arrays in numbered `.npz` parts plus a `meta.json` index,
each written to a temporary name and renamed, so a collector killed at any point
leaves a readable directory and a second run appends (resumes) after what is there.
"""

import dataclasses
import json
import pathlib
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
        q = len(self.observation)
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or len(value) != q:
                raise ValueError(
                    f"Rollouts `{name}` must be a NumPy array with one row per query ({q}, "
                    f"from `observation`); got {_describe(value)}."
                )
        if self.observation.ndim != 2:
            raise ValueError(
                f"Rollouts `observation` must be (queries, obs_dim); got {self.observation.shape}."
            )
        if self.candidates.ndim != 4:
            raise ValueError(
                "Rollouts `candidates` must be (queries, N, horizon, action_dim); got "
                f"{self.candidates.shape}."
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
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("info") != info:
                raise ValueError(
                    f"{self.directory} holds rollouts collected with {self.meta.get('info')}, "
                    f"not {info}. Use another directory, or the same settings to append."
                )
        else:
            self.meta = {"info": info, "parts": [], "episodes": 0, "queries": 0}

    @property
    def num_episodes(self) -> int:
        """Episodes already recorded: a resumed collector starts after them."""
        return int(self.meta["episodes"])

    def append(self, rollouts: Rollouts) -> None:
        """Writes `rollouts` as the next part."""
        if not isinstance(rollouts, Rollouts):
            raise TypeError(f"append takes Rollouts; got {type(rollouts).__name__}.")
        name = f"part-{len(self.meta['parts']):05d}.npz"
        tmp = self.directory / (name + ".tmp.npz")
        np.savez(tmp, **dataclasses.asdict(rollouts))
        tmp.replace(self.directory / name)
        meta = dict(self.meta)
        meta["parts"] = self.meta["parts"] + [name]
        meta["episodes"] = self.num_episodes + rollouts.num_episodes
        meta["queries"] = int(self.meta["queries"]) + rollouts.num_queries
        tmp_meta = self.directory / "meta.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1))
        tmp_meta.replace(self.directory / "meta.json")
        self.meta = meta


def load_rollouts(directory: str | pathlib.Path) -> Rollouts:
    """Reads every part listed in `<directory>/meta.json` as one [`flowcorrect.Rollouts`][]."""
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"No rollouts in {directory}: meta.json is missing (write them with "
            "fc.RolloutWriter)."
        )
    meta = json.loads(meta_path.read_text())
    parts = []
    for name in meta["parts"]:
        with np.load(directory / name) as f:
            parts.append(Rollouts(**{k: f[k] for k in f.files}))
    return concatenate(parts)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__
