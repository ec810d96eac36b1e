"""Typed records of what a framework callback did in the real run (replica -> meta.json -> parent).

Non-finite values travel as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so meta.json and the JSON
report stay strict JSON.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["Evaluation", "CallbackObservation", "encode_float", "decode_float"]

ROLES = ("checkpoint", "early_stopping", "tracker")


def encode_float(x) -> object:
    """A float for JSON: finite floats as they are, NaN/inf as strings, None stays None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def decode_float(x) -> Optional[float]:
    return None if x is None else float(x)


@dataclass
class Evaluation:
    """One evaluation the callback looked at: its monitored value and whether it became the new best."""

    index: int  # 0-based, in the order the callback saw them
    epoch: Optional[float]  # the framework's own epoch number (Lightning/Keras/fastai from 0; HF from 1.0)
    value: Optional[float]  # the monitored value as the framework saw it; None: absent from its logs
    improved: bool = False  # the callback took it as its new best
    step: Optional[int] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = encode_float(self.value)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(**{**d, "value": decode_float(d.get("value"))})


@dataclass
class CallbackObservation:
    """One framework callback: its settings as read back from the object, and what it did."""

    framework: str  # lightning | keras | transformers | fastai
    callback: str  # the class name, e.g. ModelCheckpoint, EarlyStopping, Trainer, SaveModelCallback
    role: str  # checkpoint (keeps weights) | early_stopping | tracker (another TrackerCallback)
    monitor: Optional[str]
    mode: Optional[str]  # the direction the framework used: min | max | None (a comparator we cannot name)
    group: int = 0  # callbacks of one training run (one Trainer / fit) share it
    min_delta: float = 0.0  # as a positive size
    start_from_epoch: int = 0
    baseline: Optional[float] = None  # the best starts here and must be beaten (Keras initial_value_threshold)
    config: dict = field(default_factory=dict)  # the remaining settings, JSON-able
    evaluations: list = field(default_factory=list)  # list[Evaluation]
    kept: str = "best"  # what the framework keeps as "best": the file, the restored weights, ...
    stopped_index: Optional[int] = None  # the evaluation after which it stopped the training

    @property
    def values(self) -> list:
        return [math.nan if e.value is None else e.value for e in self.evaluations]

    @property
    def kept_index(self) -> Optional[int]:
        """The evaluation the framework kept as best: the last one it took as a new best."""
        improved = [e.index for e in self.evaluations if e.improved]
        return improved[-1] if improved else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["evaluations"] = [e.to_dict() for e in self.evaluations]
        d["baseline"] = encode_float(self.baseline)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CallbackObservation":
        return cls(**{**d, "evaluations": [Evaluation.from_dict(e) for e in d.get("evaluations", [])],
                      "baseline": decode_float(d.get("baseline"))})
