"""One W&B run per audited target: config, both replicas' history, difference tables, findings,
the best checkpoint as a ``model`` artifact, and the plots.

W&B is optional and never allowed to break or stall an audit: wandb is imported lazily, every
problem (not installed, disabled, bad project name, unwritable dir, no network) becomes a warning
string, ``wandb.init`` / ``finish`` run under short timeouts, and a run that fails half-way is
removed from disk so ``wandb sync`` never uploads half a run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..result import _jsonable
from .config import PublishConfig
from ..envvars import patched_environ
from .findings import best_checkpoint, early_stop_epoch
from .plots import target_slug

_RESERVED_METRIC_KEYS = ("step", "epoch")


@dataclass
class WandbRun:
    """Where one target's run went."""

    target: str
    run_id: str
    name: str
    mode: str  # offline | online
    run_dir: Path
    url: Optional[str] = None
    artifact: Optional[str] = None  # "<name>:best" when the best checkpoint was logged

    def to_dict(self) -> dict:
        return {"target": self.target, "run_id": self.run_id, "name": self.name, "mode": self.mode,
                "run_dir": str(self.run_dir), "url": self.url, "artifact": self.artifact}


@dataclass
class WandbOutcome:
    runs: list = field(default_factory=list)  # list[WandbRun]
    warnings: list = field(default_factory=list)  # list[str]
    mode: str = "disabled"  # the mode really used


# --- what gets logged (pure functions: the tests compare the offline run against the result) ---


def run_config(result, *, session_id: str, session_info: Optional[dict], git: dict) -> dict:
    """The run's config: how the audit ran, on what, from which commit."""
    info = session_info or {}
    return _jsonable({
        "target": result.target,
        "kind": result.kind,
        "test": result.test,
        "seed": result.seed,
        "runs": result.runs,
        "device": result.device,
        "isolation": result.isolation,
        "seeding": result.seeding,
        "compared": result.compared,
        "comparison": result.comparison,
        "options": info.get("options", {}),
        "environment": result.environment,
        "git": {"sha": git.get("sha"), "dirty": git.get("dirty")},
        "session": session_id,
    })


def history_rows(result) -> list:
    """Both replicas' logged metrics merged into rows ``{"epoch", "train_step", "replica<i>/<metric>"}``.

    Rows are keyed by (step, epoch) so replicas that stopped at different points still line up;
    ordered by step when every row has one, else by epoch, else by position.
    """
    replicas = [r for r in result.replicas if r.metrics]
    all_rows = [m for r in replicas for m in r.metrics]
    if not all_rows:
        return []
    by_step = all(m.get("step") is not None for m in all_rows)
    by_epoch = all(m.get("epoch") is not None for m in all_rows)
    merged: dict = {}
    for r in replicas:
        for i, m in enumerate(r.metrics):
            if by_step or by_epoch:
                key = (m.get("step") if by_step else 0, m.get("epoch") if by_epoch else 0)
            else:
                key = (i, 0)
            row = merged.setdefault(key, {})
            if m.get("epoch") is not None:
                row["epoch"] = m["epoch"]
            if m.get("step") is not None:
                row["train_step"] = m["step"]
            for k, v in m.items():
                if k not in _RESERVED_METRIC_KEYS and v is not None:
                    row[f"replica{r.index}/{k}"] = v
    return [merged[k] for k in sorted(merged)]


