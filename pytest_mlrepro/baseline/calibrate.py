"""Tolerances measured, not guessed: run N replicas of a training (deterministic settings off, as on a
GPU, if asked) and keep in its baseline how far their curves spread, plus the tolerances that spread
recommends. A training that is nondeterministic by design then still gets a regression gate: its
baseline is compared with those tolerances instead of bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

from . import store
from .compare import _curves
from .record import AuditBaseline, Baseline, BaselineError

DEFAULT_FACTOR = 2.0  # recommended tolerance = factor × the largest spread seen


def spread(result) -> dict:
    """Per curve (the traced loss, each logged metric): the largest |replica - replica 0| over every
    point and replica, and the largest relative one."""
    if result.error is not None or len(result.replicas) < 2:
        raise BaselineError(f"{result.target}: calibration needs a finished audit with at least 2 replicas")
    runs = [AuditBaseline(target=result.target, seed=result.seed, environment={}, trajectory={}, losses=list(r.losses),
                          metrics=list(r.metrics), final={}) for r in result.replicas]
    reference = _curves(runs[0])
    out: dict = {}
    for name, points in reference.items():
        worst_abs = worst_rel = 0.0
        for other in runs[1:]:
            theirs = _curves(other).get(name, [])
            if len(theirs) != len(points):
                raise BaselineError(f"{result.target}: replicas logged {name!r} a different number of times "
                                    f"({len(points)} vs {len(theirs)}): no tolerance can describe that")
            for (_, a), (_, b) in zip(points, theirs):
                if a is None or b is None or (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
                    continue
                d = abs(a - b)
                worst_abs = max(worst_abs, d)
                if a != 0:
                    worst_rel = max(worst_rel, d / abs(a))
        out[name] = {"max_abs": worst_abs, "max_rel": worst_rel, "points": len(points)}
    return out


def recommend(spreads: dict, factor: float = DEFAULT_FACTOR) -> dict:
    """An absolute envelope per curve: ``factor`` × the largest deviation the replicas showed (0: exact)."""
    return {name: {"atol": factor * s["max_abs"], "rtol": 0.0, "allow_failing": 0} for name, s in spreads.items()}


def calibrate(result, path: Path, *, test: Optional[str] = None, audit_index: int = 0,
              factor: float = DEFAULT_FACTOR) -> AuditBaseline:
    """Write the calibration of ``result`` into the baseline at ``path`` (created from replica 0 when
    missing or when it has no audit ``audit_index`` yet) and return that audit's baseline."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise BaselineError(f"the calibration factor must be a number >= 1, got {factor!r}")
    spreads = spread(result)
    calibration = {"replicas": len(result.replicas), "deterministic_settings": result.environment.get(
        "use_deterministic_algorithms"), "factor": factor, "spread": spreads, "tolerances": recommend(spreads, factor)}
    entry = replace(AuditBaseline.from_result(result), calibration=calibration)
    baseline = store.read(path) or Baseline(test=test or result.target)
    if audit_index < len(baseline.audits):
        baseline.audits[audit_index] = entry
    elif audit_index == len(baseline.audits):
        baseline.audits.append(entry)
    else:
        raise BaselineError(f"{path} holds {len(baseline.audits)} audit(s): cannot calibrate audit {audit_index}")
    store.write(path, baseline)
    return entry
