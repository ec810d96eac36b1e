"""What a person reads at the end of a pytest run, and the properties CI dashboards read.

``summary_lines`` is the ``pytest_terminal_summary`` table (target, check, verdict, first
divergence, cause: one row per audit and one per finding) followed by where results were
published and any publishing warnings. ``junit_properties`` is for ``item.user_properties`` so
JUnit XML carries the verdicts.
"""
from __future__ import annotations


HEADERS = ("target", "check", "verdict", "first divergence", "cause")
AUDIT_CHECK = "determinism"
_MAX_WIDTHS = (48, 28, 16, 56, 60)


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def first_divergence_text(result) -> str:
    """``step 3, net.0.weight (forward, net.1: Dropout)``, or "" when there is none."""
    fd = result.first_divergence
    if fd is None:
        return ""
    parts = []
    if fd.step is not None:
        parts.append(f"step {fd.step}")
    if fd.tensor:
        parts.append(fd.tensor)
    text = ", ".join(parts) or (fd.message or "")
    where = [p for p in (fd.phase, f"{fd.module}: {fd.module_type}" if fd.module and fd.module_type else fd.module) if p]
    if where:
        text += f" ({', '.join(where)})"
    return text


def cause_text(result) -> str:
    if result.error is not None:
        return f"{result.error.type}: {result.error.message}"
    if result.cause is not None:
        return f"{result.cause.kind}: {result.cause.detail}"
    return ""


def table_rows(results) -> list:
    """The table's rows as tuples of strings (untruncated)."""
    rows = []
    for r in results:
        if getattr(r, "kind", "audit") != "checks" or r.error is not None or not r.findings:
            check = AUDIT_CHECK if getattr(r, "kind", "audit") != "checks" else "checks"
            rows.append((r.target, check, r.verdict, first_divergence_text(r), cause_text(r)))
        for f in r.findings:
            rows.append((r.target, f.check, f.verdict, "", f.message if f.verdict != "pass" else ""))
    return rows


def summary_lines(results, outcome=None) -> list:
    """The terminal summary: an aligned table, then outputs written and warnings (if any)."""
    results = list(results)
    lines: list = []
    if results:
        rows = [tuple(_cut(c, w) for c, w in zip(row, _MAX_WIDTHS)) for row in table_rows(results)]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*HEADERS).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt.format(*row).rstrip() for row in rows)
        counts: dict = {}
        for r in results:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        lines.append(f"{len(results)} audit(s): " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    if outcome is not None:
        lines.extend(outcome_lines(outcome))
    return lines


def outcome_lines(outcome) -> list:
    """Where results went (report, plots, W&B runs and how to sync them), publishing warnings, and
    publishing errors (the report could not be written: the run fails).

    Reads attributes leniently, so a caller's stand-in outcome carrying only ``warnings`` works.
    """
    lines = []
    report_path = getattr(outcome, "report_path", None)
    if report_path is not None:
        lines.append(f"JSON report: {report_path}")
    plots = getattr(outcome, "plots", None) or {}
    n_plots = sum(len(v) for v in plots.values())
    if n_plots and getattr(outcome, "plots_dir", None) is not None:
        lines.append(f"plots: {n_plots} PNG(s) in {outcome.plots_dir}")
    runs = getattr(outcome, "wandb_runs", None) or []
    for run in runs:  # the run's name tells apart two audits of one target
        lines.append(f"W&B run ({run.mode}) for {getattr(run, 'name', None) or run.target}: {run.url or run.run_dir}")
    offline = [r for r in runs if r.mode == "offline"]
    if offline:
        lines.append(f"upload the offline W&B runs with: wandb sync {offline[0].run_dir.parent}/offline-run-*")
    spec = getattr(outcome, "report_spec_path", None)
    if spec is not None:
        lines.append(f"W&B report spec saved: {spec} (after `wandb sync`, create the report with: mlrepro publish {spec})")
    if getattr(outcome, "report_url", None):
        lines.append(f"W&B report: {outcome.report_url}")
    for w in getattr(outcome, "warnings", None) or []:
        lines.append(f"WARNING: {w}")
    for e in getattr(outcome, "errors", None) or []:  # last, where the eye lands: these fail the run
        lines.append(f"ERROR: {e}")
    return lines


def junit_properties(result) -> list:
    """``(name, value)`` string pairs for ``item.user_properties``; names start with ``mlrepro.``."""
    kind = getattr(result, "kind", "audit")
    props = [
        ("mlrepro.target", result.target),
        ("mlrepro.kind", kind),
        ("mlrepro.verdict", result.verdict),
    ]
    if kind != "checks":
        props += [
            ("mlrepro.deterministic", "true" if result.deterministic else "false"),
            ("mlrepro.seed", str(result.seed)),
            ("mlrepro.runs", str(result.runs)),
            ("mlrepro.device", result.device),
            ("mlrepro.compared", result.compared),
            ("mlrepro.tensors_compared", str(len(result.tensors))),
            ("mlrepro.tensors_differing", str(len(result.differing_tensors))),
        ]
    fd = result.first_divergence
    if fd is not None:
        if fd.step is not None:
            props.append(("mlrepro.first_divergence.step", str(fd.step)))
        if fd.tensor:
            props.append(("mlrepro.first_divergence.tensor", fd.tensor))
        if fd.phase:
            props.append(("mlrepro.first_divergence.phase", fd.phase))
        if fd.module:
            props.append(("mlrepro.first_divergence.module", fd.module))
    if result.cause is not None:
        props.append(("mlrepro.cause", result.cause.kind))
        props.append(("mlrepro.cause.detail", result.cause.detail))
    if result.error is not None:
        props.append(("mlrepro.error", f"{result.error.type}: {result.error.message}"))
    for f in result.findings:
        props.append((f"mlrepro.check.{f.check}", f.verdict))
    return props
