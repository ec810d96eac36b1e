"""The invariance matrix (option ``invariant``): one extra replica per axis, compared with replica 0.
In-process audits of the tiny leak fixtures (the hashseed axis needs processes: there it is skipped)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_mlrepro import audit, checks, controls
from pytest_mlrepro.config import INVARIANT_AXES, AuditConfig
from pytest_mlrepro.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LEAKS = ROOT / "fixtures" / "leaks"


def _cells(result):
    return {f.details["axis"]: f for f in result.findings if f.check == checks.INVARIANCE}


def test_each_axis_is_a_cell_and_listing_order_is_caught(tmp_path):
    result = audit(str(LEAKS / "listing_order.py"), isolation="inprocess", workdir=tmp_path, rootdir=ROOT,
                   invariant="listing-order,clock,threads=1e-5,hashseed")
    assert result.deterministic, result.explain()  # the replicas alone see nothing
    cells = _cells(result)
    assert list(cells) == ["listing-order", "clock", "threads", "hashseed"]
    listing = cells["listing-order"]
    assert (listing.verdict, listing.details["step"], listing.details["changed"]) == ("fail", 0, True)
    assert "changed at step 0" in listing.message and listing.details["tensor"] in ("weight", "bias")
    assert cells["clock"].verdict == "pass" and "result unchanged" in cells["clock"].message
    assert cells["threads"].verdict == "pass" and cells["threads"].details["tolerance"] == 1e-5
    assert cells["hashseed"].verdict == "skip" and "process isolation" in cells["hashseed"].message
    assert result.verdict == "failed-checks"  # a changed cell fails the audit it was asked for
    assert (tmp_path / "invariant-listing-order-0").is_dir()


def test_a_program_that_does_not_depend_on_the_axis_passes_and_a_differing_one_is_skipped(tmp_path):
    clean = audit(str(LEAKS / "clean.py"), isolation="inprocess", workdir=tmp_path / "c", rootdir=ROOT,
                  invariant="listing-order")
    assert clean.verdict == "deterministic" and _cells(clean)["listing-order"].verdict == "pass"
    broken = audit(str(LEAKS / "random_in_loss.py"), isolation="inprocess", workdir=tmp_path / "b", rootdir=ROOT,
                   invariant="clock", diagnose=False)
    assert _cells(broken)["clock"].verdict == "skip" and "already differ" in _cells(broken)["clock"].message
    plain = audit(str(LEAKS / "clean.py"), isolation="inprocess", workdir=tmp_path / "p", rootdir=ROOT)
    assert plain.findings == [] and not list((tmp_path / "p").glob("invariant-*"))  # opt-in only


@pytest.mark.parametrize("given, expected", [
    ("threads=1e-6,clock", (("threads", 1e-6), ("clock", None))),
    (["hashseed", ("threads", 0)], (("hashseed", None), ("threads", 0.0))),
    ((), ()), ("clock,clock", (("clock", None),)),
])
def test_the_option_reads_axes_and_tolerances(given, expected):
    assert AuditConfig().merged({"invariant": given}).invariant == expected


@pytest.mark.parametrize("given, message", [
    ("moon", "unknown axis 'moon'"), ("threads=abc", "must be a number >= 0"), ("threads=-1", ">= 0"), (3, "list of axes"),
])
def test_a_bad_axis_or_tolerance_is_refused(given, message):
    with pytest.raises(ConfigError, match=message):
        AuditConfig().merged({"invariant": given})


def test_the_perturbations_change_their_axis_and_undo(tmp_path):
    for name in "abc":
        (tmp_path / name).write_text(name)
    natural, before = os.listdir(tmp_path), time.time()
    undo = controls.apply(frozenset(), 0, perturb=frozenset({"listing-order", "clock"}))
    try:
        assert os.listdir(tmp_path) == natural[::-1] and [e.name for e in os.scandir(tmp_path)] == natural[::-1]
        assert time.time() - before > 399 * 86400
    finally:
        undo()
    assert os.listdir(tmp_path) == natural and time.time() - before < 3600
    assert set(controls.PERTURBATIONS) == set(INVARIANT_AXES)


def test_the_threads_axis_is_not_defeated_by_a_program_that_sets_its_own_count():
    import torch

    from pytest_mlrepro import controls

    before = torch.get_num_threads()
    undo = controls.apply(frozenset(), 0, frozenset({"threads"}))
    try:
        assert torch.get_num_threads() != before
        torch.set_num_threads(3)  # what the program asks for: it gets another count than replica 0 got
        assert torch.get_num_threads() == 2
    finally:
        undo()
    assert torch.get_num_threads() == before and torch.set_num_threads(before) is None
    torch.set_num_threads(3)
    assert torch.get_num_threads() == 3  # the real one is back
    torch.set_num_threads(before)
