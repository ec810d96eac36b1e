"""Hugging Face ``Trainer``'s best model (and its ``EarlyStoppingCallback``), observed in ``train()``.

``Trainer._determine_best_metric(metrics, trial)`` is the one place that compares
``metrics["eval_" + metric_for_best_model]`` with ``state.best_metric`` (``np.greater`` if
``args.greater_is_better`` else ``np.less``) and returns whether it is a new best; the checkpoint saved
then becomes ``state.best_model_checkpoint``, which ``load_best_model_at_end`` loads back.
``EarlyStoppingCallback`` counts against the same metric, so it is part of the Trainer's observation.
"""
from __future__ import annotations

import os

from .records import CallbackObservation
from .recorder import guarded

__all__ = ["patchers"]


def patchers(recorder) -> dict:
    return {"transformers.trainer": lambda m, p: _patch(m.Trainer, p, recorder)}


def _metric_key(args) -> str:
    m = args.metric_for_best_model
    return m if m.startswith("eval_") else f"eval_{m}"


def _patch(cls, patches, recorder) -> None:
    @guarded(recorder)
    def record(self, metrics, is_new):
        args = self.args
        if args.metric_for_best_model is None or _metric_key(args) not in metrics:
            return
        obs = recorder.observation(self, lambda: CallbackObservation(
            framework="transformers", callback="Trainer", role="checkpoint", monitor=args.metric_for_best_model,
            mode="max" if args.greater_is_better else "min", group=recorder.group(self),
            kept="state.best_model_checkpoint" + (", loaded at the end" if args.load_best_model_at_end else ""),
            config={"greater_is_better": args.greater_is_better, "load_best_model_at_end": args.load_best_model_at_end,
                    "save_strategy": str(getattr(args.save_strategy, "value", args.save_strategy)),
                    "early_stopping": _early_stopping(self)}), _finalize)
        recorder.evaluation(obs, value=metrics[_metric_key(args)], epoch=self.state.epoch,
                            step=self.state.global_step, improved=bool(is_new))

    def make(original):
        def _determine_best_metric(self, metrics, trial):
            is_new = original(self, metrics, trial)
            record(self, metrics, is_new)
            return is_new
        return _determine_best_metric

    patches.wrap(cls, "_determine_best_metric", make)


def _early_stopping(trainer):
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "EarlyStoppingCallback":
            return {"patience": cb.early_stopping_patience, "threshold": cb.early_stopping_threshold}
    return None


def _finalize(trainer, obs) -> None:
    best = trainer.state.best_model_checkpoint
    obs.config["best_model_checkpoint"] = os.path.basename(best) if best else None
    for cb in trainer.callback_handler.callbacks:  # control.should_training_stop is also set at max_steps
        if type(cb).__name__ == "EarlyStoppingCallback" and obs.evaluations and \
                cb.early_stopping_patience_counter >= cb.early_stopping_patience:
            obs.stopped_index = obs.evaluations[-1].index
