"""Realistic shapes of training code the audit must handle (each a few milliseconds)."""
import os
import sys
import time

import numpy as np
import torch

DATA = torch.randn(8, 4)  # module-level data, drawn when the module is imported (from the seeded RNG)


def module_level_data(ctx):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(DATA).pow(2).mean().backward()
        opt.step()
    return model


def compiled(ctx):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    fast = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        fast(x).pow(2).mean().backward()
        opt.step()
    return fast


def numpy_leaves(ctx):
    model = torch.nn.Linear(2, 1)
    return {"model": model, "val_acc": np.float64(0.5), "confusion": np.zeros((2, 2)), "path": ctx.workdir / "best.pt"}


def late_discriminator(ctx):
    """A GAN-like pair: the discriminator is first called after the generator's first step, and its
    input noise comes from a generator seeded from the clock."""
    gen, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    x = torch.randn(8, 2)
    opt_g.zero_grad()
    gen(x).pow(2).mean().backward()
    opt_g.step()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(time.time_ns() % 2**62))
    for _ in range(2):
        opt_d.zero_grad()
        disc(gen(x).detach() + noise).pow(2).mean().backward()
        opt_d.step()


def two_phase(ctx):
    """Phase 2 adds a head whose initial weights come from the clock: its optimizer starts at step 3."""
    body = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(body.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        body(x).pow(2).mean().backward()
        opt.step()
    torch.manual_seed(time.time_ns() % 2**62)
    head = torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(body, head)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt2.zero_grad()
        model(x).pow(2).mean().backward()
        opt2.step()
    return model


def exits_zero(ctx):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    sys.exit(0)


def leaks_global_state(ctx):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    os.environ["MLREPRO_TEST_LEAK"] = "1"
    sys.path.append("/nonexistent/mlrepro-leak")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    return model
