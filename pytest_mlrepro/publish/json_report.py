"""The machine-readable session report CI reads (``--mlrepro-report PATH``).

One JSON document: a versioned envelope, the session block, what else was published, and one
``AuditResult.to_dict()`` per audit. The schema is documented field by field in
docs/report-schema.md; ``validate_report`` checks a document against it so readers (the CLI, CI
scripts, our tests) fail with a message naming the field instead of a KeyError later.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from ..atomic import atomic_write_text
from ..result import SCHEMA_NAME as AUDIT_SCHEMA_NAME
from ..result import SCHEMA_VERSION as AUDIT_SCHEMA_VERSION
from ..result import AuditResult, _jsonable
from .config import PublishError

REPORT_SCHEMA = "pytest-mlrepro/report"
REPORT_VERSION = 1
VERDICTS = ("deterministic", "pass", "nondeterministic", "failed-checks", "error")
PASSING = ("deterministic", "pass")  # audits that matched; checks-only results whose checks passed
KINDS = ("audit", "checks")
FINDING_VERDICTS = ("pass", "fail", "error", "skip", "warn")  # warn: worth a look, never fails a test


def _package_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("pytest-mlrepro")
    except PackageNotFoundError:
        return None
    except Exception:  # pragma: no cover - broken metadata must not break a report
        return None


def verdict_counts(results: Iterable[AuditResult]) -> dict:
    """How many audits got each verdict (every verdict present, zeros included)."""
    counts = {v: 0 for v in VERDICTS}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    counts["total"] = sum(counts[v] for v in VERDICTS)
    return counts


def build_report(results: list, session_info: Optional[dict] = None, *, outputs: Optional[dict] = None) -> dict:
    """The report document for ``results``.

    ``session_info`` (free keys from the caller: id, command, rootdir, seed, options, git, ...) is
    copied into ``session``; ``created_at``, ``pytest_mlrepro_version``, ``counts`` and ``ok`` are
    computed here and win over caller keys of the same name. ``outputs`` says what else was
    published (plots, W&B runs, warnings); see docs/report-schema.md.
    """
    results = list(results)
    for i, r in enumerate(results):
        if not isinstance(r, AuditResult):
            raise PublishError(f"report entry {i} is a {type(r).__name__}, not an AuditResult")
    counts = verdict_counts(results)
    session = dict(session_info or {})
    session.update(
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        pytest_mlrepro_version=_package_version(),
        counts=counts,
        ok=all(r.verdict in PASSING for r in results),
    )
    out = {"plots": {}, "wandb_runs": [], "wandb_report_spec": None, "wandb_report_url": None, "warnings": []}
    out.update(outputs or {})
    return _jsonable(
        {
            "schema": REPORT_SCHEMA,
            "version": REPORT_VERSION,
            "session": session,
            "outputs": out,
            "audits": [r.to_dict() for r in results],
        }
    )


def check_report_path(path: Path) -> None:
    """Prove at session start, before any audit, that the report can be written at the end.

    Creates missing parent folders, then creates and removes a temp file in the folder (``os.access``
    lies for root, read-only mounts and ACLs). Raises ``PublishError`` naming the path and the reason
    when the path is a folder or its folder cannot be created or written. Imports neither torch nor wandb.
    """
    path = Path(path)
    if path.is_dir():
        raise PublishError(f"report path {path} is a folder; give a file name such as {path / 'mlrepro-report.json'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PublishError(f"cannot write the report {path}: cannot create its folder {parent} ({_reason(e)})") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PublishError(f"cannot write the report {path}: its folder {parent} is not writable ({_reason(e)})") from e


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _refuse_unwritable(path: Path) -> None:
    """At write time nothing is created: a folder as path or a vanished folder is an error naming it."""
    if path.is_dir():
        raise PublishError(f"report path {path} is a folder; give a file name such as {path / 'mlrepro-report.json'}")
    if not path.parent.is_dir():
        raise PublishError(f"cannot write the report {path}: its folder {path.parent} does not exist "
                           "(check_report_path creates it at session start)")


def write_report(path, report: dict) -> Path:
    """Write ``report`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    A missing or unwritable folder, or a document that is not valid JSON, raises ``PublishError``
    and leaves nothing behind; an existing report is replaced only by a complete new one.
    """
    path = Path(path)
    _refuse_unwritable(path)
    try:
        text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise PublishError(f"the report for {path} is not valid JSON: {e}") from e
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise PublishError(f"cannot write the report {path}: {_reason(e)}") from e
    return path


def read_report(path) -> dict:
    """Load and validate a report; errors name the file and the offending field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PublishError(f"report {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise PublishError(f"report {path} is not JSON: {e}") from e
    problems = validate_report(doc)
    if problems:
        raise PublishError(f"report {path} does not follow {REPORT_SCHEMA} v{REPORT_VERSION}: " + "; ".join(problems))
    return doc


# --- validation ------------------------------------------------------------------------------

_NUM = (int, float, str)  # floats may be "nan" / "inf" / "-inf" strings (AuditResult._jsonable)


def _check(problems: list, where: str, value: Any, types, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        problems.append(f"{where}: expected {_tname(types)}, got bool")
    elif not isinstance(value, types):
        problems.append(f"{where}: expected {_tname(types)}, got {type(value).__name__}")


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _require(problems: list, where: str, d: dict, key: str, types, *, optional: bool = False) -> Any:
    if key not in d:
        problems.append(f"{where}.{key}: missing")
        return None
    _check(problems, f"{where}.{key}", d[key], types, optional=optional)
    return d[key]


def validate_report(doc: Any) -> list:
    """Problems with ``doc`` as a report (empty list: valid). Checks every documented field's type."""
    p: list = []
    if not isinstance(doc, dict):
        return [f"report: expected an object, got {type(doc).__name__}"]
    if doc.get("schema") != REPORT_SCHEMA:
        p.append(f"schema: expected {REPORT_SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("version") != REPORT_VERSION:
        p.append(f"version: expected {REPORT_VERSION}, got {doc.get('version')!r}")
    session = _require(p, "report", doc, "session", dict)
    if isinstance(session, dict):
        _require(p, "session", session, "created_at", str)
        _require(p, "session", session, "pytest_mlrepro_version", str, optional=True)
        _require(p, "session", session, "ok", bool)
        if "git" in session:
            git = _require(p, "session", session, "git", dict)
            if isinstance(git, dict):
                _require(p, "session.git", git, "sha", str, optional=True)
                _require(p, "session.git", git, "dirty", bool, optional=True)
        counts = _require(p, "session", session, "counts", dict)
        if isinstance(counts, dict):
            for k in VERDICTS + ("total",):
                _require(p, "session.counts", counts, k, int)
    outputs = _require(p, "report", doc, "outputs", dict)
    if isinstance(outputs, dict):
        plots = _require(p, "outputs", outputs, "plots", dict)
        for target, paths in (plots or {}).items():
            _check(p, f"outputs.plots[{target!r}]", paths, list)
        runs = _require(p, "outputs", outputs, "wandb_runs", list)
        for i, run in enumerate(runs or []):
            w = f"outputs.wandb_runs[{i}]"
            if not isinstance(run, dict):
                p.append(f"{w}: expected an object")
                continue
            for k in ("target", "run_id", "name", "mode", "run_dir"):
                _require(p, w, run, k, str)
            _require(p, w, run, "url", str, optional=True)
            _require(p, w, run, "artifact", str, optional=True)
        _require(p, "outputs", outputs, "wandb_report_spec", str, optional=True)
        _require(p, "outputs", outputs, "wandb_report_url", str, optional=True)
        warnings = _require(p, "outputs", outputs, "warnings", list)
        for i, w in enumerate(warnings or []):
            _check(p, f"outputs.warnings[{i}]", w, str)
    audits = _require(p, "report", doc, "audits", list)
    for i, a in enumerate(audits or []):
        _validate_audit(p, f"audits[{i}]", a)
    return p


def _validate_audit(p: list, w: str, a: Any) -> None:
    if not isinstance(a, dict):
        p.append(f"{w}: expected an object, got {type(a).__name__}")
        return
    if a.get("schema") != AUDIT_SCHEMA_NAME or a.get("version") != AUDIT_SCHEMA_VERSION:
        p.append(f"{w}: expected schema {AUDIT_SCHEMA_NAME!r} v{AUDIT_SCHEMA_VERSION}, got {a.get('schema')!r} v{a.get('version')!r}")
    verdict = _require(p, w, a, "verdict", str)
    if isinstance(verdict, str) and verdict not in VERDICTS:
        p.append(f"{w}.verdict: {verdict!r} is not one of {VERDICTS}")
    kind = _require(p, w, a, "kind", str)
    if isinstance(kind, str) and kind not in KINDS:
        p.append(f"{w}.kind: {kind!r} is not one of {KINDS}")
    _require(p, w, a, "test", str, optional=True)
    for k, t in (("target", str), ("seed", int), ("runs", int), ("device", str), ("isolation", str),
                 ("seeding", str), ("comparison", dict), ("deterministic", bool), ("compared", str),
                 ("environment", dict), ("tensors", list), ("nondeterministic_ops", list), ("replicas", list),
                 ("step_divergence", list), ("findings", list)):
        _require(p, w, a, k, t)
    _require(p, w, a, "wall_time_s", _NUM, optional=True)
    if "parallel_reason" in a:  # added within version 1 (parallel replicas on GPUs): older reports lack it
        _check(p, f"{w}.parallel_reason", a["parallel_reason"], str)
    if "nproc" in a:  # added within version 1 (DDP audits): older reports lack it
        _check(p, f"{w}.nproc", a["nproc"], int)
    if "final_fingerprints" in a:  # added within version 1: older reports lack it
        _check(p, f"{w}.final_fingerprints", a["final_fingerprints"], dict, optional=True)
    fd = _require(p, w, a, "first_divergence", dict, optional=True)
    if isinstance(fd, dict):
        _require(p, f"{w}.first_divergence", fd, "step", int, optional=True)
        _require(p, f"{w}.first_divergence", fd, "tensor", str, optional=True)
        _require(p, f"{w}.first_divergence", fd, "tensors", list)
        for k in ("phase", "module", "module_type"):
            _require(p, f"{w}.first_divergence", fd, k, str, optional=True)
        _require(p, f"{w}.first_divergence", fd, "inputs_matched", bool, optional=True)
        _require(p, f"{w}.first_divergence", fd, "message", str)
        if "evidence" in fd:
            _require(p, f"{w}.first_divergence", fd, "evidence", dict)
        if "rank" in fd:  # added within version 1 (DDP audits): older reports lack it
            _require(p, f"{w}.first_divergence", fd, "rank", int, optional=True)
    cause = _require(p, w, a, "cause", dict, optional=True)
    if isinstance(cause, dict):
        _require(p, f"{w}.cause", cause, "kind", str)
        _require(p, f"{w}.cause", cause, "detail", str)
        _require(p, f"{w}.cause", cause, "evidence", dict)
    err = _require(p, w, a, "error", dict, optional=True)
    if isinstance(err, dict):
        _require(p, f"{w}.error", err, "type", str)
        _require(p, f"{w}.error", err, "message", str)
        _require(p, f"{w}.error", err, "replica", int, optional=True)
        _require(p, f"{w}.error", err, "traceback", str)
    for j, t in enumerate(a.get("tensors") or []):
        tw = f"{w}.tensors[{j}]"
        if not isinstance(t, dict):
            p.append(f"{tw}: expected an object")
            continue
        _require(p, tw, t, "name", str)
        _require(p, tw, t, "status", str)
        for k in ("shape", "other_shape"):
            _require(p, tw, t, k, list, optional=True)
        for k in ("dtype", "other_dtype"):
            _require(p, tw, t, k, str, optional=True)
        for k in ("max_abs_diff", "fraction_differing"):
            _require(p, tw, t, k, _NUM, optional=True)
        for k in ("max_ulp", "numel"):
            _require(p, tw, t, k, int, optional=True)
    for j, o in enumerate(a.get("nondeterministic_ops") or []):
        ow = f"{w}.nondeterministic_ops[{j}]"
        if isinstance(o, dict):
            _require(p, ow, o, "op", str)
            _require(p, ow, o, "call_site", str)
            _require(p, ow, o, "count", int)
        else:
            p.append(f"{ow}: expected an object")
    for j, r in enumerate(a.get("replicas") or []):
        rw = f"{w}.replicas[{j}]"
        if not isinstance(r, dict):
            p.append(f"{rw}: expected an object")
            continue
        _require(p, rw, r, "index", int)
        _require(p, rw, r, "wall_time_s", _NUM, optional=True)
        _require(p, rw, r, "steps", int)
        _require(p, rw, r, "seeding", dict, optional=True)
        _require(p, rw, r, "environment", dict)
        _require(p, rw, r, "losses", list)
        metrics = _require(p, rw, r, "metrics", list)
        for k, m in enumerate(metrics or []):
            if not isinstance(m, dict):
                p.append(f"{rw}.metrics[{k}]: expected an object")
    for j, s in enumerate(a.get("step_divergence") or []):
        sw = f"{w}.step_divergence[{j}]"
        if not isinstance(s, dict):
            p.append(f"{sw}: expected an object")
            continue
        _require(p, sw, s, "step", int)
        _require(p, sw, s, "max_abs_diff_sampled", _NUM, optional=True)
        _require(p, sw, s, "tensors_differing", int)
    for j, f in enumerate(a.get("findings") or []):
        fw = f"{w}.findings[{j}]"
        if not isinstance(f, dict):
            p.append(f"{fw}: expected an object")
            continue
        _require(p, fw, f, "check", str)
        v = _require(p, fw, f, "verdict", str)
        if isinstance(v, str) and v not in FINDING_VERDICTS:
            p.append(f"{fw}.verdict: {v!r} is not one of {FINDING_VERDICTS}")
        _require(p, fw, f, "message", str)
        _require(p, fw, f, "details", dict)
