"""The audit's answer: what was compared, whether it matched, and where it first did not.

Plain dataclasses with no torch import, so reports, W&B publishing and the terminal summary can
read a result (or its JSON) without loading a training stack. ``to_dict`` is the versioned JSON
schema documented in docs/report-schema.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA_NAME = "pytest-mlrepro/audit-result"
SCHEMA_VERSION = 1

# Cause kinds the localizer may name. Kept here so reports and docs share one list.
CAUSE_KINDS = (
    "unseeded_rng",  # a global RNG the program uses but never seeded
    "time_seed",  # the program seeded, but with a value that differs per run (time, pid, os entropy)
    "worker_seeding",  # DataLoader workers got different seeds
    "data_order",  # the batches entering the model differ (shuffle, file listing, set order)
    "hash_seed",  # the divergence goes away when PYTHONHASHSEED is pinned
    "nondeterministic_kernel",  # a module's output differs although its inputs matched, no RNG involved
    "thread_count",  # replicas ran with different intra-op thread counts
    "clock",  # the program reads the clock (time.time, datetime.now) into what it computes
    "os_entropy",  # the program reads OS entropy (uuid.uuid4, os.urandom) into what it computes
    "listing_order",  # the program depends on the order os.listdir / os.scandir / glob return
    "unknown",
)


@dataclass
class TensorDiff:
    """Comparison of one named tensor between replica 0 and replica ``other``."""

    name: str
    status: str  # equal | different | missing_in_reference | missing_in_other | shape_mismatch | dtype_mismatch | value_mismatch
    shape: Optional[list] = None
    other_shape: Optional[list] = None
    dtype: Optional[str] = None
    other_dtype: Optional[str] = None
    max_abs_diff: Optional[float] = None
    max_ulp: Optional[int] = None
    fraction_differing: Optional[float] = None
    numel: Optional[int] = None

    @property
    def equal(self) -> bool:
        return self.status == "equal"


@dataclass
class Divergence:
    """Where two replicas first part: an optimizer step (from 0) and the tensors that differ first."""

    step: Optional[int]
    tensor: Optional[str]
    tensors: list = field(default_factory=list)
    phase: Optional[str] = None  # init | input | forward | backward | optimizer | buffer | structure | final (no trace) | None
    module: Optional[str] = None
    module_type: Optional[str] = None
    inputs_matched: Optional[bool] = None
    message: str = ""
    evidence: dict = field(default_factory=dict)
    rank: Optional[int] = None  # DDP audits (nproc > 1): the rank where it starts; None: one process, or not told apart


@dataclass
class Cause:
    """The cause of a divergence. ``confirmed``: a diagnosis rerun with ``control`` (a name from
    controls.CONTROLS) applied made the replicas agree; otherwise the kind is the best hint from the
    recorded evidence. ``reruns``: each rerun as {controls, agreed, label, error}."""

    kind: str
    detail: str
    evidence: dict = field(default_factory=dict)
    confirmed: bool = False
    control: Optional[str] = None
    reruns: list = field(default_factory=list)


@dataclass
class NondeterministicOp:
    op: str
    call_site: str
    count: int = 1


@dataclass
class Finding:
    """One check's outcome (checkpoint reload, early stopping conformance, comparator, ...)."""

    check: str
    verdict: str  # pass | fail | error | skip
    message: str
    details: dict = field(default_factory=dict)


@dataclass
class ReplicaSummary:
    index: int
    wall_time_s: Optional[float] = None
    steps: int = 0
    seeding: Optional[dict] = None
    metrics: list = field(default_factory=list)  # [{"step": int, "epoch": int|None, "<name>": value, ...}]
    losses: list = field(default_factory=list)  # loss per optimizer step when visible (None where not)
    environment: dict = field(default_factory=dict)
    trace_every: Optional[int] = None  # the trace's recording interval (trace_every="auto": the one it chose)
    trace_dense_until: int = 0  # every step before this one was recorded (trace_every="auto": the dense start)
    trace_budget: Optional[dict] = None  # trace_every="auto" after thinning: median step and record seconds, overhead


@dataclass
class AuditError:
    type: str
    message: str
    replica: Optional[int] = None
    traceback: str = ""


