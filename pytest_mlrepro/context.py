"""The ``ctx`` a function target may accept: seed, device, work dir, a metrics logger."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_METRIC_PROBLEMS = 100  # bad values kept per replica with their repr; later ones are only counted
REPR_LIMIT = 200  # characters of a bad value's repr kept


@dataclass
class ReplicaContext:
    seed: int
    device: str
    workdir: Path
    replica: int = 0
    metrics: list = field(default_factory=list)
    metric_problems: list = field(default_factory=list)  # [{"name", "type", "repr", "reason", "step", "epoch"}]
    metric_problem_count: int = 0  # every bad value, also those past MAX_METRIC_PROBLEMS

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    def log(self, step: int | None = None, epoch: int | None = None, **metrics: Any) -> None:
        """Record metrics (floats, ints, bools or one-element tensors/arrays) for reports and plots.

        A value that is no number (a string, None, a tensor of several elements) is left out of the
        row and recorded as a problem the audit reports as a ``training.metrics`` finding: raising here
        would end the training and lose the determinism verdict. NaN and inf are numbers and are kept.
        """
        step, epoch = self._position("step", step), self._position("epoch", epoch)
        row: dict = {"step": step, "epoch": epoch}
        for name, value in metrics.items():
            number, reason = _as_number(value)
            if reason is None:
                row[name] = number
            else:
                self._problem(name, value, reason, step, epoch)
        self.metrics.append(row)

    def _position(self, name: str, value: Any) -> int | None:
        """``step``/``epoch`` as an int or None; anything else is a problem, recorded as None."""
        if value is None:
            return None
        number, reason = _as_number(value)
        if reason is None and not isinstance(number, bool) and float(number).is_integer():
            return int(number)
        self._problem(name, value, reason or "not a whole number", None, None)
        return None

    def _problem(self, name: str, value: Any, reason: str, step: Any, epoch: Any) -> None:
        self.metric_problem_count += 1
        if len(self.metric_problems) < MAX_METRIC_PROBLEMS:
            self.metric_problems.append({"name": name, "type": _type_name(value), "repr": _short_repr(value),
                                         "reason": reason, "step": step, "epoch": epoch})


def _as_number(value: Any) -> tuple:
    """(the value as a float or bool, None) for a number; (None, why not) for anything else."""
    if isinstance(value, bool):
        return value, None
    if hasattr(value, "item") and hasattr(value, "shape"):  # torch tensors, numpy arrays and scalars
        numel = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
        if numel != 1:
            return None, f"a {_type_name(value)} of {numel} elements, not one number"
        try:
            value = value.item()
        except Exception as exc:  # a meta tensor, a failed device copy
            return None, f"its .item() failed: {type(exc).__name__}: {exc}"
        if isinstance(value, bool):
            return value, None
    if isinstance(value, numbers.Real):
        try:
            return float(value), None
        except (OverflowError, ValueError, TypeError) as exc:
            return None, f"not representable as a float ({exc})"
    if isinstance(value, complex):
        return None, "a complex number, not a real one"
    return None, "not a number"


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not stop the training either
        text = f"<repr failed: {type(exc).__name__}>"
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def metrics_finding(replicas: list) -> Any:
    """The ``training.metrics`` finding from each replica's ``(index, problems, count)``, or None when
    every logged value was a number."""
    from .checks import METRICS
    from .result import Finding

    total = sum(count for _, _, count in replicas)
    if not total:
        return None
    problems = [{"replica": index, **p} for index, found, _ in replicas for p in found]
    names = sorted({p["name"] for p in problems})
    first = problems[0] if problems else None
    counts = [count for _, _, count in replicas]
    if len(set(counts)) == 1:
        how_many = f"{counts[0]} value{'s that are not numbers' if counts[0] != 1 else ' that is not a number'}"
        how_many += f" in each of the {len(replicas)} replicas" if len(replicas) > 1 else ""
    else:
        how_many = f"values that are not numbers ({', '.join(f'replica {i}: {c}' for i, _, c in replicas)})"
    message = f"ctx.log was given {how_many} ({', '.join(f'`{n}`' for n in names)}), left out of the metrics history"
    if first is not None:
        at = "".join(f" {k} {first[k]}" for k in ("step", "epoch") if first[k] is not None)
        message += f"; first: `{first['name']}` = {first['repr']} ({first['type']}: {first['reason']}){' at' + at if at else ''}"
    details = {"count": total, "names": names, "replicas": [{"replica": i, "count": c} for i, _, c in replicas],
               "problems": problems}
    return Finding(METRICS, "fail", message, details)
