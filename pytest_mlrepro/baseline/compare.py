"""Compare an audit with its stored baseline: exactly when the environment key is the same, with the
declared per-metric tolerances when it is not (never a silent exact comparison across machines).

An exact mismatch names the first step whose fingerprint differs from the baseline and its tensor,
and the metrics that moved; a tolerance comparison lists each curve point outside its tolerance,
allowing ``allow_failing`` points per metric (Megatron-style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .record import AuditBaseline

EXACT, TOLERANCE, INCOMPARABLE = "exact", "tolerance", "incomparable"


@dataclass
class MetricDiff:
    metric: str
    at: str  # "epoch 3", "step 16"
    baseline: Any
    obtained: Any
    allowed: Optional[str] = None  # the tolerance, in tolerance comparisons


@dataclass
class BaselineComparison:
    """The typed outcome of one audit against its baseline."""

    comparison: str  # exact | tolerance | incomparable
    reason: str  # why that comparison was made
    matched: bool
    first_step: Optional[int] = None
    first_tensor: Optional[str] = None
    first_step_after: Optional[int] = None  # thinned traces: the divergence began after this step (-1: the initial weights)
    tensors: list = field(default_factory=list)
    metrics: list = field(default_factory=list)  # list[MetricDiff]
    epochs: dict = field(default_factory=dict)  # best/stopped epoch changes: name -> (baseline, obtained)
    message: str = ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _curves(b: AuditBaseline) -> dict[str, list[tuple[str, Any]]]:
    """Every curve of a run: the traced loss per step and each logged metric per epoch (or step)."""
    curves: dict[str, list[tuple[str, Any]]] = {"loss": [(f"step {i}", v) for i, v in enumerate(b.losses)]}
    for i, row in enumerate(b.metrics):
        at = f"epoch {row['epoch']}" if row.get("epoch") is not None else (
            f"step {row['step']}" if row.get("step") is not None else f"row {i}")
        for name, value in row.items():
            if name not in ("step", "epoch"):
                curves.setdefault(name, []).append((at, value))
    return curves


def _trace(b: AuditBaseline):
    from ..tracing.record import TraceRecord

    return TraceRecord.from_trajectory(b.trajectory, steps=len(b.losses))


def _env_changes(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def compare(baseline: AuditBaseline, obtained: AuditBaseline, tolerances: Optional[dict] = None) -> BaselineComparison:
    """The audit ``obtained`` against its ``baseline``."""
    calibrated = (baseline.calibration or {}).get("tolerances") or {}
    tolerances = {**calibrated, **(tolerances or {})}  # declared tolerances win over calibrated ones
    epochs = {name: (getattr(baseline, name), getattr(obtained, name)) for name in ("best_epoch", "stopped_epoch")
              if getattr(baseline, name) != getattr(obtained, name)}
    if baseline.environment == obtained.environment and baseline.seed == obtained.seed:
        exact = _exact(baseline, obtained, epochs)
        if exact.matched or not calibrated:
            return exact
        reason = (f"not bitwise equal ({exact.message}), and the baseline is calibrated for a nondeterministic "
                  f"training ({baseline.calibration.get('replicas')} replicas): compared with its tolerances")
        return _approximate(baseline, obtained, tolerances, reason, epochs)
    reason = (f"the environment differs from the baseline's ({_env_changes(baseline.environment, obtained.environment)})"
              if baseline.environment != obtained.environment else f"the seed differs ({baseline.seed} -> {obtained.seed})")
    if calibrated:
        reason += f"; tolerances calibrated from {baseline.calibration.get('replicas')} replicas"
    if not tolerances:
        return BaselineComparison(INCOMPARABLE, reason, False, epochs=epochs, message=(
            f"{reason}, so it cannot be compared exactly, and no tolerances are declared: declare them (ini "
            "mlrepro_tolerances or the marker's tolerances=) or record a baseline for this environment with "
            "--mlrepro-update"))
    return _approximate(baseline, obtained, tolerances, reason, epochs)


def _exact(baseline: AuditBaseline, obtained: AuditBaseline, epochs: dict) -> BaselineComparison:
    from ..localize import exact_step, first_divergence, last_common_step_before

    reason = "same environment key and seed: exact comparison"
    a, b = _curves(baseline), _curves(obtained)
    moved = [MetricDiff(name, at, va, vb) for name in a for (at, va), (_, vb) in zip(a[name], b.get(name, []))
             if not _same(va, vb)]
    moved += [MetricDiff(name, "curve", f"{len(a.get(name, []))} points", f"{len(b.get(name, []))} points")
              for name in sorted(set(a) | set(b)) if len(a.get(name, [])) != len(b.get(name, []))]
    td = first_divergence(_trace(baseline), _trace(obtained))
    final = sorted(k for k in set(baseline.final) | set(obtained.final) if baseline.final.get(k) != obtained.final.get(k))
    matched = td is None and not final and not moved and not epochs
    result = BaselineComparison(EXACT, reason, matched, metrics=moved, epochs=epochs, tensors=final)
    if matched:
        result.message = "matches its baseline exactly"
        return result
    if td is not None:
        result.first_step, result.tensors = td.step, td.tensors or final
        result.first_tensor = td.tensors[0] if td.tensors else None
        where = ("the initial weights" if td.kind == "init" else f"step {td.step} on") if td.kind != "structure" else None
        ta, tb = _trace(baseline), _trace(obtained)
        if td.kind == "step" and not exact_step(td, ta, tb):  # thinned traces: the step before was not recorded in both
            before = last_common_step_before(td, ta, tb)
            result.first_step_after = before if before is not None else -1
            where = (f"step {td.step} on (the first step both traces recorded after "
                     + (f"step {before}, where they matched" if before is not None else "the initial weights")
                     + "; the divergence began in between)")
        head = (f"differs from the baseline from {where}: `{result.first_tensor}` first" if where and result.first_tensor
                else f"differs from the baseline in its structure: {td.note}" if td.kind == "structure"
                else f"differs from the baseline from {where}")
    elif final:
        result.first_tensor = final[0]
        head = f"every traced step matches the baseline, but the final `{final[0]}` differs"
    else:
        head = "the weights match the baseline, but"
    parts = [head]
    if moved:
        shown = "; ".join(f"{m.metric} at {m.at}: {m.baseline!r} -> {m.obtained!r}" for m in moved[:5])
        parts.append(f"metrics moved ({shown}{'; …' if len(moved) > 5 else ''})")
    if epochs:
        parts.append(", ".join(f"{k.replace('_', ' ')} {v[0]} -> {v[1]}" for k, v in epochs.items()))
    result.message = "; ".join(parts)
    return result


def _within(a: Any, b: Any, tol: dict) -> bool:
    if _same(a, b):
        return True
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= tol.get("atol", 0.0) + tol.get("rtol", 0.0) * abs(a)


def _approximate(baseline: AuditBaseline, obtained: AuditBaseline, tolerances: dict, reason: str,
                 epochs: dict) -> BaselineComparison:
    a, b = _curves(baseline), _curves(obtained)
    outside: list[MetricDiff] = []
    unknown = sorted(set(tolerances) - set(a))
    if unknown:
        return BaselineComparison(TOLERANCE, reason, False, message=(
            f"{reason}; tolerances name metric(s) the baseline never logged: {', '.join(unknown)} "
            f"(logged: {', '.join(sorted(a))})"))
    for name, tol in tolerances.items():
        points_a, points_b = a[name], b.get(name, [])
        allowed = f"atol={tol.get('atol', 0.0):g} rtol={tol.get('rtol', 0.0):g}"
        if len(points_a) != len(points_b):
            outside.append(MetricDiff(name, "curve", f"{len(points_a)} points", f"{len(points_b)} points", allowed))
            continue
        bad = [MetricDiff(name, at, va, vb, allowed) for (at, va), (_, vb) in zip(points_a, points_b) if not _within(va, vb, tol)]
        if len(bad) > int(tol.get("allow_failing", 0)):
            outside.extend(bad)
    not_compared = sorted(set(a) - set(tolerances))
    matched = not outside and not epochs
    note = f"; not compared (no tolerance declared): {', '.join(not_compared)}" if not_compared else ""
    if matched:
        message = f"within the declared tolerances of its baseline ({reason}; compared {', '.join(tolerances)}{note})"
    else:
        shown = "; ".join(f"{m.metric} at {m.at}: {m.baseline!r} -> {m.obtained!r} ({m.allowed})" for m in outside[:5])
        parts = [f"outside the declared tolerances of its baseline ({reason})"]
        if outside:
            parts.append(shown + ("; …" if len(outside) > 5 else ""))
        if epochs:
            parts.append(", ".join(f"{k.replace('_', ' ')} {v[0]} -> {v[1]}" for k, v in epochs.items()))
        message = "; ".join(parts) + note
    return BaselineComparison(TOLERANCE, reason, matched, metrics=outside, epochs=epochs, message=message)