def run_summary(result) -> dict:
    """Verdicts and the best-epoch metrics (``best_<metric>``); the history adds last values itself."""
    s: dict = {"verdict": result.verdict}
    if result.kind != "checks":  # a checks-only result compared no replicas
        s.update(deterministic=result.deterministic, tensors_compared=len(result.tensors),
                 tensors_differing=len(result.differing_tensors))
    fd = result.first_divergence
    if fd is not None:
        s["first_divergence_step"] = fd.step
        s["first_divergence_tensor"] = fd.tensor
        s["first_divergence_phase"] = fd.phase
        s["first_divergence_module"] = fd.module
    if result.cause is not None:
        s["cause"] = result.cause.kind
        s["cause_detail"] = result.cause.detail
    if result.error is not None:
        s["error"] = f"{result.error.type}: {result.error.message}"
    for f in result.findings:
        s[f"check/{f.check}"] = f.verdict
    best = best_checkpoint(result)
    if best is not None:
        s["best_epoch"] = best.best_epoch
        if best.monitor:
            s["best_monitor"] = best.monitor
        if best.mode:
            s["best_mode"] = best.mode
        for k, v in best.recorded_metrics.items():
            s[f"best_{k}"] = v
        if not best.is_best:
            s["checkpoint_epoch"] = best.checkpoint_epoch
    stop = early_stop_epoch(result)
    if stop is not None:
        s["early_stop_epoch"] = stop
    return {k: v for k, v in s.items() if v is not None}


TENSOR_COLUMNS = ["tensor", "status", "dtype", "shape", "other_shape", "max_abs_diff", "max_ulp",
                  "fraction_differing", "numel", "in_first_divergence"]
DIVERGENCE_COLUMNS = ["step", "tensor", "tensors", "phase", "module", "module_type", "inputs_matched",
                      "message", "cause", "cause_detail"]
FINDING_COLUMNS = ["check", "verdict", "message", "details"]
STEP_COLUMNS = ["step", "max_abs_diff_sampled", "tensors_differing"]


def _s(x) -> Optional[str]:
    return None if x is None else str(x)


def table_rows(result) -> dict:
    """The rows of each W&B table, by table key (only tables with rows)."""
    fd = result.first_divergence
    first = set(fd.tensors or ([fd.tensor] if fd and fd.tensor else [])) if fd else set()
    tables = {}
    if result.tensors:
        tables["tensor_diffs"] = (TENSOR_COLUMNS, [
            [t.name, t.status, _s(t.dtype), _s(t.shape), _s(t.other_shape), t.max_abs_diff, t.max_ulp,
             t.fraction_differing, t.numel, t.name in first]
            for t in result.tensors
        ])
    if fd is not None:
        c = result.cause
        tables["first_divergence"] = (DIVERGENCE_COLUMNS, [[
            fd.step, fd.tensor, ", ".join(fd.tensors), fd.phase, fd.module, fd.module_type,
            _s(fd.inputs_matched), fd.message, c.kind if c else None, c.detail if c else None,
        ]])
    if result.findings:
        tables["findings"] = (FINDING_COLUMNS, [
            [f.check, f.verdict, f.message, json.dumps(_jsonable(f.details), sort_keys=True)] for f in result.findings
        ])
    if result.step_divergence:
        tables["step_divergence"] = (STEP_COLUMNS, [
            [d.get("step"), d.get("max_abs_diff_sampled"), d.get("tensors_differing")] for d in result.step_divergence
        ])
    return tables


def artifact_name(target: str) -> str:
    """A valid artifact name (letters, digits, ``-_.``; at most 128 chars) unique per target."""
    return f"best-{target_slug(target)}"


def artifact_metadata(result) -> Optional[dict]:
    """The checkpoint artifact's metadata: the logged metrics of the epoch the file holds, which are
    exactly the metrics at the best epoch when the file is the best (it is aliased ``best`` then)."""
    best = best_checkpoint(result)
    return None if best is None else _jsonable(dict(best.checkpoint_metrics if not best.is_best else best.recorded_metrics))


# --- talking to wandb ------------------------------------------------------------------------


def _quiet_wandb_env():
    """Keep wandb from printing into pytest's output while we publish; restore the caller's env."""
    return patched_environ({"WANDB_SILENT": "true", "WANDB_CONSOLE": "off"})


