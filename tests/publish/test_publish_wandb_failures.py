"""W&B going wrong never fails, hangs or half-writes a session: it becomes a warning."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_mlrepro.publish import PublishConfig, PublishError, publish_session
from pytest_mlrepro.publish.wandb_publish import publish_to_wandb
from pytest_mlrepro.result import AuditResult


@pytest.fixture
def results(sample_results):
    return [sample_results["deterministic"], sample_results["nondeterministic"]]


def _publish(tmp_path, results, **kw):
    kw.setdefault("wandb_dir", tmp_path / "wb")
    config = PublishConfig(report_path=tmp_path / "report.json", **kw)
    verdicts = [r.verdict for r in results]
    outcome = publish_session(results, config, session_info={"id": "s"})
    assert [r.verdict for r in results] == verdicts
    assert outcome.errors == [] and outcome.ok  # W&B trouble is a warning, never a reason to fail the run
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outputs"]["warnings"] == outcome.warnings  # the report says what went wrong too
    assert [a["verdict"] for a in report["audits"]] == verdicts
    return outcome


def test_disabled_by_the_user_is_silent_and_creates_nothing(tmp_path, results, wandb_home):
    outcome = _publish(tmp_path, results, wandb_mode="disabled")
    assert outcome.warnings == [] and outcome.wandb_runs == [] and outcome.wandb_mode == "disabled"
    assert not (tmp_path / "wb").exists()


def test_wandb_mode_disabled_in_the_environment_wins_and_says_so(tmp_path, results, wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    outcome = _publish(tmp_path, results)
    assert outcome.warnings == ["W&B publishing skipped: WANDB_MODE=disabled is set in the environment"]
    assert not (tmp_path / "wb").exists()


@pytest.mark.parametrize("project, why", [("team/proj", "contains '/'"), ("a:b#c", "contains '#:'"), ("x" * 129, "longer than 128")])
def test_invalid_project_name(tmp_path, results, wandb_home, project, why):
    outcome = _publish(tmp_path, results[:1], project=project)
    (warning,) = outcome.warnings
    assert warning.startswith("W&B publishing skipped: the W&B project name") and why in warning
    assert not (tmp_path / "wb").exists()


def test_unwritable_wandb_dir(tmp_path, results, wandb_home):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outcome = _publish(tmp_path, results, wandb_dir=blocker / "wb")
    (warning,) = outcome.warnings
    assert f"the W&B dir {blocker / 'wb'} is not writable" in warning and "(--mlrepro-wandb-dir)" in warning
    assert outcome.wandb_runs == [] and blocker.read_text() == "not a folder"


def test_wandb_not_installed(tmp_path, results, wandb_home, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    outcome = _publish(tmp_path, results)
    assert outcome.warnings == ["W&B publishing skipped: wandb is not installed (pip install wandb)"]
    assert list((tmp_path / "wb" / "wandb").glob("*run-*")) == []


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(PublishError, match=r"W&B mode 'cloud' is not one of offline, online, disabled"):
        PublishConfig(wandb_mode="cloud")


def _closed_port() -> int:
    """A localhost port nothing listens on: bound, then closed, so a connection is refused at once."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric_rows(run) -> list:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.history
            if any(k.startswith("replica") for k in row)]


def _assert_kept_offline(tmp_path, results, outcome) -> str:
    """Every result has an intact offline run on disk; returns the one fallback warning."""
    from pytest_mlrepro.publish.wandb_publish import history_rows, run_summary
    from pytest_mlrepro.wandb_offline import read_run

    folder = tmp_path / "wb" / "wandb"
    assert [r.target for r in outcome.wandb_runs] == [r.target for r in results]
    assert outcome.wandb_mode == "offline" and outcome.errors == []
    for info, result in zip(outcome.wandb_runs, results):
        assert info.mode == "offline" and info.url is None and info.run_dir.parent == folder
        assert info.run_dir.name.startswith("offline-run-") and info.run_dir.name.endswith(info.run_id)
        run = read_run(info.run_dir)
        assert (run.run_id, run.display_name, run.group, run.exit_code) == (info.run_id, result.target, "s", 0)
        assert run.config["target"] == result.target and run.config["seed"] == result.seed
        assert _metric_rows(run) == history_rows(result)
        summary = run_summary(result)
        assert {k: run.summary[k] for k in summary} == summary
    assert [p.name for p in folder.iterdir() if p.name.startswith("run-")] == []  # no half online run left
    assert outcome.report_url is None and outcome.report_spec_path.parent == folder  # spec kept for `mlrepro publish`
    (warning,) = [w for w in outcome.warnings if "offline" in w]
    assert f"{len(results)} run(s) were logged offline instead in {folder}" in warning
    assert f"`wandb sync {folder}/offline-run-*`" in warning and "verdicts are unaffected" in warning
    return warning


