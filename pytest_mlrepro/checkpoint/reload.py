"""The reload contract of a best checkpoint.

A "best" checkpoint is only useful if (1) it is the best epoch of the logged history under the
declared direction, (2) it holds the weights that were hashed at that epoch, (3) the metrics stored
with it are that epoch's (not the last epoch's), and (4) loading it - in a fresh process, as a user
would - and evaluating again gives the recorded metrics (bit for bit in deterministic mode).
``check_reload`` checks all four and returns ``Finding``s (``best_checkpoint.history`` and
``best_checkpoint.reload``); every bad input becomes a finding naming the file, epoch and metric.

"Best" means what a best-only saver holds after the whole logged history (``oracle.simulate``
with a patience no history exhausts): the curve may get worse before it gets better. The history
sidecar is first reconciled with the checkpoint (``storage.reconcile_history``), so a writer
killed between its two files never makes a valid checkpoint fail.

Run as ``python -m pytest_mlrepro.checkpoint.reload REQUEST.json`` it is the fresh-process worker.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from pytest_mlrepro.result import Finding

__all__ = ["check_reload", "resolve_callable", "callable_reference", "load_history"]

from pytest_mlrepro.checks import HISTORY, RELOAD


# ---------------------------------------------------------------------------------------------
# resolving "module:fn" / "path/to/file.py:fn"


def resolve_callable(ref):
    """Return the callable named by ``"module:qualname"`` or ``"path.py:qualname"`` (or ``ref`` itself).

    Resolution and import are the audit's own (``pytest_mlrepro.targets``), so a reference means
    the same thing to a reload check as to an audit.
    """
    if callable(ref):
        return ref
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"expected a callable or 'module:function' / 'file.py:function', got {ref!r}")
    from pytest_mlrepro.targets import load_function, resolve

    return load_function(resolve(ref))


def callable_reference(fn) -> str | None:
    """A ``module:qualname`` or ``file.py:qualname`` string a fresh process can resolve, or None."""
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    mod = sys.modules.get(module)
    if module != "__main__" and not module.startswith("_mlrepro_target_"):
        try:
            if importlib.util.find_spec(module) is not None:
                return f"{module}:{qualname}"
        except (ImportError, ValueError):
            pass
    path = getattr(mod, "__file__", None)
    return f"{path}:{qualname}" if path else None


# ---------------------------------------------------------------------------------------------
# history


def load_history(history, checkpoint_path: Path, metadata: dict | None = None):
    """Per-epoch metric dicts from a list, a JSON file, or the checkpoint's sidecar (None).

    With the checkpoint's ``metadata``, a sidecar is reconciled with it first
    (``storage.reconcile_history``: a save that never landed is cut off). Returns ``(entries, origin)``.
    """
    entries, origin, _ = _load_history(history, checkpoint_path, metadata)
    return entries, origin


def _load_history(history, checkpoint_path: Path, metadata):
    """``(entries, origin, note)``; ``note`` says how the sidecar was reconciled (None: as written)."""
    from pytest_mlrepro.checkpoint.storage import history_path, reconcile_history

    source = history
    if history is None:
        sidecar = history_path(checkpoint_path)
        if not sidecar.exists():
            return None, None, None
        source = sidecar
    note = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"history file {path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"history file {path} is not valid JSON ({exc})") from None
        origin = str(path)
        if isinstance(data, dict) and metadata is not None:
            entries, note = reconcile_history(data, metadata, origin)
        else:
            entries = data.get("history") if isinstance(data, dict) else data
    else:
        entries, origin = source, "history argument"
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{origin}: history must be a list of per-epoch metric dicts")
    return [dict(e) for e in entries], origin, note


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _same_value(a, b, tol: float) -> bool:
    fa, fb = _num(a), _num(b)
    if fa is None or fb is None:
        return a == b
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    if tol == 0.0:
        return fa == fb
    return abs(fa - fb) <= tol


def _metrics_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("epoch", "step")}


def _metadata_problem(meta: dict, mode: str, tolerance: float) -> str | None:
    """What makes a checkpoint's metadata unusable for the contract, or None."""
    import math

    epoch = meta.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return f"metadata records no integer best epoch (epoch={epoch!r})"
    if not isinstance(meta.get("metrics"), dict):
        return f"metadata of epoch {epoch}: 'metrics' must be a dict of every metric of that epoch, got {meta.get('metrics')!r}"
    if mode not in ("min", "max"):
        return f"metadata of epoch {epoch}: mode must be 'min' or 'max', got {mode!r}"
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        return f"tolerance must be a finite number >= 0, got {tolerance!r}"
    return None


