"""An action queue for asynchronous chunked execution, free of any framework.

A chunked policy runs while the robot moves. This queue holds the chunk being executed,
counts executed actions, says when the next inference is due (every `s` executed
actions), hands out what real-time chunking needs (the leftover of the current chunk in
the new chunk's frame, and the delay) and switches to the new chunk when it arrives:
after a simulated delay of `d` control steps, or whenever it is handed in (a real robot,
where the delay is measured). NumPy only, so it runs in any sim or robot loop.
"""

import collections
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._misc import is_int, is_real


@dataclasses.dataclass(frozen=True)
class ChunkRequest:
    """What an inference started now needs to know.

    - `prev_chunk_left_over`: the current chunk's actions not yet executed, `(...,
        horizon - executed, action_dim)`, in the new chunk's frame (row 0 runs at the time
        of the new chunk's row 0); `None` for the first chunk.
    - `inference_delay`: the delay `d` in control steps the new chunk must expect.
    - `execution_horizon`: `s`.
    - `step`: the control step at which the request was made.
    """

    prev_chunk_left_over: np.ndarray | None
    inference_delay: int
    execution_horizon: int
    step: int


@dataclasses.dataclass(frozen=True)
class ChunkArrival:
    """How a submitted chunk arrived, returned by [`flowcorrect.rtc.ActionQueue.submit`][].

    - `conditioned_delay`: the delay `d` its request reported (what the policy was
        conditioned on: the committed prefix it was given).
    - `measured_delay`: the control steps executed between the request and the
        chunk's arrival `d'` (equal to `d` when the delay is simulated; `None` for the
        first chunk, which replaces nothing).
    - `late`: `d' > d`. The queue still switches at row `d'` of the new chunk, its
        action for that step; rows `d ... d'-1`, planned for steps the old chunk ran,
        are skipped. Count late arrivals to see whether the latency estimate is too low.
    - `seconds`: the wall-clock time from request to submit.
    """

    conditioned_delay: int
    measured_delay: int | None
    late: bool
    seconds: float


