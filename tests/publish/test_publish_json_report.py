"""The JSON report: versioned envelope, validation, atomic writes, and the documented schema."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pytest_mlrepro.publish import PublishError, build_report, read_report, validate_report, write_report
from pytest_mlrepro.result import AuditResult

DOC = Path(__file__).resolve().parents[2] / "docs" / "report-schema.md"
SESSION = {"id": "s-1", "command": "pytest --mlrepro", "rootdir": "/repo", "seed": 3, "options": {"runs": 2},
           "git": {"sha": "a" * 40, "dirty": False}}


@pytest.fixture
def results(sample_results):
    return [sample_results[k] for k in ("deterministic", "nondeterministic", "checkpoint", "error", "checks")]


def test_envelope_counts_and_audits(results):
    doc = build_report(results, SESSION)
    assert (doc["schema"], doc["version"]) == ("pytest-mlrepro/report", 1)
    assert doc["session"]["counts"] == {"deterministic": 1, "pass": 1, "nondeterministic": 1, "failed-checks": 1,
                                        "error": 1, "total": 5}
    assert doc["session"]["ok"] is False
    assert doc["session"]["id"] == "s-1" and doc["session"]["options"] == {"runs": 2}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", doc["session"]["created_at"])
    assert doc["audits"] == [r.to_dict() for r in results]
    assert [a["verdict"] for a in doc["audits"]] == ["deterministic", "nondeterministic", "failed-checks", "error", "pass"]
    assert [a["kind"] for a in doc["audits"]] == ["audit"] * 4 + ["checks"]
    assert validate_report(doc) == []
    assert build_report([results[0], results[4]], SESSION)["session"]["ok"] is True  # deterministic + passing checks


def test_computed_session_keys_win_over_caller_keys(results):
    doc = build_report(results[:1], {"ok": "yes", "counts": None})
    assert doc["session"]["ok"] is True and doc["session"]["counts"]["total"] == 1


def test_written_report_reads_back_into_equal_results(tmp_path, results):
    path = write_report(tmp_path / "report.json", build_report(results, SESSION))
    doc = read_report(path)
    back = [AuditResult.from_dict(a) for a in doc["audits"]]
    assert [b.to_dict() for b in back] == [r.to_dict() for r in results]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_non_finite_floats_are_strings_and_the_file_is_strict_json(tmp_path, sample_results):
    r = AuditResult.from_dict(sample_results["nondeterministic"].to_dict())
    r.tensors[0].max_abs_diff = float("nan")
    r.step_divergence[5]["max_abs_diff_sampled"] = float("inf")
    path = write_report(tmp_path / "r.json", build_report([r], SESSION))
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["audits"][0]["tensors"][0]["max_abs_diff"] == "nan"
    assert doc["audits"][0]["step_divergence"][5]["max_abs_diff_sampled"] == "inf"
    assert validate_report(doc) == []


def test_missing_folder_is_a_clear_error_and_nothing_is_written(tmp_path, results):
    target = tmp_path / "no" / "such" / "report.json"
    with pytest.raises(PublishError, match=r"its folder .*no/such does not exist"):
        write_report(target, build_report(results, SESSION))
    assert list(tmp_path.iterdir()) == []


def test_a_folder_as_report_path_is_refused(tmp_path, results):
    with pytest.raises(PublishError, match="is a folder"):
        write_report(tmp_path, build_report(results, SESSION))


def test_a_failed_write_keeps_the_previous_report(tmp_path, results):
    path = write_report(tmp_path / "report.json", build_report(results, SESSION))
    before = path.read_bytes()
    with pytest.raises(PublishError, match="not valid JSON"):
        write_report(path, {"schema": "pytest-mlrepro/report", "bad": {1, 2}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_build_refuses_what_is_not_an_audit_result(results):
    with pytest.raises(PublishError, match="report entry 1 is a dict"):
        build_report([results[0], results[1].to_dict()], SESSION)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: d.update(version=2), "version: expected 1, got 2"),
        (lambda d: d["session"].pop("ok"), "session.ok: missing"),
        (lambda d: d["session"]["counts"].update(error="1"), "session.counts.error: expected int, got str"),
        (lambda d: d["audits"][1]["first_divergence"].update(step="3"), "audits[1].first_divergence.step: expected int"),
        (lambda d: d["audits"][2]["findings"][0].update(verdict="ok"), "audits[2].findings[0].verdict: 'ok' is not one of"),
        (lambda d: d["audits"][0].update(verdict="flaky"), "audits[0].verdict: 'flaky' is not one of"),
        (lambda d: d["audits"][3]["error"].pop("type"), "audits[3].error.type: missing"),
        (lambda d: d["audits"][1]["tensors"][0].update(max_ulp=1.5), "audits[1].tensors[0].max_ulp: expected int"),
        (lambda d: d["outputs"]["wandb_runs"].append({"target": "t"}), "outputs.wandb_runs[0].run_id: missing"),
        (lambda d: d["audits"][0].update(deterministic=1), "audits[0].deterministic: expected bool, got int"),
        (lambda d: d["audits"][4].update(kind="check"), "audits[4].kind: 'check' is not one of"),
        (lambda d: d["audits"][0].update(final_fingerprints=["ab"]), "audits[0].final_fingerprints: expected dict, got list"),
    ],
)
def test_validation_names_the_field(results, edit, problem):
    doc = build_report(results, SESSION)
    edit(doc)
    problems = validate_report(doc)
    assert any(problem in p for p in problems), problems


def test_read_report_names_the_file(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"schema": "pytest-mlrepro/report", "version": 0}))
    with pytest.raises(PublishError, match=rf"report {re.escape(str(p))} does not follow .*version: expected 1"):
        read_report(p)


# --- the documentation and the documents agree -------------------------------------------------


def documented_fields() -> dict:
    """``path -> type`` from docs/report-schema.md's tables."""
    fields = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^|]+) \|", line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def actual_paths(value, prefix: str, open_paths: set, out: set) -> set:
    """Dotted paths of every key in ``value`` (list elements as ``[]``), not descending into open objects."""
    if not prefix.endswith("[]"):
        out.add(prefix)
    if prefix in open_paths:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            actual_paths(v, f"{prefix}.{k}" if prefix else k, open_paths, out)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)):
                actual_paths(v, f"{prefix}[]", open_paths, out)
    return out


