"""Bad input gives a clear failure naming the target and the cause, never a crash or an orphan."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_mlrepro import TargetError, audit

TARGETS = Path(__file__).resolve().parent / "targets"
TINY = str(TARGETS / "tiny.py")
FAST = {"isolation": "forkserver"}  # replicas forked from a warm interpreter: torch imported once per worker


@pytest.mark.parametrize("target, message", [
    ("no_such_module_xyz:train", "cannot import module 'no_such_module_xyz'"),
    (f"{TINY}:nope", "has no attribute 'nope'"),
    (f"{TINY}:NOT_CALLABLE", "is a int, not callable"),
])
def test_unresolvable_targets_fail_in_the_replica_with_the_cause(target, message, tmp_path):
    result = audit(target, workdir=tmp_path)
    assert result.verdict == "error"
    assert message in result.error.message and result.error.replica == 0
    assert "Traceback" in result.error.traceback


@pytest.mark.parametrize("target, message", [
    ("missing/file.py:train", "does not exist"),
    ("missing_script.py", "does not exist"),
    ("not a target", "neither"),
    ("", "empty"),
    (42, "must be"),
])
def test_malformed_targets_raise_before_running_anything(target, message, tmp_path):
    with pytest.raises(TargetError, match=message):
        audit(target, workdir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_lambda_needs_inprocess_isolation(tmp_path):
    with pytest.raises(TargetError, match="isolation='inprocess'"):
        audit(lambda: None, workdir=tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 1}, "runs must be"),
    ({"isolation": "thread"}, "isolation must be"),
    ({"mode": "close"}, "mode must be"),
    ({"atol": -1.0}, ">= 0"),
    ({"timeout": 0}, "timeout must be"),
    ({"seed": -3}, "seed must be"),
    ({"device": "tpu"}, "device must be"),
])
def test_bad_arguments_raise_value_errors(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        audit(f"{TINY}:train", workdir=tmp_path, **kwargs)


def test_a_raising_target_shows_the_replicas_traceback(tmp_path):
    result = audit(f"{TINY}:raises", workdir=tmp_path, **FAST)
    assert result.verdict == "error"
    assert "RuntimeError: the training blew up on purpose" in result.error.traceback
    assert "tiny.py" in result.error.traceback and "tiny.py:raises" in result.error.message
    with pytest.raises(pytest.fail.Exception, match="blew up on purpose"):
        result.assert_deterministic()


def test_a_script_exiting_non_zero_is_a_failure_naming_the_status(tmp_path):
    result = audit(str(TARGETS / "exits.py"), workdir=tmp_path, **FAST)
    assert result.verdict == "error"
    assert "exited with status 3" in result.error.message


def test_nothing_comparable_is_refused(tmp_path):
    result = audit(f"{TINY}:returns_nothing_comparable", workdir=tmp_path, **FAST)
    assert result.verdict == "error"
    assert "returned int" in result.error.message


def test_returning_nothing_compares_the_trained_model(tmp_path):
    result = audit(f"{TINY}:returns_nothing", workdir=tmp_path, **FAST)
    assert result.deterministic, result.explain()
    assert [t.name for t in result.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_state_dict_and_a_module_compare_the_same_tensors(tmp_path):
    a = audit(f"{TINY}:returns_state_dict", workdir=tmp_path / "a", **FAST)
    b = audit(f"{TINY}:train", workdir=tmp_path / "b", **FAST)
    assert a.deterministic and b.deterministic
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]


def test_different_structures_are_reported_not_crashed(tmp_path):
    result = audit(f"{TINY}:different_structures", workdir=tmp_path, isolation="inprocess")
    statuses = {t.name: t.status for t in result.tensors}
    assert not result.deterministic
    assert statuses == {"w": "equal", "extra": "missing_in_other", "other": "missing_in_reference"}
    assert "extra: missing_in_other" in result.explain()


def test_a_hanging_target_is_killed_with_its_process_tree(tmp_path):
    psutil = pytest.importorskip("psutil")
    started = time.monotonic()
    result = audit(f"{TINY}:hangs", workdir=tmp_path, timeout=8)
    assert time.monotonic() - started < 60
    assert result.verdict == "error" and result.error.type == "timeout"
    assert "hung past the timeout of 8s" in result.error.message
    pid = int((tmp_path / "replica-0" / "work" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "grandchild left running"


def test_inprocess_isolation_restores_the_callers_rng_state(tmp_path):
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    result = audit(f"{TINY}:train", isolation="inprocess", workdir=tmp_path)
    assert result.deterministic
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_broken_target_is_localized_in_process_too(tmp_path):
    result = audit(f"{TINY}:noisy_input", isolation="inprocess", workdir=tmp_path)
    assert not result.deterministic
    assert (result.first_divergence.step, result.first_divergence.phase) == (1, "input")
    assert result.first_divergence.module == "0"


def test_tolerance_mode_accepts_what_bitwise_rejects(tmp_path):
    target = f"{TINY}:noisy_input"
    loose = audit(target, mode="tolerance", atol=1e9, isolation="inprocess", workdir=tmp_path)
    assert loose.deterministic and loose.comparison["mode"] == "tolerance"
    assert all(t.status == "equal" for t in loose.tensors)


def test_result_round_trips_through_json(tmp_path):
    import json

    from pytest_mlrepro import AuditResult

    result = audit(f"{TINY}:noisy_input", isolation="inprocess", workdir=tmp_path)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["schema"] == "pytest-mlrepro/audit-result" and d["verdict"] == "nondeterministic"
    back = AuditResult.from_dict(d)
    assert back.first_divergence.step == 1 and back.cause.kind == result.cause.kind
    assert back.to_dict() == d


@pytest.mark.parametrize("isolation", ["process", "forkserver", "inprocess"])
def test_cwd_is_the_private_workdir_by_default_and_rootdir_on_request(tmp_path, isolation):

    project = tmp_path / "project"
    project.mkdir()
    (project / "data.txt").write_text("2.0")
    before = os.getcwd()
    isolated = audit(f"{TINY}:reads_relative_data", workdir=tmp_path / "a", rootdir=project, isolation=isolation)
    assert isolated.verdict == "error" and "data.txt" in isolated.error.message
    rooted = audit(f"{TINY}:reads_relative_data", workdir=tmp_path / "b", rootdir=project, isolation=isolation,
                   cwd="rootdir")
    assert rooted.deterministic, rooted.explain()
    assert os.getcwd() == before
    with pytest.raises(ValueError, match="cwd must be"):
        audit(f"{TINY}:train", cwd="here")


def test_a_relative_workdir_works(tmp_path, monkeypatch):
    """Replicas run with their own cwd: a relative workdir must mean the caller's folder, not theirs."""
    monkeypatch.chdir(tmp_path)
    result = audit(f"{TINY}:train", workdir="rel/audit")
    assert result.error is None and result.deterministic, result.explain()
    assert (tmp_path / "rel" / "audit" / "replica-0" / "out" / "weights.pt").is_file()


def test_a_probe_that_cannot_install_leaves_nothing_patched_in_process(tmp_path, monkeypatch):
    """The probes installed before it and the controls are undone (in-process they would outlive the audit)."""
    import random

    import torch

    from pytest_mlrepro.observe.probe import CallbackProbe

    generator, seed = torch.Generator, random.seed

    def broken(self):
        raise RuntimeError("cannot install")

    monkeypatch.setattr(CallbackProbe, "install", broken)
    with pytest.raises(RuntimeError, match="cannot install"):
        audit(f"{TINY}:train", workdir=tmp_path, isolation="inprocess")
    assert torch.Generator is generator and random.seed is seed  # the seed probe's patches are gone
