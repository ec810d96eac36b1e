"""Targets for the fork-server tests: a tiny training, one that sets a thread variable after importing
torch, one that reads its own hash seed and process, one that crashes and one that hangs."""
import os
import signal

import torch


def train(ctx=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model


def sets_threads_after_torch(ctx=None):
    os.environ["OMP_NUM_THREADS"] = "3"  # this module imported torch already: no effect in a fresh interpreter either
    return train()


def whoami(ctx=None):
    """The hash secret and the process this replica ran in, as weights (compared by the audit)."""
    model = train()
    return {"model": model.state_dict(), "hash": torch.tensor(hash("mlrepro")), "pid": torch.tensor(os.getpid()),
            "sid": torch.tensor(os.getsid(0))}


def segfault(ctx=None):
    os.kill(os.getpid(), signal.SIGSEGV)


def hangs(ctx=None):
    import time

    time.sleep(120)
