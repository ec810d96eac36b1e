"""fastai's ``TrackerCallback``s (``SaveModelCallback``, ``EarlyStoppingCallback``, ...), observed in ``fit``.

``TrackerCallback.after_epoch`` compares ``recorder.values[-1][idx]`` with ``comp(val - min_delta, best)``
and sets ``new_best``; the subclasses call it through ``super()``, so one wrapper sees every tracker.
``before_fit`` resets the best when ``reset_on_fit``; ``EarlyStoppingCallback`` stops by raising
``CancelFitException``; ``SaveModelCallback.after_fit`` loads the last best file back.
"""
from __future__ import annotations

from .records import CallbackObservation
from .recorder import direction_of_comparator, guarded

__all__ = ["patchers"]


def patchers(recorder) -> dict:
    return {"fastai.callback.tracker": lambda m, p: _patch(m, p, recorder)}


def _role(cb) -> tuple:
    name = type(cb).__name__
    if hasattr(cb, "every_epoch") and hasattr(cb, "at_end"):  # SaveModelCallback and its subclasses
        if cb.every_epoch or cb.at_end:
            return "tracker", "saved files (not the best)"
        return "checkpoint", "weights loaded back by after_fit"
    if hasattr(cb, "patience") and "EarlyStopping" in name:
        return "early_stopping", "best"
    return "tracker", "best"


def _patch(module, patches, recorder) -> None:
    tracker = module.TrackerCallback

    @guarded(recorder)
    def record(self):
        value = self.recorder.values[-1][self.idx]
        role, kept = _role(self)
        config = {k: getattr(self, k) for k in ("patience", "every_epoch", "at_end", "reset_on_fit") if hasattr(self, k)}
        config["comp"] = getattr(self.comp, "__name__", repr(self.comp))
        obs = recorder.observation(self, lambda: CallbackObservation(
            framework="fastai", callback=type(self).__name__, role=role, monitor=self.monitor,
            mode=direction_of_comparator(self.comp), group=recorder.group(self.learn),
            min_delta=abs(float(self.min_delta)), kept=kept, config=config))
        recorder.evaluation(obs, value=value, epoch=self.epoch, improved=bool(getattr(self, "new_best", False)))

    def make_after_epoch(original):
        def after_epoch(self):
            result = original(self)
            record(self)
            return result
        return after_epoch

    def make_before_fit(original):
        def before_fit(self):
            if self.reset_on_fit:
                recorder.restart(self)
            return original(self)
        return before_fit

    patches.wrap(tracker, "after_epoch", make_after_epoch)
    patches.wrap(tracker, "before_fit", make_before_fit)
    es = getattr(module, "EarlyStoppingCallback", None)
    cancel = getattr(module, "CancelFitException", None)
    if es is not None and cancel is not None:
        @guarded(recorder)
        def stopped(self):
            obs = recorder.find(self)
            if obs is not None and obs.evaluations and obs.stopped_index is None:
                obs.stopped_index = obs.evaluations[-1].index

        def make_es(original):
            def after_epoch(self):
                try:
                    return original(self)
                except cancel:
                    stopped(self)
                    raise
            return after_epoch

        patches.wrap(es, "after_epoch", make_es)
