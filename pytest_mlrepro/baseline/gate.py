"""The regression gate of one test: compare its audits with the stored baseline, write what the user
asked for (a missing baseline, an update, an ``.obtained`` file on a mismatch) and say whether the
test passes. Each audit gets a ``baseline.regression`` finding, so the verdict reaches the terminal
summary, the JSON report and W&B like every other check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..checks import BASELINE
from ..result import Finding
from . import store
from .compare import BaselineComparison, compare
from .record import AuditBaseline, Baseline, BaselineError

CHECK, UPDATE, UPDATE_ALL = "check", "update", "update_all"


@dataclass
class GateOutcome:
    path: Path
    passed: bool
    message: str
    written: Optional[str] = None  # "baseline" | "obtained" | None
    comparisons: list = field(default_factory=list)  # list[Optional[BaselineComparison]]


def _table(comparisons: list) -> list[str]:
    rows = [(c_index, m) for c_index, c in enumerate(comparisons) if c for m in c.metrics]
    if not rows:
        return []
    lines = ["  audit  metric            at          baseline              obtained"]
    for i, m in rows[:20]:
        lines.append(f"  {i:<5}  {m.metric[:16]:<16}  {m.at[:10]:<10}  {str(m.baseline)[:20]:<20}  {str(m.obtained)[:20]}")
    if len(rows) > 20:
        lines.append(f"  … {len(rows) - 20} more")
    return lines


def _finding(verdict: str, message: str, path: Path, c: Optional[BaselineComparison] = None, **extra) -> Finding:
    details = {"baseline_path": str(path), **extra}
    if c is not None:
        details.update({"comparison": c.comparison, "reason": c.reason, "first_step": c.first_step,
                        "first_step_after": c.first_step_after,
                        "first_tensor": c.first_tensor, "tensors": c.tensors[:20],
                        "metrics": [vars(m) for m in c.metrics[:50]], "epochs": {k: list(v) for k, v in c.epochs.items()}})
    return Finding(BASELINE, verdict, message, details)


def run_gate(results: list, *, test_id: str, path: Path, mode: str = CHECK,
             tolerances: Optional[dict] = None) -> Optional[GateOutcome]:
    """Gate the audits ``results`` of one test against the baseline at ``path`` (None: nothing to gate)."""
    audits = [r for r in results if r.kind == "audit"]
    if not audits:
        return None
    if any(r.error is not None for r in audits):
        return None  # the test fails on the error itself; a baseline of a failed run means nothing
    obtained = Baseline(test=test_id, audits=[AuditBaseline.from_result(r) for r in audits])
    try:
        stored = store.read(path)
        problem = None
    except BaselineError as exc:
        stored, problem = None, str(exc)
    if mode == UPDATE_ALL or (mode == UPDATE and (stored is None or problem)):
        store.write(path, obtained)
        store.remove_obtained(path)
        note = "rewritten" if mode == UPDATE_ALL and stored is not None else ("replaced an unusable one" if problem else "written")
        for r in audits:
            r.findings.append(_finding("pass", f"baseline {note}: {path}", path, updated=True))
        return GateOutcome(path, True, f"mlrepro baseline {note}: {path}", written="baseline")
    if problem:
        for r in audits:
            r.findings.append(_finding("error", problem, path))
        return GateOutcome(path, False, f"{problem}")
    if stored is None:
        store.write(path, obtained)
        for r in audits:
            r.findings.append(_finding("fail", f"no baseline yet: wrote {path}; the next run compares with it", path))
        return GateOutcome(path, False, f"no baseline yet for {test_id}: wrote {path} (commit it); the next run "
                           "compares with it", written="baseline")
    comparisons: list = []
    if len(stored.audits) != len(obtained.audits):
        message = f"the test ran {len(obtained.audits)} audit(s), its baseline {path} holds {len(stored.audits)}"
        comparisons = [None] * len(audits)
    else:
        comparisons = [compare(old, new, tolerances or {}) for old, new in zip(stored.audits, obtained.audits)]
        message = ("; ".join(f"audit {i} ({audits[i].target}): {c.message}" for i, c in enumerate(comparisons)
                             if not c.matched) if len(audits) > 1 else comparisons[0].message)
    if all(c is not None and c.matched for c in comparisons):
        store.remove_obtained(path)
        for r, c in zip(audits, comparisons):
            r.findings.append(_finding("pass", c.message, path, c))
        return GateOutcome(path, True, message, comparisons=comparisons)
    if mode == UPDATE:
        store.write(path, obtained)
        store.remove_obtained(path)
        for r, c in zip(audits, comparisons):
            r.findings.append(_finding("pass", f"baseline updated: {path} (was: {c.message if c else message})", path, c,
                                       updated=True))
        return GateOutcome(path, True, f"mlrepro baseline updated: {path} (was: {message})", written="baseline",
                           comparisons=comparisons)
    for r, c in zip(audits, comparisons):
        matched = c is not None and c.matched
        r.findings.append(_finding("pass" if matched else "fail", c.message if c else message, path, c))
    obtained_file = store.write_obtained(path, obtained)
    lines = [f"{test_id} {message}", *_table(comparisons),
             f"baseline {path}; this run written to {obtained_file}; accept it with --mlrepro-update"]
    return GateOutcome(path, False, "\n".join(lines), written="obtained", comparisons=comparisons)