def _first_repeated(epochs):
    """The first epoch number logged twice (None if none): such a history names no single best."""
    seen = set()
    for e in epochs:
        key = e if isinstance(e, (int, float, str)) else repr(e)
        if key in seen:
            return e
        seen.add(key)
    return None


def _saver_best(values, mode: str, min_delta: float, baseline):
    """Index of the value a best-only saver holds after all of ``values`` (None: nothing saved).

    The oracle run with a patience no sequence can exhaust, NaN counted as "no improvement": each
    value becomes best only by beating the current best by more than ``min_delta``; ties keep the
    earlier epoch; NaN is never best.
    """
    from pytest_mlrepro.checkpoint.oracle import StopSpec, simulate

    spec = StopSpec(mode, len(values) + 1, min_delta, baseline, 0, "ignore")
    return simulate(values, spec).best_epoch


def _check_history(path: Path, meta: dict, monitor: str, mode: str, history, origin, note=None) -> Finding:
    from pytest_mlrepro.checkpoint.oracle import StopSpec

    best_epoch = meta.get("epoch")
    details = {"monitor": monitor, "mode": mode, "best_epoch": best_epoch, "argbest_epoch": None,
               "history": history, "checkpoint_path": str(path), "history_source": origin}
    if note:
        details["history_reconciled"] = note
    epochs = [e.get("epoch", i) for i, e in enumerate(history)]
    for e, entry in zip(epochs, history):
        if monitor not in entry:
            return Finding(HISTORY, "fail", f"{origin}: monitored metric {monitor!r} is missing from the logged "
                                            f"metrics of epoch {e} (logged: {sorted(_metrics_of(entry))})", details)
    repeated = _first_repeated(epochs)
    if repeated is not None:
        return Finding(HISTORY, "error", f"{origin}: epoch {repeated!r} is logged more than once; the best "
                                         f"epoch of an ambiguous history cannot be checked", details)
    values = [_num(entry[monitor]) for entry in history]
    for e, v, entry in zip(epochs, values, history):
        if v is None:
            return Finding(HISTORY, "fail", f"{origin}: metric {monitor!r} at epoch {e} is not a number: "
                                            f"{entry[monitor]!r}", details)
    try:
        start = int(meta.get("start_from_epoch") or 0)
        min_delta = float(meta.get("min_delta") or 0.0)
        StopSpec(mode, 0, min_delta, meta.get("baseline"), start, "ignore")  # validates the saver's settings
    except (TypeError, ValueError) as exc:
        return Finding(HISTORY, "error", f"{path}: metadata describes an invalid spec: {exc}", details)
    # start_from_epoch counts the epochs as logged (users number them from 0 or from 1): drop the
    # earlier ones and let the oracle see the rest, then map its answer back to logged epochs
    kept = [i for i, e in enumerate(epochs) if not isinstance(e, (int, float)) or e >= start]
    best_kept = _saver_best([values[i] for i in kept], mode, min_delta, meta.get("baseline"))
    best_index = kept[best_kept] if best_kept is not None else None
    argbest = epochs[best_index] if best_index is not None else None
    details["argbest_epoch"] = argbest
    if argbest != best_epoch:
        where = (f"epoch {argbest} ({monitor}={values[best_index]!r})" if argbest is not None
                 else "no epoch at all")
        recorded = (meta.get("metrics") or {}).get(monitor)
        return Finding(HISTORY, "fail",
                       f"{path}: checkpoint metadata says best epoch {best_epoch} ({monitor}={recorded!r}), but under "
                       f"mode={mode!r}{f', min_delta={min_delta!r}' if min_delta else ''} the logged history "
                       f"({origin}) makes {where} the best", details)
    entry = history[epochs.index(best_epoch)]
    recorded = meta.get("metrics") or {}
    differing = [k for k, v in _metrics_of(entry).items() if k in recorded and not _same_value(v, recorded[k], 0.0)]
    missing = [k for k in _metrics_of(entry) if k not in recorded]
    if differing or missing:
        matches = [e for e, h in zip(epochs, history)
                   if all(k in recorded and _same_value(v, recorded[k], 0.0) for k, v in _metrics_of(h).items())]
        source = (f"those of epoch {matches[-1]}{' (the last epoch)' if matches[-1] == epochs[-1] else ''}"
                  if matches else "from no logged epoch")
        return Finding(HISTORY, "fail",
                       f"{path}: the metrics stored with the best checkpoint (epoch {best_epoch}) are {source}, not "
                       f"epoch {best_epoch}'s: differing {differing or []}, missing {missing or []}",
                       {**details, "co_metrics_epoch": matches[-1] if matches else None})
    return Finding(HISTORY, "pass", f"{path}: best epoch {best_epoch} is the best of {len(history)} logged epochs "
                                    f"under mode={mode!r}, with that epoch's co-metrics"
                                    + (f" ({note})" if note else ""), details)


