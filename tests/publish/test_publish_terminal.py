"""The terminal summary table and the JUnit properties."""
from __future__ import annotations

from pathlib import Path

from pytest_mlrepro.publish import junit_properties, summary_lines
from pytest_mlrepro.publish.session import PublishOutcome
from pytest_mlrepro.publish.wandb_publish import WandbRun


def _cells(line: str, header: str) -> list:
    """Split a table line at the header's column starts."""
    starts = [header.index(h) for h in ("target", "check", "verdict", "first divergence", "cause")]
    bounds = starts + [None]
    return [line[a:b].strip() for a, b in zip(bounds, bounds[1:])]


def test_one_row_per_audit_and_per_finding(sample_results):
    results = [sample_results[k] for k in ("deterministic", "nondeterministic", "checkpoint", "error", "checks")]
    lines = summary_lines(results)
    header = lines[0]
    assert header.split() == ["target", "check", "verdict", "first", "divergence", "cause"]
    assert set(lines[1]) <= {"-", " "}
    rows = [_cells(line, header) for line in lines[2:-1]]
    assert rows[0] == ["tests/test_train.py::test_mlp", "determinism", "deterministic", "", ""]
    assert rows[1][:3] == ["examples/unseeded.py:train", "determinism", "nondeterministic"]
    assert rows[1][3] == "step 3, net.0.weight (forward, net.1: Dropout)"
    assert rows[1][4].startswith("unseeded_rng: torch's global RNG")
    ckpt = [r for r in rows if r[0].startswith("tests/test_ckpt.py")]
    assert [r[1:3] for r in ckpt] == [
        ["determinism", "failed-checks"], ["best_checkpoint.reload", "pass"], ["best_checkpoint.history", "pass"],
        ["early_stopping.conformance", "fail"], ["comparator.direction", "pass"],
    ]
    assert ckpt[3][4].startswith("EarlyStopping (monitor 'val_loss') disagrees")
    assert ckpt[0][0].endswith("…") and len(ckpt[0][0]) == 48  # long targets are cut, visibly
    err = next(r for r in rows if r[0] == "pkg.train:broken")
    assert err[1:] == ["determinism", "error", "", "ZeroDivisionError: division by zero"]
    checks = [r for r in rows if r[0] == "reload:best-epoch=2.pt"]
    assert [r[1:3] for r in checks] == [["best_checkpoint.reload", "pass"]]  # no fake "determinism" row
    assert lines[-1] == "5 audit(s): 1 deterministic, 1 error, 1 failed-checks, 1 nondeterministic, 1 pass"


def test_outcome_lines_say_where_results_went_and_warn(sample_results, tmp_path):
    run_dir = tmp_path / "wandb" / "offline-run-20260101_000000-abc123"
    outcome = PublishOutcome(
        session_id="s", report_path=tmp_path / "r.json", plots_dir=tmp_path / "r-plots",
        plots={"t": [Path("a.png"), Path("b.png")]},
        wandb_runs=[WandbRun("t", "abc123", "t", "offline", run_dir)],
        report_spec_path=tmp_path / "wandb" / "mlrepro-report-s.json",
        warnings=["W&B run for t not published: boom"],
    )
    lines = summary_lines([sample_results["deterministic"]], outcome)
    tail = lines[lines.index("1 audit(s): 1 deterministic") + 1:]
    assert tail == [
        f"JSON report: {tmp_path / 'r.json'}",
        f"plots: 2 PNG(s) in {tmp_path / 'r-plots'}",
        f"W&B run (offline) for t: {run_dir}",
        f"upload the offline W&B runs with: wandb sync {tmp_path / 'wandb'}/offline-run-*",
        f"W&B report spec saved: {outcome.report_spec_path} (after `wandb sync`, create the report with: "
        f"mlrepro publish {outcome.report_spec_path})",
        "WARNING: W&B run for t not published: boom",
    ]


def test_a_stand_in_outcome_with_only_warnings_is_printed():
    class Failed:
        warnings = ["publishing failed: OSError: disk full"]

    assert summary_lines([], Failed()) == ["WARNING: publishing failed: OSError: disk full"]


def test_junit_properties(sample_results):
    props = dict(junit_properties(sample_results["nondeterministic"]))
    assert props["mlrepro.verdict"] == "nondeterministic" and props["mlrepro.deterministic"] == "false"
    assert props["mlrepro.first_divergence.step"] == "3"
    assert props["mlrepro.first_divergence.tensor"] == "net.0.weight"
    assert props["mlrepro.cause"] == "unseeded_rng"
    assert (props["mlrepro.tensors_compared"], props["mlrepro.tensors_differing"]) == ("3", "2")
    ckpt = dict(junit_properties(sample_results["checkpoint"]))
    assert ckpt["mlrepro.check.early_stopping.conformance"] == "fail"
    assert ckpt["mlrepro.check.best_checkpoint.reload"] == "pass"
    checks = dict(junit_properties(sample_results["checks"]))
    assert checks["mlrepro.kind"] == "checks" and checks["mlrepro.verdict"] == "pass"
    assert "mlrepro.deterministic" not in checks
    err = dict(junit_properties(sample_results["error"]))
    assert err["mlrepro.error"] == "ZeroDivisionError: division by zero"
    for result in sample_results.values():
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in junit_properties(result))
