"""Trainings sized for the benchmarks: the fixtures train in well under a second, but the audit
figure needs a training of >= 10 s and the trace figure a step that costs a realistic few ms.

Three sizes, all on synthetic data made from a seeded generator (no downloads):

- ``mlp``:  512 -> 1024 -> 512 -> 10 with dropout, batch 64, Adam; 1.05 M parameters.
- ``cnn``:  two conv/pool blocks on 3x16x16 images, then 1024 -> 768 -> 10, batch 32, Adam; 0.81 M parameters.
- ``tiny``: 10 -> 24 -> 2 with dropout, batch 20, SGD (the size of ``fixtures/mlp_script.py``); 0.3 k parameters.
- ``mlp-b256``: ``mlp`` with batch 256 (the trace's cost per step stays, the step's compute grows 4x).

Run as a user would run a training script (this is what ``bench_audit.py wall`` audits)::

    OMP_NUM_THREADS=1 python benchmarks/workloads.py --epochs 40 [--size mlp] [--seed 0] [--device cpu]

It seeds python ``random``, numpy and torch itself and prints, last, ``trained <steps> steps in <s> s``.
``benchmarks/workloads.py:train`` is the same training as a function target (``train(ctx, epochs=N)``).
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SIZES = {
    "mlp": {"samples": 2048, "batch": 64},
    "mlp-b256": {"samples": 2048, "batch": 256},  # same model and data, 4x the compute per step
    "cnn": {"samples": 1024, "batch": 32},
    "tiny": {"samples": 160, "batch": 20},
}


def make_model(size: str) -> nn.Module:
    size = size.split("-")[0]
    if size == "mlp":
        return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Dropout(0.1),
                             nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    if size == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(), nn.Linear(64 * 4 * 4, 768), nn.ReLU(), nn.Dropout(0.1), nn.Linear(768, 10))
    if size == "tiny":
        return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Dropout(0.25), nn.Linear(24, 2))
    raise ValueError(f"unknown workload size {size!r}; choose one of {sorted(SIZES)}")


def make_data(size: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = SIZES[size]["samples"]
    size = size.split("-")[0]
    if size == "mlp":
        x = torch.randn(n, 512, generator=generator)
        y = (x[:, :10].argmax(1) + (x[:, 10] > 0).long()) % 10
    elif size == "cnn":
        x = torch.randn(n, 3, 16, 16, generator=generator)
        y = (x[:, 0, :8].mean((1, 2)) > 0).long() * 5 + x[:, 1].argmax(1).argmax(1) % 5
    else:
        x = torch.randn(n, 10, generator=generator)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


@dataclass
class Training:
    """A model, its optimizer and its data; ``step()`` runs one optimizer step on the next batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    _order: torch.Tensor = None
    _pos: int = 0

    def step(self) -> torch.Tensor:
        if self._order is None or self._pos >= len(self._order):
            self._order = torch.randperm(len(self.x), device=self.x.device)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch]
        self._pos += self.batch
        loss = nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.x) // self.batch)

    def epoch(self) -> torch.Tensor:
        self._order = None
        for _ in range(self.steps_per_epoch):
            loss = self.step()
        return loss


def make_training(size: str = "mlp", device: str = "cpu") -> Training:
    """Build a training from the current global RNG state (seed first, as the callers do)."""
    generator = torch.Generator().manual_seed(1234)  # the data is fixed; the seed drives init, shuffle, dropout
    x, y = make_data(size, generator)
    model = make_model(size).to(device)
    if size == "tiny":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Training(model, opt, x.to(device), y.to(device), SIZES[size]["batch"])


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(ctx, epochs: int = 10, size: str = "mlp") -> nn.Module:
    """Function target: the harness has seeded everything."""
    t = make_training(size, str(ctx.torch_device))
    for epoch in range(epochs):
        loss = t.epoch()
        ctx.log(step=(epoch + 1) * t.steps_per_epoch, epoch=epoch, train_loss=float(loss.detach()))
    return t.model


def main(argv=None) -> nn.Module:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", default="mlp", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args(argv)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    started = time.perf_counter()
    t = make_training(a.size, a.device)
    for _ in range(a.epochs):
        loss = t.epoch()
    print(f"final loss {float(loss.detach()):.4f}")  # float() also waits for the device
    print(f"trained {a.epochs * t.steps_per_epoch} steps in {time.perf_counter() - started:.3f} s", flush=True)
    return t.model


if __name__ == "__main__":
    main()
