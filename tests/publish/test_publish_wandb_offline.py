"""A real offline W&B session, read back from disk: every run says exactly what its result said."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers.audit_samples import HISTORY
from pytest_mlrepro.publish.session import git_state
from pytest_mlrepro.publish.wandb_report_spec import build_report, load_spec

CKPT = "tests/test_ckpt.py::test_best_checkpoint[lightning]"
NONDET = "examples/unseeded.py:train"
DET = "tests/test_train.py::test_mlp"
ERR = "pkg.train:broken"
MISSING = "tests/test_ckpt.py::test_checkpoint_deleted"
CHECKS = "reload:best-epoch=2.pt"


def metric_rows(run) -> list:
    """History rows that carry replica metrics, without W&B's own underscore keys."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.history
            if any(k.startswith("replica") for k in row)]


def test_one_offline_run_per_target_in_the_session_group(published):
    o = published.outcome
    assert [r.target for r in o.wandb_runs] == [r.target for r in published.results]
    assert o.wandb_mode == "offline"
    for info in o.wandb_runs:
        run = published.runs[info.target]
        assert info.mode == "offline" and info.url is None
        assert info.run_dir.parent == published.root / "wb" / "wandb"
        assert info.run_dir.name.startswith("offline-run-") and info.run_dir.name.endswith(info.run_id)
        assert (run.run_id, run.project, run.group, run.job_type) == (info.run_id, "mlrepro-tests", "session-42", "audit")
        assert run.tags == ["ci", "unit"]
        assert run.display_name == info.target
        assert run.exit_code == 0


def test_publishing_is_quiet_and_leaves_verdicts_alone(published):
    assert [r.verdict for r in published.results] == published.verdicts_before
    assert published.outcome.errors == []
    assert "wandb" not in published.output.lower(), published.output
    print(f"publish_session over {len(published.results)} results took {published.elapsed:.2f} s")


def test_config_is_seed_options_environment_and_git(published):
    r = published.results[2]
    config = {k: v for k, v in published.runs[CKPT].config.items() if k != "_wandb"}
    assert config == {
        "target": CKPT, "kind": "audit", "test": CKPT, "seed": 0, "runs": 2, "device": "cpu", "isolation": "subprocess", "seeding": "harness",
        "compared": "weights", "comparison": {"mode": "bitwise"},
        "options": {"runs": 2, "device": "cpu", "wandb": "offline"},
        "environment": r.environment, "git": git_state(published.session_info["rootdir"]), "session": "session-42",
    }
    assert config["git"]["sha"] is None or len(config["git"]["sha"]) == 40


def test_history_holds_both_replicas_per_epoch(published):
    expected = [
        {"epoch": h["epoch"], "train_step": 10 * (h["epoch"] + 1),
         **{f"replica{i}/{k}": v for i in (0, 1) for k, v in h.items() if k != "epoch"}}
        for h in HISTORY
    ]
    assert metric_rows(published.runs[CKPT]) == expected


def test_history_of_diverging_replicas_by_step(published):
    res = published.results[1]
    expected = [
        {"train_step": s, "replica0/loss": res.replicas[0].metrics[s]["loss"], "replica1/loss": res.replicas[1].metrics[s]["loss"]}
        for s in range(6)
    ]
    rows = metric_rows(published.runs[NONDET])
    assert rows == expected
    assert rows[3]["replica0/loss"] != rows[3]["replica1/loss"]  # the divergence is visible in the history


def test_summary_has_best_epoch_metrics_and_verdicts(published):
    s = published.runs[CKPT].summary
    assert {k: s[k] for k in s if k.startswith("best_")} == {
        "best_epoch": 2, "best_monitor": "val_loss", "best_mode": "min",
        "best_val_loss": 0.4, "best_val_acc": 0.8, "best_train_loss": 0.5,
    }
    assert s["verdict"] == "failed-checks" and s["deterministic"] is True
    assert s["check/best_checkpoint.reload"] == "pass"
    assert s["check/early_stopping.conformance"] == "fail"
    assert s["check/comparator.direction"] == "pass"
    assert s["early_stop_epoch"] == 4

    n = published.runs[NONDET].summary
    assert (n["verdict"], n["deterministic"], n["first_divergence_step"], n["first_divergence_tensor"]) == (
        "nondeterministic", False, 3, "net.0.weight")
    assert (n["first_divergence_phase"], n["first_divergence_module"], n["cause"]) == ("forward", "net.1", "unseeded_rng")
    assert (n["tensors_compared"], n["tensors_differing"]) == (3, 2)
    assert not any(k.startswith("best_") for k in n)

    e = published.runs[ERR].summary
    assert (e["verdict"], e["error"]) == ("error", "ZeroDivisionError: division by zero")


