"""Keras 3's ``ModelCheckpoint(save_best_only=True)`` and ``EarlyStopping``, observed in ``model.fit``.

Both resolve their direction (``monitor_op``: ``ops.less``/``ops.greater``) at the first
``on_epoch_end`` and assign ``self.best = current`` on an improvement (a new object = a new best).
"""
from __future__ import annotations

from .records import CallbackObservation
from .recorder import direction_of_comparator, guarded

__all__ = ["patchers"]


def patchers(recorder) -> dict:
    return {
        "keras.src.callbacks.model_checkpoint": lambda m, p: _patch(m.ModelCheckpoint, p, recorder, "checkpoint"),
        "keras.src.callbacks.early_stopping": lambda m, p: _patch(m.EarlyStopping, p, recorder, "early_stopping"),
    }


def _patch(cls, patches, recorder, role: str) -> None:
    @guarded(recorder)
    def record(self, epoch, logs, before):
        value = (logs or {}).get(self.monitor)
        if value is None or getattr(value, "shape", ()) not in ((), None):
            return
        if role == "checkpoint" and not (self.save_best_only and self.save_freq == "epoch"):
            return
        baseline = None
        if role == "checkpoint":
            kept, config = "saved file", {"filepath": str(self.filepath), "mode": self.mode}
            min_delta, start = 0.0, 0
            # its best before its first evaluation: initial_value_threshold, which a value must beat to be saved
            baseline = None if before is None else float(before)
        else:
            kept = "restored weights" if self.restore_best_weights else "best"
            config = {"patience": self.patience, "restore_best_weights": self.restore_best_weights,
                      "baseline": self.baseline, "mode": self.mode}
            min_delta, start = abs(float(self.min_delta)), int(self.start_from_epoch)
        obs = recorder.observation(self, lambda: CallbackObservation(
            framework="keras", callback=type(self).__name__, role=role, monitor=self.monitor,
            mode=direction_of_comparator(self.monitor_op), group=recorder.group(self.model), min_delta=min_delta,
            start_from_epoch=start, baseline=baseline, kept=kept, config=config))
        ev = recorder.evaluation(obs, value=value, epoch=epoch, improved=self.best is not before)
        if role == "early_stopping" and obs.stopped_index is None and self.stopped_epoch == epoch and epoch > 0:
            obs.stopped_index = ev.index

    def make(original):
        def on_epoch_end(self, epoch, logs=None):
            before = self.best
            result = original(self, epoch, logs)
            record(self, epoch, logs, before)
            return result
        return on_epoch_end

    patches.wrap(cls, "on_epoch_end", make)

    def make_begin(original):  # a second fit resets the callback's best: a new observation
        def on_train_begin(self, logs=None):
            recorder.restart(self)
            return original(self, logs)
        return on_train_begin

    patches.wrap(cls, "on_train_begin", make_begin)
