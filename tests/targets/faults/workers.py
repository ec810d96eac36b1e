"""Fault target: a training that feeds from two DataLoader workers and keeps going (slowly) long
enough to be interrupted. It records the pids of the replica and of its workers under
$FAULTS_PID_DIR (``<pid>.replica``, ``<pid>.worker``) so a test knows when the audit is in flight,
and first starts the two double-forked escapees of ``escapes.py`` (``<pid>.escaped`` there too)."""
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


def _mark(kind: str, pid: int = 0) -> None:
    folder = os.environ.get("FAULTS_PID_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{pid or os.getpid()}.{kind}").write_text("")


def _worker_init(worker_id: int) -> None:
    _mark("worker")


def train(ctx, seconds: float = 60.0):
    """Trains for ``seconds`` (sleeping between steps), the DataLoader workers alive all along."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from escapes import escape

    for pid in escape(ctx):
        _mark("escaped", pid)
    _mark("replica")
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=8, num_workers=2, worker_init_fn=_worker_init, persistent_workers=True)
    model = torch.nn.Linear(4, 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for x, y in loader:
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            with torch.no_grad():  # plain SGD: torch.optim would import torch._dynamo (seconds)
                for p in model.parameters():
                    p -= 0.01 * p.grad
            time.sleep(0.05)
    return model