# ---------------------------------------------------------------------------------------------
# re-evaluation


def _evaluate_here(checkpoint_path, model_factory, evaluate, data, seed, monitor) -> dict:
    """Load, rebuild, evaluate; returns {"ok": True, "metrics"} or {"ok": False, "stage", "error", "traceback"}."""
    stage = "load"
    try:
        import torch

        from pytest_mlrepro.checkpoint.callbacks import plain_metrics
        from pytest_mlrepro.checkpoint.storage import load_checkpoint

        state, _ = load_checkpoint(checkpoint_path)
        stage = "model_factory"
        model = resolve_callable(model_factory)()
        stage = "load_state_dict"
        model.load_state_dict(state, strict=True)
        model.eval()
        stage = "data"
        if isinstance(data, str) and ":" in data:
            data = resolve_callable(data)()
        stage = "evaluate"
        fn = resolve_callable(evaluate)
        torch.manual_seed(int(seed) if seed is not None else 0)
        with torch.no_grad():
            result = fn(model) if data is None else fn(model, data)
        if isinstance(result, dict):
            metrics = plain_metrics(result)
        else:
            metrics = plain_metrics({monitor: result})
        return {"ok": True, "metrics": metrics}
    except BaseException as exc:  # reported, not raised: the finding names the stage
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"ok": False, "stage": stage, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=10)}


def _evaluate_fresh(checkpoint_path, model_factory, evaluate, data, seed, monitor, timeout) -> dict:
    given = {"model_factory": model_factory, "evaluate": evaluate}
    refs = {name: callable_reference(fn) for name, fn in given.items()}
    for name, ref in refs.items():
        if ref is None:
            return {"ok": False, "stage": "setup", "error": (
                f"fresh_process=True needs {name} as 'module:function' or 'file.py:function' (or a module-level "
                f"function); got {getattr(given[name], '__qualname__', given[name])!r}. Pass a string "
                f"reference or fresh_process=False"), "traceback": ""}
    if data is not None and not isinstance(data, str):
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            return {"ok": False, "stage": "setup", "error": "fresh_process=True needs data as a 'module:function' "
                    "reference (called with no arguments in the fresh process) or a JSON value", "traceback": ""}
    with tempfile.TemporaryDirectory(prefix="mlrepro-reload-") as tmp:
        request = Path(tmp) / "request.json"
        answer = Path(tmp) / "answer.json"
        request.write_text(json.dumps({"checkpoint": str(Path(checkpoint_path).resolve()), "data": data,
                                       "seed": seed, "monitor": monitor, "answer": str(answer), **refs}))
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest_mlrepro.checkpoint.reload", str(request)],
                                  env=env, capture_output=True, text=True, timeout=timeout, cwd=os.getcwd())
        except subprocess.TimeoutExpired:
            return {"ok": False, "stage": "fresh process", "error": f"timed out after {timeout} s", "traceback": ""}
        if not answer.exists():
            return {"ok": False, "stage": "fresh process",
                    "error": f"the fresh process exited with code {proc.returncode} without an answer",
                    "traceback": (proc.stderr or "")[-4000:]}
        return json.loads(answer.read_text())