@dataclass
class AuditResult:
    target: str
    seed: int
    runs: int
    device: str
    isolation: str
    seeding: str  # harness | program
    comparison: dict
    deterministic: bool
    first_divergence: Optional[Divergence] = None
    cause: Optional[Cause] = None
    tensors: list = field(default_factory=list)  # list[TensorDiff], replica 0 vs first differing replica
    nondeterministic_ops: list = field(default_factory=list)  # list[NondeterministicOp]
    environment: dict = field(default_factory=dict)
    replicas: list = field(default_factory=list)  # list[ReplicaSummary]
    step_divergence: list = field(default_factory=list)  # [{"step", "max_abs_diff_sampled", "tensors_differing"}]
    findings: list = field(default_factory=list)  # list[Finding]
    error: Optional[AuditError] = None
    compared: str = "weights"  # weights (full tensors) | none (a checks-only result)
    wall_time_s: Optional[float] = None
    kind: str = "audit"  # audit (replicas compared) | checks (findings of checkpoint/early-stopping checks only)
    test: Optional[str] = None  # the pytest node id that produced it, when run under pytest
    parallel: int = 1  # replicas that ran at once
    parallel_reason: str = ""  # why that many: the cores, or the devices (which, identical or not)
    nproc: int = 1  # ranks per replica (a DDP audit: > 1; ``first_divergence.rank`` names one)
    final_fingerprints: Optional[dict] = None  # tensor name -> strong fingerprint (hex) of replica 0's final state
    # replica 0's per-step fingerprints (param_names, opt_indices, entries, fp): what a baseline keeps;
    # not part of the JSON report (it can be long), so it does not travel to the xdist controller
    trajectory: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "error"
        if self.kind == "checks":
            return "failed-checks" if any(f.verdict in ("fail", "error") for f in self.findings) else "pass"
        if not self.deterministic:
            return "nondeterministic"
        if any(f.verdict in ("fail", "error") for f in self.findings):
            return "failed-checks"
        return "deterministic"

    @property
    def differing_tensors(self) -> list:
        return [t for t in self.tensors if not t.equal]

    def summary_line(self) -> str:
        """One line for terminal tables and assertion messages."""
        if self.error is not None:
            return f"{self.target}: error: {self.error.type}: {self.error.message}"
        if self.kind == "checks":
            failed = [f for f in self.findings if f.verdict in ("fail", "error")]
            return f"{self.target}: {len(self.findings) - len(failed)} of {len(self.findings)} checks passed"
        if self.deterministic:
            failed = [f for f in self.findings if f.verdict in ("fail", "error")]
            checks = f"; {len(failed)} of {len(self.findings)} checks FAILED" if failed else ""
            if self.comparison.get("mode") == "bitwise":
                return f"{self.target}: deterministic ({len(self.tensors)} tensors, {self.compared} bitwise-equal){checks}"
            return f"{self.target}: deterministic within {self.comparison}{checks}"
        parts = [f"{self.target}: NOT deterministic"]
        if self.first_divergence is not None:
            parts.append(self.first_divergence.message or f"first divergence at step {self.first_divergence.step}, tensor {self.first_divergence.tensor}")
        if self.cause is not None:
            parts.append(f"likely cause: {self.cause.kind} ({self.cause.detail})")
        return "; ".join(parts)

    def tensor_diff_lines(self, heading: str) -> list:
        """The differing tensors, at most ten, one line each, under "<n> of <total> <heading>"."""
        diffs = self.differing_tensors
        if not diffs:
            return []
        lines = [f"{len(diffs)} of {len(self.tensors)} {heading}"]
        for t in diffs[:10]:
            if t.status == "different":
                lines.append(f"  {t.name} {t.dtype}{t.shape}: max|diff|={t.max_abs_diff:.3g} max_ulp={t.max_ulp} "
                             f"differing={t.fraction_differing:.1%}")
            else:
                lines.append(f"  {t.name}: {t.status}")
        if len(diffs) > 10:
            lines.append(f"  ... and {len(diffs) - 10} more")
        return lines

    def explain(self) -> str:
        """A multi-line human explanation used by ``assert_deterministic`` and the terminal."""
        lines = [self.summary_line()]
        if self.error is not None and self.error.traceback:
            lines.append(f"--- replica {self.error.replica} traceback ---")
            lines.append(self.error.traceback.rstrip())
        lines.extend(self.tensor_diff_lines("tensors differ:"))
        if self.nondeterministic_ops:
            lines.append("nondeterministic ops seen (deterministic-algorithms warn_only pass):")
            for op in self.nondeterministic_ops[:10]:
                lines.append(f"  {op.op} at {op.call_site} (x{op.count})")
        for f in self.findings:
            if f.verdict != "pass":
                lines.append(f"[{f.check}] {f.verdict}: {f.message}")
        return "\n".join(lines)

    def assert_deterministic(self) -> "AuditResult":
        """Fail the calling test with the explanation unless the replicas matched and no check failed."""
        if self.error is not None or not self.deterministic or any(f.verdict in ("fail", "error") for f in self.findings):
            import pytest

            pytest.fail(self.explain(), pytrace=False)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, trajectory=None))
        d.pop("trajectory")
        d = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "verdict": self.verdict, **d}
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> "AuditResult":
        d = dict(d)
        for k in ("schema", "version", "verdict"):
            d.pop(k, None)
        fd = d.get("first_divergence")
        d["first_divergence"] = Divergence(**fd) if fd else None
        d["cause"] = Cause(**d["cause"]) if d.get("cause") else None
        d["error"] = AuditError(**d["error"]) if d.get("error") else None
        d["tensors"] = [TensorDiff(**t) for t in d.get("tensors", [])]
        d["nondeterministic_ops"] = [NondeterministicOp(**o) for o in d.get("nondeterministic_ops", [])]
        d["replicas"] = [ReplicaSummary(**r) for r in d.get("replicas", [])]
        d["findings"] = [Finding(**f) for f in d.get("findings", [])]
        return cls(**d)


def _jsonable(x: Any) -> Any:
    """Make floats JSON-safe (NaN/inf as strings) and tuples lists, recursively."""
    import math

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)
