"""Drive fastai's real ``EarlyStoppingCallback`` / ``SaveModelCallback`` through a real ``Learner.fit``.

Chosen way: the real loop. ``run(values)`` fits a one-weight ``Learner`` for ``len(values)`` epochs
with a ``Metric`` named like the monitor whose value at epoch ``e`` is ``values[e]`` (the Recorder
puts it where the TrackerCallbacks read it); the metric also writes the epoch into a buffer of the
model, so the file ``SaveModelCallback`` saved, and the weights it loads back at the end, say
which epoch they come from. ~0.02 s a run.

What fastai claims: ``comp=None`` becomes ``np.less`` if ``'loss'`` or ``'error'`` is a substring
of the monitor, else ``np.greater`` (so ``mae``, ``mse``, ``rmse``, ``perplexity`` are maximised,
fastai#2469); improvement is ``comp(value - min_delta, best)`` with the best reset to the worst
infinity at ``before_fit``; it stops when the wait reaches ``patience`` (0 behaves as 1); NaN never
compares better ("ignore"). No baseline / start_from_epoch. ``SaveModelCallback.after_fit`` loads
the best file back with ``weights_only=False`` (a pickle), which this adapter does not do itself.
"""
from __future__ import annotations

import os
import tempfile

from pytest_mlrepro.checkpoint.adapters import NO_STOP_PATIENCE, as_float, empty_outcome, quiet, require

__all__ = ["FastaiDriver", "early_stopping_factory", "checkpoint_factory", "supported_specs"]


_RECORDER_COLUMNS = ("epoch", "train_loss", "valid_loss", "time")


def _fastai():
    return require("fastai.callback.tracker", "fastai-deps")


