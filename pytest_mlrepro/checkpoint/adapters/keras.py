"""Drive Keras 3's real ``EarlyStopping`` and ``ModelCheckpoint`` through a real ``model.fit`` (torch backend).

Chosen way: the real loop. ``run(values)`` fits a two-sample ``Sequential`` model for
``len(values)`` epochs; a first callback writes ``values[epoch]`` into ``logs[monitor]`` at
``on_epoch_end`` (before EarlyStopping / ModelCheckpoint read the same dict) and writes the epoch
into a frozen "epoch_tag" layer, so a saved weights file says which epoch it holds. ~0.03 s a run.

What Keras claims: ``mode="auto"`` resolves at the first epoch end: ``loss``/``val_loss`` -> min,
otherwise the direction (``_direction``) of a *compiled* metric of that name; anything else raises
``ValueError`` (Keras 3 fails closed; tf.keras used to guess). Improvement is ``current -/+ min_delta``
strictly better; ``baseline`` and ``start_from_epoch`` exist; NaN never compares better, so it
counts toward patience ("ignore"). Known differences from the reference semantics (see
docs/frameworks.md): the first monitored value always becomes best, NaN and the worst infinity
included; a value that improves on the best without beating ``baseline`` resets nothing but also
never triggers the stop check; and it never stops at epoch 0.
"""
from __future__ import annotations

import os
import tempfile

from pytest_mlrepro.checkpoint.adapters import NO_STOP_PATIENCE, as_float, empty_outcome, quiet, require

__all__ = ["KerasDriver", "early_stopping_factory", "checkpoint_factory", "supported_specs", "keras_backend"]


