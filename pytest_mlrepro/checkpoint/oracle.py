"""The reference semantics of early stopping and best-only checkpointing, as a pure function.

``simulate(values, spec)`` says, for one monitored value per epoch, when training stops, which
epoch is best and at which epochs a best-only checkpoint saves. Every callback we ship or drive
(ours, Lightning's, Keras's, Hugging Face's, fastai's) is compared against it. No torch here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["StopSpec", "Outcome", "is_improvement", "simulate", "NAN_POLICIES", "MODES"]

MODES = ("min", "max")
# stop: a NaN stops training at that epoch (it never becomes best).
# ignore: a NaN never improves and counts toward patience.
# stop_nonfinite: NaN, +inf and -inf all stop training at that epoch (Lightning's check_finite=True).
NAN_POLICIES = ("stop", "ignore", "stop_nonfinite")


@dataclass(frozen=True)
class StopSpec:
    """What an early-stopping / best-checkpoint configuration means; validated on creation."""

    mode: str
    patience: int = 0
    min_delta: float = 0.0
    baseline: float | None = None
    start_from_epoch: int = 0
    nan_policy: str = "stop"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {self.patience!r}")
        if not isinstance(self.min_delta, (int, float)) or math.isnan(self.min_delta) or self.min_delta < 0:
            raise ValueError(
                f"min_delta must be a number >= 0 (the direction comes from mode), got {self.min_delta!r}"
            )
        if math.isinf(self.min_delta):
            raise ValueError("min_delta must be finite")
        if self.baseline is not None and (not isinstance(self.baseline, (int, float)) or math.isnan(self.baseline)):
            raise ValueError(f"baseline must be a number or None, got {self.baseline!r}")
        if isinstance(self.start_from_epoch, bool) or not isinstance(self.start_from_epoch, int) or self.start_from_epoch < 0:
            raise ValueError(f"start_from_epoch must be an int >= 0, got {self.start_from_epoch!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """What happened: epochs consumed, where it stopped, the best epoch/value, the save epochs."""

    epochs_run: int
    stop_epoch: int | None
    best_epoch: int | None
    best_value: float | None
    saved_epochs: tuple = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["saved_epochs"] = list(self.saved_epochs)
        return d


def is_improvement(current: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True iff ``current`` beats ``best`` by strictly more than ``min_delta``.

    Computed as ``current + min_delta < best`` (min) / ``current - min_delta > best`` (max), the
    arithmetic Lightning and Keras use. ``best=None`` behaves as the worst infinity, so any value
    improves except NaN and the worst infinity itself (+inf under min, -inf under max).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
    current = float(current)
    if math.isnan(current):
        return False
    if best is None:
        best = math.inf if mode == "min" else -math.inf
    best = float(best)
    if math.isnan(best):  # a NaN best (never produced here) is beaten by anything that is a number
        return True
    if mode == "min":
        return current + min_delta < best
    return current - min_delta > best


def simulate(values, spec: StopSpec) -> Outcome:
    """Run the reference semantics over ``values`` (one monitored value per epoch, epochs from 0).

    - epochs before ``spec.start_from_epoch`` are ignored entirely (neither best nor counted);
    - the best starts at ``spec.baseline`` (which must be beaten) or at "nothing yet";
    - an improvement (``is_improvement``) becomes best, is saved, and resets the wait;
    - otherwise the wait grows; training stops after the epoch where the wait reaches
      ``max(patience, 1)`` - i.e. after epoch ``last_improvement + max(patience, 1)``;
    - NaN: ``nan_policy="stop"`` stops at that epoch; ``"ignore"`` counts it as a non-improvement;
      ``"stop_nonfinite"`` stops at NaN and at +-inf. Otherwise +-inf are ordinary values.
    """
    if not isinstance(spec, StopSpec):
        raise TypeError(f"spec must be a StopSpec, got {type(spec).__name__}")
    vals = [float(v) for v in values]
    limit = max(spec.patience, 1)
    best = spec.baseline
    best_epoch = None
    best_value = None
    wait = 0
    saved = []
    for epoch, v in enumerate(vals):
        if epoch < spec.start_from_epoch:
            continue
        if math.isnan(v) and spec.nan_policy in ("stop", "stop_nonfinite"):
            return Outcome(epoch + 1, epoch, best_epoch, best_value, tuple(saved))
        if math.isinf(v) and spec.nan_policy == "stop_nonfinite":
            return Outcome(epoch + 1, epoch, best_epoch, best_value, tuple(saved))
        if is_improvement(v, best, spec.mode, spec.min_delta):
            best = best_value = v
            best_epoch = epoch
            wait = 0
            saved.append(epoch)
        else:
            wait += 1
            if wait >= limit:
                return Outcome(epoch + 1, epoch, best_epoch, best_value, tuple(saved))
    return Outcome(len(vals), None, best_epoch, best_value, tuple(saved))