def test_every_field_is_documented_and_every_documented_field_exists(published):
    doc_fields = documented_fields()
    assert len(doc_fields) > 80
    open_paths = {p for p, t in doc_fields.items() if "open object" in t}
    report = published.report
    assert validate_report(report) == []
    paths = actual_paths(report, "", open_paths, set()) - {""}
    assert paths - set(doc_fields) == set(), "fields missing from docs/report-schema.md"
    assert set(doc_fields) - paths == set(), "documented fields the published report lacks"


def test_best_checkpoint_metrics_come_from_the_history_not_the_checkpoints_claim():
    """A broken checkpoint records the last epoch's metrics; the published best metrics must be the
    logged metrics of the best epoch, or the publisher repeats the bug it reports."""
    from pytest_mlrepro.publish.findings import best_checkpoint
    from pytest_mlrepro.result import AuditResult, Finding

    history = [{"epoch": e, "val_loss": v, "val_mae": v / 2} for e, v in enumerate([0.9, 0.5, 0.2, 0.4, 0.8])]
    findings = [
        Finding("best_checkpoint.history", "fail", "co-metrics from epoch 4",
                {"monitor": "val_loss", "mode": "min", "best_epoch": 2, "argbest_epoch": 2, "history": history}),
        Finding("best_checkpoint.reload", "fail", "recorded 0.8, re-evaluated 0.2",
                {"checkpoint_path": "best.pt", "monitor": "val_loss", "mode": "min", "best_epoch": 2,
                 "recorded_metrics": {"val_loss": 0.8, "val_mae": 0.4}}),
    ]
    result = AuditResult(target="t.py:train", seed=0, runs=2, device="cpu", isolation="process", seeding="harness",
                         comparison={"mode": "bitwise"}, deterministic=True, findings=findings)
    best = best_checkpoint(result)
    assert best.best_epoch == 2 and best.recorded_metrics == {"val_loss": 0.2, "val_mae": 0.1}
    findings.pop(0)  # no history logged: the checkpoint's own record is all there is
    assert best_checkpoint(result).recorded_metrics == {"val_loss": 0.8, "val_mae": 0.4}