def _worker(request_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    res = _evaluate_here(req["checkpoint"], req["model_factory"], req["evaluate"], req.get("data"),
                         req.get("seed"), req["monitor"])
    from pytest_mlrepro.checkpoint.storage import atomic_write_json

    atomic_write_json(req["answer"], res, fsync=False)
    return 0


# ---------------------------------------------------------------------------------------------
# the contract


def check_reload(checkpoint_path, *, evaluate, model_factory, history=None, data=None, tolerance: float = 0.0,
                 deterministic: bool = True, fresh_process: bool = True, monitor: str | None = None,
                 mode: str | None = None, timeout: float = 300.0) -> list:
    """Check a best checkpoint against its history and against a re-evaluation.

    ``evaluate(model)`` (or ``evaluate(model, data)`` when ``data`` is given) returns a dict of
    metrics (or one number, taken as the monitored metric); ``model_factory()`` builds an
    untrained model. In a fresh process (default) both must be ``"module:fn"`` / ``"file.py:fn"``
    strings or module-level functions; ``data`` then is such a reference (called with no
    arguments) or a JSON value. ``history``: list of per-epoch metric dicts, a JSON file, or None
    for the ``<checkpoint>.history.json`` sidecar ``BestCheckpoint`` writes. ``monitor``/``mode``
    default to the checkpoint's metadata. Comparison is exact when ``deterministic`` else within
    ``tolerance`` (absolute). Returns ``[history finding, reload finding]`` (fewer if the file is
    unusable).
    """
    from pytest_mlrepro.checkpoint import storage
    from pytest_mlrepro.checkpoint.direction import infer_direction

    path = Path(checkpoint_path)
    tol = 0.0 if deterministic else float(tolerance)
    details = {"checkpoint_path": str(path), "monitor": monitor, "mode": mode, "best_epoch": None,
               "recorded_metrics": None, "reevaluated_metrics": None, "tolerance": tol}
    try:
        state, meta = storage.load_checkpoint(path)
    except storage.CheckpointMissing as exc:
        return [Finding(RELOAD, "error", f"best checkpoint absent: {exc}", details)]
    except storage.CheckpointRefused as exc:
        return [Finding(RELOAD, "fail", f"{exc}", {**details, "refused": True})]
    except storage.CheckpointCorrupt as exc:
        return [Finding(RELOAD, "fail", f"{exc}", details)]
    if meta is None:
        return [Finding(RELOAD, "fail", f"{path}: checkpoint metadata missing: no epoch, metrics or weights hash "
                                        f"recorded with the weights, so the best checkpoint cannot be verified", details)]
    monitor = monitor or meta.get("monitor")
    if not monitor:
        return [Finding(RELOAD, "fail", f"{path}: metadata names no monitored metric; pass monitor=", details)]
    try:
        mode = mode or meta.get("mode") or infer_direction(monitor)
    except ValueError as exc:
        return [Finding(RELOAD, "error", f"{path}: {exc}", details)]
    best_epoch = meta.get("epoch")
    recorded = meta.get("metrics")
    details.update(monitor=monitor, mode=mode, best_epoch=best_epoch, recorded_metrics=recorded)
    problem = _metadata_problem(meta, mode, tol)
    if problem:
        return [Finding(RELOAD, "fail", f"{path}: {problem}", details)]
    findings = []

    try:
        hist, origin, note = _load_history(history, path, meta)
    except ValueError as exc:
        findings.append(Finding(HISTORY, "error", str(exc), {"monitor": monitor, "mode": mode, "best_epoch": best_epoch,
                                                            "argbest_epoch": None, "history": None}))
        hist = None
    else:
        if hist is None:
            findings.append(Finding(HISTORY, "skip", f"{path}: no logged history given and no sidecar "
                                                     f"{path}.history.json; best-epoch check skipped",
                                    {"monitor": monitor, "mode": mode, "best_epoch": best_epoch,
                                     "argbest_epoch": None, "history": None}))
        else:
            findings.append(_check_history(path, meta, monitor, mode, hist, origin, note))

    problems = []
    if best_epoch is None:
        problems.append("metadata records no epoch")
    if not isinstance(recorded, dict):
        problems.append("metadata records no metrics")
        recorded = {}
    elif monitor not in recorded:
        problems.append(f"metadata metrics of epoch {best_epoch} lack the monitored metric {monitor!r}")
    else:
        rv = _num(recorded[monitor])
        if rv is None or math.isnan(rv):
            problems.append(f"NaN (or a non-number) recorded as the best {monitor!r} at epoch {best_epoch}")
    if problems:
        findings.append(Finding(RELOAD, "fail", f"{path}: " + "; ".join(problems), details))
        return findings

    actual_hash = storage.weights_sha256(state)
    details["weights_sha256"] = actual_hash
    details["recorded_weights_sha256"] = meta.get("weights_sha256")
    if meta.get("weights_sha256") is None:
        problems.append(f"metadata of epoch {best_epoch} records no weights hash")
    elif meta["weights_sha256"] != actual_hash:
        problems.append(f"the weights in the file are not the weights hashed at epoch {best_epoch} "
                        f"(sha256 {actual_hash[:12]} != recorded {meta['weights_sha256'][:12]})")

    seed = meta.get("seed")
    if fresh_process:
        res = _evaluate_fresh(path, model_factory, evaluate, data, seed, monitor, timeout)
    else:
        res = _evaluate_here(path, model_factory, evaluate, data, seed, monitor)
    details["fresh_process"] = bool(fresh_process)
    if not res.get("ok"):
        details["traceback"] = res.get("traceback", "")
        findings.append(Finding(RELOAD, "error",
                                f"{path}: reloading the best checkpoint (epoch {best_epoch}, monitor {monitor!r}) failed "
                                f"at {res.get('stage')}: {res.get('error')}"
                                + (f"; also: {'; '.join(problems)}" if problems else ""), details))
        return findings
    re_metrics = res["metrics"]
    details["reevaluated_metrics"] = re_metrics
    if monitor not in re_metrics:
        problems.append(f"evaluate returned no {monitor!r} (returned: {sorted(re_metrics)})")
    compared = [k for k in re_metrics if k in recorded]
    details["compared_metrics"] = compared
    bad = [k for k in compared if not _same_value(re_metrics[k], recorded[k], tol)]
    for k in bad:
        problems.append(f"{k}: recorded {recorded[k]!r} at epoch {best_epoch}, re-evaluated {re_metrics[k]!r}"
                        + (" (exact comparison)" if tol == 0.0 else f" (tolerance {tol})"))
    if problems:
        findings.append(Finding(RELOAD, "fail", f"{path} (best epoch {best_epoch}): " + "; ".join(problems), details))
    else:
        how = "bit for bit" if tol == 0.0 else f"within {tol}"
        findings.append(Finding(RELOAD, "pass", f"{path}: epoch {best_epoch} reloaded{' in a fresh process' if fresh_process else ''} "
                                                f"reproduces {', '.join(compared)} {how}; weights hash matches", details))
    return findings


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
