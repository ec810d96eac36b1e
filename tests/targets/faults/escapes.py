"""Fault targets: processes that try to outlive the replica, and a replica that dies by a signal.

``escape`` starts two double-forked grandchildren that call setsid (so they leave the replica's
process group and session, and are re-parented away from it): one keeps the environment, the other
execs ``sleep`` with an empty environment. Their pids land in ``ctx.workdir/escaped.pids``."""
import os
import shutil
import signal
import sys
import time

import torch


def _double_fork(argv, env) -> int:
    """Start argv as a setsid'd grandchild whose parent exits at once; return the grandchild's pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: new session, fork again, report the grandchild, exit
        try:
            os.close(r)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.close(w)
                os.execve(argv[0], argv, env)
            os.write(w, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


def escape(ctx) -> list[int]:
    pids = [
        _double_fork([sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ)),
        _double_fork([shutil.which("sleep") or "/bin/sleep", "120"], {}),
    ]
    (ctx.workdir / "escaped.pids").write_text(" ".join(map(str, pids)))
    return pids


def escape_and_hang(ctx):
    escape(ctx)
    time.sleep(120)


def escape_and_train(ctx):
    escape(ctx)
    return torch.nn.Linear(2, 1)  # (no torch.optim: it would import torch._dynamo, seconds)


def segfault(ctx):
    model = torch.nn.Linear(2, 1)
    os.kill(os.getpid(), signal.SIGSEGV)
    return model