class LatencyTracker:
    """The delay to condition the next inference on, from measured inference times.

    A real robot's inference delay varies (network, batching, a busy GPU). The tracker
    keeps the last `window` measured inference times and estimates the delay of the next
    request, in control steps, as `ceil(quantile(times, q) / control_period)`: a high
    quantile, so that a chunk rarely arrives later than the delay it was conditioned on
    (see [`flowcorrect.rtc.ChunkArrival`][]). Before the first measurement it returns
    `initial_delay`. Give it to an [`flowcorrect.rtc.ActionQueue`][] with
    `simulate_delay=False`, which times every request and feeds the tracker; or call
    `record` yourself.

    **Arguments:**

    - `control_period`: seconds per control step (`1 / control_hz`), a number `> 0`.
    - `window`: how many recent inference times to keep, an int `>= 1`. Default 32.
    - `quantile`: `q` in `[0, 1]`. Default 0.9.
    - `initial_delay`: the delay before any measurement, an int `>= 0`. Default 0.
    - `max_delay`: an upper bound on the estimate (an int, or `None`). The queue also
        caps it at what the chunking allows (`min(s, horizon - s)`).

    !!! example

        ```python
        tracker = fc.rtc.LatencyTracker(control_period=1 / 50, quantile=0.9)
        queue = fc.rtc.ActionQueue(execution_horizon=25, latency=tracker, simulate_delay=False)
        request = queue.request()                  # request.inference_delay from the tracker
        arrival = queue.submit(policy(observation, request))
        if arrival.late:
            print("arrived after", arrival.measured_delay, "steps; conditioned on",
                  arrival.conditioned_delay)
        ```
    """

    def __init__(self, control_period: float, *, window: int = 32, quantile: float = 0.9,
                 initial_delay: int = 0, max_delay: int | None = None):
        if not is_real(control_period) \
                or not math.isfinite(control_period) or control_period <= 0:
            raise ValueError(
                f"`control_period` must be a number of seconds > 0 (1 / control rate); got "
                f"{control_period!r}; e.g. LatencyTracker(control_period=1 / 50)."
            )
        for name, value, low in (("window", window, 1), ("initial_delay", initial_delay, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")
        if not is_real(quantile) \
                or not 0 <= quantile <= 1:
            raise ValueError(f"`quantile` must be a number in [0, 1]; got {quantile!r}.")
        if max_delay is not None and (not is_int(max_delay) or max_delay < 0):
            raise ValueError(f"`max_delay` must be None or an int >= 0; got {max_delay!r}.")
        self.control_period = float(control_period)
        self.quantile = float(quantile)
        self.initial_delay = int(initial_delay)
        self.max_delay = None if max_delay is None else int(max_delay)
        self.times: collections.deque[float] = collections.deque(maxlen=int(window))

    def record(self, seconds: float) -> None:
        """Adds one measured inference time, in seconds (finite, `>= 0`)."""
        if not is_real(seconds) \
                or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"`seconds` must be a finite number >= 0; got {seconds!r}.")
        self.times.append(float(seconds))

    def steps(self, seconds: float) -> int:
        """Control steps that pass during `seconds` of inference (rounded up: a chunk that
        arrives during a step is first used at the next one)."""
        # A hair of tolerance: 0.06 s at 50 Hz is 3 steps, not 4 by rounding.
        return max(0, math.ceil(seconds / self.control_period - 1e-9))

    def delay(self) -> int:
        """The delay, in control steps, to condition the next inference on."""
        if not self.times:
            d = self.initial_delay
        else:
            d = self.steps(float(np.quantile(np.asarray(self.times), self.quantile)))
        return d if self.max_delay is None else min(d, self.max_delay)


class ActionQueue:
    """Executes action chunks asynchronously: the robot keeps moving while the policy thinks.

    The loop, in a simulator (the delay is simulated) or on a robot:

    ```python
    queue = fc.rtc.ActionQueue(execution_horizon=4, inference_delay=2)
    while running:
        if queue.inference_due:
            request = queue.request()          # the observation is taken now
            queue.submit(policy(observation, request))
        action, switched = queue.pop()
        observation = env.step(action)
    ```

    Timing, with horizon `H`, execution horizon `s` and delay `d`: an inference is due
    once `s` actions of the current chunk have run (its rows `0 .. s-1`); the request
    takes the observation then, and the new chunk's row 0 is the action for that same
    control step. For `d` more steps the robot runs the current chunk's rows `s .. s+d-1`
    (the committed actions, which real-time chunking passes to the sampler); then it
    switches to the new chunk at its row `d`. So each chunk contributes `s` actions, and
    `d = 0` is synchronous execution. The first chunk, with nothing to run before it,
    starts at its row 0 whenever it arrives.

    Chunks may carry leading batch axes `(..., H, action_dim)` (several environments
    stepped in lockstep); the bookkeeping is shared by the batch. Every chunk is checked
    and copied by `submit` (a NaN, an inf or a non-number is refused) and `pop` hands out
    copies: nothing a caller does with its arrays afterwards changes what the robot
    executes.

    **Arguments:**

    - `execution_horizon`: `s >= 1`, actions executed from each chunk.
    - `inference_delay`: `d` with `0 <= d <= s`, the simulated delay (and what requests
        report). Also needs `d <= H - s` (checked at the first chunk).
    - `simulate_delay`: `True` (default): a submitted chunk takes over exactly `d` steps
        after its request (handing it in early is how a simulator models the delay).
        `False` (a real robot): it takes over at the next `pop`, at the row equal to
        the steps executed since the request (the measured delay, recorded in
        `measured_delays`).
    - `latency`: a [`flowcorrect.rtc.LatencyTracker`][] (needs `simulate_delay=False`):
        every request reports the tracker's estimate as its `inference_delay` (capped at
        `min(s, horizon - s)`), and every submit feeds the tracker the measured
        inference time. `submit` returns a [`flowcorrect.rtc.ChunkArrival`][] saying whether
        the chunk arrived later than the delay it was conditioned on.
    - `clock`: seconds as a float, `time.monotonic` by default (a test can pass a fake).
    """

    def __init__(self, execution_horizon: int, inference_delay: int = 0, *,
                 simulate_delay: bool = True, latency: LatencyTracker | None = None,
                 clock: Callable[[], float] = time.monotonic):
        for name, value, low in (("execution_horizon", execution_horizon, 1),
                                 ("inference_delay", inference_delay, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")
        if inference_delay > execution_horizon:
            raise ValueError(
                f"`inference_delay` {inference_delay} exceeds `execution_horizon` "
                f"{execution_horizon}: the next inference would be due before this one "
                "returns. Execute at least d actions per chunk."
            )
        if latency is not None and not isinstance(latency, LatencyTracker):
            raise TypeError(
                f"`latency` must be a fc.rtc.LatencyTracker or None; got {type(latency).__name__}."
            )
        if latency is not None and simulate_delay:
            raise ValueError(
                "`latency` measures a real delay, but `simulate_delay=True` fixes it at "
                "`inference_delay`. Pass simulate_delay=False with a tracker."
            )
        if not callable(clock):
            raise TypeError(f"`clock` must be callable; got {type(clock).__name__}.")
        self.execution_horizon = int(execution_horizon)
        self.inference_delay = int(inference_delay)
        self.simulate_delay = bool(simulate_delay)
        self.latency = latency
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forgets every chunk and counter (a new episode)."""
        self.chunk: np.ndarray | None = None  # the chunk being executed
        self.index = 0  # its next row
        self.steps = 0  # actions executed in all
        self.chunk_id = -1  # how many chunks were taken over, minus one
        self._pending: np.ndarray | None = None
        self._request: ChunkRequest | None = None
        self.measured_delays: list[int] = []
        self.arrivals: list[ChunkArrival] = []
        self._requested_at = 0.0
        self._switched = False  # a chunk took over and its first action is not popped yet

    @property
    def inference_due(self) -> bool:
        """Whether an inference should start now (none is running, and the current chunk
        has run `s` actions, or there is none)."""
        self._arrive()
        if self._request is not None:
            return False
        return self.chunk is None or self.index >= self.execution_horizon

    def request(self) -> ChunkRequest:
        """Starts an inference: records the step and returns what it needs."""
        self._arrive()
        if self._request is not None:
            raise RuntimeError("An inference is already running; submit its chunk first.")
        left = None if self.chunk is None else np.array(self.chunk[..., self.index:, :])
        self._request = ChunkRequest(left, self._next_delay(), self.execution_horizon,
                                     self.steps)
        self._requested_at = float(self.clock())
        return self._request

    def _next_delay(self) -> int:
        if self.latency is None:
            return self.inference_delay
        cap = self.execution_horizon
        if self.chunk is not None:
            cap = min(cap, self.chunk.shape[-2] - self.execution_horizon)
        return min(self.latency.delay(), cap)

    def submit(self, chunk: Any, *, replace: bool = False) -> ChunkArrival:
        """Hands in the chunk of the running inference.

        The chunk is copied: reusing its array afterwards does not change what the robot
        executes.

        **Returns:** a [`flowcorrect.rtc.ChunkArrival`][]: the delay the request reported,
        the measured one and whether the chunk is late (also kept in `arrivals`).

        **Arguments:**

        - `chunk`: `(..., horizon, action_dim)`, real numbers, every entry finite (a NaN
            or inf would be executed, so it is refused), of the previous chunk's shape.
        - `replace`: `True` to hand in another chunk for the same request, replacing one
            handed in before that has not taken over yet (with `simulate_delay=True`,
            before `d` steps have passed). Without it a second chunk for one request is
            an error: a loop that submits twice usually has a bug. A chunk that has taken
            over is being executed and is never replaced; `request()` the next one.
        """
        if not isinstance(replace, bool):
            raise TypeError(f"`replace` must be True or False; got {replace!r}.")
        self._arrive()
        if self._request is None:
            if self.chunk is not None:
                raise RuntimeError(
                    "No inference is running: the last request's chunk has taken over and is "
                    "being executed, so it cannot be replaced. Call request() (when "
                    "inference_due) before submitting the next chunk."
                )
            raise RuntimeError("No inference is running: call request() before submit().")
        if self._pending is not None and not replace:
            raise RuntimeError(
                "This request's chunk was already submitted and takes over "
                f"{self.inference_delay} steps after the request; a second submit() would "
                "silently replace it. Pass submit(chunk, replace=True) to replace it, or "
                "request() the next inference once inference_due."
            )
        chunk = _checked_chunk(chunk)
        horizon = chunk.shape[-2]
        if self.chunk is not None and chunk.shape != self.chunk.shape:
            raise ValueError(
                f"`chunk` has shape {chunk.shape} but the previous chunk had {self.chunk.shape}."
            )
        if self.chunk is None and self.inference_delay > horizon - self.execution_horizon:
            raise ValueError(
                f"`inference_delay` {self.inference_delay} exceeds horizon - execution_horizon "
                f"= {horizon} - {self.execution_horizon}: the robot would run out of actions "
                "while the policy thinks."
            )
        if self.execution_horizon > horizon:
            raise ValueError(
                f"`execution_horizon` {self.execution_horizon} exceeds the chunk's horizon "
                f"{horizon}."
            )
        request = self._request
        seconds = float(self.clock()) - self._requested_at
        if self.latency is not None and not replace:
            self.latency.record(max(seconds, 0.0))
        self._pending = chunk
        measured: int | None
        if self.chunk is None:
            measured = None
            self._take_over(0)
            self._switched = False  # the first chunk replaces nothing
        elif not self.simulate_delay:
            measured = self.steps - request.step
            self.measured_delays.append(measured)
            self._take_over(measured)
        else:
            measured = request.inference_delay
        arrival = ChunkArrival(
            request.inference_delay, measured,
            measured is not None and measured > request.inference_delay, seconds,
        )
        self.arrivals.append(arrival)
        return arrival

    def _arrive(self) -> None:
        # A simulated inference returns exactly `d` steps after its request, before that
        # step's action is chosen (and before a new inference may be due at that step).
        if self._pending is not None and self.simulate_delay:
            if self.steps - self._request.step >= self.inference_delay:  # type: ignore[union-attr]
                self._take_over(self.inference_delay)

    def _take_over(self, row: int) -> None:
        assert self._pending is not None
        self.chunk, self.index, self._pending = self._pending, row, None
        self._request = None
        self.chunk_id += 1
        self._switched = True

    def pop(self) -> tuple[np.ndarray, bool]:
        """The action for this control step, `(..., action_dim)`, and whether it is the
        first one taken from a newly arrived chunk (a switch)."""
        if self.chunk is None:
            raise RuntimeError("No chunk yet: request() and submit() the first chunk.")
        self._arrive()
        switched, self._switched = self._switched, False
        if self.index >= self.chunk.shape[-2]:
            raise RuntimeError(
                f"The chunk ran out after {self.index} actions while the next one was not "
                "in: the inference took longer than horizon - execution_horizon steps."
            )
        # A copy: a caller editing the action in place must not edit the chunk.
        action = np.array(self.chunk[..., self.index, :])
        self.index += 1
        self.steps += 1
        return action, switched


def _checked_chunk(chunk: Any) -> np.ndarray:
    """A copy of `chunk` as a real NumPy array with every entry finite, or a clear error."""
    fix = (
        "submit the policy's chunk as a float array of shape (..., horizon, action_dim), "
        "e.g. np.asarray(actions, np.float32)"
    )
    try:
        array = np.array(chunk)  # a copy, whatever the caller does with its buffer later
    except (TypeError, ValueError) as e:
        raise TypeError(f"`chunk` is not an array of numbers ({e}); {fix}.") from None
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(
            f"`chunk` must hold real numbers; got dtype {array.dtype} (of shape "
            f"{array.shape}); {fix}."
        )
    if array.ndim < 2:
        raise ValueError(f"`chunk` must be (..., horizon, action_dim); got {array.shape}.")
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`chunk` has {int(bad.sum())} non-finite entries of {array.size} (the first, "
            f"{array[first]}, at index {first}); the robot would execute them. Replace the "
            "chunk before submitting it (fc.sample falls back to the plain chunk by itself "
            "and flags it in info.fell_back; only a policy that returns non-finite chunks "
            "gets them through)."
        )
    return array


__all__ = ["ActionQueue", "ChunkArrival", "ChunkRequest", "LatencyTracker"]
