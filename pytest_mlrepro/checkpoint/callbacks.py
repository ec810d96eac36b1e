"""Reference callbacks for a plain PyTorch loop: ``BestCheckpoint`` and ``EarlyStopping``.

They implement exactly the semantics of ``oracle.simulate`` (tested property by property) and are
the behaviour the framework adapters are compared against. Call them at the end of every epoch:

    ckpt = BestCheckpoint("val_loss", dirpath=out)           # mode inferred: min
    stop = EarlyStopping("val_loss", patience=3)
    for epoch in range(max_epochs):
        metrics = {"train_loss": ..., "val_loss": ..., "val_mae": ...}
        ckpt.on_epoch_end(epoch, metrics, model, step=global_step)
        if stop.on_epoch_end(epoch, metrics):
            break
"""
from __future__ import annotations

import math
import operator
import time
from pathlib import Path

from pytest_mlrepro.checkpoint.direction import infer_direction
from pytest_mlrepro.checkpoint.oracle import StopSpec, is_improvement

__all__ = ["BestCheckpoint", "EarlyStopping", "MetricMissingError", "monitored_value", "plain_metrics"]

METADATA_FORMAT = "pytest-mlrepro/best-checkpoint-metadata"


class MetricMissingError(LookupError):
    """The monitored metric is not among the metrics logged for an epoch."""

    def __init__(self, owner: str, monitor: str, epoch, available):
        self.monitor, self.epoch, self.available = monitor, epoch, sorted(map(str, available))
        super().__init__(
            f"{owner}: monitored metric {monitor!r} is missing from the metrics of epoch {epoch} "
            f"(logged: {', '.join(self.available) or 'nothing'})"
        )

    def __str__(self):  # LookupError would repr() the message
        return self.args[0]


def _to_float(value, monitor, epoch):
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {monitor!r} at epoch {epoch} is not a number: {value!r} ({exc})") from None


def monitored_value(owner: str, monitor: str, epoch, metrics: dict) -> float:
    if not isinstance(metrics, dict):
        raise TypeError(f"{owner}: metrics of epoch {epoch} must be a dict, got {type(metrics).__name__}")
    if monitor not in metrics:
        raise MetricMissingError(owner, monitor, epoch, metrics.keys())
    return _to_float(metrics[monitor], monitor, epoch)


def plain_metrics(metrics: dict) -> dict:
    """Metrics as JSON-friendly floats (0-d tensors and numpy scalars unwrapped); others as str."""
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            out[str(k)] = str(v)
    return out


def _resolve_mode(monitor: str, mode):
    if mode is None:
        return infer_direction(monitor)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or None (infer from {monitor!r}), got {mode!r}")
    return mode


