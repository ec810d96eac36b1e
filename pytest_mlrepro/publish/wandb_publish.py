"""One W&B run per audited target: config, both replicas' history, difference tables, findings,
the best checkpoint as a ``model`` artifact, and the plots.

W&B is optional and never allowed to break or stall an audit: wandb is imported lazily, every
problem (not installed, disabled, bad project name, unwritable dir, no network) becomes a warning
string, ``wandb.init`` / ``finish`` run under short timeouts, and a run that fails half-way is
removed from disk so ``wandb sync`` never uploads half a run. An online run that cannot start (the
server unreachable, no API key) is logged offline instead, with a warning naming the folder to
``wandb sync`` later, so the audit's data is never lost.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..envvars import patched_environ
from ..result import _jsonable
from .config import PublishConfig, PublishError
from .findings import best_checkpoint, early_stop_epoch
from .naming import AuditName, audit_names, target_slug

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
    audit: Optional[int] = None  # index of the result in the published list (not in the report)

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


def artifact_name(target: str, slug: Optional[str] = None) -> str:
    """A valid artifact name (letters, digits, ``-_.``; at most 128 chars) unique per audit.

    ``slug`` is the audit's ``AuditName.slug`` (default: the target's), so two audits of one target
    in a session log two artifacts instead of two versions fighting over the ``best`` alias.
    """
    return f"best-{slug or target_slug(target)}"


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
        # wandb reads WANDB_* once per process (wandb.setup) and ignores later changes; the server a run
        # talks to must be the one the environment names now, not the one an earlier wandb use saw.
        if os.environ.get("WANDB_BASE_URL", "").strip():
            kw.update(base_url=os.environ["WANDB_BASE_URL"].strip().rstrip("/"))
    return wandb.Settings(**kw)


def _user_run_active(wandb) -> bool:
    """Whether the process has a W&B run of its own open (``wandb.run``): we must not finish it."""
    return getattr(wandb, "run", None) is not None


class _OnlineStartFailed(PublishError):
    """``wandb.init`` in online mode failed; the run can still be logged offline."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _plots_of(plots, index: int, result) -> list:
    """The PNGs of the ``index``-th result: ``plots`` is a list aligned with the results, or a
    ``{target: [paths]}`` dict (only right when every target is audited once)."""
    if not plots:
        return []
    if isinstance(plots, dict):
        return list(plots.get(result.target, []))
    return list(plots[index]) if index < len(plots) and plots[index] else []


def publish_to_wandb(results, config: PublishConfig, *, session_id: str, session_info: Optional[dict] = None,
                     git: Optional[dict] = None, plots=None) -> WandbOutcome:
    """Log one run per result. Never raises for W&B problems: they come back as warnings.

    ``plots``: per result, the PNGs to log in its run (a list aligned with ``results``; a
    ``{target: paths}`` dict is accepted too). Each run gets its own name (``naming.audit_names``).
    """
    results = list(results)
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
        _publish_all(wandb, results, config, mode, outcome, session_id=session_id, session_info=session_info,
                     git=git or {}, plots=plots)
        if not _user_run_active(wandb):
            # No run of the user's is open: stop wandb's service now rather than at exit, and leave no
            # process-wide wandb session behind whose frozen WANDB_* settings a later publish would inherit.
            with contextlib.suppress(Exception):
                wandb.teardown()
    return outcome


