"""The session's W&B Report: a plain JSON spec, and the wandb-workspaces Report built from it.

Online, the report is created right after the runs. Offline, runs exist only on disk until
``wandb sync``, so the spec is saved beside them (``<wandb_dir>/wandb/mlrepro-report-<session>.json``)
and ``mlrepro publish SPEC`` creates the report later with ``create_report(load_spec(SPEC))``.
The spec is data, not pickled objects, so it survives package upgrades and can be read by people.
"""
from __future__ import annotations

import json
import re
import threading
import warnings
from pathlib import Path

from ..atomic import atomic_write_text
from typing import Optional

from ..result import _jsonable
from .config import PublishConfig, PublishError
from .terminal import cause_text, first_divergence_text

SPEC_SCHEMA = "pytest-mlrepro/wandb-report-spec"
SPEC_VERSION = 1
MEDIA_KEYS = ["plots/metrics", "plots/step_divergence"]


def build_spec(results, runs, config: PublishConfig, *, session_id: str) -> dict:
    """The report spec for a session: where its runs are, what to plot, the verdict table.

    Runs are matched to results by their ``audit`` index (a target audited twice has two runs),
    else by target; each audit carries its session-unique ``name``.
    """
    from .naming import audit_names

    results = list(results)
    run_of = _runs_by_audit(results, runs)
    metrics: list = []
    for res in results:
        for rep in res.replicas:
            for row in rep.metrics:
                for k in row:
                    if k not in ("step", "epoch") and k not in metrics:
                        metrics.append(k)
    x = "epoch" if any(row.get("epoch") is not None for res in results for rep in res.replicas for row in rep.metrics) else "train_step"
    return _jsonable({
        "schema": SPEC_SCHEMA,
        "version": SPEC_VERSION,
        "entity": config.entity,
        "project": config.project,
        "session": session_id,
        "title": (config.report_title or f"pytest-mlrepro audit {session_id}")[:128],
        "description": f"Determinism audit of {len(results)} target(s), session {session_id}.",
        "x_axis": x,
        "metrics": metrics,
        "media_keys": MEDIA_KEYS,
        "audits": [
            {
                "target": res.target,
                "name": name.label,
                "verdict": res.verdict,
                "first_divergence": first_divergence_text(res),
                "cause": cause_text(res),
                "findings": [[f.check, f.verdict] for f in res.findings],
                "run_id": run_of[i].run_id if i in run_of else None,
            }
            for i, (res, name) in enumerate(zip(results, audit_names(results)))
        ],
    })


def _runs_by_audit(results: list, runs) -> dict:
    """``{result index: run}``: by each run's ``audit`` index, else by target (first unclaimed)."""
    out: dict = {}
    for run in runs:
        i = getattr(run, "audit", None)
        if i is None:
            i = next((j for j, r in enumerate(results) if r.target == run.target and j not in out), None)
        if i is not None:
            out[i] = run
    return out


def spec_path(config: PublishConfig, session_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", session_id)
    return Path(config.wandb_dir) / "wandb" / f"mlrepro-report-{safe}.json"


def save_spec(spec: dict, path) -> Path:
    """Write the spec atomically beside the offline runs."""
    path = Path(path)
    if not path.parent.is_dir():
        raise PublishError(f"cannot save the W&B report spec {path}: folder {path.parent} does not exist")
    atomic_write_text(path, json.dumps(spec, indent=2) + "\n", fsync=False)
    return path


def load_spec(path) -> dict:
    """Read a saved spec; errors name the file and what is wrong."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PublishError(f"W&B report spec {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise PublishError(f"W&B report spec {path} is not JSON: {e}") from e
    if not isinstance(spec, dict) or spec.get("schema") != SPEC_SCHEMA or spec.get("version") != SPEC_VERSION:
        raise PublishError(f"{path} is not a {SPEC_SCHEMA} v{SPEC_VERSION} file")
    for key in ("project", "session", "title", "audits"):
        if key not in spec:
            raise PublishError(f"W&B report spec {path} lacks {key!r}")
    return spec


def _markdown_table(spec: dict) -> str:
    def cell(x) -> str:
        return str(x or "").replace("|", "\\|").replace("\n", " ")

    lines = ["| target | verdict | first divergence | cause | checks |", "|---|---|---|---|---|"]
    for a in spec["audits"]:
        checks = ", ".join(f"{c}: {v}" for c, v in a.get("findings", []))
        lines.append(f"| {cell(a.get('name') or a['target'])} | **{cell(a['verdict'])}** | {cell(a.get('first_divergence'))} | "
                     f"{cell(a.get('cause'))} | {cell(checks)} |")
    return "\n".join(lines)


def build_report(spec: dict, *, entity: Optional[str] = None):
    """A ``wandb_workspaces.reports.v2.Report`` for ``spec`` (not saved; no network needed).

    ``entity`` overrides the spec's; one of them must be set (``create_report`` asks the API for
    the default entity when both are missing).
    """
    with warnings.catch_warnings():  # its pydantic-v1-style validators warn at import; not the user's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr

    entity = entity or spec.get("entity")
    if not entity:
        raise PublishError("the W&B report needs an entity (--mlrepro-wandb-entity, or log in to W&B)")
    runset = wr.Runset(entity=entity, project=spec["project"], name=f"session {spec['session']}",
                       filters=f"Config('session') = '{spec['session']}'")
    x = spec.get("x_axis") or "epoch"
    panels = [
        wr.LinePlot(title=m, x=x, y=[f"replica0/{m}", f"replica1/{m}"], title_x=x, title_y=m)
        for m in spec.get("metrics", [])
    ]
    panels.append(wr.MediaBrowser(title="plots", media_keys=list(spec.get("media_keys", MEDIA_KEYS)), num_columns=2))
    panels.append(wr.RunComparer(diff_only="split"))
    return wr.Report(
        project=spec["project"],
        entity=entity,
        title=spec["title"],
        description=spec.get("description", ""),
        blocks=[
            wr.H2(text="Verdicts"),
            wr.MarkdownBlock(text=_markdown_table(spec)),
            wr.H2(text="Runs"),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def create_report(spec: dict, *, timeout: float = 60.0) -> str:
    """Save the report to W&B and return its URL. Raises ``PublishError`` on failure or timeout.

    The save runs in a daemon thread so a dead network costs at most ``timeout`` seconds.
    """
    box: dict = {}

    def work() -> None:
        try:
            entity = spec.get("entity")
            if not entity:
                import wandb

                entity = wandb.Api(timeout=int(timeout)).default_entity
            box["url"] = build_report(spec, entity=entity).save().url
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    t = threading.Thread(target=work, name="mlrepro-wandb-report", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise PublishError(f"creating the W&B report {spec.get('title')!r} did not finish within {timeout:g} s")
    if "error" in box:
        e = box["error"]
        raise PublishError(f"creating the W&B report {spec.get('title')!r} failed: {type(e).__name__}: {e}") from e
    return box["url"]


def publish_report_spec(path, *, timeout: float = 60.0) -> str:
    """``mlrepro publish SPEC``: create the W&B Report of a saved spec (after ``wandb sync``); its URL."""
    return create_report(load_spec(path), timeout=timeout)
