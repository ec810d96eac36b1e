"""Lightning's ``ModelCheckpoint`` and ``EarlyStopping``, observed in the program's own ``Trainer``.

``ModelCheckpoint._save_topk_checkpoint(trainer, monitor_candidates)`` is where it compares the
monitored value and moves ``best_model_path``/``best_model_score`` (a new score object = a new best);
``EarlyStopping._run_early_stopping_check(trainer)`` reads ``trainer.callback_metrics[monitor]`` and
replaces ``best_score`` on an improvement. Both exist in ``pytorch_lightning`` and ``lightning.pytorch``.
"""
from __future__ import annotations

import os

from .records import CallbackObservation
from .recorder import guarded

__all__ = ["patchers"]


def patchers(recorder) -> dict:
    out = {}
    for root in ("pytorch_lightning", "lightning.pytorch"):
        out[f"{root}.callbacks.model_checkpoint"] = lambda m, p: _patch_checkpoint(m.ModelCheckpoint, p, recorder)
        out[f"{root}.callbacks.early_stopping"] = lambda m, p: _patch_early_stopping(m.EarlyStopping, p, recorder)
    return out


def _patch_checkpoint(cls, patches, recorder) -> None:
    @guarded(recorder)
    def record(self, trainer, candidates, before):
        if self.monitor is None or self.monitor not in candidates:
            return
        obs = recorder.observation(self, lambda: CallbackObservation(
            framework="lightning", callback=type(self).__name__, role="checkpoint", monitor=self.monitor,
            mode=self.mode, group=recorder.group(trainer), kept="best_model_path",
            config={"save_top_k": self.save_top_k, "mode": self.mode}), _finalize_checkpoint)
        recorder.evaluation(obs, value=candidates[self.monitor], epoch=trainer.current_epoch,
                            step=trainer.global_step, improved=self.best_model_score is not before)

    def make(original):
        def _save_topk_checkpoint(self, trainer, monitor_candidates):
            before = self.best_model_score
            result = original(self, trainer, monitor_candidates)
            if self.save_top_k != 0:
                record(self, trainer, monitor_candidates, before)
            return result
        return _save_topk_checkpoint

    patches.wrap(cls, "_save_topk_checkpoint", make)


def _finalize_checkpoint(ck, obs) -> None:
    obs.config["best_model_path"] = os.path.basename(ck.best_model_path or "") or None


def _patch_early_stopping(cls, patches, recorder) -> None:
    @guarded(recorder)
    def record(self, trainer, value, before):
        obs = recorder.observation(self, lambda: CallbackObservation(
            framework="lightning", callback=type(self).__name__, role="early_stopping", monitor=self.monitor,
            mode=self.mode, group=recorder.group(trainer), min_delta=abs(float(self.min_delta)), kept="best",
            config={"patience": self.patience, "check_finite": self.check_finite, "mode": self.mode}))
        ev = recorder.evaluation(obs, value=value, epoch=trainer.current_epoch, step=trainer.global_step,
                                 improved=self.best_score is not before)
        if trainer.should_stop and obs.stopped_index is None and self.stopped_epoch == trainer.current_epoch:
            obs.stopped_index = ev.index

    def make(original):
        def _run_early_stopping_check(self, trainer):
            value = trainer.callback_metrics.get(self.monitor)
            before = self.best_score
            result = original(self, trainer)
            if value is not None and not trainer.fast_dev_run:
                record(self, trainer, value, before)
            return result
        return _run_early_stopping_check

    patches.wrap(cls, "_run_early_stopping_check", make)
