"""One option table, one validation: every bad value is refused at the start, with one message, on
every surface (audit(), pytest's options, ini and environment, the marker, the mlrepro CLI)."""
from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pytest_mlrepro import cli
from pytest_mlrepro.config import (AUDIT_OPTIONS, BY_NAME, CLI_OPTIONS, OPTIONS, TEXT_OPTIONS, AuditConfig, SessionConfig,
                                   marker_signature)
from pytest_mlrepro.errors import ConfigError, MlreproError

TINY = str(Path(__file__).parent / "targets" / "tiny.py")

# (option, bad text as typed on a command line, the message every surface gives)
BAD_TEXT = [
    ("seed", "-1", "seed must be a whole number from 0 to 4294967295, got -1"),
    ("seed", "4294967296", "seed must be a whole number from 0 to 4294967295, got 4294967296"),
    ("seed", "x", "expected a whole number, got 'x'"),
    ("runs", "1", "runs must be a whole number >= 2, got 1"),
    ("runs", "0", "runs must be a whole number >= 2, got 0"),
    ("trace_every", "0", "trace_every must be a whole number >= 1, got 0"),
    ("parallel", "0", "parallel must be auto or a whole number >= 1, got 0"),
    ("parallel", "many", "expected a whole number, got 'many'"),
    ("device", "tpu", "device must be one of auto, cpu, cuda; got 'tpu'"),
    ("isolation", "thread", "isolation must be one of process, forkserver, inprocess; got 'thread'"),
    ("timeout", "0", "timeout must be a number of seconds > 0, or none for no limit; got 0.0"),
    ("timeout", "-3", "timeout must be a number of seconds > 0, or none for no limit; got -3.0"),
    ("timeout", "inf", "timeout must be a number of seconds > 0, or none for no limit; got inf"),
    ("timeout", "soon", "expected a number, got 'soon'"),
    ("deterministic", "maybe", "expected true or false, got 'maybe'"),
    ("seeding", "sometimes", "seeding must be one of harness, program or None; got 'sometimes'"),
    ("mode", "fuzzy", "mode must be one of bitwise, tolerance, ulp; got 'fuzzy'"),
    ("atol", "-1e-3", "atol must be a finite number >= 0, got -0.001"),
    ("rtol", "nan", "rtol must be a finite number >= 0, got nan"),
    ("max_ulp", "-2", "max_ulp must be a whole number >= 0, got -2"),
    ("cwd", "home", "cwd must be one of replica, rootdir; got 'home'"),
    ("tolerances", '{"val_loss": {"rtl": 1}}', "tolerances['val_loss']: unknown key(s) rtl; known: atol, rtol, allow_failing"),
    ("tolerances", '{"val_loss": {"rtol": -1}}', "tolerances['val_loss'].rtol must be a finite number >= 0, got -1"),
    ("tolerances", '[1]', "tolerances must be a dict of metric -> {atol, rtol, allow_failing}, got [1]"),
    ("wandb", "sometimes", "wandb must be one of offline, online, disabled; got 'sometimes'"),
    ("wandb_project", " ", "wandb_project must be a non-empty string, got ' '"),
]
AUDIT_BAD = [b for b in BAD_TEXT if BY_NAME[b[0]].audit]

# (option, bad Python value given to audit() or the marker, message)
BAD_VALUES = [
    ("seed", True, "seed must be a whole number from 0 to 4294967295, got True"),
    ("seed", 1.5, "seed must be a whole number from 0 to 4294967295, got 1.5"),
    ("runs", 1, "runs must be a whole number >= 2, got 1"),
    ("trace_every", 0, "trace_every must be a whole number >= 1, got 0"),
    ("timeout", 0, "timeout must be a number of seconds > 0, or none for no limit; got 0"),
    ("timeout", "30", "timeout must be a number of seconds > 0, or none for no limit; got '30'"),
    ("deterministic", "yes", "deterministic must be true or false, got 'yes'"),
    ("atol", float("nan"), "atol must be a finite number >= 0, got nan"),
    ("max_ulp", 1.0, "max_ulp must be a whole number >= 0, got 1.0"),
    ("args", "--epochs 2", "args must be a list of command-line words, not one string: got '--epochs 2' (write args=['--epochs', '2'])"),
    ("kwargs", {1: 2}, "kwargs must be a dict with string keys, got {1: 2}"),
    ("checkpoint", {"path": "best.pt"}, "checkpoint: missing evaluate, model_factory"),
    ("checkpoint", "best.pt", "checkpoint must be a CheckpointSpec or a dict, got str"),
]


