"""What a reproducible training can still get wrong: metrics that are no numbers, NaN/inf weights.
Both become findings next to the determinism verdict, which is still computed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_mlrepro import AuditResult, audit, checks
from pytest_mlrepro.compare import compare_state_files, count_nonfinite, nonfinite_finding
from pytest_mlrepro.context import MAX_METRIC_PROBLEMS, ReplicaContext, metrics_finding

TARGETS = Path(__file__).resolve().parent / "targets"
OUTPUTS = str(TARGETS / "outputs.py")


def _ctx() -> ReplicaContext:
    return ReplicaContext(seed=0, device="cpu", workdir=Path("."))


def _findings(result: AuditResult, check: str) -> list:
    return [f for f in result.findings if f.check == check]


# -- ctx.log -------------------------------------------------------------------------------------------


def test_log_keeps_numbers_and_records_what_is_no_number_without_raising():
    ctx = _ctx()
    ctx.log(step=3, epoch=np.int64(1), loss=torch.tensor(0.25), acc=np.float32(0.5), n=7, ok=True,
            nan=float("nan"), inf=float("-inf"), phase="train", missing=None, vec=torch.ones(3), z=1j)
    row = ctx.metrics[0]
    assert {k: row[k] for k in ("step", "epoch", "loss", "acc", "n", "ok", "inf")} == {
        "step": 3, "epoch": 1, "loss": 0.25, "acc": 0.5, "n": 7.0, "ok": True, "inf": -math.inf}
    assert math.isnan(row["nan"])
    assert not {"phase", "missing", "vec", "z"} & set(row)
    problems = {p["name"]: p for p in ctx.metric_problems}
    assert list(problems) == ["phase", "missing", "vec", "z"] and ctx.metric_problem_count == 4
    assert problems["phase"] == {"name": "phase", "type": "str", "repr": "'train'", "reason": "not a number",
                                 "step": 3, "epoch": 1}
    assert problems["missing"]["type"] == "NoneType" and problems["missing"]["repr"] == "None"
    assert problems["vec"]["type"] == "torch.Tensor" and "3 elements" in problems["vec"]["reason"]
    assert "complex" in problems["z"]["reason"]


def test_log_records_a_bad_step_or_epoch_as_a_problem_and_keeps_the_row():
    ctx = _ctx()
    ctx.log(step="seven", epoch=1.5, loss=1.0)
    assert ctx.metrics == [{"step": None, "epoch": None, "loss": 1.0}]
    assert [(p["name"], p["repr"]) for p in ctx.metric_problems] == [("step", "'seven'"), ("epoch", "1.5")]


def test_log_keeps_a_bounded_record_of_problems_and_counts_them_all():
    ctx = _ctx()
    for step in range(MAX_METRIC_PROBLEMS + 50):
        ctx.log(step=step, note="x" * 1000)
    assert len(ctx.metric_problems) == MAX_METRIC_PROBLEMS and ctx.metric_problem_count == MAX_METRIC_PROBLEMS + 50
    assert len(ctx.metric_problems[0]["repr"]) <= 200


def test_metrics_finding_names_the_metrics_and_the_first_bad_value():
    assert metrics_finding([(0, [], 0), (1, [], 0)]) is None
    problem = {"name": "acc", "type": "NoneType", "repr": "None", "reason": "not a number", "step": 2, "epoch": None}
    finding = metrics_finding([(0, [problem], 1), (1, [problem], 1)])
    assert finding.check == checks.METRICS and finding.verdict == "fail"
    assert "1 value that is not a number in each of the 2 replicas" in finding.message
    assert "`acc` = None (NoneType: not a number) at step 2" in finding.message
    assert finding.details["count"] == 2 and finding.details["names"] == ["acc"]
    assert [p["replica"] for p in finding.details["problems"]] == [0, 1]


def test_bad_metrics_are_a_finding_and_the_determinism_verdict_still_stands(tmp_path):
    result = audit(f"{OUTPUTS}:bad_metrics", workdir=tmp_path, isolation="inprocess")
    assert result.error is None, result.explain()
    assert result.deterministic and result.verdict == "failed-checks"
    [finding] = _findings(result, checks.METRICS)
    assert finding.verdict == "fail"
    assert finding.details["names"] == ["acc", "grad_norms", "phase"]
    per_replica = [p for p in finding.details["problems"] if p["replica"] == 0]
    assert [(p["name"], p["step"], p["epoch"], p["type"]) for p in per_replica] == [
        ("phase", 0, 0, "str"), ("grad_norms", 0, 0, "torch.Tensor"),
        ("phase", 1, 0, "str"), ("acc", 1, 0, "NoneType"), ("grad_norms", 1, 0, "torch.Tensor"),
        ("phase", 2, 0, "str"), ("grad_norms", 2, 0, "torch.Tensor")]
    assert "training.metrics" in result.explain() and "`acc`" in result.explain()
    # the numbers are all there, NaN and inf included; the report is strict JSON and reads back
    rows = result.replicas[0].metrics
    assert [r["step"] for r in rows] == [0, 1, 2] and all("loss" in r for r in rows)
    assert math.isnan(rows[0]["ratio"]) and rows[0]["ceiling"] == math.inf and rows[0]["acc"] == 0.5
    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert report["verdict"] == "failed-checks"
    back = AuditResult.from_dict(report)
    assert back.findings[0].check == checks.METRICS and back.to_dict() == report
    with pytest.raises(pytest.fail.Exception, match="not numbers"):
        result.assert_deterministic()


# -- NaN / inf in the final weights ---------------------------------------------------------------------


def test_identical_nan_weights_are_reproducible_but_reported(tmp_path):
    result = audit(f"{OUTPUTS}:nan_weights", workdir=tmp_path, isolation="inprocess")
    assert result.error is None, result.explain()
    assert result.deterministic, "identical NaNs are bitwise equal: the training is reproducible"
    assert result.verdict == "failed-checks"
    [finding] = _findings(result, checks.FINAL_WEIGHTS)
    assert finding.verdict == "fail"
    assert finding.details["names"] == ["0.weight", "2.bias"]
    assert finding.details["replicas"] == [0, 1] == finding.details["replicas_checked"]
    counts = {(t["replica"], t["name"]): (t["nan"], t["inf"], t["numel"]) for t in finding.details["tensors"]}
    assert counts == {(r, "0.weight"): (3, 0, 32) for r in (0, 1)} | {(r, "2.bias"): (0, 1, 2) for r in (0, 1)}
    assert "`0.weight` (3 NaN, 0 inf of 32 elements) and 1 more tensor, in every replica checked (0, 1)" in finding.message
    json.dumps(result.to_dict(), allow_nan=False)


def test_nan_in_one_replica_is_nondeterministic_and_reported_for_that_replica(tmp_path):
    result = audit(f"{OUTPUTS}:nan_in_one_replica", workdir=tmp_path, isolation="inprocess", diagnose=False)
    assert not result.deterministic and result.verdict == "nondeterministic"
    [finding] = _findings(result, checks.FINAL_WEIGHTS)
    assert finding.details["tensors"] == [{"name": "0.weight", "replica": 1, "nan": 1, "inf": 0, "numel": 32}]
    assert "in replica 1 (checked: 0, 1)" in finding.message


def test_finite_weights_and_clean_metrics_add_no_finding(tmp_path):
    result = audit(f"{TARGETS / 'tiny.py'}:train", workdir=tmp_path, isolation="inprocess")
    assert result.verdict == "deterministic" and result.findings == []


def test_nonfinite_counts_come_from_the_comparing_pass(tmp_path):
    a = {"f32": torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]),
         "bf16": torch.tensor([float("nan")] * 3, dtype=torch.bfloat16),
         "c64": torch.tensor([complex(float("nan"), float("inf")), 1 + 1j, complex(1, float("inf"))]),
         "int": torch.arange(4), "big": torch.randn(200_000)}
    b = {k: v.clone() for k, v in a.items()}
    b["big"][150_000] = float("nan")  # past the first scan chunk, only on one side
    a["only_a"] = torch.tensor([float("nan")])
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    ref, other = compare_state_files(tmp_path / "a.pt", tmp_path / "b.pt").nonfinite
    assert ref == {"f32": {"nan": 1, "inf": 2, "numel": 4}, "bf16": {"nan": 3, "inf": 0, "numel": 3},
                   "c64": {"nan": 1, "inf": 1, "numel": 3}, "only_a": {"nan": 1, "inf": 0, "numel": 1}}
    assert other == {"f32": {"nan": 1, "inf": 2, "numel": 4}, "bf16": {"nan": 3, "inf": 0, "numel": 3},
                     "c64": {"nan": 1, "inf": 1, "numel": 3}, "big": {"nan": 1, "inf": 0, "numel": 200_000}}
    assert count_nonfinite(torch.arange(3)) is None and count_nonfinite("x") is None
    assert count_nonfinite(torch.tensor([float("nan"), 1.0]).half()) == (1, 0)
    if hasattr(torch, "float8_e4m3fn"):
        assert count_nonfinite(torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn)) == (1, 0)


def test_nonfinite_finding_is_none_when_everything_is_finite():
    assert nonfinite_finding({0: {}, 1: {}}) is None
    finding = nonfinite_finding({0: {}, 1: {"w": {"nan": 2, "inf": 0, "numel": 9}}})
    assert finding.check == checks.FINAL_WEIGHTS and finding.details["replicas"] == [1]