class FastaiDriver:
    """fastai ``EarlyStoppingCallback`` and/or ``SaveModelCallback`` configured as the user would.

    ``early_stopping`` / ``save_model``: kwargs (``monitor`` added) or ``None``. With ``save_model``,
    ``Outcome.best_epoch`` is the epoch whose weights ``after_fit`` loaded back into the model.
    """

    def __init__(self, monitor: str, *, early_stopping: dict | None = None, save_model: dict | None = None,
                 path=None):
        if early_stopping is None and save_model is None:
            raise ValueError("FastaiDriver needs early_stopping and/or save_model kwargs")
        if monitor in _RECORDER_COLUMNS:
            raise ValueError(f"monitor {monitor!r} is one of fastai's own Recorder columns {_RECORDER_COLUMNS}; "
                             f"the scripted metric needs a name of its own (e.g. 'valid_score' or 'mae')")
        _fastai()
        self.monitor = monitor
        self._es_kwargs = None if early_stopping is None else {**early_stopping, "monitor": monitor}
        self._sm_kwargs = None if save_model is None else {**save_model, "monitor": monitor}
        self._path = path
        parts = (["EarlyStoppingCallback"] if early_stopping is not None else []) + (["SaveModelCallback"] if save_model is not None else [])
        self.name = "fastai." + "+".join(parts)
        self.spec = self._claimed_spec()
        self.last_run: dict = {}

    def _callbacks(self):
        from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback

        es = EarlyStoppingCallback(**self._es_kwargs) if self._es_kwargs is not None else None
        sm = SaveModelCallback(**self._sm_kwargs) if self._sm_kwargs is not None else None
        return es, sm

    def _claimed_spec(self):
        import numpy as np

        from pytest_mlrepro.checkpoint.oracle import StopSpec

        es, sm = self._callbacks()
        cb = es if es is not None else sm
        mode = "min" if cb.comp is np.less else "max" if cb.comp is np.greater else None
        if mode is None:
            raise ValueError(f"fastai comp {cb.comp!r} is neither np.less nor np.greater; pass mode explicitly")
        patience = int(es.patience) if es is not None else NO_STOP_PATIENCE
        return StopSpec(mode=mode, patience=patience, min_delta=abs(float(cb.min_delta)), nan_policy="ignore")

    def run(self, values):
        import torch
        from fastai.callback.core import Callback
        from fastai.data.core import DataLoaders
        from fastai.data.load import DataLoader
        from fastai.learner import Learner, Metric

        from pytest_mlrepro.checkpoint.oracle import Outcome

        values = [float(v) for v in values]
        if not values:
            return empty_outcome()
        monitor = self.monitor

        class Scripted(Metric):
            """The monitored metric: ``values[epoch]``; tags the model's weights with the epoch."""

            def __init__(self):
                self.epoch, self.seen = -1, []

            def reset(self):
                pass

            def accumulate(self, learn):
                self.epoch = learn.epoch
                with torch.no_grad():
                    learn.model.epoch_tag.fill_(float(learn.epoch))

            @property
            def value(self):
                if not self.seen or self.seen[-1] != self.epoch:
                    self.seen.append(self.epoch)
                return values[self.epoch]

            @property
            def name(self):
                return monitor

        es, sm = self._callbacks()

        class Watch(Callback):
            """Runs after the trackers: which epochs gave a new best, and did EarlyStopping stop."""

            order = 70

            def __init__(self):
                self.improved, self.done = [], []

            def after_epoch(self):
                self.done.append(self.epoch)
                t = sm if sm is not None else es
                if t.new_best:
                    self.improved.append(self.epoch)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(1, 1)
                self.register_buffer("epoch_tag", torch.tensor(-1.0))

            def forward(self, x):
                return self.lin(x)

        watch, metric = Watch(), Scripted()
        with tempfile.TemporaryDirectory(prefix="mlrepro-fastai-") as tmp:
            path = os.path.join(self._path or tmp, f"run-{os.getpid()}-{id(values)}")
            ds = [(torch.ones(1), torch.ones(1))]
            dls = DataLoaders(DataLoader(ds, bs=1), DataLoader(ds, bs=1), device="cpu")
            learn = Learner(dls, Net(), loss_func=torch.nn.MSELoss(), metrics=[metric], path=path)
            with quiet("fastai"), learn.no_bar(), learn.no_logging():
                learn.fit(len(values), lr=0.01, cbs=[c for c in (es, sm, watch) if c is not None])
            epochs_run = len(metric.seen)
            stop_epoch = None
            if es is not None and epochs_run and (len(watch.done) < epochs_run):
                stop_epoch = epochs_run - 1  # EarlyStopping raised CancelFitException in after_epoch
            info = {"epochs": list(metric.seen)}
            if sm is not None:
                files = sorted(os.listdir(os.path.join(path, "models"))) if os.path.isdir(os.path.join(path, "models")) else []
                saved = tuple(watch.improved)
                best_epoch = int(round(learn.model.epoch_tag.item())) if files else None  # loaded by after_fit
                best_value = as_float(sm.best) if files else None
                info.update(files=files, last_saved_path=str(sm.last_saved_path), best_weights_epoch=best_epoch)
            else:
                saved = tuple(watch.improved)
                # the stopping epoch never reaches Watch, but it is never an improvement
                best_epoch = watch.improved[-1] if watch.improved else None
                best_value = as_float(es.best) if watch.improved else None
            if es is not None:
                info.update(es_best=as_float(es.best), es_wait=es.wait)
            self.last_run = info
        return Outcome(epochs_run, stop_epoch, best_epoch, best_value, saved)


def early_stopping_factory(monitor: str = "valid_score", **fixed):
    """``spec -> FastaiDriver`` with an explicit ``comp`` from the spec's mode."""
    return _factory(monitor, save_model=False, **fixed)


def checkpoint_factory(monitor: str = "valid_score", path=None, **fixed):
    """``spec -> FastaiDriver`` with ``EarlyStoppingCallback`` + ``SaveModelCallback``."""
    return _factory(monitor, save_model=True, path=path, **fixed)


def _factory(monitor, *, save_model, path=None, **fixed):
    from pytest_mlrepro.checkpoint.conformance import UnsupportedSpec

    def make(spec):
        import numpy as np

        if spec.baseline is not None or spec.start_from_epoch:
            raise UnsupportedSpec("fastai trackers have no baseline / start_from_epoch")
        if spec.nan_policy != "ignore":
            raise UnsupportedSpec("fastai has no NaN stop in its trackers; a NaN counts as a non-improvement")
        comp = np.less if spec.mode == "min" else np.greater
        es = {"comp": comp, "patience": spec.patience, "min_delta": spec.min_delta, **fixed}
        sm = {"comp": comp, "min_delta": spec.min_delta} if save_model else None
        return FastaiDriver(monitor, early_stopping=es, save_model=sm, path=path)

    return make


def supported_specs():
    """The ``StopSpec`` strategy restricted to what fastai's trackers can express."""
    from pytest_mlrepro.checkpoint.strategies import stop_specs

    return stop_specs(baseline=False, start_from_epoch=False, nan_policies=("ignore",))
