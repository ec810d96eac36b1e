"""Publish a whole audit session: plots, W&B runs (and report), the JSON report, in that order.

The one entry point the plugin and the CLI call. It never raises because of W&B and never waits
on a network beyond the configured timeouts: W&B and plot problems become warnings in the returned
``PublishOutcome``, which the terminal summary prints. A JSON report that cannot be written is an
error instead (``PublishOutcome.errors``): CI gates on that file, so the run must exit non-zero.
The JSON report is written last so it can say where everything else went.
"""
from __future__ import annotations

import datetime as _dt
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import PublishConfig, PublishError


@dataclass
class PublishOutcome:
    """What ``publish_session`` wrote, and what it could not.

    ``warnings`` never change a verdict or the exit status (W&B, plots). ``errors`` must make the run
    exit non-zero: the JSON report, which CI reads, could not be written.
    """

    session_id: str
    report_path: Optional[Path] = None
    plots_dir: Optional[Path] = None
    plots: dict = field(default_factory=dict)  # target -> [Path, ...] written on disk, every audit of it in order
    wandb_mode: str = "disabled"
    wandb_runs: list = field(default_factory=list)  # list[WandbRun]
    report_spec_path: Optional[Path] = None
    report_url: Optional[str] = None
    warnings: list = field(default_factory=list)  # list[str]
    errors: list = field(default_factory=list)  # list[str]: failures that must fail the run

    @property
    def ok(self) -> bool:
        """False when the run must exit non-zero because of publishing (see ``errors``)."""
        return not self.errors

    @property
    def run_dirs(self) -> list:
        return [r.run_dir for r in self.wandb_runs]

    def outputs(self) -> dict:
        """The report's ``outputs`` block (see docs/report-schema.md)."""
        return {
            "plots": {t: [str(p) for p in ps] for t, ps in self.plots.items()},
            "wandb_runs": [r.to_dict() for r in self.wandb_runs],
            "wandb_report_spec": str(self.report_spec_path) if self.report_spec_path else None,
            "wandb_report_url": self.report_url,
            "warnings": list(self.warnings),
        }


def git_state(cwd=None, timeout: float = 5.0) -> dict:
    """``{"sha": HEAD or None, "dirty": bool or None}``; None where git is missing or not a repo."""
    def git(*args) -> Optional[str]:
        try:
            p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"sha": sha.strip(), "dirty": None if status is None else bool(status.strip())}


def new_session_id() -> str:
    return "mlrepro-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _write_plots(results, out_dir: Path, outcome: PublishOutcome) -> list:
    """Each audit's PNGs under its own stem (``naming.audit_names``), so a target audited twice gets
    two sets; returns them per result (for its W&B run) and collects them per target in ``outcome``."""
    from .naming import audit_names
    from .plots import plot_metrics, plot_step_divergence

    per_audit = []
    for r, name in zip(results, audit_names(results)):
        paths = []
        for fn in (plot_metrics, plot_step_divergence):
            try:
                p = fn(r, out_dir, stem=name.slug)
            except PublishError as e:
                outcome.warnings.append(f"plot {fn.__name__} for {name.label} not written: {e}")
                continue
            except Exception as e:  # a plot must never cost the verdict
                outcome.warnings.append(f"plot {fn.__name__} for {name.label} failed: {type(e).__name__}: {e}")
                continue
            if p is not None:
                paths.append(p)
        if paths:
            outcome.plots.setdefault(r.target, []).extend(paths)
        per_audit.append(paths)
    return per_audit


def publish_session(results: list, config: PublishConfig, *, session_info: Optional[dict] = None) -> PublishOutcome:
    """Write plots, W&B runs and the JSON report for ``results`` as ``config`` asks.

    ``session_info`` (id, command, rootdir, seed, options, ...) goes into the report's session
    block and the runs' config; ``session_info["id"]`` (else ``config.group``, else a fresh id)
    names the W&B group. Never raises for W&B or plotting problems (they are ``warnings``); a report
    that cannot be written is an entry in ``errors`` (check the path early with
    ``json_report.check_report_path``, which creates its folder).
    """
    results = list(results)
    info = dict(session_info or {})
    session_id = str(config.group or info.get("id") or new_session_id())
    info.setdefault("id", session_id)
    outcome = PublishOutcome(session_id=session_id)
    git = info.get("git") if isinstance(info.get("git"), dict) else git_state(info.get("rootdir"))
    info["git"] = git

    # 1. Plots: on disk where asked; into a scratch folder when only W&B wants them.
    mode, _ = config.effective_wandb_mode()
    plots_dir = config.resolved_plots_dir()
    if plots_dir is not None:
        from .plots import ensure_plots_dir

        try:
            ensure_plots_dir(plots_dir)
        except PublishError as e:
            outcome.warnings.append(f"plots not written to disk: {e}")
            plots_dir = None
    scratch = None
    if plots_dir is None and mode != "disabled":
        scratch = Path(tempfile.mkdtemp(prefix="mlrepro-plots-"))
    try:
        target_dir = plots_dir or scratch
        wandb_plots: list = []  # per result, the PNGs its W&B run logs
        if target_dir is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                outcome.warnings.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
            else:
                wandb_plots = _write_plots(results, target_dir, outcome)
        if plots_dir is not None and outcome.plots:
            outcome.plots_dir = plots_dir
        elif scratch is not None:
            outcome.plots = {}

        # 2. W&B runs, then the report (online) or its spec (offline).
        from .wandb_publish import publish_to_wandb

        try:
            wb = publish_to_wandb(results, config, session_id=session_id, session_info=info, git=git, plots=wandb_plots)
        except Exception as e:  # never let W&B cost the JSON report below
            from .wandb_publish import WandbOutcome

            wb = WandbOutcome(warnings=[f"W&B publishing failed: {type(e).__name__}: {e}; verdicts are unaffected"])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    outcome.wandb_mode = wb.mode
    outcome.wandb_runs = wb.runs
    outcome.warnings.extend(wb.warnings)
    if wb.runs:
        _publish_report(results, wb, config, session_id, outcome)

    # 3. The JSON report, last, so it records the rest.
    if config.report_path is not None:
        _write_json_report(results, info, config.report_path, outcome)
    return outcome


def _write_json_report(results, info: dict, path: Path, outcome: PublishOutcome) -> None:
    """Write the report (atomically); any failure is an error, since CI reads nothing else."""
    from .json_report import build_report, write_report

    try:
        report = build_report(results, info, outputs=outcome.outputs())
        outcome.report_path = write_report(path, report)
    except PublishError as e:
        outcome.errors.append(f"JSON report not written: {e}")
    except Exception as e:  # an unexpected failure still must not pass for a written report
        outcome.errors.append(f"JSON report not written: cannot write the report {path}: {type(e).__name__}: {e}")


def _publish_report(results, wb, config: PublishConfig, session_id: str, outcome: PublishOutcome) -> None:
    try:
        from .wandb_report_spec import build_spec, create_report, save_spec, spec_path

        spec = build_spec(results, wb.runs, config, session_id=session_id)
        if wb.mode == "online":
            try:
                outcome.report_url = create_report(spec, timeout=config.init_timeout)
                return
            except PublishError as e:
                outcome.warnings.append(f"W&B report not created: {e}; its spec is saved for `mlrepro publish`")
        outcome.report_spec_path = save_spec(spec, spec_path(config, session_id))
    except Exception as e:
        outcome.warnings.append(f"W&B report spec not saved: {type(e).__name__}: {e}")

