"""A loop that updates its weights by hand (`p.data -= lr * g`, no optimizer object) still gets a
step per update: a step is a change of a root module's trained parameters between two forwards."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_mlrepro import audit
from pytest_mlrepro.trace import Tracer

ROOT = Path(__file__).resolve().parent.parent
TARGET = "fixtures/frameworks_trace/manual_update.py:train"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    kw = dict(rootdir=ROOT, isolation="inprocess", timeout=120, diagnose=False)
    return (audit(TARGET, workdir=tmp_path_factory.mktemp("clean"), **kw),
            audit(TARGET, kwargs={"perturb_step": 2}, workdir=tmp_path_factory.mktemp("planted"), **kw))


def test_manual_updates_are_steps(runs):
    clean, _ = runs
    assert clean.error is None, clean.explain()
    assert clean.deterministic, clean.explain()
    assert [r.steps for r in clean.replicas] == [6, 6]  # the last update is seen when the program ends
    assert [e[0] for e in clean.trajectory["entries"]] == ["init"] + ["step"] * 6
    assert clean.trajectory["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_planted_divergence_in_a_manual_loop_is_found_at_its_step(runs):
    _, planted = runs
    assert not planted.deterministic
    div = planted.first_divergence
    assert (div.step, div.phase) == (2, "input"), planted.explain()  # the replay of a fallback step names the phase too


def _trace(loop) -> "Tracer":
    tracer = Tracer().install()
    try:
        loop()
    finally:
        tracer.uninstall()
    return tracer


def test_updates_through_version_counters_and_gradient_accumulation():
    """In-place updates under no_grad bump `_version` (no content check needed); two forwards per
    update (accumulation) and an evaluation forward with no update between are not extra steps."""
    m = torch.nn.Linear(3, 1)

    def loop():
        for _ in range(3):
            for _ in range(2):
                m(torch.randn(4, 3)).sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            with torch.no_grad():
                m(torch.randn(2, 3))

    assert _trace(loop).steps == 3


def test_no_change_no_step_and_optimizers_take_over():
    m = torch.nn.Linear(3, 1)
    assert _trace(lambda: [m(torch.randn(2, 3)) for _ in range(3)]).steps == 0  # inference only
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def loop():
        for _ in range(4):
            opt.zero_grad()
            m(torch.randn(2, 3)).sum().backward()
            opt.step()

    tracer = _trace(loop)
    record = tracer.record()
    assert record.steps == 4 and record.group_kinds == ["torch.optim"]  # no fallback group, no double count


def test_updates_through_data_after_one_that_bumped_the_version_still_count():
    """A version bump (a no_grad in-place nudge) once does not make later `.data` updates invisible."""
    m = torch.nn.Linear(3, 1)

    def loop():
        for i in range(4):
            m(torch.randn(2, 3)).sum().backward()
            if i == 0:
                with torch.no_grad():
                    m.weight.add_(1e-3)
            for p in m.parameters():
                p.data -= 0.1 * p.grad
                p.grad = None

    assert _trace(loop).steps == 4
