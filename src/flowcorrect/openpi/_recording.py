"""A served policy's recording: what a verifier learns from, kept per client episode and
written when the client reports the episode's outcome."""

import hashlib
import logging
import pathlib
from typing import Any

import jax
import numpy as np

from .._verifiers.rollouts import Rollouts, RolloutWriter

logger = logging.getLogger("flowcorrect.openpi")


def _nbytes(tree: Any) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def episode_number(episode: str) -> int:
    """A stable non-negative int for a client's episode id (its `episode_seed`)."""
    digest = hashlib.blake2b(episode.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


class Recorder:
    """Records each served request of an episode (its context, the candidate chunks, the
    executed one) in memory and appends the whole episode to a
    [`flowcorrect.verifiers.RolloutWriter`][] directory when the client reports its outcome.

    An episode without an outcome (dropped, or `done` without `success`) is never
    written, so it is never used for training; a killed server loses only the episodes
    in flight. A write that fails (a full or unwritable disk) stops recording with one
    log line; serving goes on.

    **Arguments:**

    - `directory`: the rollouts directory (created; a later server appends to it only
        with the same `info`).
    - `info`: what produced the records (the model's fingerprint, the context and
        chunk layout), stored in the directory's `meta.json`.
    - `max_bytes`: the most memory held by episodes in flight; an episode that would
        pass it stops being recorded (and is not written).
    """

    def __init__(self, directory: str | pathlib.Path, info: dict[str, Any], max_bytes: int):
        self.directory = pathlib.Path(directory).absolute()
        self.writer = RolloutWriter(self.directory, info)
        self.max_bytes = max_bytes
        self.error: str | None = None
        self._open: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._overflowed: set[str] = set()
        self._bytes = 0
        self.written_episodes = 0
        self.written_queries = 0

    def add(self, episode: str, observation: Any, candidates: np.ndarray) -> None:
        """One query: `observation` (the pooled context `(context_dim,)`, or a pytree of
        NumPy arrays such as the model's inputs), `candidates` `(N, horizon, dims)` with
        the executed chunk first."""
        if self.error is not None or episode in self._overflowed:
            return
        size = _nbytes(observation) + candidates.nbytes
        if self._bytes + size > self.max_bytes:
            self.discard(episode)
            self._overflowed.add(episode)
            logger.warning(
                "Recording of episode %r stopped: episodes in flight would hold more than "
                "%d bytes (ServerLimits.max_recording_bytes); it will not be written.",
                episode, self.max_bytes,
            )
            return
        self._open.setdefault(episode, []).append((observation, candidates))
        self._bytes += size

    def discard(self, episode: str) -> None:
        records = self._open.pop(episode, [])
        self._bytes -= sum(_nbytes(o) + k.nbytes for o, k in records)
        self._overflowed.discard(episode)

    def finish(self, episode: str, success: bool | None) -> int:
        """Ends an episode: writes it when its outcome is known; returns the queries
        written (0 when nothing was)."""
        records = self._open.get(episode, [])
        overflowed = episode in self._overflowed
        self.discard(episode)
        if success is None or not records or overflowed or self.error is not None:
            return 0
        q = len(records)
        steps = np.arange(q, dtype=np.int64)
        part = Rollouts(
            observation=jax.tree.map(lambda *rows: np.stack(rows), *[o for o, _ in records]),
            candidates=np.stack([k for _, k in records]).astype(np.float32),
            executed=np.zeros(q, np.int64),
            episode=np.zeros(q, np.int64),
            step=steps,
            success=np.full(q, bool(success)),
            # Counted in requests: the server does not see the robot's control steps.
            steps_to_success=(q - steps) if success else np.full(q, -1, np.int64),
            episode_seed=np.asarray([episode_number(episode)], np.int64),
        )
        try:
            self.writer.append(part)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.error(
                "Recording to %s stopped (%s); the server keeps serving actions, and "
                "records nothing more.", self.directory, self.error,
            )
            return 0
        self.written_episodes += 1
        self.written_queries += q
        return q

    def status(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "recording": self.error is None,
            "error": self.error,
            "episodes_written": self.written_episodes,
            "queries_written": self.written_queries,
            "episodes_in_flight": len(self._open),
        }