def check_wandb_dir(path: Path) -> Optional[str]:
    """Why runs cannot be written under ``path`` (None when they can). wandb itself would silently
    fall back to the system temp dir, where nobody would look for them."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "wandb").mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mlrepro-probe-", dir=path / "wandb")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"the W&B dir {path} is not writable ({e.strerror or e})"
    return None


def _run_dirs(root: Path) -> set:
    try:
        return {p for p in (root / "wandb").iterdir() if p.is_dir() and "run-" in p.name}
    except OSError:
        return set()


def _settings(wandb, config: PublishConfig, mode: str):
    kw = dict(
        init_timeout=config.init_timeout,
        silent=True,
        quiet=True,
        show_info=False,
        show_warnings=False,
        console="off",
        x_disable_stats=True,
        disable_git=True,  # git SHA and dirty flag go into the config ourselves
        disable_job_creation=True,
        save_code=False,
        x_save_requirements=False,
    )
    if mode == "online":
        kw.update(finish_timeout=config.finish_timeout, finish_timeout_raises=True,
                  login_timeout=config.init_timeout, x_graphql_timeout_seconds=min(10.0, config.init_timeout))
    return wandb.Settings(**kw)


def publish_to_wandb(results, config: PublishConfig, *, session_id: str, session_info: Optional[dict] = None,
                     git: Optional[dict] = None, plots: Optional[dict] = None) -> WandbOutcome:
    """Log one run per result. Never raises for W&B problems: they come back as warnings."""
    outcome = WandbOutcome()
    mode, why = config.effective_wandb_mode()
    outcome.mode = mode
    if mode == "disabled":
        if why:
            outcome.warnings.append(f"W&B publishing skipped: {why}")
        return outcome
    problem = config.project_problem()
    if problem:
        outcome.warnings.append(f"W&B publishing skipped: {problem} (--mlrepro-wandb-project)")
        outcome.mode = "disabled"
        return outcome
    problem = check_wandb_dir(Path(config.wandb_dir))
    if problem:
        outcome.warnings.append(f"W&B publishing skipped: {problem} (--mlrepro-wandb-dir)")
        outcome.mode = "disabled"
        return outcome
    already_loaded = "wandb" in sys.modules
    with _quiet_wandb_env():
        try:
            import wandb
        except ImportError:
            outcome.warnings.append("W&B publishing skipped: wandb is not installed (pip install wandb)")
            outcome.mode = "disabled"
            return outcome
        except Exception as e:  # a broken install must not fail the audit either
            outcome.warnings.append(f"W&B publishing skipped: importing wandb failed: {type(e).__name__}: {e}")
            outcome.mode = "disabled"
            return outcome
        unreachable = False
        for result in results:
            if unreachable:
                outcome.warnings.append(f"W&B run for {result.target} not published: the W&B server was unreachable")
                continue
            try:
                run = _publish_one(wandb, result, config, mode, session_id=session_id, session_info=session_info,
                                   git=git or {}, plots=(plots or {}).get(result.target, []), warnings=outcome.warnings)
            except Exception as e:
                unreachable = mode == "online" and _looks_like_network(e)
                outcome.warnings.append(_describe_failure(result.target, mode, config, e, unreachable))
                continue
            outcome.runs.append(run)
        if not already_loaded:
            # Nobody else in this process uses wandb: stop its service now rather than at exit.
            with contextlib.suppress(Exception):
                wandb.teardown()
    return outcome


def _looks_like_network(e: Exception) -> bool:
    """wandb reports a dead network as CommError / timeouts; anything else is a different problem."""
    text = str(e).lower()
    return type(e).__name__ in ("CommError", "TimeoutError") or any(
        w in text for w in ("timed out", "timeout", "connection refused", "connect:", "unreachable", "dial tcp"))


def _describe_failure(target: str, mode: str, config: PublishConfig, e: Exception, network: bool) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if network:
        return (f"W&B run for {target} not published: the W&B server was unreachable within "
                f"{config.init_timeout:g} s ({text}); verdicts are unaffected; "
                "use --mlrepro-wandb=offline and `wandb sync` later")
    return f"W&B run for {target} not published: {text}; verdicts are unaffected"


def _publish_one(wandb, result, config: PublishConfig, mode: str, *, session_id, session_info, git, plots,
                 warnings: list) -> WandbRun:
    root = Path(config.wandb_dir)
    before = _run_dirs(root)
    # Everything computed before init so a malformed result cannot leave a half-logged run.
    cfg = run_config(result, session_id=session_id, session_info=session_info, git=git)
    rows = history_rows(result)
    summary = run_summary(result)
    tables = table_rows(result)
    best = best_checkpoint(result)
    ckpt = None
    if best is not None and best.checkpoint_path:
        ckpt = Path(best.checkpoint_path)
        if not ckpt.is_file():
            warnings.append(f"W&B: best checkpoint {ckpt} of {result.target} (epoch {best.best_epoch}) does not exist; "
                            "no model artifact logged")
            ckpt = None
    run = None
    try:
        run = wandb.init(
            project=config.project,
            entity=config.entity,
            group=session_id,
            job_type=config.job_type,
            tags=list(config.tags),
            name=result.target[:128],
            config=cfg,
            dir=str(root),
            mode=mode,
            settings=_settings(wandb, config, mode),
            reinit="create_new",
        )
        if rows:
            step_key = "epoch" if all("epoch" in r for r in rows) else ("train_step" if all("train_step" in r for r in rows) else None)
            if step_key:
                run.define_metric(step_key)
                run.define_metric("replica*", step_metric=step_key)
            for row in rows:
                run.log(row)
        media = {key: wandb.Table(columns=cols, data=data, allow_mixed_types=True) for key, (cols, data) in tables.items()}
        for p in plots:
            kind = "step_divergence" if str(p).endswith("-step-divergence.png") else "metrics"
            media[f"plots/{kind}"] = wandb.Image(str(p), caption=f"{result.target}: {kind}")
        if media:
            run.log(media)
        for k, v in summary.items():
            run.summary[k] = v
        art_ref = None
        if ckpt is not None:
            if best.is_best:
                description = f"best checkpoint of {result.target}: epoch {best.best_epoch}"
            else:  # never alias as "best" a file the history shows is not
                description = (f"checkpoint saved as best by {result.target}, but it holds epoch "
                               f"{best.checkpoint_epoch}; the logged history's best is epoch {best.best_epoch}")
            art = wandb.Artifact(
                artifact_name(result.target),
                type="model",
                description=description + (f", monitor {best.monitor} ({best.mode})" if best.monitor else ""),
                metadata=artifact_metadata(result),
            )
            art.add_file(str(ckpt), name=ckpt.name)
            alias = "best" if best.is_best else "claimed-best"
            run.log_artifact(art, aliases=[alias])
            art_ref = f"{art.name}:{alias}"
        info = WandbRun(target=result.target, run_id=run.id, name=result.target[:128], mode=mode,
                        run_dir=Path(run.dir).parent, url=run.url if mode == "online" else None, artifact=art_ref)
        try:
            run.finish()
        except TimeoutError:
            # Online upload slower than finish_timeout: the run is complete on disk, only the upload is not.
            warnings.append(f"W&B upload of {result.target} did not finish within {config.finish_timeout:g} s; "
                            f"the run is kept in {info.run_dir}; upload it with `wandb sync {info.run_dir}`")
        run = None
        return info
    except BaseException:
        if run is not None:
            with contextlib.suppress(BaseException):
                run.finish(exit_code=1)
        for d in _run_dirs(root) - before:  # nothing half-written: a failed run leaves no dir to sync
            shutil.rmtree(d, ignore_errors=True)
        wandb_dir = root / "wandb"  # latest-run, debug.log, debug-internal.log may point into the removed run
        for entry in (wandb_dir.iterdir() if wandb_dir.is_dir() else ()):
            if entry.is_symlink() and not entry.exists():
                with contextlib.suppress(OSError):
                    entry.unlink()
        raise
