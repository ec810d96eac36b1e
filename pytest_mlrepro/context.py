"""The ``ctx`` a function target may accept: seed, device, work dir, a metrics logger."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ReplicaContext:
    seed: int
    device: str
    workdir: Path
    replica: int = 0
    metrics: list = field(default_factory=list)

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    def log(self, step: int | None = None, epoch: int | None = None, **metrics: Any) -> None:
        """Record metrics (floats, ints or 0-dim tensors) for reports and plots."""
        row: dict = {"step": step, "epoch": epoch}
        for name, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"ctx.log: metric {name!r} must be a number, got {type(value).__name__}")
            row[name] = float(value) if not isinstance(value, bool) else value
        self.metrics.append(row)
