"""The self-budgeting trace (``trace_every="auto"``): record every one of the first steps while timing
them, then pick the recording interval so that the trace adds at most ``BUDGET`` of the step time.

Each replica measures and chooses on its own; the interval is a power of two, so two replicas that
chose differently still share every recorded step of the larger interval (the localizer compares
the steps both recorded; a dense re-trace then finds the exact first divergent step).
"""
from __future__ import annotations

import time

BUDGET = 0.02  # the trace's share of a step's time
MEASURE_STEPS = 6  # steps recorded densely and timed (the first one, with registration and warm-up, is not timed)
MAX_INTERVAL = 256


class TraceBudget:
    def __init__(self):
        self._last_end = None  # when the previous step's bookkeeping ended
        self._step_s: list = []  # the training's own time between steps
        self._record_s: list = []  # time spent recording each step
        self._began = None

    def begin(self) -> float:
        """At a step's end, before recording: the training's time since the previous step is measured here."""
        self._began = time.perf_counter()
        return self._began

    def end(self, began: float, steps_done: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._step_s.append(began - self._last_end)
            self._record_s.append(now - began)
        self._last_end = now

    @property
    def measured(self) -> bool:
        return len(self._record_s) >= MEASURE_STEPS - 1

    def interval(self) -> int:
        """The smallest power of two k with record time / (k * step time) <= BUDGET, from the medians of
        the timed steps (a step preempted by another process does not decide it)."""
        if not self._step_s:
            return MAX_INTERVAL
        return interval_for(_median(self._step_s), _median(self._record_s))


def interval_for(step_s: float, record_s: float) -> int:
    if step_s <= 0:
        return MAX_INTERVAL
    k = 1
    while k < MAX_INTERVAL and record_s > BUDGET * k * step_s:
        k *= 2
    return k


def _median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
