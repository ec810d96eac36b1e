"""Does fastai's ``WandbCallback(log_model=True)`` describe the best model with the best epoch's metrics?

The seed articles' scenario: ``SaveModelCallback(monitor=...)`` keeps the best epoch's weights and
``WandbCallback(log_model=True)`` uploads that file as a ``model`` artifact at the end of the fit.
fastai 2.8 builds the artifact's metadata in ``WandbCallback.after_fit`` from ``recorder.log``, which
holds the *last* epoch's values (fastai/callback/wandb.py:157-158), so whenever the best epoch is not
the last one, the best weights travel with another epoch's metrics.

``check_fastai_wandb_best_metadata`` runs the real thing and reads the evidence back from the run
file: a real ``Learner.fit`` with the real ``SaveModelCallback`` and ``WandbCallback`` in a real W&B
*offline* run (everything W&B writes stays under ``tmpdir``); a watcher callback notes the epochs
``SaveModelCallback`` saved and the MD5 of each file it wrote; then the ``run-<id>.wandb`` file is
read back (``pytest_mlrepro.wandb_offline``) and the model artifact's metadata is compared with the
Recorder's row at the epoch ``SaveModelCallback`` kept, and its file with the file saved at that
epoch. Verdict ``fail`` names the best epoch, the epoch the metadata comes from and every differing
value. Without a ``learner_factory`` a one-weight learner is trained for ``len(values)`` epochs with
the monitored value scripted to ``values[epoch]`` (~0.1 s fit, ~2 s with W&B's start and finish).

Compatibility: with fastcore 2.2.x, ``WandbCallback.before_fit`` raises ``TypeError: vars() argument
must have __dict__ attribute`` for every learner (its config formatter calls ``fastcore.init_args``
on floats and bools; fastcore#931). When that fastcore is installed, the check patches the name
``init_args`` inside ``fastai.callback.wandb`` for the duration of the fit (objects without
``__dict__`` have no init args) and lists the patch in ``details["compat_shims"]``; nothing else of
fastai or W&B is replaced.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import sys
from pathlib import Path

from pytest_mlrepro.checkpoint.adapters import as_float, quiet, require
from pytest_mlrepro.result import Finding
from pytest_mlrepro.envvars import patched_environ

__all__ = ["CHECK", "check_fastai_wandb_best_metadata", "metadata_differences"]

from pytest_mlrepro.checks import METADATA as CHECK
CALLBACK = "fastai.WandbCallback"

# Recorder columns fastai leaves out of the artifact metadata on purpose (wandb.py:157).
_LEFT_OUT_BY_FASTAI = ("epoch", "train_loss", "time")

# W&B variables that would send the run elsewhere or resume another run; cleared while the check runs.
_WANDB_ENV_CLEARED = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID",
                      "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_JOB_TYPE", "WANDB_NAME",
                      "WANDB_NOTES", "WANDB_SWEEP_ID")


def check_fastai_wandb_best_metadata(learner_factory=None, *, values=None, monitor: str = "valid_loss", tmpdir,
                                     n_epochs: int | None = None, comp=None, save_model_kwargs: dict | None = None,
                                     wandb_callback_kwargs: dict | None = None, fit_kwargs: dict | None = None,
                                     rel_tol: float = 1e-6, project: str = "mlrepro-fastai-wandb",
                                     wandb_callback_cls=None, read_run=None) -> Finding:
    """Train with ``SaveModelCallback`` + ``WandbCallback(log_model=True)`` offline; check the artifact's metadata.

    ``learner_factory(cbs, path) -> Learner`` builds the user's learner and must pass ``cbs`` to
    ``Learner(..., cbs=cbs, path=path)``; it needs ``n_epochs``. Without it, ``values`` scripts the
    monitored value per epoch of a built-in one-weight learner (``valid_loss`` through its loss,
    any other name through a metric of that name). ``comp`` / ``save_model_kwargs`` configure the
    ``SaveModelCallback``; ``wandb_callback_kwargs`` the ``WandbCallback`` (``log_model`` is forced on,
    ``log_preds`` defaults off); ``wandb_callback_cls`` replaces fastai's class (e.g. a fixed subclass).
    Metadata strings are compared with the recorded floats within
    ``rel_tol`` (fastai writes ``str(value)``). ``read_run(run_dir)`` reads the offline run (default:
    ``pytest_mlrepro.wandb_offline.read_run``).
    """
    fit_kwargs = dict(fit_kwargs or {})
    if learner_factory is None:
        if values is None or len(values) == 0:
            raise ValueError("check_fastai_wandb_best_metadata: pass values (the monitored value per epoch, "
                             "at least one) or a learner_factory with n_epochs")
        if n_epochs is not None and n_epochs != len(values):
            raise ValueError(f"n_epochs={n_epochs} but {len(values)} scripted values; leave n_epochs out")
        if monitor in ("epoch", "train_loss", "time"):
            raise ValueError(f"monitor {monitor!r} cannot be scripted: the built-in learner scripts valid_loss "
                             f"or a metric of its own name")
        values = [float(v) for v in values]
        n_epochs = len(values)
        fit_kwargs.setdefault("lr", 0.01)
    else:
        if values is not None:
            raise ValueError("values scripts the built-in learner only; with a learner_factory pass n_epochs")
        if not n_epochs or n_epochs < 1:
            raise ValueError(f"a learner_factory needs n_epochs >= 1 (got {n_epochs!r})")
    if read_run is None:
        read_run = _default_reader()
    wandb_was_loaded = "wandb" in sys.modules
    require("fastai.callback.tracker", "fastai-deps")
    try:
        require("fastai.callback.wandb", "fastai-deps")
    except ImportError as exc:
        raise ImportError(f"fastai's WandbCallback cannot be imported ({exc.__cause__ or exc}); it needs wandb: "
                          f"pip install wandb") from exc
    import wandb

    if wandb.run is not None:
        return _error(f"a W&B run ({wandb.run.id}) is already active in this process; fastai's WandbCallback logs "
                      f"to the global run, so the check needs to start its own: finish that run first", monitor)
    tmpdir = Path(tmpdir)
    try:
        with _offline_wandb_env(tmpdir) as wandb_dir, _fastcore_init_args_compat() as shims:
            return _run_check(learner_factory, values, monitor, n_epochs, comp, save_model_kwargs or {},
                              wandb_callback_kwargs or {}, fit_kwargs, rel_tol, project, read_run, tmpdir,
                              wandb_dir, shims, wandb_callback_cls)
    finally:
        if not wandb_was_loaded:  # nobody else in this process uses W&B: stop its service now
            with contextlib.suppress(Exception):
                wandb.teardown()


def metadata_differences(metadata: dict, recorded: dict, *, rel_tol: float = 1e-6) -> dict:
    """``{metric: {"metadata": str|None, "recorded": float|None}}`` for every metric that is not the same.

    ``recorded`` is one Recorder row (name -> value). A metric the Recorder has (other than those fastai
    leaves out) but the metadata lacks, or a metadata key the Recorder does not have, differs too.
    """
    diffs = {}
    for name, value in recorded.items():
        if name in _LEFT_OUT_BY_FASTAI:
            continue
        if name not in metadata:
            diffs[name] = {"metadata": None, "recorded": _plain(value)}
        elif not _same(metadata[name], value, rel_tol):
            diffs[name] = {"metadata": metadata[name], "recorded": _plain(value)}
    for name, text in metadata.items():
        if name not in recorded:
            diffs[name] = {"metadata": text, "recorded": None}
    return diffs


# --- the run ------------------------------------------------------------------------------------


def _run_check(learner_factory, values, monitor, n_epochs, comp, sm_kwargs, wcb_kwargs, fit_kwargs, rel_tol,
               project, read_run, tmpdir, wandb_dir, shims, wandb_callback_cls) -> Finding:
    import wandb
    from fastai.callback.tracker import SaveModelCallback
    from fastai.callback.wandb import WandbCallback

    sm = SaveModelCallback(**{**sm_kwargs, "monitor": monitor, **({} if comp is None else {"comp": comp})})
    wcb = (wandb_callback_cls or WandbCallback)(**{"log_preds": False, **wcb_kwargs, "log_model": True})
    watch = _make_watch(sm)
    cbs = [sm, wcb, watch]
    learner_path = tmpdir / "learner"
    if learner_factory is None:
        learn = _scripted_learner(values, monitor, cbs, learner_path)
    else:
        learn = learner_factory(cbs=cbs, path=learner_path)
        if not any(cb is wcb for cb in learn.cbs):
            raise ValueError("learner_factory did not pass cbs to its Learner (WandbCallback is not among "
                             "learn.cbs); build it with Learner(..., cbs=cbs, path=path)")
    mode = _mode(sm.comp)
    try:
        run = wandb.init(project=project, dir=str(wandb_dir), mode="offline", settings=_settings(wandb))
    except Exception as exc:  # noqa: BLE001 -- any W&B failure becomes an error finding
        return _error(f"wandb.init (offline, dir {wandb_dir}) failed: {type(exc).__name__}: {exc}", monitor, mode=mode)
    run_dir = Path(run.dir).parent
    if wandb_dir.resolve() not in run_dir.resolve().parents:
        return _error(f"wandb.init returned a run outside {wandb_dir} ({run_dir}): another W&B run is active in "
                      f"this process", monitor, mode=mode)
    try:
        with quiet("fastai"), learn.no_bar():
            learn.fit(n_epochs, **fit_kwargs)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            run.finish(exit_code=1)
        if not isinstance(exc, Exception):
            raise
        hint = ("; SaveModelCallback saved no model (the monitor never improved) and its after_fit loads "
                "the best file unconditionally" if not watch.saved else "")
        return _error(f"the fit with SaveModelCallback + WandbCallback raised {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{hint}", monitor, mode=mode,
                      run_dir=str(run_dir), saved_epochs=list(watch.saved), compat_shims=shims)
    run.finish()
    history = _recorder_history(learn)
    details = {"callback": _callback_name(wcb), "monitor": monitor, "mode": mode, "history": history,
               "checkpoint_path": str(sm.last_saved_path) if sm.last_saved_path else None,
               "saved_epochs": list(watch.saved), "rel_tol": rel_tol, "compat_shims": shims}
    offline, problem = _read_finished_run(read_run, run_dir)
    if offline is None:
        return _error(f"could not read the finished offline W&B run in {run_dir}: {problem}", **details)
    details["run_file"] = str(getattr(offline, "path", run_dir))
    return _judge(offline, watch, history, details, rel_tol)


def _judge(offline, watch, history, details, rel_tol) -> Finding:
    monitor, run_file = details["monitor"], details["run_file"]
    if not history:
        return _error("the fit recorded no epoch", **details)
    last_epoch = len(history) - 1
    details["last_epoch"] = last_epoch
    if not watch.saved:
        return _error(f"SaveModelCallback saved no model in {len(history)} epochs ({monitor} never improved, or "
                      f"every_epoch/at_end is set): there is no best model to describe", **details)
    best_epoch = watch.saved[-1]
    details["best_epoch"] = best_epoch
    models = [a for a in offline.artifacts if a["type"] == "model"]
    if not models:
        return _error(f"{run_file}: WandbCallback(log_model=True) logged no model artifact", **details)
    art = models[-1]
    metadata = art["metadata"]
    details.update(artifact=art["name"], metadata=metadata)
    files = list(art["files"].values())
    file_epochs = [watch.digests.get(f["digest"]) for f in files]
    details["artifact_file_epoch"] = file_epochs[0] if len(file_epochs) == 1 else file_epochs
    recorded = history[best_epoch]
    details["recorded_metrics"] = _strip_epoch(recorded)
    details["last_metrics"] = _strip_epoch(history[last_epoch])
    diffs = metadata_differences(metadata, _strip_epoch(recorded), rel_tol=rel_tol)
    details["differences"] = diffs
    meta_epochs = [e for e, row in enumerate(history)
                   if not metadata_differences(metadata, _strip_epoch(row), rel_tol=rel_tol)]
    details["metadata_epochs"] = meta_epochs
    problems = []
    if len(files) != 1 or file_epochs[0] != best_epoch:
        problems.append(f"its file is not the one SaveModelCallback saved at epoch {best_epoch} "
                        f"(file(s) match saved epoch(s) {file_epochs})")
    if diffs:
        where = (f"epoch {meta_epochs[-1]}'s metrics" + (" (the last epoch)" if meta_epochs[-1] == last_epoch else "")
                 if meta_epochs else "metrics of no recorded epoch")
        values = "; ".join(
            f"{k}: metadata {_show(d['metadata'])}, recorded at epoch {best_epoch} {_show(d['recorded'])}"
            for k, d in diffs.items())
        problems.append(f"its metadata carries {where}, not epoch {best_epoch}'s: {values}")
    head = (f"model artifact '{art['name']}' ({run_file}): SaveModelCallback kept epoch {best_epoch} "
            f"({monitor}={_show(recorded.get(monitor))}, {details['mode'] or 'custom comp'}) of {len(history)}")
    if problems:
        return Finding(CHECK, "fail", f"{details['callback']}: {head}, but " + "; and ".join(problems), details)
    return Finding(CHECK, "pass", f"{details['callback']}: {head}; its file and metadata are epoch {best_epoch}'s", details)


# --- the learner ----------------------------------------------------------------------------------


def _make_watch(sm):
    """A callback after ``SaveModelCallback``: the epochs it saved, and the MD5 (as W&B writes it) of each file."""
    from fastai.callback.core import Callback

    class WatchSaves(Callback):
        order = sm.order + 1  # before EarlyStoppingCallback (+3), which may cancel the fit in after_epoch

        def __init__(self):
            self.saved, self.digests = [], {}

        def before_fit(self):
            self.saved, self.digests = [], {}

        def after_epoch(self):
            if getattr(sm, "new_best", False) and sm.last_saved_path is not None:
                self.saved.append(self.epoch)
                self.digests[_md5_b64(sm.last_saved_path)] = self.epoch

    return WatchSaves()


def _scripted_learner(values, monitor, cbs, path):
    """A one-weight ``Learner`` whose monitored value at epoch ``e`` is ``values[e]``, with a real ``mae``."""
    import torch
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner, Metric
    from fastai.metrics import mae, rmse

    class ScriptedLoss(torch.nn.Module):
        """MSE while training; ``values[epoch]`` in validation when the monitor is ``valid_loss``."""

        def __init__(self):
            super().__init__()
            self.scripted = None

        def forward(self, pred, y):
            loss = torch.nn.functional.mse_loss(pred, y)
            return loss if self.scripted is None else loss * 0 + self.scripted

    class ScriptedMetric(Metric):
        def __init__(self):
            self.epoch = 0

        def reset(self):
            pass

        def accumulate(self, learn):
            self.epoch = learn.epoch

        @property
        def value(self):
            return values[self.epoch]

        @property
        def name(self):
            return monitor

    loss = ScriptedLoss()

    class Script(Callback):
        def before_train(self):
            loss.scripted = None

        def before_validate(self):
            loss.scripted = values[self.epoch] if monitor == "valid_loss" else None

    metrics = [] if monitor == "valid_loss" else [ScriptedMetric()]
    metrics.append(rmse if monitor == "mae" else mae)
    data = [(torch.tensor([float(i)]), torch.tensor([2.0 * i + 1.0])) for i in range(4)]
    dls = DataLoaders(DataLoader(data, bs=4), DataLoader(data, bs=4), device="cpu")
    return Learner(dls, torch.nn.Linear(1, 1), loss_func=loss, metrics=metrics, path=path, cbs=[Script(), *cbs])


def _recorder_history(learn) -> list:
    """One dict per epoch: ``epoch`` and every Recorder column but ``time`` (what the trackers compared)."""
    names = [n for n in learn.recorder.metric_names[1:] if n != "time"]
    return [{"epoch": e, **{n: _plain(v) for n, v in zip(names, row)}} for e, row in enumerate(learn.recorder.values)]


# --- W&B and fastcore -----------------------------------------------------------------------------


@contextlib.contextmanager
def _offline_wandb_env(tmpdir: Path):
    """W&B offline, silent, with its run dir, config, cache, data and artifact staging under ``tmpdir``."""
    home = tmpdir / "wandb-home"
    wandb_dir = tmpdir / "wandb-runs"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DIR": str(wandb_dir),
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "WANDB_ARTIFACT_DIR": str(home / "artifacts")}
    for p in (wandb_dir, *(Path(env[k]) for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"))):
        p.mkdir(parents=True, exist_ok=True)
    with patched_environ(env, clear=_WANDB_ENV_CLEARED):
        yield wandb_dir


@contextlib.contextmanager
def _fastcore_init_args_compat():
    """Yield the shims applied: fastcore's ``init_args`` must return ``{}`` for a float (fastcore#931)."""
    import fastai.callback.wandb as fw

    original = fw.init_args
    try:
        original(0.0)
        broken = False
    except TypeError:
        broken = True
    if not broken:
        yield []
        return

    def init_args(o):
        return original(o) if hasattr(o, "__dict__") else {}

    fw.init_args = init_args
    try:
        yield [("fastai.callback.wandb.init_args: {} for objects without __dict__ "
                "(fastcore init_args raises TypeError on floats/bools, fastcore#931)")]
    finally:
        fw.init_args = original