def keras_backend():
    """Import keras on the torch backend (setting ``KERAS_BACKEND=torch`` if unset); refuse another backend."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = require("keras", "keras")
    if keras.backend.backend() != "torch":
        raise ImportError(f"the Keras adapter runs Keras 3 on the torch backend, but keras was loaded with "
                          f"backend {keras.backend.backend()!r}; set KERAS_BACKEND=torch before importing keras")
    return keras


class KerasDriver:
    """Keras ``EarlyStopping`` (and/or ``ModelCheckpoint(save_best_only=True)``) as the user configured it.

    ``compiled_metrics``: what ``model.compile(metrics=...)`` gets (a list, or a zero-argument callable
    returning a fresh list, for metric objects) - ``mode="auto"`` looks the monitor up there.
    """

    def __init__(self, monitor: str, *, early_stopping: dict | None = None, checkpoint: dict | None = None,
                 compiled_metrics=None, dirpath=None):
        if early_stopping is None and checkpoint is None:
            raise ValueError("KerasDriver needs early_stopping and/or checkpoint kwargs")
        keras_backend()
        self.monitor = monitor
        self._es_kwargs = None if early_stopping is None else {**early_stopping, "monitor": monitor}
        self._ck_kwargs = None if checkpoint is None else {**checkpoint, "monitor": monitor}
        self._metrics = compiled_metrics
        self._dirpath = dirpath
        parts = (["EarlyStopping"] if early_stopping is not None else []) + (["ModelCheckpoint"] if checkpoint is not None else [])
        self.name = "keras." + "+".join(parts)
        self._spec = None
        self.last_run: dict = {}

    @property
    def spec(self):
        """What the callback claims, with ``mode`` as Keras resolves it at the first epoch end."""
        if self._spec is None:
            from pytest_mlrepro.checkpoint.oracle import StopSpec

            kept = self.last_run
            self.run([0.0])  # Keras resolves "auto" only inside fit; this raises if it cannot
            mode, es = self.last_run.pop("resolved_mode"), self.last_run.pop("early_stopping")
            self.last_run = kept
            if es is not None:
                self._spec = StopSpec(mode=mode, patience=int(es.patience), min_delta=abs(float(es.min_delta)),
                                      baseline=None if es.baseline is None else float(es.baseline),
                                      start_from_epoch=int(es.start_from_epoch), nan_policy="ignore")
            else:
                self._spec = StopSpec(mode=mode, patience=NO_STOP_PATIENCE, nan_policy="ignore")
        return self._spec

    def _model(self):
        keras = keras_backend()
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1),
                                  keras.layers.Dense(1, trainable=False, name="epoch_tag")])
        metrics = self._metrics() if callable(self._metrics) else list(self._metrics or [])
        model.compile(optimizer="sgd", loss="mse", metrics=metrics)
        return model

    def run(self, values):
        from pytest_mlrepro.checkpoint.oracle import Outcome

        values = [float(v) for v in values]
        if not values:
            return empty_outcome()
        keras = keras_backend()
        import numpy as np

        monitor = self.monitor

        class Inject(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epochs = []

            def on_epoch_end(self, epoch, logs=None):
                self.model.get_layer("epoch_tag").bias.assign(np.array([float(epoch)], dtype="float32"))
                logs[monitor] = values[epoch]
                self.epochs.append(epoch)

        class Record(keras.callbacks.Callback):
            def __init__(self, es, ck):
                super().__init__()
                self.es, self.improved, self.stop_epoch = es, [], None

            def on_epoch_end(self, epoch, logs=None):
                es = self.es
                if es is not None and es.best is not None and es.best_epoch == epoch:
                    self.improved.append(epoch)
                if self.model.stop_training and self.stop_epoch is None:
                    self.stop_epoch = epoch

        with tempfile.TemporaryDirectory(prefix="mlrepro-keras-") as tmp:
            run_dir = os.path.join(self._dirpath or tmp, f"run-{os.getpid()}-{id(values)}")
            es = keras.callbacks.EarlyStopping(**self._es_kwargs) if self._es_kwargs is not None else None
            ck = None
            if self._ck_kwargs is not None:
                ck = keras.callbacks.ModelCheckpoint(
                    **{"filepath": os.path.join(run_dir, "e{epoch}.weights.h5"), "save_best_only": True,
                       "save_weights_only": True, **self._ck_kwargs})
            inject, rec = Inject(), Record(es, ck)
            model = self._model()
            x = np.ones((2, 1), dtype="float32")
            with quiet("keras"):
                model.fit(x, x, epochs=len(values), batch_size=2, verbose=0, shuffle=False,
                          callbacks=[c for c in (inject, es, ck, rec) if c is not None])
            watched = es if es is not None else ck
            resolved = "max" if watched.monitor_op is keras.ops.greater else "min"
            info = {"epochs": list(inject.epochs), "resolved_mode": resolved, "early_stopping": es,
                    "model_stop_training": bool(model.stop_training)}
            if ck is not None:
                files = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
                saved = tuple(sorted(int(f[1:].split(".")[0]) - 1 for f in files))  # Keras names epoch+1
                best_epoch = self._tag_of(model, os.path.join(run_dir, f"e{saved[-1] + 1}.weights.h5")) if saved else None
                best_value = as_float(ck.best) if saved else None
                info.update(files=files, best_weights_epoch=best_epoch, ck_best=as_float(ck.best))
            else:
                saved = tuple(rec.improved)
                best_epoch = rec.improved[-1] if rec.improved else None
                best_value = as_float(es.best) if rec.improved else None
            if es is not None:
                info.update(es_stopped_epoch=es.stopped_epoch, es_best=as_float(es.best), es_best_epoch=es.best_epoch)
            self.last_run = info
        return Outcome(len(inject.epochs), rec.stop_epoch, best_epoch, best_value, saved)

    @staticmethod
    def _tag_of(model, path):
        """Load the weights file into the model and read back the epoch it was written at."""
        model.load_weights(path)
        return int(round(float(model.get_layer("epoch_tag").bias.numpy()[0])))


def early_stopping_factory(monitor: str = "val_loss", **fixed):
    """``spec -> KerasDriver`` configuring ``EarlyStopping`` from the spec (explicit mode)."""
    return _factory(monitor, checkpoint=False, **fixed)


def checkpoint_factory(monitor: str = "val_loss", dirpath=None, **fixed):
    """``spec -> KerasDriver`` with ``EarlyStopping`` + ``ModelCheckpoint(save_best_only=True)``."""
    return _factory(monitor, checkpoint=True, dirpath=dirpath, **fixed)


def _factory(monitor, *, checkpoint, dirpath=None, **fixed):
    from pytest_mlrepro.checkpoint.conformance import UnsupportedSpec

    def make(spec):
        if spec.nan_policy != "ignore":
            raise UnsupportedSpec("Keras has no NaN stop; a NaN counts as a non-improvement")
        if checkpoint and (spec.min_delta or spec.baseline is not None or spec.start_from_epoch):
            raise UnsupportedSpec("Keras ModelCheckpoint has no min_delta / baseline / start_from_epoch")
        es = {"mode": spec.mode, "patience": spec.patience, "min_delta": spec.min_delta,
              "baseline": spec.baseline, "start_from_epoch": spec.start_from_epoch, **fixed}
        ck = {"mode": spec.mode} if checkpoint else None
        return KerasDriver(monitor, early_stopping=es, checkpoint=ck, dirpath=dirpath)

    return make


def supported_specs(*, checkpoint: bool = False):
    """The ``StopSpec`` strategy restricted to what Keras can express."""
    from pytest_mlrepro.checkpoint.strategies import stop_specs

    if checkpoint:
        return stop_specs(nan_policies=("ignore",), min_deltas=(0.0,), baseline=False, start_from_epoch=False)
    return stop_specs(nan_policies=("ignore",))
