"""The self-budgeting trace (trace_every="auto"): each replica times its first steps and picks a
power-of-two interval keeping the trace within 2 % of a step; replicas that chose differently are
compared on the steps both recorded, and a dense re-trace still finds the exact first step."""
from __future__ import annotations

from pathlib import Path

import torch

from pytest_mlrepro import audit
from pytest_mlrepro.localize import exact_step, first_divergence, step_divergence
from pytest_mlrepro.trace import TraceRecord
from pytest_mlrepro.tracing.budget import MAX_INTERVAL, MEASURE_STEPS, TraceBudget, interval_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_interval_is_the_smallest_power_of_two_within_budget():
    assert interval_for(1.0, 0.01) == 1  # 1 % of a step: every step
    assert interval_for(1.0, 0.1) == 8  # 10 %: 0.1 / 8 = 1.25 % <= 2 %, 0.1 / 4 = 2.5 % is not
    assert interval_for(1.0, 0.16) == 8
    assert interval_for(1.0, 1e3) == MAX_INTERVAL
    assert interval_for(0.0, 0.1) == MAX_INTERVAL


def test_the_budget_decides_from_the_median_step():
    """One step preempted by another process (a 100x longer gap) does not decide the interval."""
    import pytest_mlrepro.tracing.budget as budget

    b, clock = TraceBudget(), [0.0]
    real = budget.time.perf_counter
    budget.time.perf_counter = lambda: clock[0]
    try:
        for i in range(MEASURE_STEPS):
            clock[0] += 1.0 if i != 3 else 100.0  # the training's own time
            began = b.begin()
            clock[0] += 0.1  # recording
            b.end(began, i + 1)
    finally:
        budget.time.perf_counter = real
    assert b.measured and b.interval() == 8


def _trace(schedule: list, values: dict, *, every: int, dense_until: int, steps: int = 40) -> TraceRecord:
    """One group of one tensor; ``values[step]`` overrides the fingerprint (default: the step number)."""
    entries = [("init", 0, 0)] + [("step", s, 0) for s in schedule]
    fp = torch.tensor([-1] + [values.get(s, s) for s in schedule])
    return TraceRecord(param_names=["w"], opt_indices=[[0]], entries=entries, fp=fp, steps=steps, every=every,
                       dense_until=dense_until, samples=fp.to(torch.float64), opt_sample_lens=[[1]])


def test_replicas_with_different_intervals_are_compared_on_their_common_steps():
    a_steps = list(range(6)) + [s for s in range(6, 40) if s % 4 == 0]
    b_steps = list(range(6)) + [s for s in range(6, 40) if s % 16 == 0]
    a = _trace(a_steps, {}, every=4, dense_until=6)
    assert first_divergence(a, _trace(b_steps, {}, every=16, dense_until=6)) is None
    diverged = {s: -s for s in range(13, 40)}  # from step 13 on
    td = first_divergence(a, _trace(b_steps, diverged, every=16, dense_until=6))
    assert (td.kind, td.step) == ("step", 16)  # the first step both recorded after the change
    b = _trace(b_steps, diverged, every=16, dense_until=6)
    assert not exact_step(td, a, b)  # so the audit re-traces densely
    assert [r["step"] for r in step_divergence(a, b)] == list(range(6)) + [16, 32]
    early = first_divergence(a, _trace(b_steps, {3: 99}, every=16, dense_until=6))
    assert early.step == 3 and exact_step(early, a, b)  # inside the densely recorded start: exact already


def test_a_missing_step_is_still_a_structure_difference():
    a = _trace(list(range(10)), {}, every=1, dense_until=0, steps=10)
    b = _trace(list(range(9)), {}, every=1, dense_until=0, steps=9)
    assert first_divergence(a, b).kind == "structure"


def test_auto_trace_still_finds_the_exact_step_of_the_late_divergence(tmp_path):
    result = audit("fixtures/late_divergence.py:train", device="cpu", workdir=tmp_path, rootdir=ROOT,
                   trace_every="auto", isolation="inprocess", diagnose=False)
    div = result.first_divergence
    assert (div.step, div.phase) == (7, "input"), result.explain()
    chosen = [r.trace_every for r in result.replicas]
    assert all(isinstance(k, int) and k >= 1 and k & (k - 1) == 0 for k in chosen), chosen
    assert MEASURE_STEPS < 7  # step 7 lies past the densely recorded, timed steps
    if max(chosen) > 1:  # and an interval > 1 skips it (7 is odd): only the dense re-trace can name it
        assert (tmp_path / "dense-0").is_dir()
