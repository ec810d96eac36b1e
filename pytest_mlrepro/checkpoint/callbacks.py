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
    a small environment dict and ``weights_sha256`` of the saved weights. Unless
    ``write_history=False``, the per-epoch metric history is kept beside it
    (``<filename>.history.json``) for the reload contract.
    """

    def __init__(self, monitor: str, mode: str | None = None, min_delta: float = 0.0, *, dirpath=".",
                 filename: str = "best.pt", baseline: float | None = None, start_from_epoch: int = 0,
                 seed: int | None = None, write_history: bool = True, fsync: bool = True):
        self.monitor = monitor
        self.spec = StopSpec(_resolve_mode(monitor, mode), 0, min_delta, baseline, start_from_epoch, "ignore")
        self.mode = self.spec.mode
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / filename
        self.history_path = self.dirpath / f"{filename}.history.json"
        self.seed = seed
        self.write_history = write_history
        self.fsync = fsync
        self._best = baseline
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
        record = plain_metrics(metrics)
        self.history.append({"epoch": epoch, "step": step, **record})
        saved = False
        if epoch >= self.spec.start_from_epoch and is_improvement(value, self._best, self.mode, self.spec.min_delta):
            self._save(epoch, step, record, value, model)
            saved = True
        if self.write_history:
            self._write_history()
        return saved

    def _save(self, epoch, step, record, value, model):
        import torch

        from pytest_mlrepro.checkpoint import storage

        t0 = time.perf_counter()
        state = model.state_dict() if hasattr(model, "state_dict") else model
        if not isinstance(state, dict):
            raise TypeError(f"BestCheckpoint: model must be an nn.Module or a state dict, got {type(model).__name__}")
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
            "weights_sha256": storage.weights_sha256(state),
            "environment": storage.environment_info(),
        }
        self.bytes_written += storage.save_checkpoint(self.path, state, metadata, fsync=self.fsync)
        self.save_seconds += time.perf_counter() - t0
        self.n_saves += 1
        self._best = self.best_value = value
        self.best_epoch = epoch
        self.best_metrics = record
        self.saved_epochs.append(epoch)

    def _write_history(self):
        from pytest_mlrepro.checkpoint import storage

        storage.atomic_write_json(self.history_path, {"monitor": self.monitor, "mode": self.mode,
                                                      "checkpoint": self.path.name, "history": self.history},
                                  fsync=False)  # rewritten every epoch; atomic, but not worth an fsync each time