def test_a_checkpoint_that_is_not_the_best_is_not_published_as_best():
    """The history check failed: the file holds epoch 4, the logged best is epoch 2. The summary's
    best_<metric> keys describe epoch 2; the file keeps its own epoch's metrics and is not 'best'."""
    from pytest_mlrepro.publish.findings import best_checkpoint
    from pytest_mlrepro.publish.wandb_publish import artifact_metadata, run_summary
    from pytest_mlrepro.result import AuditResult, Finding

    history = [{"epoch": e, "val_loss": v} for e, v in enumerate([0.9, 0.5, 0.4, 0.45, 0.47])]
    findings = [
        Finding("best_checkpoint.history", "fail", "", {"monitor": "val_loss", "mode": "min", "best_epoch": 4,
                                                      "argbest_epoch": 2, "history": history}),
        Finding("best_checkpoint.reload", "pass", "", {"checkpoint_path": "best.pt", "monitor": "val_loss", "mode": "min",
                                                     "best_epoch": 4, "recorded_metrics": {"val_loss": 0.47}}),
    ]
    result = AuditResult(target="t.py:train", seed=0, runs=2, device="cpu", isolation="process", seeding="harness",
                         comparison={"mode": "bitwise"}, deterministic=True, findings=findings)
    best = best_checkpoint(result)
    assert (best.best_epoch, best.checkpoint_epoch, best.is_best) == (2, 4, False)
    summary = run_summary(result)
    assert summary["best_epoch"] == 2 and summary["best_val_loss"] == 0.4 and summary["checkpoint_epoch"] == 4
    assert artifact_metadata(result) == {"val_loss": 0.47}


# --- check_report_path: the session-start check -----------------------------------------------


def test_check_report_path_creates_missing_folders_and_leaves_nothing_else(tmp_path):
    from pytest_mlrepro.publish import check_report_path

    target = tmp_path / "out" / "nested" / "report.json"
    assert check_report_path(target) is None
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []  # the probe file is gone, no report yet
    check_report_path(target)  # an existing folder is fine too
    write_report(target, build_report([], SESSION))
    check_report_path(target)  # so is an existing report (it is replaced at the end)


def test_check_report_path_refuses_a_folder(tmp_path):
    from pytest_mlrepro.errors import MlreproError
    from pytest_mlrepro.publish import check_report_path

    with pytest.raises(PublishError, match=rf"report path {re.escape(str(tmp_path))} is a folder") as info:
        check_report_path(tmp_path)
    assert isinstance(info.value, MlreproError)


def test_check_report_path_refuses_a_folder_it_cannot_create(tmp_path):
    from pytest_mlrepro.publish import check_report_path

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "sub" / "report.json"
    with pytest.raises(PublishError, match=rf"cannot write the report {re.escape(str(target))}: cannot create its folder "
                                           rf"{re.escape(str(target.parent))} \(.+\)"):
        check_report_path(target)
    assert blocker.read_text() == "x"


def test_check_report_path_proves_the_folder_writable_by_writing(tmp_path, monkeypatch):
    """os.access says yes to root and on read-only mounts; only creating a file proves it."""
    import errno
    import tempfile

    from pytest_mlrepro.publish import check_report_path

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    target = tmp_path / "report.json"
    with pytest.raises(PublishError, match=rf"cannot write the report {re.escape(str(target))}: its folder "
                                           rf"{re.escape(str(tmp_path))} is not writable \(Permission denied\)"):
        check_report_path(target)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_report_path_refuses_a_read_only_folder(tmp_path):
    from pytest_mlrepro.publish import check_report_path

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PublishError, match="is not writable"):
            check_report_path(ro / "report.json")
    finally:
        ro.chmod(0o700)


def test_check_report_path_imports_neither_torch_nor_wandb(tmp_path):
    """The plugin calls it in pytest_configure, where heavy imports would slow every pytest run."""
    import subprocess
    import sys

    code = ("import sys; from pytest_mlrepro.publish.json_report import check_report_path; "
            f"check_report_path({str(tmp_path / 'd' / 'r.json')!r}); "
            "print(sorted(m for m in ('torch', 'wandb', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stderr
    assert (tmp_path / "d").is_dir()
