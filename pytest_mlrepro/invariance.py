"""The invariance matrix (option ``invariant``): one extra replica per axis, replica 0's run with that
axis changed (more or fewer intra-op threads, another PYTHONHASHSEED, file listings reversed, the
clock far ahead), compared with replica 0. Each axis is a ``Finding``: pass when the result is
unchanged (within the axis's tolerance), fail with the first step and tensor where it changed."""
from __future__ import annotations

from typing import Optional

from . import checks, localize
from .errors import ReplicaError
from .result import Finding
from .runner import ReplicaOutput
from .seeding import replica_hash_seed

AXIS_CHANGE = {"threads": "a different intra-op thread count", "hashseed": "another PYTHONHASHSEED",
               "listing-order": "file listings (os.listdir, os.scandir, glob) reversed",
               "clock": "the clock 400 days ahead"}
LABEL = "invariant"  # folders invariant-<axis>-0, progress lines


def _cell(axis: str, tolerance: Optional[float], verdict: str, message: str, **details) -> Finding:
    return Finding(checks.INVARIANCE, verdict, f"invariance to {axis} ({AXIS_CHANGE[axis]}): {message}",
                   {"axis": axis, "tolerance": tolerance, **details})


def invariance_findings(run, axes: tuple) -> list:
    """One finding per axis. ``run`` is the audit's ``_Audit`` (its replicas have run)."""
    result = run.result
    if not result.deterministic:
        return [_cell(a, t, "skip", "not measured: the replicas already differ without it") for a, t in axes]
    cells, calls = {}, []
    for axis, tol in axes:
        if axis == "hashseed" and run._hash_seed(0) is None:
            cells[axis] = _cell(axis, tol, "skip", "not measured: needs process isolation and no PYTHONHASHSEED set "
                                "in the environment")
            continue
        kw = {"perturb": frozenset({axis})}
        if axis == "hashseed":
            kw["hash_seed"] = replica_hash_seed(result.seed, 10_007)  # no replica's
        calls.append((axis, tol, (0, f"{LABEL}-{axis}", kw)))
    try:
        outputs = run._run_all([c for _, _, c in calls])
    except ReplicaError as exc:
        outputs = None
        for axis, tol, _ in calls:
            cells[axis] = _cell(axis, tol, "error", f"the extra replica failed: {exc}")
    if outputs is not None:
        base = ReplicaOutput(0, run.root / "replica-0" / "out")
        for (axis, tol, _), out in zip(calls, outputs):
            cells[axis] = _compare(axis, tol, base, out, result.comparison)
    return [cells[a] for a, _ in axes]


def _compare(axis: str, tol: Optional[float], base: ReplicaOutput, out: ReplicaOutput, comparison: dict) -> Finding:
    from .compare import compare_state_files

    how = comparison if tol is None else {"mode": "tolerance", "atol": tol, "rtol": 0.0, "max_ulp": 0}
    compared = compare_state_files(base.weights_path, out.weights_path, **how)
    td = localize.first_divergence(base.trace(), out.trace())
    step = None if td is None else td.step
    differing = [d for d in compared.diffs if not d.equal]
    if compared.equal:
        note = "" if td is None else f" (within the tolerance; bitwise different from step {step})"
        return _cell(axis, tol, "pass", f"result unchanged{note}", changed=False, step=step)
    first = differing[0]
    where = f"changed at step {step}" if step is not None else "the final weights changed"
    size = f", max|diff|={first.max_abs_diff:.3g}" if first.max_abs_diff is not None else ""
    count = f"{len(differing)} of {len(compared.diffs)} tensors"
    return _cell(axis, tol, "fail", f"{where} (`{first.name}`{size}; {count})",
                 changed=True, step=step, tensor=first.name, max_abs_diff=first.max_abs_diff)
