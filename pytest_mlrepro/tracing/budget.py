"""The self-budgeting trace (``trace_every="auto"``, the default): record every step while timing it,
then thin the recording to the interval that keeps the trace within ``BUDGET`` of the step time.

Recording every step is kept for as long as the recording has cost less than ``ALLOWANCE_S`` in all:
a thinned trace pays for an exact first divergent step with a dense re-trace (one more run of both
replicas, at least a replica's start-up), so a training whose whole trace costs less than that is
recorded densely. After it, the interval is the smallest power of two k with
``record / (k * step) <= BUDGET``, from the medians of the last ``WINDOW`` steps (a step preempted by
another process does not decide it; steps after warm-up do).

Each replica measures and chooses on its own; the interval is a power of two, so two replicas that
chose differently still share every recorded step of the larger interval (the localizer compares
the steps both recorded; a dense re-trace then finds the exact first divergent step).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Optional

BUDGET = 0.02  # the trace's share of a step's time once thinned
ALLOWANCE_S = 1.0  # recording time spent on dense recording before thinning (about one replica start-up)
MEASURE_STEPS = 6  # at least this many timed steps decide (the first one, with registration and warm-up, is not timed)
WINDOW = 64  # the interval is decided from the medians of this many latest steps
MAX_INTERVAL = 256


@dataclass(frozen=True)
class BudgetChoice:
    """What the budget decided, stated in the result: densely recorded steps, then the interval, and why."""

    dense_until: int
    every: int
    step_s: float  # median time of the training's own step
    record_s: float  # median time to record one step

    @property
    def overhead(self) -> float:
        """The recording's estimated share of a step once thinned."""
        return self.record_s / (self.every * self.step_s) if self.step_s > 0 else 0.0

    def to_plain(self) -> dict:
        return {"dense_until": self.dense_until, "every": self.every, "step_s": self.step_s,
                "record_s": self.record_s, "overhead": self.overhead}


class TraceBudget:
    def __init__(self, allowance_s: Optional[float] = None):
        self.allowance_s = ALLOWANCE_S if allowance_s is None else allowance_s
        self._last_end: Optional[float] = None  # when the previous step's bookkeeping ended
        self._step_s: collections.deque = collections.deque(maxlen=WINDOW)  # the training's own time between steps
        self._record_s: collections.deque = collections.deque(maxlen=WINDOW)  # time spent recording each step
        self._spent = 0.0  # recording time so far
        self._timed = 0
        self.choice: Optional[BudgetChoice] = None

    def begin(self) -> float:
        """At a step's end, before recording: the training's time since the previous step is measured here."""
        return time.perf_counter()

    def end(self, began: float, steps_done: int) -> Optional[BudgetChoice]:
        """After recording step ``steps_done - 1``: the choice, once the dense allowance is spent."""
        now = time.perf_counter()
        if self._last_end is not None:
            self._step_s.append(began - self._last_end)
            self._record_s.append(now - began)
            self._spent += now - began
            self._timed += 1
        self._last_end = now
        if self._timed >= MEASURE_STEPS - 1 and self._spent >= self.allowance_s:
            self.choice = BudgetChoice(steps_done, *self._interval())
        return self.choice

    @property
    def measured(self) -> bool:
        return self.choice is not None

    def _interval(self) -> tuple:
        step_s, record_s = _median(self._step_s), _median(self._record_s)
        return interval_for(step_s, record_s), step_s, record_s


def interval_for(step_s: float, record_s: float) -> int:
    if step_s <= 0:
        return MAX_INTERVAL
    k = 1
    while k < MAX_INTERVAL and record_s > BUDGET * k * step_s:
        k *= 2
    return k


def _median(values) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