def _publish_all(wandb, results: list, config: PublishConfig, mode: str, outcome: WandbOutcome, *, session_id,
                 session_info, git, plots) -> None:
    """One run per result; an online run that cannot start (or loses the network) is logged offline
    instead, and so are all after it, so a dead network costs one timeout and no data."""
    fallback = None  # why online failed: from then on every run is logged offline
    offline = []
    for i, (result, name) in enumerate(zip(results, audit_names(results))):
        kw = dict(session_id=session_id, session_info=session_info, git=git, plots=_plots_of(plots, i, result),
                  name=name)
        run_mode = "offline" if fallback else mode
        said: list = []  # this run's own warnings, kept from the attempt that counts only
        try:
            try:
                run = _publish_one(wandb, result, config, run_mode, warnings=said, **kw)
            except Exception as e:
                if run_mode != "online" or not (isinstance(e, _OnlineStartFailed) or _looks_like_network(e)):
                    raise
                fallback = _online_problem(config, getattr(e, "cause", e))
                said = []
                run = _publish_one(wandb, result, config, "offline", warnings=said, **kw)
        except Exception as e:
            outcome.warnings.extend(said)
            outcome.warnings.append(_describe_failure(name.label, e))
            continue
        outcome.warnings.extend(said)
        run.audit = i
        outcome.runs.append(run)
        if run.mode == "offline" and mode == "online":
            offline.append(run)
    if fallback:
        outcome.mode = "offline"  # the runs exist only on disk: the report spec is saved, not created
        outcome.warnings.append(_fallback_warning(config, fallback, offline))


def _online_problem(config: PublishConfig, e: BaseException) -> str:
    """Why an online run could not start, as a clause (network problems say how long we waited)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if _looks_like_network(e):
        server = os.environ.get("WANDB_BASE_URL", "").strip()  # else wandb's default (or the user's login host)
        return f"the W&B server{' ' + server if server else ''} was unreachable within {config.init_timeout:g} s ({text})"
    return f"the online W&B run could not start ({text})"


def _fallback_warning(config: PublishConfig, problem: str, offline: list) -> str:
    """One warning for the whole fallback: why, how many runs were kept, and how to upload them."""
    folder = Path(config.wandb_dir) / "wandb"
    return (f"W&B online publishing failed: {problem}; verdicts are unaffected; {len(offline)} run(s) were "
            f"logged offline instead in {folder}; upload them later with `wandb sync {folder}/offline-run-*`")


def _looks_like_network(e: Exception) -> bool:
    """wandb reports a dead network as CommError / timeouts; anything else is a different problem."""
    text = str(e).lower()
    return type(e).__name__ in ("CommError", "TimeoutError") or any(
        w in text for w in ("timed out", "timeout", "connection refused", "connect:", "unreachable", "dial tcp"))


def _describe_failure(label: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return f"W&B run for {label} not published: {text}; verdicts are unaffected"


def _publish_one(wandb, result, config: PublishConfig, mode: str, *, session_id, session_info, git, plots,
                 warnings: list, name: Optional[AuditName] = None) -> WandbRun:
    """Log ``result`` as one run; raises ``_OnlineStartFailed`` when an online run cannot start."""
    name = name or AuditName(result.target)
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
            warnings.append(f"W&B: best checkpoint {ckpt} of {name.label} (epoch {best.best_epoch}) does not exist; "
                            "no model artifact logged")
            ckpt = None
    run = None
    try:
        try:
            run = wandb.init(
                project=config.project,
                entity=config.entity,
                group=session_id,
                job_type=config.job_type,
                tags=list(config.tags),
                name=name.run_name,
                config=cfg,
                dir=str(root),
                mode=mode,
                settings=_settings(wandb, config, mode),
                reinit="create_new",
            )
        except Exception as e:
            if mode == "online":
                raise _OnlineStartFailed(e) from e
            raise
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
            media[f"plots/{kind}"] = wandb.Image(str(p), caption=f"{name.label}: {kind}")
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
                artifact_name(result.target, name.slug),
                type="model",
                description=description + (f", monitor {best.monitor} ({best.mode})" if best.monitor else ""),
                metadata=artifact_metadata(result),
            )
            art.add_file(str(ckpt), name=ckpt.name)
            alias = "best" if best.is_best else "claimed-best"
            run.log_artifact(art, aliases=[alias])
            art_ref = f"{art.name}:{alias}"
        info = WandbRun(target=result.target, run_id=run.id, name=name.run_name, mode=mode,
                        run_dir=Path(run.dir).parent, url=run.url if mode == "online" else None, artifact=art_ref)
        try:
            run.finish()
        except TimeoutError:
            # Online upload slower than finish_timeout: the run is complete on disk, only the upload is not.
            warnings.append(f"W&B upload of {name.label} did not finish within {config.finish_timeout:g} s; "
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