def _read_finished_run(read_run, run_dir: Path, timeout: float = 30.0):
    """``(run, None)`` once the run file ends with its ``exit`` record, else ``(None, why)``.

    ``run.finish()`` returns when wandb-core has *handled* the exit record; the transaction log is
    flushed to disk a little later (seen: 0 records readable right after ``finish``, all of them
    ~2 s later), so an early read misses the artifact.
    """
    import time

    deadline = time.monotonic() + timeout
    why = "no run file yet"
    while True:
        try:
            run = read_run(run_dir)
            if "exit" in getattr(run, "record_types", ["exit"]):
                return run, None
            why = f"no exit record yet ({len(run.record_types)} records)"
        except Exception as exc:  # noqa: BLE001 -- a log still being written ends mid-record
            why = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            return None, f"still incomplete after {timeout:g} s ({why})"
        time.sleep(0.05)


def _settings(wandb):
    return wandb.Settings(silent=True, quiet=True, show_info=False, show_warnings=False, console="off",
                          x_disable_stats=True, disable_git=True, disable_job_creation=True, save_code=False,
                          x_save_requirements=False)


def _default_reader():
    from pytest_mlrepro.wandb_offline import read_run

    return read_run


# --- small helpers --------------------------------------------------------------------------------


def _callback_name(cb) -> str:
    cls = type(cb)
    return CALLBACK if cls.__module__ == "fastai.callback.wandb" else f"{cls.__module__}.{cls.__qualname__}"


def _md5_b64(path) -> str:
    """The digest W&B records for an artifact file: base64 of the MD5 of its bytes."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode("ascii")


def _mode(comp):
    import numpy as np

    return "min" if comp is np.less else "max" if comp is np.greater else None


def _plain(v):
    if isinstance(v, (str, bool)) or v is None:
        return v
    try:
        return as_float(v)
    except (TypeError, ValueError):
        return str(v)


def _same(text, value, rel_tol) -> bool:
    if value is None:
        return text is None
    try:
        a, b = float(text), float(value)
    except (TypeError, ValueError):
        return str(text) == str(value)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)


def _strip_epoch(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "epoch"}


def _show(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v) if isinstance(v, str) else str(v)


def _error(message: str, monitor: str | None = None, **details) -> Finding:
    details.setdefault("callback", CALLBACK)
    if monitor is not None:
        details.setdefault("monitor", monitor)
    return Finding(CHECK, "error", f"{details['callback']}: {message}", details)
