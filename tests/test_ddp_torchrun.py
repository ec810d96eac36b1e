"""``ddp_launcher="torchrun"``: the ranks of a DDP replica started by torchrun's own agent. One real
audit (a cold interpreter per rank costs tens of seconds here); the option and the launcher's
bookkeeping of failed and stopped ranks on records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_mlrepro.config import BY_NAME, AuditConfig, marker_signature
from pytest_mlrepro.distributed_rank import RANKS_FILE, write_outcome
from pytest_mlrepro.distributed_torchrun import RENDEZVOUS, WORKER_MODULE, WorkerExit, rank_ends, torchrun_arguments
from pytest_mlrepro.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = str(ROOT / "fixtures" / "ddp" / "ddp_train.py")


def test_a_correct_program_under_torchrun_is_deterministic_with_every_rank_traced(tmp_path):
    from pytest_mlrepro import audit

    result = audit(PROGRAM, nproc=2, ddp_launcher="torchrun", args=["--steps", "2"], workdir=tmp_path,
                   diagnose=False, timeout=300, isolation="forkserver")
    assert result.error is None, result.explain()
    assert result.verdict == "deterministic" and result.findings == [], result.explain()
    assert [r.steps for r in result.replicas] == [2, 2]
    for replica in (0, 1):
        out = tmp_path / f"replica-{replica}" / "out"
        for rank in (0, 1):
            assert (out / f"rank-{rank}" / "trace.pt").is_file() and (out / f"rank-{rank}" / "ddp.json").is_file()
        ends = json.loads((out / RANKS_FILE).read_text())
        assert ends["launcher"] == "torchrun" and [e["status"] for e in ends["ranks"]] == ["ok", "ok"]
        assert any((out / "torchrun").iterdir()), "torchrun's agent ran (its log folder)"


# -- the option ------------------------------------------------------------------------------------------

def test_ddp_launcher_option_is_validated():
    assert AuditConfig().ddp_launcher == "fork" and "ddp_launcher='fork'" in marker_signature()
    assert BY_NAME["ddp_launcher"].from_text(" TorchRun ") == "torchrun"
    assert AuditConfig(nproc=2, ddp_launcher="torchrun").validate().ddp_launcher == "torchrun"
    with pytest.raises(ConfigError, match="ddp_launcher must be one of fork, torchrun; got 'mpirun'"):
        AuditConfig(nproc=2, ddp_launcher="mpirun").validate()
    with pytest.raises(ConfigError, match="ddp_launcher='torchrun' needs nproc > 1"):
        AuditConfig(ddp_launcher="torchrun").validate()
    AuditConfig(ddp_launcher="fork").validate()  # the default with one process: nothing to refuse


def test_torchrun_accepts_the_command_line(tmp_path):
    from torch.distributed import run as torchrun

    args = torchrun.parse_args(torchrun_arguments(3, "abc", tmp_path / "spec.pkl", tmp_path))
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == ("1", "3", "c10d", RENDEZVOUS)
    assert (args.max_restarts, args.module, args.training_script) == (0, True, WORKER_MODULE)
    assert args.local_addr == "127.0.0.1"
    assert args.training_script_args == [str(tmp_path / "spec.pkl"), str(tmp_path)]


# -- which rank failed, which the agent stopped ----------------------------------------------------------

def _report(out: Path, rank: int, message: str, at_ns: int) -> None:
    import os

    d = out / f"rank-{rank}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "error.json").write_text(json.dumps({"type": "RuntimeError", "message": message, "traceback": ""}))
    os.utime(d / "error.json", ns=(at_ns, at_ns))


S = 1_000_000_000


def test_a_crashing_rank_is_named_and_the_rank_the_agent_stopped_is_not_blamed(tmp_path):
    # rank 1 raised (its report); torchrun's agent then stopped rank 0 with SIGTERM, in the same second
    _report(tmp_path, 1, "rank 1 crashed on purpose", 100 * S + 400_000_000)
    ranks, order = rank_ends(tmp_path, 2, {1: WorkerExit(1, 1, 100.0), 0: WorkerExit(0, -15, 100.0)}, 101 * S)
    assert order == [1]
    assert ranks[0]["status"] == "stopped" and "torchrun's agent, SIGTERM" in ranks[0]["reason"]
    assert (ranks[1]["status"], ranks[1]["exit_code"], ranks[1]["at_ns"]) == ("failed", 1, 100 * S + 400_000_000)
    assert write_outcome(tmp_path, ranks, order, launcher="torchrun") == 1
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["rank"] == 1 and error["message"].startswith("rank 1 failed first: RuntimeError: rank 1 crashed on purpose")
    assert "rank 0 was killed (by torchrun's agent, SIGTERM" in error["message"]


def test_the_earliest_report_decides_and_a_native_crash_counts_as_a_failure(tmp_path):
    # both raised (rank 0 first, then rank 1 as its peer vanished): the earlier report is the first failure
    _report(tmp_path, 0, "first", 100 * S + 100)
    _report(tmp_path, 1, "second", 100 * S + 900)
    _, order = rank_ends(tmp_path, 2, {0: WorkerExit(0, -15, 100.0), 1: WorkerExit(1, 1, 100.0)}, 101 * S)
    assert order == [0, 1]
    # rank 1 died of SIGSEGV without a report: it failed; rank 0, stopped, did not
    ranks, order = rank_ends(tmp_path / "b", 2, {1: WorkerExit(1, -11, 100.0), 0: WorkerExit(0, -15, 100.0)}, 101 * S)
    assert order == [1] and ranks[1] == {"rank": 1, "status": "signal", "signal": "SIGSEGV", "at_ns": 100 * S}
    assert ranks[0]["status"] == "stopped"


def test_ranks_killed_from_outside_are_failures_and_a_clean_run_has_none(tmp_path):
    # nobody failed on their own (an OOM kill, then the agent's SIGTERM): the agent's times order them
    ranks, order = rank_ends(tmp_path, 2, {0: WorkerExit(0, -15, 101.0), 1: WorkerExit(1, -9, 100.0)}, 102 * S)
    assert order == [1, 0] and [r["status"] for r in ranks] == ["signal", "signal"]
    ranks, order = rank_ends(tmp_path, 2, {}, 5)
    assert order == [] and ranks == [{"rank": k, "status": "ok", "exit_code": 0, "at_ns": 5} for k in (0, 1)]
    assert write_outcome(tmp_path, ranks, order, launcher="torchrun") == 0 and not (tmp_path / "error.json").exists()