# -- the table is the only definition ---------------------------------------------------------------
def test_every_surface_is_generated_from_the_one_table(pytestconfig):
    audit_fields = [f.name for f in dataclasses.fields(AuditConfig)]
    session_fields = [f.name for f in dataclasses.fields(SessionConfig)]
    assert audit_fields + session_fields == [o.name for o in OPTIONS]
    for o in AUDIT_OPTIONS:
        assert f"{o.name}={o.default!r}" in marker_signature()
    pytest_flags = {a for opt in pytestconfig._parser._anonymous.options + [
        o for g in pytestconfig._parser._groups for o in g.options] for a in opt.names() if a.startswith("--mlrepro-")}
    assert pytest_flags == {"--mlrepro-" + o.flag for o in TEXT_OPTIONS}
    audit_parser = next(a for a in cli._parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("audit"))
    cli_flags = {s for action in audit_parser._actions for s in action.option_strings}
    assert {"--" + o.flag for o in CLI_OPTIONS} <= cli_flags
    assert not {"--" + o.flag for o in TEXT_OPTIONS if not o.cli} & cli_flags


def test_the_readme_holds_the_generated_option_table():
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    try:
        from options_table import table
    finally:
        sys.path.pop(0)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert table() in readme, "README's option table is stale: run python scripts/options_table.py --write"


def test_the_config_is_frozen_and_validation_normalises():
    c = AuditConfig(timeout=5, atol=1, args=["--epochs", "2"], kwargs=None).validate()
    assert (c.timeout, c.atol, c.args, c.kwargs) == (5.0, 1.0, ("--epochs", "2"), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3  # type: ignore[misc]


def test_a_checkpoint_with_cwd_rootdir_is_refused_as_a_combination():
    with pytest.raises(ConfigError, match="checkpoint checks need cwd='replica'"):
        AuditConfig().merged({"cwd": "rootdir", "checkpoint": {"path": "b.pt", "evaluate": "m:e", "model_factory": "m:f"}})


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_tolerances_accept_exactly_the_finite_non_negative_numbers(value):
    ok = math.isfinite(value) and value >= 0
    for name in ("atol", "rtol"):
        if ok:
            assert getattr(AuditConfig().merged({name: value}), name) == value
        else:
            with pytest.raises(ConfigError, match=f"{name} must be a finite number >= 0"):
                AuditConfig().merged({name: value})


@settings(max_examples=200, deadline=None)
@given(st.integers(-5, 10))
def test_text_and_python_values_are_checked_by_the_same_rule(n):
    """`--mlrepro-runs N`, `runs=N` and `--runs N` agree for every N."""
    option = BY_NAME["runs"]
    try:
        from_python, python_error = option.check(n), None
    except ConfigError as exc:
        from_python, python_error = None, str(exc)
    try:
        from_text, text_error = option.from_text(str(n)), None
    except ConfigError as exc:
        from_text, text_error = None, str(exc)
    assert (from_python, python_error) == (from_text, text_error)
    assert (python_error is None) == (n >= 2)


# -- the API ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, message", AUDIT_BAD, ids=[f"{b[0]}={b[1]}" for b in AUDIT_BAD])
def test_the_api_refuses_bad_text_values_before_running_anything(name, text, message, tmp_path):
    """Reading a value from text is the surfaces' job; the API checks the value the text reads as."""
    option = BY_NAME[name]
    try:
        value = option.parse(text)
    except ConfigError as exc:
        assert str(exc) == message
        return
    with pytest.raises(ConfigError) as info:
        from pytest_mlrepro import audit

        audit(TINY + ":train", workdir=tmp_path / "w", **{name: value})
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, MlreproError)
    assert not (tmp_path / "w").exists()  # nothing ran


