"""A served policy's state, kept per episode the client names, never per process."""

import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._requests import RequestError, ServerLimits


@dataclasses.dataclass
class Episode:
    """One client episode on a server.

    - `key`: the episode's own random key: request `i` draws its noise from
        `fold_in(key, i)`, so an episode's chunks do not depend on other clients'
        requests, nor on how many requests the server has served.
    - `requests`: how many of its requests have been served.
    - `previous`: its last chunk in the model's action space, `(1, horizon, action_dim)`
        (what real-time chunking continues), or `None` before the first.
    - `last_used`: the clock reading of its last request.
    """

    key: Any
    requests: int = 0
    previous: np.ndarray | None = None
    last_used: float = 0.0

    def next_rng(self) -> Any:
        return jax.random.fold_in(self.key, self.requests)


def episode_key(seed_key: Any, episode: str) -> Any:
    """The episode's key: the server's key folded with a stable hash of its id (the same
    id gives the same key on every server started with the same seed)."""
    digest = hashlib.blake2b(episode.encode("utf-8"), digest_size=4).digest()
    return jax.random.fold_in(seed_key, int.from_bytes(digest, "little") & 0x7FFFFFFF)


class Episodes:
    """The open episodes of one server: at most `limits.max_episodes`, least recently used
    dropped first, and any idle for `limits.episode_idle_s` dropped at the next request.

    **Arguments:**

    - `seed_key`: the server's key, from which each episode's key is derived.
    - `limits`: the server's [`flowcorrect.openpi.ServerLimits`][].
    - `clock`: seconds, monotonic (a test passes its own).
    - `on_drop`: called with `(episode_id, episode)` when one is dropped unfinished
        (for example to discard its partial recording).
    """

    def __init__(
        self,
        seed_key: Any,
        limits: ServerLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[str, Episode], None] | None = None,
    ):
        self._seed_key = seed_key
        self._limits = limits
        self._clock = clock
        self._on_drop = on_drop
        self._open: collections.OrderedDict[str, Episode] = collections.OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, episode: str) -> bool:
        return episode in self._open

    def _expire(self, now: float) -> None:
        idle = self._limits.episode_idle_s
        while self._open:
            name, episode = next(iter(self._open.items()))
            if now - episode.last_used <= idle:
                break
            self._drop(name)

    def _drop(self, name: str) -> None:
        episode = self._open.pop(name)
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(name, episode)

    def peek(self, name: str, *, reset: bool = False) -> Episode:
        """The episode's state for a new request, without changing anything: a fresh
        episode when `name` is new or `reset` is set. [`commit`][] stores it once the
        request has been served."""
        self._expire(self._clock())
        if reset or name not in self._open:
            return Episode(key=episode_key(self._seed_key, name))
        return dataclasses.replace(self._open[name])

    def commit(self, name: str, episode: Episode, previous: np.ndarray | None) -> None:
        """Stores the episode after a served request: its chunk and one more request."""
        now = self._clock()
        if name in self._open and self._open[name] is not episode:
            del self._open[name]
        episode.previous = previous
        episode.requests += 1
        episode.last_used = now
        self._open[name] = episode
        self._open.move_to_end(name)
        while len(self._open) > self._limits.max_episodes:
            self._drop(next(iter(self._open)))

    def close(self, name: str) -> Episode:
        """Ends an episode (its `done` request); an unknown id is a [`RequestError`][]."""
        self._expire(self._clock())
        if name not in self._open:
            raise RequestError(
                f"Episode {name!r} is not open on this server: it sent no request, was "
                "already reported done, or was dropped after "
                f"{self._limits.episode_idle_s:g} s idle or to keep at most "
                f"{self._limits.max_episodes} episodes (ServerLimits)."
            )
        return self._open.pop(name)
