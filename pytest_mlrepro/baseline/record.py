"""What a baseline holds: per audit, the trajectory (per-step fingerprints of every trained tensor),
the losses and logged metrics, the best and stop epochs, the final per-tensor fingerprints, and
the environment key that decides whether a later run can be compared exactly.

Plain data, no torch: a baseline is read, validated and written without loading a training stack.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..checks import HISTORY, RELOAD
from ..errors import MlreproError

SCHEMA = "pytest-mlrepro/baseline"
VERSION = 1

# Environment facts that change float results: a different value means "compare with tolerances"
ENVIRONMENT_KEY_FIELDS = ("torch", "cuda", "cudnn", "device", "device_name", "machine", "cpu_capability",
                          "num_threads", "use_deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
                          "cublas_workspace_config")


class BaselineError(MlreproError):
    """A baseline file that cannot be used: unreadable, corrupt, truncated, another schema or version."""


def environment_key(environment: dict) -> dict:
    return {k: environment.get(k) for k in ENVIRONMENT_KEY_FIELDS}


@dataclass(frozen=True)
class AuditBaseline:
    """One audit of a test, as stored."""

    target: str
    seed: int
    environment: dict  # the environment key
    trajectory: dict  # param_names, opt_indices, entries [(kind, step, optimizer)], fp [int], steps, every
    losses: list  # per optimizer step, replica 0 (None where no loss was seen)
    metrics: list  # the rows replica 0 logged through ctx.log
    final: dict  # tensor name -> fingerprint (hex)
    best_epoch: Optional[int] = None
    stopped_epoch: Optional[int] = None
    # `mlrepro calibrate`: replicas, deterministic_settings, factor, spread per curve, tolerances per curve
    calibration: Optional[dict] = None

    @classmethod
    def from_result(cls, result: Any) -> "AuditBaseline":
        """The baseline of a finished audit (replica 0's run)."""
        if result.error is not None:
            raise BaselineError(f"{result.target}: an audit that failed ({result.error.type}) has no baseline")
        if result.trajectory is None or result.final_fingerprints is None:
            raise BaselineError(f"{result.target}: the audit recorded no trajectory to keep as a baseline")
        replica = result.replicas[0] if result.replicas else None
        best, stopped = _epochs(result.findings)
        return cls(target=result.target, seed=result.seed, environment=environment_key(result.environment or {}),
                   trajectory=result.trajectory, losses=list(replica.losses) if replica else [],
                   metrics=list(replica.metrics) if replica else [], final=dict(result.final_fingerprints),
                   best_epoch=best, stopped_epoch=stopped)

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "AuditBaseline":
        if not isinstance(d, dict):
            raise BaselineError(f"{where}: an audit entry must be an object, got {type(d).__name__}")
        missing = [k for k in ("target", "seed", "environment", "trajectory", "losses", "metrics", "final") if k not in d]
        if missing:
            raise BaselineError(f"{where}: an audit entry lacks {', '.join(missing)}")
        t = d["trajectory"]
        if not isinstance(t, dict) or not all(k in t for k in ("param_names", "opt_indices", "entries", "fp")):
            raise BaselineError(f"{where}: the trajectory lacks param_names, opt_indices, entries or fp")
        expected = sum(len(t["opt_indices"][e[2]]) for e in t["entries"])
        if len(t["fp"]) != expected:
            raise BaselineError(f"{where}: the trajectory is truncated ({len(t['fp'])} fingerprints, {expected} expected)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: _restore(v) for k, v in d.items() if k in known})


@dataclass
class Baseline:
    """One test's baseline file: every audit the test ran, in order."""

    test: str
    audits: list = field(default_factory=list)  # list[AuditBaseline]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, "test": self.test, "audits": [a.to_dict() for a in self.audits]}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Baseline":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise BaselineError(f"{where}: not a pytest-mlrepro baseline (schema {d.get('schema') if isinstance(d, dict) else None!r})")
        if d.get("version") != VERSION:
            raise BaselineError(f"{where}: baseline schema version {d.get('version')!r}, this pytest-mlrepro reads "
                                f"version {VERSION}: rewrite it with --mlrepro-update")
        audits = d.get("audits")
        if not isinstance(audits, list):
            raise BaselineError(f"{where}: 'audits' must be a list")
        return cls(test=str(d.get("test", "")), audits=[AuditBaseline.from_dict(a, where) for a in audits])


def _epochs(findings: list) -> tuple[Optional[int], Optional[int]]:
    """Best and stop epochs from the checkpoint checks, when the audit ran them."""
    best = stopped = None
    for f in findings:
        if f.check in (HISTORY, RELOAD):
            best = f.details.get("best_epoch", best) if best is None else best
            stopped = f.details.get("stopped_epoch", stopped) if stopped is None else stopped
    return best, stopped


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinities: store them as strings ("nan", "inf", "-inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _restore(x: Any) -> Any:
    if isinstance(x, str) and x in _SPECIAL:
        return _SPECIAL[x]
    if isinstance(x, dict):
        return {k: _restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore(v) for v in x]
    return x
