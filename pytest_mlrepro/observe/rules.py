"""Findings from observed framework callbacks: pure functions over typed records, no framework needed.

Rules, each a named function of one observation (or of one training run's observations):

- ``direction_rule``: the direction the framework used vs. the direction table (``infer_direction``);
- ``best_rule``: the evaluation the framework kept as best vs. the arg-best of the values it logged
  (``oracle.simulate`` with the right direction and the callback's own ``min_delta`` /
  ``start_from_epoch``, NaN never best); a NaN in the way is reported as ``framework.nan``;
- ``monitors_rule``: a checkpoint callback and an early-stopping callback of one run watch different metrics.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from .. import checks
from ..result import Finding
from .records import CallbackObservation, encode_float

__all__ = ["observed_findings", "direction_rule", "best_rule", "monitors_rule", "RULES"]

_NAMES = {"lightning": "Lightning", "keras": "Keras", "transformers": "Hugging Face", "fastai": "fastai"}

# why a framework picked the direction it used when the program did not say
_DEFAULTS = {
    "lightning": "Lightning's `mode` defaults to 'min' for every metric",
    "transformers": "with `greater_is_better` unset, Transformers maximises every metric whose name does not end in 'loss'",
    "fastai": "with `comp` unset, fastai minimises only names containing 'loss' or 'error'",
    "keras": "the callback's `mode`",
}


def _fix_direction(o: CallbackObservation, expected: str) -> str:
    if o.framework == "transformers":
        return (f"TrainingArguments(metric_for_best_model={o.monitor!r}, "
                f"greater_is_better={expected == 'max'})")
    if o.framework == "fastai":
        return f"{o.callback}(monitor={o.monitor!r}, comp=np.{'less' if expected == 'min' else 'greater'})"
    return f"{o.callback}(monitor={o.monitor!r}, mode={expected!r})"


def _fix_nan(o: CallbackObservation) -> str:
    return {
        "lightning": "keep the monitored metric finite (ModelCheckpoint saves a first NaN score as best; do not "
                     "load best_model_path while best_model_score is NaN/inf)",
        "keras": "add keras.callbacks.TerminateOnNaN() before it, or keep the metric finite (a first NaN stays best)",
        "fastai": "add TerminateOnNaNCallback(), or keep the metric finite",
    }.get(o.framework, "keep the monitored metric finite")


def _who(o: CallbackObservation) -> str:
    return f"{_NAMES.get(o.framework, o.framework)} {o.callback}"


def _configured(o: CallbackObservation) -> str:
    """The callback as the program configured it, e.g. ``Lightning ModelCheckpoint(monitor='val_acc')``."""
    key = "metric_for_best_model" if o.framework == "transformers" else "monitor"
    return f"{_who(o)}({key}={o.monitor!r})"


def _fmt(v: Optional[float]) -> str:
    return "missing" if v is None else f"{v:.6g}"


def _label(o: CallbackObservation, index: int) -> str:
    e = o.evaluations[index]
    if e.epoch is None:
        return f"evaluation {index}"
    return f"epoch {int(e.epoch)}" if float(e.epoch).is_integer() else f"epoch {e.epoch:g}"


def _at(o: CallbackObservation, index: Optional[int], note: str = "") -> str:
    """``epoch 3 (val_acc=0.91)``, with an optional note inside the brackets."""
    if index is None:
        return "no epoch"
    return f"{_label(o, index)} ({o.monitor}={_fmt(o.evaluations[index].value)}{'; ' + note if note else ''})"


def _epoch(o: CallbackObservation, index: Optional[int]):
    return None if index is None else o.evaluations[index].epoch


def _stopped_epoch(o: CallbackObservation) -> Optional[int]:
    """The epoch it stopped after, for ``details["stopped_epoch"]`` (an int, as publishers require)."""
    epoch = _epoch(o, o.stopped_index)
    return epoch if isinstance(epoch, int) else None


def _expected(o: CallbackObservation) -> Optional[str]:
    from ..checkpoint.direction import infer_direction

    try:
        return infer_direction(o.monitor)
    except ValueError:
        return None


def _details(o: CallbackObservation, **extra) -> dict:
    return {"framework": o.framework, "callback": o.callback, "role": o.role, "monitor": o.monitor,
            "observed_mode": o.mode, "min_delta": o.min_delta, "kept": o.kept, "config": o.config,
            "epochs": [e.epoch for e in o.evaluations], "values": [encode_float(e.value) for e in o.evaluations],
            "improved_epochs": [e.epoch for e in o.evaluations if e.improved],
            "stopped_epoch": _stopped_epoch(o), **extra}


def direction_rule(o: CallbackObservation) -> Optional[Finding]:
    """fail when the framework compared the monitored metric the wrong way round."""
    if o.monitor is None:
        return None
    expected = _expected(o)
    if expected is None or o.mode is None:
        why = (f"{o.monitor!r} is not in the direction table" if expected is None
               else f"its comparator {o.config.get('comp')!r} is neither less nor greater")
        return Finding(checks.FRAMEWORK_DIRECTION, "skip", f"{_who(o)}: direction not checked ({why})",
                       _details(o, expected_mode=expected))
    details = _details(o, expected_mode=expected)
    if o.mode == expected:
        return Finding(checks.FRAMEWORK_DIRECTION, "pass",
                       f"{_who(o)} {o.mode}imises {o.monitor!r}, as it should", details)
    best = _reference(o, expected)
    return Finding(
        checks.FRAMEWORK_DIRECTION, "fail",
        f"{_configured(o)} {o.mode}imises it ({_DEFAULTS.get(o.framework, 'its mode')}), but "
        f"{o.monitor!r} should be {expected}imised: it kept {_at(o, o.kept_index)} as best, the best logged was "
        f"{_at(o, best)}. Fix: {_fix_direction(o, expected)}", details)


def _reference(o: CallbackObservation, mode: str) -> Optional[int]:
    """The evaluation a correct best-only tracker keeps: the last strict improvement by more than min_delta."""
    from ..checkpoint.oracle import StopSpec, simulate

    spec = StopSpec(mode=mode, patience=len(o.evaluations) + 1, min_delta=o.min_delta, baseline=o.baseline,
                    start_from_epoch=o.start_from_epoch, nan_policy="ignore")
    return simulate(o.values, spec).best_epoch


def best_rule(o: CallbackObservation) -> Optional[Finding]:
    """fail when the epoch the framework kept as best is not the arg-best of the values it saw."""
    if o.role not in ("checkpoint", "early_stopping") or not o.evaluations:
        return None
    mode = _expected(o) or o.mode
    if mode is None:
        return None
    kept, best = o.kept_index, _reference(o, mode)
    details = _details(o, expected_mode=mode, kept_epoch=_epoch(o, kept), argbest_epoch=_epoch(o, best))
    what = "keeps" if o.role == "checkpoint" or o.kept != "best" else "counts its patience from"
    if kept is None and best is None:
        return Finding(checks.FRAMEWORK_BEST, "pass",
                       f"{_who(o)} took no evaluation as best: no {o.monitor!r} value it saw could be", details)
    if kept == best:
        return Finding(checks.FRAMEWORK_BEST, "pass",
                       f"{_who(o)} {what} {_at(o, kept, o.kept)}, the best {o.monitor!r} logged", details)
    values = o.values
    if kept is not None and math.isnan(values[kept]):  # a NaN is never the best: it was let in
        return Finding(
            checks.FRAMEWORK_NAN, "fail",
            f"{_configured(o)} {what} {_at(o, kept, o.kept)} because of a NaN: {o.monitor!r} was NaN at "
            f"{', '.join(_label(o, i) for i, v in enumerate(values) if math.isnan(v))}, "
            + (f"the best logged was {_at(o, best)}" if best is not None else "no value logged could be best")
            + f". Fix: {_fix_nan(o)}", details)
    reason = (f" because it {o.mode}imises {o.monitor!r}. Fix: {_fix_direction(o, mode)}"
              if o.mode is not None and o.mode != mode else
              ". Fix: check its min_delta / baseline / save settings, or load the checkpoint of the arg-best epoch")
    return Finding(
        checks.FRAMEWORK_BEST, "fail",
        f"{_configured(o)} {what} {_at(o, kept, o.kept)}, but the best {o.monitor!r} logged was "
        f"{_at(o, best)}{reason}", details)


def monitors_rule(observations: list) -> list:
    """fail when, in one training run, checkpointing keeps the best of one metric and early stopping watches another."""
    runs: dict = {}
    for o in observations:
        if o.role in ("checkpoint", "early_stopping") and o.monitor is not None:
            runs.setdefault((o.framework, o.group), []).append(o)
    out = []
    for (framework, _), members in runs.items():
        ck = [o for o in members if o.role == "checkpoint"]
        es = [o for o in members if o.role == "early_stopping"]
        if not ck or not es:
            continue
        details = {"framework": framework, "checkpoint": {o.callback: o.monitor for o in ck},
                   "early_stopping": {o.callback: o.monitor for o in es}}
        for s in es:
            same = [c for c in ck if c.monitor == s.monitor]
            for c in same:
                out.append(Finding(checks.FRAMEWORK_MONITORS, "pass",
                                   f"{_who(c)} and {s.callback} both watch {c.monitor!r}", details))
            for c in ck if not same else ():  # a further checkpoint of another metric, beside one of this, is deliberate
                stop = _label(s, s.stopped_index) if s.stopped_index is not None else "the last epoch"
                out.append(Finding(
                    checks.FRAMEWORK_MONITORS, "fail",
                    f"{_NAMES.get(framework, framework)}: {c.callback} keeps the best {c.monitor!r} "
                    f"({_at(c, c.kept_index)}) but {s.callback} watches {s.monitor!r} (training ran until {stop}): "
                    f"the run stops on one metric and keeps the best of another. Fix: "
                    f"{s.callback}(monitor={c.monitor!r}, ...) or {c.callback}(monitor={s.monitor!r}, ...)",
                    {**details, "stopped_epoch": _stopped_epoch(s)}))
    return out


RULES = (direction_rule, best_rule)


def observed_findings(observations: Iterable) -> list:
    """Findings for replica 0's observations (``CallbackObservation``s or their dicts from meta.json)."""
    obs = [o if isinstance(o, CallbackObservation) else CallbackObservation.from_dict(o) for o in observations]
    findings = [f for o in obs for f in (rule(o) for rule in RULES) if f is not None]
    return findings + monitors_rule(obs)