def test_best_checkpoint_is_a_model_artifact_with_best_epoch_metrics(published):
    models = [a for a in published.runs[CKPT].artifacts if a["type"] == "model"]
    assert len(models) == 1
    art = models[0]
    assert art["name"].startswith("best-tests-test_ckpt.py-test_best_checkpoint-lightning-")
    assert "best" in art["aliases"]
    assert art["metadata"] == {"val_loss": 0.4, "val_acc": 0.8, "train_loss": 0.5}  # exactly epoch 2's metrics
    assert "epoch 2" in art["description"] and "val_loss (min)" in art["description"]
    data = Path(published.checkpoint).read_bytes()
    (name, entry), = art["files"].items()
    assert name == Path(published.checkpoint).name
    assert entry["size"] == len(data)
    assert entry["digest"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    info = next(r for r in published.outcome.wandb_runs if r.target == CKPT)
    assert info.artifact == f"{art['name']}:best"


def test_checks_only_result_logs_its_best_checkpoint_without_replica_keys(published):
    run = published.runs[CHECKS]
    assert run.config["kind"] == "checks" and run.config["test"] == "tests/test_reload.py::test_reload"
    assert metric_rows(run) == []
    s = run.summary
    assert s["verdict"] == "pass" and "deterministic" not in s and "tensors_compared" not in s
    assert (s["best_epoch"], s["best_val_loss"], s["best_val_acc"]) == (7, 0.25, 0.9)
    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    assert model["metadata"] == {"val_loss": 0.25, "val_acc": 0.9} and "best" in model["aliases"]


def test_missing_checkpoint_warns_and_logs_the_rest(published):
    warnings = [w for w in published.outcome.warnings if MISSING in w]
    assert len(warnings) == 1
    assert "does-not-exist/best.pt" in warnings[0] and "epoch 2" in warnings[0] and "no model artifact" in warnings[0]
    run = published.runs[MISSING]
    assert not [a for a in run.artifacts if a["type"] == "model"]
    assert run.summary["best_val_loss"] == 0.4  # the findings are still published
    assert len(published.outcome.warnings) == 1, published.outcome.warnings


def _table(info, run, key) -> dict:
    ref = next(row[key] for row in run.history if key in row)
    assert ref["_type"] == "table-file"
    return json.loads((info.run_dir / "files" / ref["path"]).read_text())


def test_tensor_difference_and_first_divergence_tables(published):
    info = next(r for r in published.outcome.wandb_runs if r.target == NONDET)
    run = published.runs[NONDET]
    t = _table(info, run, "tensor_diffs")
    assert t["columns"] == ["tensor", "status", "dtype", "shape", "other_shape", "max_abs_diff", "max_ulp",
                            "fraction_differing", "numel", "in_first_divergence"]
    assert t["data"] == [
        ["net.0.weight", "different", "torch.float32", "[8, 4]", "[8, 4]", 0.0123, 98765, 0.75, 32, True],
        ["net.0.bias", "different", "torch.float32", "[8]", "[8]", 1.5e-5, 120, 0.25, 8, True],
        ["net.2.weight", "equal", "torch.float32", "[1, 8]", "[1, 8]", 0.0, 0, 0.0, 8, False],
    ]
    fd = _table(info, run, "first_divergence")
    assert fd["data"] == [[3, "net.0.weight", "net.0.weight, net.0.bias", "forward", "net.1", "Dropout", "True",
                           "first divergence at step 3 in net.1 (Dropout), forward", "unseeded_rng",
                           "torch's global RNG is used by Dropout but never seeded"]]
    sd = _table(info, run, "step_divergence")
    assert [row[0] for row in sd["data"]] == list(range(6)) and sd["data"][3] == [3, 3e-7, 1]


def test_findings_table_carries_checkpoint_and_early_stopping_details(published):
    info = next(r for r in published.outcome.wandb_runs if r.target == CKPT)
    t = _table(info, published.runs[CKPT], "findings")
    by_check = {row[0]: row for row in t["data"]}
    assert set(by_check) == {"best_checkpoint.reload", "best_checkpoint.history", "early_stopping.conformance", "comparator.direction"}
    es = by_check["early_stopping.conformance"]
    assert es[1] == "fail"
    assert json.loads(es[3])["observed"] == {"epochs_run": 3, "stop_epoch": 2}
    assert json.loads(es[3])["counterexample"] == [1.0, 1.0, 0.5]
    assert json.loads(by_check["best_checkpoint.reload"][3])["recorded_metrics"] == {"val_loss": 0.4, "val_acc": 0.8, "train_loss": 0.5}


def test_plots_are_logged_as_images(published):
    for target, keys in ((CKPT, {"plots/metrics"}), (NONDET, {"plots/metrics", "plots/step_divergence"}), (ERR, set())):
        info = next(r for r in published.outcome.wandb_runs if r.target == target)
        logged = {k: v for row in published.runs[target].history for k, v in row.items() if k.startswith("plots/")}
        assert set(logged) == keys
        for ref in logged.values():
            assert ref["_type"] == "image-file" and ref["format"] == "png"
            assert (info.run_dir / "files" / ref["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_lists_the_runs_and_the_saved_report_spec(published):
    out = published.report["outputs"]
    assert [r["run_id"] for r in out["wandb_runs"]] == [r.run_id for r in published.outcome.wandb_runs]
    assert out["warnings"] == published.outcome.warnings
    spec_path = Path(out["wandb_report_spec"])
    assert spec_path.parent == published.root / "wb" / "wandb"  # beside the offline runs
    spec = load_spec(spec_path)
    assert spec["session"] == "session-42" and spec["project"] == "mlrepro-tests"
    assert [a["run_id"] for a in spec["audits"]] == [r.run_id for r in published.outcome.wandb_runs]
    assert {"val_loss", "loss"} <= set(spec["metrics"])
    report = build_report(spec, entity="someone")  # wandb-workspaces validates every block
    assert report.title == "pytest-mlrepro audit session-42" and report.project == "mlrepro-tests"
    assert "**nondeterministic**" in report.blocks[1].text
    assert not list(spec_path.parent.glob(".*.tmp"))


@pytest.mark.parametrize("missing", ["project", "audits"])
def test_a_broken_report_spec_is_refused_by_name(tmp_path, published, missing):
    spec = load_spec(published.report["outputs"]["wandb_report_spec"])
    del spec[missing]
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    from pytest_mlrepro.publish import PublishError

    with pytest.raises(PublishError, match=f"{p}.*lacks '{missing}'"):
        load_spec(p)
