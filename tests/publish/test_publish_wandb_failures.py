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


def test_online_without_network_returns_quickly_with_a_warning(tmp_path, results, wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    t0 = time.monotonic()
    outcome = _publish(tmp_path, results, wandb_mode="online", init_timeout=3)
    elapsed = time.monotonic() - t0
    assert elapsed < 25, f"online publishing without network took {elapsed:.1f} s"
    first, second = outcome.warnings
    assert first.startswith("W&B run for tests/test_train.py::test_mlp not published: the W&B server was unreachable within 3 s")
    assert "verdicts are unaffected" in first and "--mlrepro-wandb=offline" in first
    assert second == "W&B run for examples/unseeded.py:train not published: the W&B server was unreachable"
    assert outcome.wandb_runs == [] and outcome.report_url is None and outcome.report_spec_path is None
    assert [p for p in (tmp_path / "wb" / "wandb").iterdir() if "run-" in p.name] == []  # nothing half-written
    print(f"online with no network: {elapsed:.1f} s")


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
