"""``mlrepro audit`` for code you did not write: argv (program args after ``--``), ``--json``, progress
lines, kept replica logs, the seeding mode on the verdict line, exit codes (0 / 1 / 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_mlrepro import auditing, cli
from pytest_mlrepro.progress import FAILED, FINISHED, STARTED, ProgressEvent, StepsWriter, describe, read_steps, track
from pytest_mlrepro.result import AuditError, AuditResult, Finding
from pytest_mlrepro.run_log import RunLog

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests/targets/cli_tiny_train.py"


# -- argv, usage errors: no audit runs --------------------------------------------------------------
def test_program_args_are_everything_after_the_first_double_dash():
    assert cli.split_program_args(["audit", "t.py", "--seed", "1"]) == (["audit", "t.py", "--seed", "1"], [])
    assert cli.split_program_args(["audit", "t.py", "--", "--seed", "2", "--", "x"]) == (
        ["audit", "t.py"], ["--seed", "2", "--", "x"])


@pytest.fixture
def no_audit(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a usage error must stop before any audit")

    monkeypatch.setattr(auditing, "audit", refuse)


BAD_USAGE = [
    (["audit", TINY, "--args", "--steps", "2"], "--args is gone"),
    (["audit", TINY + ":train", "--", "--steps", "2"], "go to script targets, and none is given"),
    (["audit", TINY, "fixtures/time_seed.py", "--json", "x.json"], "--json writes one audit's entry and 2 targets"),
    (["audit", "missing.py"], "missing.py does not exist"),
    (["audit", TINY + ":nope"], "has no 'nope' (functions defined there: train)"),
    (["audit", "no_such_module_anywhere:train"], "no module named 'no_such_module_anywhere'"),
    (["compare", "--base", "HEAD", TINY + ":train", "--", "3"], "is a function, which takes none"),
]


@pytest.mark.parametrize("argv, message", BAD_USAGE, ids=[" ".join(a[:3]) for a, _ in BAD_USAGE])
def test_usage_and_target_errors_exit_2_before_any_audit(argv, message, no_audit, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "o"
    assert cli.main(argv[:2] + (["--out", str(out)] if argv[0] == "audit" else []) + argv[2:]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_syntax_error_is_a_target_error(tmp_path, no_audit, capsys):
    (tmp_path / "broken.py").write_text("def train(:\n    pass\n")
    assert cli.main(["audit", str(tmp_path / "broken.py") + ":train", "--out", str(tmp_path / "o")]) == 2
    assert "syntax error in" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_function_bound_in_ways_not_visible_is_left_to_the_replica(tmp_path):
    from pytest_mlrepro.preflight import check_target

    (tmp_path / "star.py").write_text("from os.path import *\n")
    (tmp_path / "assigned.py").write_text("import functools\ntrain = functools.partial(print)\n")
    assert check_target(str(tmp_path / "star.py") + ":train").qualname == "train"
    assert check_target(str(tmp_path / "assigned.py") + ":train").qualname == "train"


# -- the verdict line and the exit status, over records ---------------------------------------------
def _result(**kw) -> AuditResult:
    base = dict(target="t.py:train", seed=0, runs=2, device="cpu", isolation="process", seeding="harness",
                comparison={"mode": "bitwise"}, deterministic=True)
    return AuditResult(**{**base, **kw})


def test_the_verdict_line_says_who_seeded_and_warns_of_default_harness_seeding():
    line = cli.verdict_line(_result(), seeding_given=False)
    assert "[seeding: harness, the default for a function target" in line and "--seeding program" in line
    assert cli.verdict_line(_result(), seeding_given=True).endswith("[seeding: harness]")
    assert cli.verdict_line(_result(seeding="program"), seeding_given=False).endswith("[seeding: program]")


def test_exit_status_0_reproducible_1_not_or_a_failing_check_2_not_audited():
    fail = Finding("weights.finite", "fail", "NaN")
    assert cli._exit_status([_result()]) == 0
    assert cli._exit_status([_result(), _result(deterministic=False)]) == 1
    assert cli._exit_status([_result(findings=[fail])]) == 1
    assert cli._exit_status([_result(deterministic=False), _result(error=AuditError("ExitStatus", "status 3"))]) == 2


# -- progress events and the run log ----------------------------------------------------------------
def test_track_emits_started_running_and_finished_with_the_steps_so_far(tmp_path):
    events = []
    writer = StepsWriter(tmp_path, lambda: 7, interval_s=0.01).start()
    with track(events.append, "replica", 1, tmp_path, heartbeat_s=0.05):
        time.sleep(0.2)
    writer.stop()
    assert read_steps(tmp_path) == 7
    states = [e.state for e in events]
    assert states[0] == STARTED and states[-1] == FINISHED and "running" in states
    assert events[-1].steps == 7 and describe(events[-1]).startswith("replica 1: finished after 0.")
    assert describe(events[-1]).endswith(", 7 steps")


def test_track_reports_a_failed_run_and_reraises(tmp_path):
    events = []
    with pytest.raises(RuntimeError, match="boom"):
        with track(events.append, "replay", 0, tmp_path):
            raise RuntimeError("boom\nsecond line")
    assert [e.state for e in events] == [STARTED, FAILED] and events[-1].message == "boom"
    assert read_steps(tmp_path / "nowhere") is None


def test_the_run_log_keeps_the_program_s_output_and_shows_its_tail_on_failure(tmp_path, capsys):
    run = tmp_path / "replica-0" / "out"
    run.mkdir(parents=True)
    (run / "stdout.txt").write_text("".join(f"out line {i}\n" for i in range(30)))
    (run / "stderr.txt").write_text("Traceback ...\nRuntimeError: planted\n")
    log = RunLog("t.py", tmp_path / "logs")
    log(ProgressEvent("replica", 0, FINISHED, 1.5, 3, str(run)))
    assert (tmp_path / "logs" / "replica-0.stdout.txt").read_text().startswith("out line 0")
    assert "planted" not in capsys.readouterr().err  # a finished run's output is kept, not shown
    log(ProgressEvent("replica", 0, FAILED, 2.0, None, str(run), "replica 0 of t.py failed"))
    err = capsys.readouterr().err
    assert "mlrepro: t.py: replica 0: FAILED after 2.0s: replica 0 of t.py failed" in err
    assert "RuntimeError: planted" in err and "out line 29" in err and "out line 9\n" not in err  # the last 20 lines


# -- real audits through the CLI ---------------------------------------------------------------------
def test_a_cli_audit_in_a_fresh_process_writes_json_progress_and_logs_and_exits_0(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "pytest_mlrepro.cli", "audit", TINY, "--json", str(out / "a.json"),
                           "--deterministic", "false", "--wandb", "disabled", "--out", str(out), "--", "--steps", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{TINY}: deterministic (2 tensors, weights bitwise-equal)  [seeding: program]" in proc.stdout
    for i in (0, 1):
        assert f"mlrepro: {TINY}: replica {i}: started" in proc.stderr
        assert f"mlrepro: {TINY}: replica {i}: finished after" in proc.stderr
    assert ", 4 steps" in proc.stderr  # the args after -- reached the program
    entry = json.loads((out / "a.json").read_text())
    assert (entry["schema"], entry["deterministic"], entry["first_divergence"], entry["cause"]) == (
        "pytest-mlrepro/audit-result", True, None, None)
    assert entry["seeding"] == "program" and isinstance(entry["findings"], list)
    logs = out / "logs" / "tests-targets-cli_tiny_train.py"
    assert (logs / "replica-1.stdout.txt").read_text() == "tiny_train: 4 steps\n"
    assert "a line on stderr" in (logs / "replica-0.stderr.txt").read_text()


def test_a_nondeterministic_program_exits_1_with_its_divergence_in_the_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "o"
    code = cli.main(["audit", TINY, "--isolation", "inprocess", "--deterministic", "false", "--json", str(out / "a.json"),
                     "--wandb", "disabled",
                     "--out", str(out), "--", "--steps", "2", "--noisy-loss"])
    captured = capsys.readouterr()
    assert code == 1, captured
    entry = json.loads((out / "a.json").read_text())
    assert entry["deterministic"] is False and entry["verdict"] == "nondeterministic"
    assert entry["first_divergence"]["step"] == 0 and entry["first_divergence"]["phase"]
    assert "module" in entry["first_divergence"] and entry["cause"]["kind"]
    assert "NOT deterministic" in captured.out and "[seeding: program]" in captured.out
    assert f"mlrepro: {TINY}: replay 0: finished" in captured.err  # the extra runs report too


def test_a_crashing_program_exits_2_and_says_why(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.main(["audit", TINY, "--isolation", "inprocess", "--deterministic", "false", "--wandb", "disabled",
                     "--out", str(tmp_path / "o"), "--", "--crash"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{TINY}: error: RuntimeError: replica 0 of {TINY} failed: RuntimeError: tiny_train: planted crash" in captured.out
    assert f"mlrepro: {TINY}: replica 0: FAILED after" in captured.err


@pytest.mark.parametrize("argv", [["--help"], ["audit", "--help"], ["compare", "--help"]])
def test_help_lists_every_option_of_the_table(argv, capsys):
    """argparse %-formats help texts: a literal "%" in an option's help once made --help crash."""
    from pytest_mlrepro.config import CLI_OPTIONS

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    if argv[0] == "audit":
        assert all(f"--{o.flag}" in out for o in CLI_OPTIONS), out
        assert "2 % of the step time" in " ".join(out.split())