class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``max(patience, 1)`` counted epochs.

    ``on_epoch_end(epoch, metrics) -> should_stop``. After a stop, ``stopped_epoch`` is that
    epoch; ``best_epoch``/``best_value`` are the last improvement (None if none).
    """

    def __init__(self, monitor: str, mode: str | None = None, patience: int = 0, min_delta: float = 0.0,
                 baseline: float | None = None, start_from_epoch: int = 0, nan_policy: str = "stop"):
        self.monitor = monitor
        self.spec = StopSpec(_resolve_mode(monitor, mode), patience, min_delta, baseline, start_from_epoch, nan_policy)
        self.mode = self.spec.mode
        self._best = baseline
        self.best_epoch = None
        self.best_value = None
        self.wait = 0
        self.stopped_epoch = None
        self.improved_epochs = []

    @property
    def should_stop(self) -> bool:
        return self.stopped_epoch is not None

    def on_epoch_end(self, epoch: int, metrics: dict) -> bool:
        if self.stopped_epoch is not None:
            return True
        value = monitored_value("EarlyStopping", self.monitor, epoch, metrics)
        spec = self.spec
        if epoch < spec.start_from_epoch:
            return False
        nonfinite_stops = (math.isnan(value) and spec.nan_policy != "ignore") or (
            math.isinf(value) and spec.nan_policy == "stop_nonfinite")
        if nonfinite_stops:
            self.stopped_epoch = epoch
            return True
        if is_improvement(value, self._best, spec.mode, spec.min_delta):
            self._best = self.best_value = value
            self.best_epoch = epoch
            self.wait = 0
            self.improved_epochs.append(epoch)
            return False
        self.wait += 1
        if self.wait >= max(spec.patience, 1):
            self.stopped_epoch = epoch
            return True
        return False


class BestCheckpoint:
    """Save the model only when ``monitor`` improves, atomically, with the epoch's full record.

    The checkpoint's metadata holds ALL metrics of the saved epoch, the epoch and step, the seed,
    a small environment dict, ``weights_sha256`` of the saved weights and the ``save_id`` naming
    this save. Unless ``write_history=False``, the per-epoch metric history is kept beside it
    (``<filename>.history.json``) for the reload contract, written so that a crash at any moment
    leaves a consistent pair: on an improving epoch the sidecar is written first (with the epoch
    and a ``pending`` record of the save), then the checkpoint, then the sidecar again (``saved``);
    ``storage.reconcile_history`` reads a pending save the checkpoint lacks as "never landed".
    Epochs must be ints that increase; an epoch whose write raised is not recorded.
    """

    def __init__(self, monitor: str, mode: str | None = None, min_delta: float = 0.0, *, dirpath=".",
                 filename: str = "best.pt", baseline: float | None = None, start_from_epoch: int = 0,
                 seed: int | None = None, write_history: bool = True, fsync: bool = True):
        from pytest_mlrepro.checkpoint.storage import history_path

        self.monitor = monitor
        self.spec = StopSpec(_resolve_mode(monitor, mode), 0, min_delta, baseline, start_from_epoch, "ignore")
        self.mode = self.spec.mode
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / filename
        self.history_path = history_path(self.path)
        self.seed = seed
        self.write_history = write_history
        self.fsync = fsync
        self._best = baseline
        self._saved = None  # {"epoch", "save_id"} of the checkpoint on disk
        self.best_epoch = None
        self.best_value = None
        self.best_metrics = None
        self.saved_epochs = []
        self.history = []
        self.n_saves = 0
        self.bytes_written = 0
        self.save_seconds = 0.0

    def on_epoch_end(self, epoch: int, metrics: dict, model, *, step: int | None = None) -> bool:
        """Record the epoch; save if the monitored metric improved. Returns whether it saved."""
        value = monitored_value("BestCheckpoint", self.monitor, epoch, metrics)
        epoch, step = self._check_epoch(epoch), self._check_step(step)
        record = plain_metrics(metrics)
        improved = epoch >= self.spec.start_from_epoch and is_improvement(value, self._best, self.mode,
                                                                          self.spec.min_delta)
        state = self._state_dict(model) if improved else None
        if not self.history:
            self._remove_stale_temp_files()
        self.history.append({"epoch": epoch, "step": step, **record})
        if improved:
            self._save(epoch, step, record, value, state)
        elif self.write_history:
            try:
                self._write_history(pending=None, fsync=False)  # not worth an fsync: losing it loses nothing
            except BaseException:
                self.history.pop()
                raise
        return improved

    def _check_epoch(self, epoch) -> int:
        """Epochs name history entries: a repeated or decreasing one would make the history ambiguous."""
        from pytest_mlrepro.checkpoint.storage import CheckpointError

        try:
            if isinstance(epoch, bool):
                raise TypeError
            epoch = operator.index(epoch)  # ints, numpy ints, integer 0-d tensors
        except TypeError:
            raise CheckpointError(self.path, f"BestCheckpoint: epoch must be an int, got {epoch!r}") from None
        if self.history and epoch <= self.history[-1]["epoch"]:
            raise CheckpointError(self.path, f"BestCheckpoint: epoch {epoch} logged after epoch "
                                             f"{self.history[-1]['epoch']}; epochs must increase")
        return epoch

    def _check_step(self, step):
        """The step goes into JSON (history, metadata): an int or None."""
        from pytest_mlrepro.checkpoint.storage import CheckpointError

        if step is None:
            return None
        try:
            if isinstance(step, bool):
                raise TypeError
            return operator.index(step)
        except TypeError:
            raise CheckpointError(self.path, f"BestCheckpoint: step must be an int or None, got {step!r}") from None

    def _state_dict(self, model) -> dict:
        from pytest_mlrepro.checkpoint.storage import CheckpointError

        state = model.state_dict() if hasattr(model, "state_dict") else model
        if not isinstance(state, dict):
            raise CheckpointError(self.path, f"BestCheckpoint: model must be an nn.Module or a state dict, "
                                             f"got {type(model).__name__}")
        return state

    def _remove_stale_temp_files(self) -> None:
        """A new run cleans what a killed one left (only our own temp files of these two names)."""
        from pytest_mlrepro.checkpoint import storage

        storage.remove_stale_temp_files(self.path)
        storage.remove_stale_temp_files(self.history_path)

    def _save(self, epoch, step, record, value, state):
        """Sidecar with the pending save, then the checkpoint, then the sidecar with it saved."""
        import torch

        from pytest_mlrepro.checkpoint import storage

        t0 = time.perf_counter()
        try:  # until the checkpoint landed, a failure un-records the epoch (the disk pair stays consistent)
            weights_hash = storage.weights_sha256(state)
            sid = storage.save_id(epoch, weights_hash)
            metadata = {
                "format": METADATA_FORMAT,
                "monitor": self.monitor,
                "mode": self.mode,
                "min_delta": self.spec.min_delta,
                "baseline": self.spec.baseline,
                "start_from_epoch": self.spec.start_from_epoch,
                "epoch": epoch,
                "step": step,
                "seed": self.seed if self.seed is not None else torch.initial_seed(),
                "best_value": value,
                "metrics": record,
                "weights_sha256": weights_hash,
                "save_id": sid,
                "environment": storage.environment_info(),
            }
            if self.write_history:  # fsynced: it must be on disk before the checkpoint it announces
                self._write_history(pending={"epoch": epoch, "save_id": sid}, fsync=self.fsync)
            self.bytes_written += storage.save_checkpoint(self.path, state, metadata, fsync=self.fsync)
        except BaseException:
            self.history.pop()
            raise
        self.save_seconds += time.perf_counter() - t0
        self.n_saves += 1
        self._best = self.best_value = value
        self._saved = {"epoch": epoch, "save_id": sid}
        self.best_epoch = epoch
        self.best_metrics = record
        self.saved_epochs.append(epoch)
        if self.write_history:  # a crash before this is read as "landed" (the checkpoint has sid)
            self._write_history(pending=None, fsync=False)

    def _write_history(self, *, pending, fsync: bool):
        from pytest_mlrepro.checkpoint import storage

        storage.write_history(self.path, monitor=self.monitor, mode=self.mode, history=self.history,
                              saved=self._saved, pending=pending, fsync=fsync)
