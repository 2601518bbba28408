"""Tests of measured latency: the tracker's delay estimate, the queue feeding it, late
chunks reported, and the switch of a late chunk (conditioned on d, arriving after d')."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import flowcorrect as fc

H, S, A = 8, 4, 2


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tracker_estimates_a_high_quantile_in_control_steps():
    tracker = fc.rtc.LatencyTracker(control_period=0.02, window=4, quantile=1.0, initial_delay=2)
    assert tracker.delay() == 2  # nothing measured yet
    for s in (0.011, 0.019, 0.021, 0.039):
        tracker.record(s)
    assert tracker.delay() == 2  # max 0.039 s is under 2 steps of 0.02 s: ready at step 2
    tracker.record(0.061)  # the window drops 0.011
    assert list(tracker.times) == [0.019, 0.021, 0.039, 0.061]
    assert tracker.delay() == 4
    assert fc.rtc.LatencyTracker(0.02, quantile=0.5).steps(0.06) == 3  # no rounding up to 4
    median = fc.rtc.LatencyTracker(0.02, quantile=0.5)
    for s in (0.01, 0.01, 0.01, 0.09, 0.09):
        median.record(s)
    assert median.delay() == 1
    capped = fc.rtc.LatencyTracker(0.02, max_delay=3)
    capped.record(1.0)
    assert capped.delay() == 3
    for bad, match in ((lambda: fc.rtc.LatencyTracker(0.0), "control_period"),
                       (lambda: fc.rtc.LatencyTracker(0.02, quantile=1.5), "quantile"),
                       (lambda: fc.rtc.LatencyTracker(0.02, window=0), "window"),
                       (lambda: fc.rtc.LatencyTracker(0.02).record(float("nan")), "seconds"),
                       (lambda: fc.rtc.ActionQueue(S, latency=fc.rtc.LatencyTracker(0.02)),
                        "simulate_delay=False"),
                       (lambda: fc.rtc.ActionQueue(S, simulate_delay=False, latency=3), "latency")):
        with pytest.raises((ValueError, TypeError), match=match):
            bad()


@settings(max_examples=40)
@given(times=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=40),
       q=st.floats(0.0, 1.0))
def test_tracker_delay_is_the_quantile_of_the_window_in_steps(times, q):
    tracker = fc.rtc.LatencyTracker(0.02, window=8, quantile=q)
    for s in times:
        tracker.record(s)
    recent = np.asarray(times[-8:])
    expected = max(0, math.ceil(np.quantile(recent, q) / 0.02 - 1e-9))
    assert tracker.delay() == expected
    # A chunk whose inference time is at most the estimate is never late.
    assert tracker.steps(float(np.quantile(recent, q))) <= tracker.delay()


def _ramp(start, horizon=H, slope=0.1):
    """Row i of a chunk starting at control step `start`: a smooth motion a(tau) = slope
    * tau in every action dim."""
    return slope * (start + np.arange(horizon, dtype=np.float64))[:, None] * np.ones(A)


def test_queue_takes_the_delay_from_the_tracker_and_reports_late_chunks():
    clock = FakeClock()
    tracker = fc.rtc.LatencyTracker(0.02, quantile=1.0, initial_delay=1)
    queue = fc.rtc.ActionQueue(S, simulate_delay=False, latency=tracker, clock=clock)
    request = queue.request()
    clock.now += 0.05
    first = queue.submit(_ramp(0))
    assert first.measured_delay is None and not first.late
    assert tracker.times[-1] == pytest.approx(0.05)
    for _ in range(S):
        queue.pop()
    request = queue.request()
    assert request.inference_delay == 3  # ceil(0.05 / 0.02)
    for _ in range(2):
        queue.pop()
    clock.now += 0.03
    arrival = queue.submit(_ramp(S))
    assert (arrival.conditioned_delay, arrival.measured_delay, arrival.late) == (3, 2, False)
    for _ in range(2):  # the new chunk, from its row 2, has run s actions
        queue.pop()
    # A slow inference: the estimate is capped at min(s, H - s) = 4.
    tracker.record(0.2)
    request = queue.request()
    assert request.inference_delay == 4
    for _ in range(4):
        queue.pop()
    clock.now += 0.08
    arrival = queue.submit(_ramp(2 * S))
    assert (arrival.measured_delay, arrival.late) == (4, False)
    assert queue.arrivals[-1] is arrival and queue.measured_delays == [2, 4]

    # Late: conditioned on the measured delay 1 (a first inference of 0.015 s), the next
    # chunk comes after 3 steps.
    queue = fc.rtc.ActionQueue(S, simulate_delay=False, clock=clock,
                           latency=fc.rtc.LatencyTracker(0.02))
    queue.request()
    clock.now += 0.015
    queue.submit(_ramp(0))
    for _ in range(S):
        queue.pop()
    assert queue.request().inference_delay == 1
    for _ in range(3):
        queue.pop()
    arrival = queue.submit(_ramp(S))
    assert (arrival.conditioned_delay, arrival.measured_delay, arrival.late) == (1, 3, True)


@pytest.mark.parametrize("d, late", [(1, 2), (2, 3), (2, 4), (0, 3)])
def test_a_late_chunk_switches_at_its_arrival_row_no_rougher_than_naive(d, late):
    # The previous chunk follows a smooth motion; the new plan is that motion shifted by
    # `offset`. A prefix-conditioned chunk keeps the committed d rows and blends into the
    # new plan from there (what training-time RTC learns); a naive chunk is the new plan
    # from row 0. Both arrive `late` > d steps after their request.
    offset = np.array([0.5, -0.3])
    blend = 1 - np.exp(-(np.arange(H) - d + 1).clip(0) / 2.0)

    def run(chunk_of):
        queue = fc.rtc.ActionQueue(S, simulate_delay=False)
        queue.request()
        queue.submit(_ramp(0))
        executed = [queue.pop()[0] for _ in range(S)]
        request = queue.request()
        assert request.inference_delay == 0
        executed += [queue.pop()[0] for _ in range(late)]  # the robot keeps moving
        new = chunk_of(request.prev_chunk_left_over)
        arrival = queue.submit(new)
        action, switched = queue.pop()
        assert switched and arrival.measured_delay == late
        # The action at the switch is the new chunk's row for this step: row `late`.
        np.testing.assert_array_equal(action, new[late])
        return float(np.linalg.norm(action - executed[-1]))

    old_frame = _ramp(S)  # the old motion in the new chunk's frame

    def conditioned(left):
        chunk = old_frame + blend[:, None] * offset[None]
        chunk[:d] = left[:d]
        return chunk

    def naive(left):
        return old_frame + offset[None]

    ordinary = np.linalg.norm(_ramp(0)[1] - _ramp(0)[0])
    jump_conditioned, jump_naive = run(conditioned), run(naive)
    assert jump_conditioned <= jump_naive
    assert jump_conditioned > ordinary  # late: the skipped rows show, but less than naive
