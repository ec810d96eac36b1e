"""Collects observations while the program trains; our own failures never reach the program."""
from __future__ import annotations

import functools
from typing import Callable, Optional

from .records import CallbackObservation, Evaluation

__all__ = ["Recorder", "guarded", "direction_of_comparator"]


def direction_of_comparator(op) -> Optional[str]:
    """``np.less`` / ``keras.ops.less`` / ``torch.lt`` -> "min"; the greater ones -> "max"; else None."""
    name = getattr(op, "__name__", None)
    return {"less": "min", "lt": "min", "greater": "max", "gt": "max"}.get(name)


def guarded(recorder: "Recorder"):
    """Decorator for recording code: an exception is noted as a problem, not raised into the training."""
    def decorate(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                recorder.problems.append(f"{fn.__qualname__}: {type(exc).__name__}: {exc}")
                return None
        return inner
    return decorate


class Recorder:
    """One observation per callback object (a new one when a fit resets it), in creation order."""

    def __init__(self) -> None:
        self._current: dict = {}  # id(callback) -> (callback, CallbackObservation, finalize)
        self._done: list = []  # (callback, observation, finalize) of every observation, in order
        self._groups: dict = {}  # id(key) -> (key, group number)
        self.problems: list = []

    def group(self, key) -> int:
        """One number per training run (a Trainer, a model, a Learner). The key is kept alive with its
        number: a freed object's id is reused, which would pair callbacks of two different runs."""
        entry = self._groups.get(id(key))
        if entry is None or entry[0] is not key:
            entry = self._groups[id(key)] = (key, len(self._groups))
        return entry[1]

    def observation(self, obj, make: Callable[[], CallbackObservation],
                    finalize: Optional[Callable] = None) -> CallbackObservation:
        entry = self._current.get(id(obj))
        if entry is None or entry[0] is not obj:
            entry = (obj, make(), finalize)
            self._current[id(obj)] = entry
            self._done.append(entry)
        return entry[1]

    def find(self, obj) -> Optional[CallbackObservation]:
        entry = self._current.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def restart(self, obj) -> None:
        """The callback reset its best (a new fit): later evaluations start a new observation."""
        entry = self._current.get(id(obj))
        if entry is not None and entry[0] is obj and entry[1].evaluations:
            del self._current[id(obj)]

    def evaluation(self, obs: CallbackObservation, *, value, epoch, improved: bool, step=None) -> Evaluation:
        from pytest_mlrepro.checkpoint.adapters import as_float

        epoch = as_float(epoch)
        if epoch is not None and epoch.is_integer():
            epoch = int(epoch)
        ev = Evaluation(index=len(obs.evaluations), epoch=epoch, value=as_float(value),
                        improved=bool(improved), step=None if step is None else int(step))
        obs.evaluations.append(ev)
        return ev

    def to_list(self) -> list:
        """Every observation with at least one evaluation, finalized (what the objects hold at the end)."""
        out = []
        for obj, obs, finalize in self._done:
            if finalize is not None:
                try:
                    finalize(obj, obs)
                except Exception as exc:
                    self.problems.append(f"reading {obs.framework} {obs.callback} at the end: {type(exc).__name__}: {exc}")
            if obs.evaluations:
                out.append(obs.to_dict())
        return out
