"""publish_session without W&B: where plots and the report go, bad report paths, git state."""
from __future__ import annotations

import json
import subprocess

from pytest_mlrepro.publish import PublishConfig, publish_session, read_report
from pytest_mlrepro.publish.session import git_state


def test_report_and_plots_beside_it(tmp_path, sample_results):
    results = [sample_results["checkpoint"], sample_results["nondeterministic"]]
    config = PublishConfig(report_path=tmp_path / "out.json", wandb_mode="disabled")
    outcome = publish_session(results, config, session_info={"command": "pytest"})
    assert outcome.warnings == [] and outcome.report_path == tmp_path / "out.json"
    assert outcome.errors == [] and outcome.ok
    assert outcome.plots_dir == tmp_path / "out-plots"
    assert {t: [p.name.rsplit("-", 1)[-1] for p in ps] for t, ps in outcome.plots.items()} == {
        results[0].target: ["metrics.png"], results[1].target: ["metrics.png", "divergence.png"]}
    report = read_report(tmp_path / "out.json")
    assert report["outputs"]["plots"] == {t: [str(p) for p in ps] for t, ps in outcome.plots.items()}
    assert report["session"]["id"] == outcome.session_id and report["session"]["command"] == "pytest"
    assert report["outputs"]["wandb_runs"] == []


def test_explicit_plots_dir_without_report(tmp_path, sample_results):
    config = PublishConfig(plots_dir=tmp_path / "pngs", wandb_mode="disabled")
    outcome = publish_session([sample_results["nondeterministic"]], config)
    assert outcome.report_path is None and len(list((tmp_path / "pngs").glob("*.png"))) == 2


def test_report_in_a_missing_folder_is_an_error_and_writes_nothing(tmp_path, sample_results):
    """At the end of a session nothing is created (check_report_path does that at its start): a
    vanished folder is an error, which must fail the run, and not a mere warning."""
    results = [sample_results["nondeterministic"]]
    config = PublishConfig(report_path=tmp_path / "missing" / "r.json", wandb_mode="disabled")
    outcome = publish_session(results, config)
    assert outcome.report_path is None and results[0].verdict == "nondeterministic"
    (warning,) = outcome.warnings
    assert warning.startswith("plots not written to disk: cannot write plots into")
    (error,) = outcome.errors
    assert error.startswith("JSON report not written: cannot write the report")
    assert f"{tmp_path / 'missing'} does not exist" in error
    assert outcome.ok is False
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a plots folder was created


def test_git_state_in_and_out_of_a_repository(tmp_path):
    assert git_state(tmp_path) == {"sha": None, "dirty": None}
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"sha": head, "dirty": False}
    (tmp_path / "a.txt").write_text("changed")
    assert git_state(tmp_path) == {"sha": head, "dirty": True}


def test_git_missing_from_path_is_tolerated(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere on PATH
    assert git_state(tmp_path) == {"sha": None, "dirty": None}


def test_report_is_valid_json_when_session_info_has_odd_values(tmp_path, sample_results):
    config = PublishConfig(report_path=tmp_path / "r.json", wandb_mode="disabled")
    publish_session([sample_results["deterministic"]], config,
                    session_info={"rootdir": tmp_path, "options": {"tags": ("a", "b"), "ratio": float("nan")}})
    session = json.loads((tmp_path / "r.json").read_text())["session"]
    assert session["rootdir"] == str(tmp_path) and session["options"] == {"tags": ["a", "b"], "ratio": "nan"}


def test_a_report_write_failing_half_way_is_an_error_and_keeps_the_previous_report(tmp_path, sample_results, monkeypatch):
    """The disk fills up while the new report is written: the old report stays whole, no temp file is
    left, and the failure is in ``errors`` (the run must fail), not among the warnings."""
    import errno
    import os

    config = PublishConfig(report_path=tmp_path / "r.json", plots_dir=None, wandb_mode="disabled")
    first = publish_session([sample_results["deterministic"]], config)
    assert first.errors == [] and first.ok and first.report_path == tmp_path / "r.json"
    before = (tmp_path / "r.json").read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the temp file is written, then cannot be made durable
    outcome = publish_session([sample_results["nondeterministic"]], config)
    monkeypatch.undo()
    assert outcome.report_path is None and outcome.ok is False
    assert outcome.errors == [f"JSON report not written: cannot write the report {tmp_path / 'r.json'}: No space left on device"]
    assert not [w for w in outcome.warnings if "report" in w.lower()]
    assert (tmp_path / "r.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-plots", "r.json"]  # no half-written temp file


def test_publishing_errors_are_printed_last(sample_results, tmp_path):
    from pytest_mlrepro.publish import summary_lines
    from pytest_mlrepro.publish.session import PublishOutcome

    outcome = PublishOutcome(session_id="s", warnings=["W&B run for t not published: boom"],
                             errors=[f"JSON report not written: cannot write the report {tmp_path}: disk full"])
    assert summary_lines([], outcome) == ["WARNING: W&B run for t not published: boom",
                                          f"ERROR: JSON report not written: cannot write the report {tmp_path}: disk full"]


def test_every_error_class_of_publish_is_an_mlrepro_error():
    """Callers catch MlreproError for 'our deliberate error'; publish/ must not raise anything else on purpose."""
    import importlib
    import inspect
    import pkgutil

    import pytest_mlrepro.publish as pkg
    from pytest_mlrepro.errors import MlreproError

    classes = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, BaseException) and c.__module__ == module.__name__]
    assert {c.__name__ for c in classes} >= {"PublishError", "_OnlineStartFailed"}
    assert [c.__name__ for c in classes if not issubclass(c, MlreproError)] == []
