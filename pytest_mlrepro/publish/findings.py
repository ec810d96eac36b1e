"""Read the checkpoint package's findings (DESIGN.md's details table) into what publishers show.

Plots, W&B and the terminal all need "the best epoch, the metrics recorded there, the checkpoint
file, the early-stop epoch"; reading the ``details`` dicts in one place keeps them agreeing, and
malformed details become a ``PublishError`` that names the check and the key.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

from .config import PublishError

RELOAD_CHECK = "best_checkpoint.reload"
HISTORY_CHECK = "best_checkpoint.history"


@dataclass
class BestCheckpoint:
    """The best epoch as the checkpoint checks recorded it."""

    best_epoch: int
    monitor: Optional[str]
    mode: Optional[str]
    recorded_metrics: dict = field(default_factory=dict)  # every metric at the best epoch
    checkpoint_path: Optional[str] = None
    source: str = RELOAD_CHECK  # the check whose details these came from


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
    """The best checkpoint of ``result``: from ``best_checkpoint.reload``, else from the history check.

    None when neither check names a best epoch (a reload that found no checkpoint records
    ``best_epoch: None``). The metrics at the best epoch come from the logged history's entry for
    that epoch (what really happened then), else from the reload check's ``recorded_metrics`` (what
    the checkpoint claims: the very thing a broken checkpoint gets wrong). Raises ``PublishError``
    naming the check and key when a detail has the wrong type.
    """
    reload = _finding(result, RELOAD_CHECK)
    history = _finding(result, HISTORY_CHECK)
    for f, check in ((reload, RELOAD_CHECK), (history, HISTORY_CHECK)):
        if f is None or f.details.get("best_epoch") is None:
            continue
        d = f.details
        epoch = _int_epoch(d["best_epoch"], check, "best_epoch")
        metrics = d.get("recorded_metrics") if check == RELOAD_CHECK else None
        if metrics is not None and not isinstance(metrics, dict):
            raise PublishError(f"finding {check!r}: details['recorded_metrics'] must be a dict of the metrics at "
                               f"best epoch {epoch}, got {type(metrics).__name__}")
        if history is not None:
            rows = history.details.get("history") or []
            if not isinstance(rows, list):
                raise PublishError(f"finding {HISTORY_CHECK!r}: details['history'] must be a list of per-epoch dicts")
            row = _history_row(rows, epoch)
            if row is not None:
                metrics = {k: v for k, v in row.items() if k not in ("epoch", "step")}
        path = d.get("checkpoint_path") if check == RELOAD_CHECK else None
        return BestCheckpoint(epoch, d.get("monitor"), d.get("mode"), dict(metrics or {}), path, check)
    return None


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
