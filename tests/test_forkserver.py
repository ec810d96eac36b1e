"""``isolation="forkserver"``: replicas forked from a warm interpreter give the same verdicts as fresh
interpreters, each with its own hash secret, process and session; servers are reused across audits;
a program whose thread variable would not take effect is refused; crashes and timeouts are named.

(The process-tree faults with a fork server — kill -9 of the parent, escapees — are in
test_faults_signals.py, parametrised over both isolations.)"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pytest_mlrepro import audit, forkserver

CASES = str(Path(__file__).resolve().parent / "targets" / "forkserver_cases.py")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _audit(target, tmp_path, **kw):
    kw.setdefault("deterministic", False)  # nothing here is about deterministic kernels
    return audit(target, workdir=tmp_path, device="cpu", isolation="forkserver", **kw)


def test_replicas_are_fresh_processes_of_their_own_with_their_own_hash_secret(tmp_path):
    result = _audit(f"{CASES}:whoami", tmp_path, seeding="program")
    assert result.error is None, result.error
    names = {d.name for d in result.tensors if not d.equal}
    # each replica hashes with its own PYTHONHASHSEED (as a fresh interpreter), in a process and session of its own
    assert names == {"hash", "pid", "sid"}, [d.name for d in result.tensors]
    a, b = (torch.load(tmp_path / f"replica-{i}" / "out" / "weights.pt", weights_only=True) for i in (0, 1))
    assert a["pid"] == a["sid"] and b["pid"] == b["sid"] and a["pid"] != os.getpid()


def test_same_verdicts_as_fresh_interpreters_and_servers_reused_across_audits(tmp_path, monkeypatch):
    first = _audit(f"{CASES}:train", tmp_path / "a")
    assert first.error is None and first.deterministic, first.explain()
    servers = {key: s.proc.pid for key, s in forkserver._servers.items() if not s.dead}
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test (call)")  # what pytest changes between tests
    again = _audit(f"{CASES}:train", tmp_path / "b")
    assert again.deterministic
    assert {key: s.proc.pid for key, s in forkserver._servers.items() if not s.dead} == servers  # none started anew
    hashed = _audit(str(FIXTURES / "hash_order.py"), tmp_path / "c", args=("--device", "cpu", "--epochs", "1"))
    assert not hashed.deterministic and hashed.first_divergence.step == 0
    assert hashed.cause.kind == "hash_seed", hashed.explain()  # the pinned-hash-seed rerun agrees, forked as well


def test_a_thread_count_set_before_importing_torch_is_refused_not_ignored(tmp_path):
    """Before `import torch` it would size the thread pool in a fresh interpreter: refused. After it, it
    has no effect there either, and other variables (sklearn's KMP_DUPLICATE_LIB_OK) are never refused."""
    refused = _audit(str(Path(CASES).with_name("forkserver_threads_first.py")), tmp_path / "a")
    assert refused.verdict == "error"
    assert "sets OMP_NUM_THREADS='3' before importing torch" in refused.error.message
    assert "isolation='process'" in refused.error.message and "KMP_DUPLICATE_LIB_OK" not in refused.error.message
    after = _audit(f"{CASES}:sets_threads_after_torch", tmp_path / "b")
    assert after.error is None and after.deterministic


def test_a_crash_and_a_hang_are_named(tmp_path):
    crashed = _audit(f"{CASES}:segfault", tmp_path / "a")
    assert crashed.error.type == "signal" and "killed by signal SIGSEGV (11)" in crashed.error.message
    hung = _audit(f"{CASES}:hangs", tmp_path / "b", timeout=8)
    assert hung.error.type == "timeout" and "hung past the timeout of 8s" in hung.error.message


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(forkserver, "START_TIMEOUT_S", 60)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # shadows torch in the server: it dies importing it
    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")
    with pytest.raises(forkserver.ForkServerError, match="no torch here"):
        forkserver.server_for({**os.environ, "PYTHONPATH": str(tmp_path)})
