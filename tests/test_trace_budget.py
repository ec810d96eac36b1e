"""The self-budgeting trace (trace_every="auto"): each replica times its first steps and picks a
power-of-two interval keeping the trace within 2 % of a step; replicas that chose differently are
compared on the steps both recorded, and a dense re-trace still finds the exact first step."""
from __future__ import annotations

from pathlib import Path

import torch

from pytest_mlrepro import audit
from pytest_mlrepro.localize import exact_step, first_divergence, step_divergence
from pytest_mlrepro.trace import TraceRecord
from pytest_mlrepro.tracing import budget
from pytest_mlrepro.tracing.budget import MAX_INTERVAL, MEASURE_STEPS, WINDOW, TraceBudget, interval_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_interval_is_the_smallest_power_of_two_within_budget():
    assert interval_for(1.0, 0.01) == 1  # 1 % of a step: every step
    assert interval_for(1.0, 0.1) == 8  # 10 %: 0.1 / 8 = 1.25 % <= 2 %, 0.1 / 4 = 2.5 % is not
    assert interval_for(1.0, 0.16) == 8
    assert interval_for(1.0, 1e3) == MAX_INTERVAL
    assert interval_for(0.0, 0.1) == MAX_INTERVAL


def _feed(b: TraceBudget, steps: list) -> list:
    """Feed (training seconds, recording seconds) per step through a fake clock; the choice after each step."""
    import pytest_mlrepro.tracing.budget as budget

    clock, choices = [0.0], []
    real = budget.time.perf_counter
    budget.time.perf_counter = lambda: clock[0]
    try:
        for i, (train_s, record_s) in enumerate(steps):
            clock[0] += train_s
            began = b.begin()
            clock[0] += record_s
            choices.append(b.end(began, i + 1))
    finally:
        budget.time.perf_counter = real
    return choices


def test_the_budget_decides_from_the_median_step():
    """One step preempted by another process (a 100x longer gap) does not decide the interval."""
    b = TraceBudget(allowance_s=0.0)
    choices = _feed(b, [(100.0 if i == 3 else 1.0, 0.1) for i in range(MEASURE_STEPS)])
    assert choices[:-1] == [None] * (MEASURE_STEPS - 1)
    assert b.measured and (choices[-1].every, choices[-1].dense_until) == (8, MEASURE_STEPS)
    assert abs(choices[-1].overhead - 0.1 / 8) < 1e-12


def test_every_step_is_recorded_while_the_recording_costs_less_than_the_allowance():
    """0.125 s per record and a 1 s allowance: dense for 9 steps (the first is not timed), then thinned;
    without the allowance a short training would pay a dense re-trace for its exact step."""
    b = TraceBudget(allowance_s=1.0)
    choices = _feed(b, [(1.0, 0.125)] * 20)
    first = next(i for i, c in enumerate(choices) if c is not None)
    assert first == 8 and choices[first].dense_until == 9 and choices[first].every == 8


def test_the_interval_comes_from_the_latest_steps_not_the_warm_up():
    """80 slow warm-up steps (1 s each), then 0.125 s steps, 1/64 s per record and a 2 s allowance: chosen
    after 128 timed steps, most of them slow (a median over all would say every step: 1/64 of 1 s is
    1.6 %), but the last WINDOW are mostly fast: 1/64 / (8 x 0.125) = 1.6 %, so every 8th."""
    b = TraceBudget(allowance_s=2.0)
    choices = _feed(b, [(1.0, 1 / 64)] * 80 + [(0.125, 1 / 64)] * 100)
    first = next(c for c in choices if c is not None)
    assert (first.dense_until, first.every, first.step_s) == (129, 8, 0.125), first
    assert WINDOW == 64  # the window the figures above assume


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


def test_auto_trace_records_a_short_training_densely_and_names_its_step_without_a_re_trace(tmp_path):
    """The default: the fixture's whole trace costs far less than the allowance, so every step is
    recorded and step 7 is named from the replicas' own traces."""
    result = audit("fixtures/late_divergence.py:train", device="cpu", workdir=tmp_path, rootdir=ROOT,
                   isolation="inprocess", diagnose=False)
    div = result.first_divergence
    assert (div.step, div.phase) == (7, "input"), result.explain()
    assert [(r.trace_every, r.trace_dense_until, r.trace_budget) for r in result.replicas] == [(1, 0, None)] * 2
    assert not (tmp_path / "dense-0").exists()


def test_a_thinned_auto_trace_still_finds_the_exact_step_of_the_late_divergence(tmp_path, monkeypatch):
    """No allowance and a budget no interval meets: the replicas record their first MEASURE_STEPS steps,
    then every MAX_INTERVAL-th; step 7 is past the dense start and odd, so only the dense re-trace can name it."""
    monkeypatch.setattr(budget, "ALLOWANCE_S", 0.0)
    monkeypatch.setattr(budget, "BUDGET", 1e-12)
    result = audit("fixtures/late_divergence.py:train", device="cpu", workdir=tmp_path, rootdir=ROOT,
                   isolation="inprocess", diagnose=False)
    div = result.first_divergence
    assert (div.step, div.phase) == (7, "input"), result.explain()
    assert [(r.trace_every, r.trace_dense_until) for r in result.replicas] == [(MAX_INTERVAL, MEASURE_STEPS)] * 2
    assert all(r.trace_budget["every"] == MAX_INTERVAL and r.trace_budget["record_s"] > 0 for r in result.replicas)
    assert MEASURE_STEPS < 7
    assert (tmp_path / "dense-0").is_dir()