def test_online_without_network_falls_back_to_offline_and_keeps_the_runs(tmp_path, sample_results, wandb_home,
                                                                         monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")  # never any address but localhost
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    results = [sample_results[k] for k in ("deterministic", "nondeterministic", "checkpoint")]
    t0 = time.monotonic()
    outcome = _publish(tmp_path, results, wandb_mode="online", init_timeout=3)
    elapsed = time.monotonic() - t0
    assert elapsed < 25, f"online publishing without network took {elapsed:.1f} s"  # one init_timeout, not one per run
    warning = _assert_kept_offline(tmp_path, results, outcome)
    assert warning.startswith(f"W&B online publishing failed: the W&B server http://127.0.0.1:{port} was unreachable "
                              "within 3 s (CommError: ")
    assert f'Post "http://127.0.0.1:{port}/graphql"' in warning  # wandb itself tried that server, no other
    assert outcome.warnings == [warning]
    ckpt = next(r for r in outcome.wandb_runs if r.target == results[2].target)
    from pytest_mlrepro.wandb_offline import read_run

    (model,) = [a for a in read_run(ckpt.run_dir).artifacts if a["type"] == "model"]
    assert ckpt.artifact == f"{model['name']}:best"  # the checkpoint artifact survives the fallback too
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["run_id"], r["mode"]) for r in report["outputs"]["wandb_runs"]] == [(r.run_id, "offline") for r in outcome.wandb_runs]
    print(f"online with no network, fell back to offline: {elapsed:.1f} s")


def test_online_without_an_api_key_falls_back_to_offline(tmp_path, results, wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key either
    outcome = _publish(tmp_path, results, wandb_mode="online", init_timeout=3)
    warning = _assert_kept_offline(tmp_path, results, outcome)
    assert warning.startswith("W&B online publishing failed: the online W&B run could not start (UsageError: ")
    assert outcome.warnings == [warning]


def test_online_goes_to_the_server_the_environment_names_now(tmp_path, results, wandb_home, monkeypatch):
    """wandb freezes WANDB_* at its first use in a process and ignores later changes. A session started
    earlier (here against another closed localhost port) must not decide which server our runs talk to,
    and publishing must not leave such a frozen session behind for the next publish either."""
    import wandb
    from wandb.sdk import wandb_setup

    old = _closed_port()
    new = next(p for p in iter(_closed_port, None) if p != old)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{old}")
    wandb.setup()  # the process-wide session, frozen with the old URL
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{new}")
        outcome = _publish(tmp_path, results[:1], wandb_mode="online", init_timeout=3)
        assert wandb_setup._singleton is None  # no frozen session left behind (no user run was open)
    finally:
        wandb.teardown()
    (warning,) = outcome.warnings
    assert f'Post "http://127.0.0.1:{new}/graphql"' in warning and f"127.0.0.1:{old}" not in warning, warning
    assert [r.mode for r in outcome.wandb_runs] == ["offline"]


def test_a_failure_inside_a_run_removes_the_run(tmp_path, sample_results, wandb_home):
    r = sample_results["deterministic"]
    config = PublishConfig(wandb_dir=tmp_path / "wb")
    outcome = publish_to_wandb([r], config, session_id="s", plots={r.target: [tmp_path / "gone.png"]})
    (warning,) = outcome.warnings
    assert warning.startswith(f"W&B run for {r.target} not published: ") and "verdicts are unaffected" in warning
    assert outcome.runs == []
    wandb_dir = tmp_path / "wb" / "wandb"
    assert [p.name for p in wandb_dir.iterdir() if "run-" in p.name] == []
    dangling = [p.name for p in wandb_dir.iterdir() if p.is_symlink() and not p.exists()]
    assert dangling == []  # latest-run, debug.log, debug-internal.log pointed into the removed run


def test_malformed_finding_details_fail_before_any_run_starts(tmp_path, sample_results, wandb_home):
    r = AuditResult.from_dict(sample_results["checkpoint"].to_dict())
    r.findings[0].details["best_epoch"] = "two"
    outcome = publish_to_wandb([r], PublishConfig(wandb_dir=tmp_path / "wb"), session_id="s")
    (warning,) = outcome.warnings
    assert "details['best_epoch'] must be an integer epoch, got 'two'" in warning
    assert [p for p in Path(tmp_path / "wb" / "wandb").iterdir() if "run-" in p.name] == []


class _FakeRun:
    def __init__(self, mode, fail_log):
        self.mode, self.fail_log, self.logged, self.summary = mode, fail_log, [], {}
        self.id, self.dir, self.url = f"{mode}-{id(self):x}"[:16], f"/nowhere/{mode}-run/files", None

    def define_metric(self, *a, **k):
        pass

    def log(self, row):
        if self.fail_log:
            raise TimeoutError("timed out while uploading history")
        self.logged.append(row)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


class _FakeWandb:
    """Just enough of wandb: online runs start, then lose the network on their first log."""

    def __init__(self):
        self.inits = []

    def Settings(self, **kw):  # noqa: N802 - wandb's spelling
        return kw

    def init(self, *, mode, **kw):
        self.inits.append(mode)
        return _FakeRun(mode, fail_log=mode == "online")

    def Table(self, **kw):  # noqa: N802
        return kw


def test_a_network_lost_mid_run_sends_that_run_and_the_rest_offline(tmp_path, results):
    from pytest_mlrepro.publish.wandb_publish import WandbOutcome, _publish_all

    fake, outcome = _FakeWandb(), WandbOutcome(mode="online")
    _publish_all(fake, results, PublishConfig(wandb_dir=tmp_path / "wb", wandb_mode="online", init_timeout=3), "online",
                 outcome, session_id="s", session_info={}, git={}, plots=None)
    assert fake.inits == ["online", "offline", "offline"]  # one online attempt, no waiting on it for every run
    assert [r.mode for r in outcome.runs] == ["offline", "offline"] and outcome.mode == "offline"
    (warning,) = outcome.warnings
    assert "unreachable within 3 s (TimeoutError: timed out while uploading history)" in warning
    assert f"2 run(s) were logged offline instead in {tmp_path / 'wb' / 'wandb'}" in warning