@pytest.mark.parametrize("name, value, message", BAD_VALUES, ids=[f"{b[0]}={b[1]!r}" for b in BAD_VALUES])
def test_the_api_refuses_bad_python_values(name, value, message, tmp_path):
    from pytest_mlrepro import audit

    with pytest.raises(ConfigError) as info:
        audit(TINY + ":train", workdir=tmp_path / "w", **{name: value})
    assert str(info.value) == message
    assert not (tmp_path / "w").exists()


def test_the_api_names_an_unknown_option_and_the_one_meant(tmp_path):
    from pytest_mlrepro import audit

    with pytest.raises(ConfigError, match=r"unknown audit option 'sed' \(did you mean 'seed'\?\)"):
        audit(TINY + ":train", sed=1)
    with pytest.raises(ConfigError, match="config must be an AuditConfig, got dict"):
        audit(TINY + ":train", {"seed": 1})


def test_a_config_object_and_overrides_combine(tmp_path):
    from pytest_mlrepro import audit

    base = AuditConfig(seed=3, isolation="inprocess")
    result = audit(TINY + ":train", base, runs=3, workdir=tmp_path)
    assert (result.seed, result.runs, result.isolation, result.deterministic) == (3, 3, "inprocess", True)


# -- pytest: command line, environment, ini ---------------------------------------------------------
@pytest.mark.parametrize("name, text, message", BAD_TEXT, ids=[f"{b[0]}={b[1]}" for b in BAD_TEXT])
def test_pytest_refuses_bad_values_at_the_start_as_usage_errors(pytester, name, text, message):
    pytester.makepyfile(test_x="def test_x():\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest(f"--mlrepro-{BY_NAME[name].flag}={text}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"mlrepro option {name} from command line: {message}" in result.stderr.str()


def test_switches_take_no_value_on_the_command_line_and_a_boolean_elsewhere(pytester, monkeypatch):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("MLREPRO_UPDATE", "maybe")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*mlrepro option update from MLREPRO_UPDATE: expected true or false, got 'maybe'*"])
    monkeypatch.setenv("MLREPRO_UPDATE", "0")
    pytester.runpytest("--mlrepro-prune").assert_outcomes(passed=1)


@pytest.mark.parametrize("where", ["env", "ini"])
def test_environment_and_ini_values_are_checked_the_same_way(pytester, monkeypatch, where):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    if where == "env":
        monkeypatch.setenv("MLREPRO_RUNS", "1")
        source = "MLREPRO_RUNS"
    else:
        pytester.makeini("[pytest]\nmlrepro_runs = 1\n")
        source = "ini mlrepro_runs"
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*mlrepro option runs from {source}: runs must be a whole number >= 2, got 1*"])


@pytest.mark.parametrize("name, value, message", BAD_VALUES[:6], ids=[f"{b[0]}={b[1]!r}" for b in BAD_VALUES[:6]])
def test_a_bad_marker_value_fails_that_test_cleanly_and_is_in_the_summary(pytester, name, value, message):
    pytester.makepyfile(test_m=f"""
        import pytest

        @pytest.mark.mlrepro({TINY + ':train'!r}, {name}={value!r})
        def test_bad():
            pass

        def test_other():
            pass
    """)
    result = pytester.runpytest("--mlrepro", "--mlrepro-wandb=disabled", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, passed=1)
    out = result.stdout.str()
    assert f"mlrepro marker: {message}" in out
    assert "Traceback" not in out and "During handling" not in out
    result.stdout.fnmatch_lines(["*= mlrepro =*", "*tiny.py:train*error*ConfigError*"])


def test_an_unwritable_report_path_stops_the_session_before_any_test(pytester, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    pytester.makepyfile(test_x="def test_x():\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest("--mlrepro", f"--mlrepro-report={blocker / 'r.json'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*cannot write the report {blocker / 'r.json'}*"])
    folder = tmp_path / "folder"
    folder.mkdir()
    result = pytester.runpytest("--mlrepro", f"--mlrepro-report={folder}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*report path {folder} is a folder*"])


def test_a_report_that_cannot_be_written_at_the_end_fails_the_run(pytester, tmp_path):
    """The folder checked at the start vanishes during the run (a file takes its place)."""
    folder = tmp_path / "out"
    pytester.makepyfile(test_x=f"""
        import shutil
        from pathlib import Path

        def test_audit(mlrepro):
            mlrepro.audit({TINY + ':train'!r}, isolation="inprocess").assert_deterministic()
            shutil.rmtree({str(folder)!r})
            Path({str(folder)!r}).write_text("now a file")
    """)
    result = pytester.runpytest("--mlrepro", "--mlrepro-wandb=disabled", f"--mlrepro-report={folder / 'r.json'}",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "JSON report not written" in result.stdout.str() + result.stderr.str()


# -- the CLI ----------------------------------------------------------------------------------------
CLI_BAD = [b for b in BAD_TEXT if BY_NAME[b[0]].cli]


@pytest.mark.parametrize("name, text, message", CLI_BAD, ids=[f"{b[0]}={b[1]}" for b in CLI_BAD])
def test_the_cli_refuses_bad_values_with_exit_2_and_the_same_message(name, text, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["audit", TINY + ":train", f"--{BY_NAME[name].flag}={text}", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_usage_errors_exit_2_before_any_audit(tmp_path, capsys):
    assert cli.main(["audit", "--expect"]) == 2
    assert "--expect needs --catalog" in capsys.readouterr().err
    assert cli.main(["audit"]) == 2
    assert "nothing to audit" in capsys.readouterr().err
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert cli.main(["audit", TINY + ":train", "--report", str(blocker / "r.json"), "--out", str(tmp_path / "o")]) == 2
    assert f"cannot write the report {blocker / 'r.json'}" in capsys.readouterr().err
    code = subprocess.run([sys.executable, "-m", "pytest_mlrepro.cli", "audit", TINY + ":train", "--runs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 2 and "runs must be a whole number >= 2, got 1" in code.stderr


def test_cli_options_from_the_table_reach_the_audit(tmp_path, capsys):
    out = tmp_path / "o"
    code = cli.main(["audit", TINY + ":train", "--seed", "4", "--runs", "3", "--isolation", "inprocess",
                     "--seeding", "harness", "--mode", "ulp", "--max-ulp", "2", "--wandb", "disabled", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    import json

    audit = json.loads((out / "report.json").read_text())["audits"][0]
    assert (audit["seed"], audit["runs"], audit["isolation"], audit["seeding"]) == (4, 3, "inprocess", "harness")
    assert audit["comparison"] == {"mode": "ulp", "atol": 0.0, "rtol": 0.0, "max_ulp": 2}
    shutil.rmtree(out)


def test_parallel_slots_share_the_cores_and_never_oversubscribe(monkeypatch):
    from pytest_mlrepro.auditing import replica_slots

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    auto = AuditConfig()
    assert replica_slots(auto, 2) == 2 and replica_slots(auto, 8) == 4  # 8 cores / 2 threads
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    assert replica_slots(auto, 2) == 1  # 8 cores / 4 workers / 2 threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert replica_slots(auto, 3) == 2
    assert replica_slots(AuditConfig(parallel=3), 2) == 2  # never more than the runs
    assert replica_slots(AuditConfig(isolation="inprocess", parallel=4), 4) == 1
    # on GPUs the device inventory decides: tests/test_devices.py
