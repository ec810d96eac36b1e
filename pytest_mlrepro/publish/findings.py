"""Read the checkpoint package's findings (DESIGN.md's details table) into what publishers show.

Plots, W&B and the terminal all need "the best epoch, the metrics recorded there, the checkpoint
file, the early-stop epoch"; reading the ``details`` dicts in one place keeps them agreeing, and
malformed details become a ``PublishError`` that names the check and the key.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from .config import PublishError

from ..checks import HISTORY as HISTORY_CHECK, RELOAD as RELOAD_CHECK


@dataclass
class BestCheckpoint:
    """The best epoch as the checkpoint checks recorded it."""

    best_epoch: int
    monitor: Optional[str]
    mode: Optional[str]
    recorded_metrics: dict = field(default_factory=dict)  # every metric at the best epoch
    checkpoint_path: Optional[str] = None
    source: str = RELOAD_CHECK  # the check whose details these came from
    checkpoint_epoch: Optional[int] = None  # the epoch the saved file holds (differs from best_epoch when broken)
    checkpoint_metrics: dict = field(default_factory=dict)  # the logged metrics of that epoch
    claimed_metrics: dict = field(default_factory=dict)  # what the file itself records (reload's recorded_metrics)
    failed: bool = False  # the reload or history check failed or errored

    @property
    def is_best(self) -> bool:
        return self.checkpoint_epoch is None or self.checkpoint_epoch == self.best_epoch

    @property
    def disputed(self) -> bool:
        """Whether the checkpoint's claim must be shown beside the history: a check failed, or the file
        names another epoch, or records other values than the history logged for its epoch."""
        if self.checkpoint_epoch is None:
            return False
        return self.failed or not self.is_best or _differs(self.claimed_metrics, self.checkpoint_metrics)


def _differs(claimed: dict, logged: dict) -> bool:
    """True when a metric present in both is not the same number (float32 round-off tolerated)."""
    for k, c in claimed.items():
        v = logged.get(k)
        if isinstance(c, bool) or isinstance(v, bool) or not isinstance(c, numbers.Real) or not isinstance(v, numbers.Real):
            continue
        if not (math.isnan(c) and math.isnan(v)) and not math.isclose(c, v, rel_tol=1e-6, abs_tol=1e-12):
            return True
    return False


def _finding(result, check: str):
    for f in result.findings:
        if f.check == check:
            return f
    return None


def _int_epoch(value, check: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PublishError(f"finding {check!r}: details[{key!r}] must be an integer epoch, got {value!r}")
    return int(value)


def best_checkpoint(result) -> Optional[BestCheckpoint]:
    """The best epoch of ``result`` and the checkpoint file that claims to hold it.

    The best epoch is the history check's arg-best (what the logged metrics say), else the epoch the
    checkpoint records. Its metrics come from the logged history's row for that epoch, else from the
    reload check's ``recorded_metrics`` (what the checkpoint claims: the very thing a broken checkpoint
    gets wrong). ``checkpoint_epoch`` is the epoch the file records; when it is not the best epoch the
    publisher must not call the file "best". ``claimed_metrics`` is what the file records, unchanged, so a
    plot can show the claim next to the history. None when no check names an epoch. Raises
    ``PublishError`` naming the check and key when a detail has the wrong type.
    """
    reload = _finding(result, RELOAD_CHECK)
    history = _finding(result, HISTORY_CHECK)
    rows = []
    if history is not None:
        rows = history.details.get("history") or []
        if not isinstance(rows, list):
            raise PublishError(f"finding {HISTORY_CHECK!r}: details['history'] must be a list of per-epoch dicts")
    claimed = None
    source = None
    for f, check in ((reload, RELOAD_CHECK), (history, HISTORY_CHECK)):
        if f is not None and f.details.get("best_epoch") is not None:
            claimed, source = _int_epoch(f.details["best_epoch"], check, "best_epoch"), check
            break
    argbest = history.details.get("argbest_epoch") if history is not None else None
    best_epoch = _int_epoch(argbest, HISTORY_CHECK, "argbest_epoch") if argbest is not None else claimed
    if best_epoch is None:
        return None
    recorded = reload.details.get("recorded_metrics") if reload is not None else None
    if recorded is not None and not isinstance(recorded, dict):
        raise PublishError(f"finding {RELOAD_CHECK!r}: details['recorded_metrics'] must be a dict of the metrics at "
                           f"best epoch {claimed}, got {type(recorded).__name__}")

    def logged(epoch):
        row = _history_row(rows, epoch) if epoch is not None else None
        return None if row is None else {k: v for k, v in row.items() if k not in ("epoch", "step")}

    best_metrics = logged(best_epoch)
    if best_metrics is None:
        best_metrics = dict(recorded or {}) if best_epoch == claimed else {}
    checkpoint_metrics = logged(claimed)
    if checkpoint_metrics is None:
        checkpoint_metrics = dict(recorded or {})
    details = (reload or history).details
    path = reload.details.get("checkpoint_path") if source == RELOAD_CHECK else None  # a reload that found a file
    claimed_metrics = dict(recorded) if recorded is not None else dict(checkpoint_metrics)
    failed = any(f is not None and f.verdict in ("fail", "error") for f in (reload, history))
    return BestCheckpoint(best_epoch, details.get("monitor"), details.get("mode"), best_metrics, path,
                          source or HISTORY_CHECK, claimed, checkpoint_metrics, claimed_metrics, failed)


def _history_row(history: list, epoch: int) -> Optional[dict]:
    """The history entry for ``epoch``: by its ``epoch`` key when entries have one, else by position."""
    if any(isinstance(h, dict) and "epoch" in h for h in history):
        for h in history:
            if isinstance(h, dict) and h.get("epoch") == epoch:
                return h
        return None
    if 0 <= epoch < len(history) and isinstance(history[epoch], dict):
        return history[epoch]
    return None


def early_stop_epoch(result) -> Optional[int]:
    """The epoch the audited training really stopped at, when a check recorded it.

    Read from ``details["stopped_epoch"]`` of any finding (the name Keras' and Lightning's
    ``EarlyStopping`` use). The conformance check's ``expected`` / ``observed`` describe a
    generated counterexample sequence, not this training, so they are deliberately not used.
    """
    for f in result.findings:
        v = f.details.get("stopped_epoch")
        if v is not None:
            return _int_epoch(v, f.check, "stopped_epoch")
    return None
