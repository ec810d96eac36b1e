"""Tiny function targets for the plugin and error tests (a few milliseconds of training each)."""
import os
import subprocess
import sys
import time

import torch


def _fit(model, x, y, ctx=None, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if ctx is not None:
            ctx.log(step=step, epoch=step, loss=loss)
    return model


def train(ctx):
    """Deterministic: everything drawn from the harness-seeded generators."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return _fit(model, torch.randn(16, 4), torch.randn(16, 2), ctx)


def noisy_input(ctx):
    """Broken: the batch at step 1 gets noise from OS entropy."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        if step == 1:
            g = torch.Generator().manual_seed(int.from_bytes(os.urandom(6), "little"))
            x = x + torch.randn(x.shape, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


def returns_state_dict(ctx):
    return train(ctx).state_dict()


def returns_nothing(ctx):
    train(ctx)


def returns_nothing_comparable(ctx):
    train(ctx)
    return 42


def raises(ctx):
    raise RuntimeError("the training blew up on purpose")


def different_structures(ctx):
    """Returns a dict whose keys depend on which replica runs it: replicas disagree on structure."""
    out = {"w": torch.ones(2)}
    out["extra" if ctx.replica == 0 else "other"] = torch.zeros(1)
    return out


def hangs(ctx):
    """Starts a grandchild that would outlive us, writes its pid, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (ctx.workdir / "grandchild.pid").write_text(str(child.pid))
    time.sleep(600)


NOT_CALLABLE = 3


def reads_relative_data(ctx):
    """Reads `data.txt` relative to the working directory, as many training scripts do."""
    from pathlib import Path

    scale = float(Path("data.txt").read_text())
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.mul_(scale)
    return _fit(model, torch.randn(4, 2), torch.randn(4, 1), ctx)
