"""Peak memory of an audit: the auditing process and each replica, against a plain run of the training.

Prints figures; asserts nothing. The training (``train`` below, also the audit's target) is a stack of
``--layers`` Linear(``--width``, ``--width``) layers, 99.9 M float32 parameters by default (381 MiB of
weights; each weight matrix just under 2**24 elements, so the figures before and after the fix of
the 16.8 M-element sampling bug are comparable), trained for ``--steps`` steps of plain SGD (no momentum: no optimizer state) on a small batch,
so weights and gradients dominate its memory. Every process here is a fresh interpreter:

- ``import floor``: ``import torch`` and the audit's modules, nothing else (what any process pays).
- ``plain run``: ``python bench_memory.py plain``: the training as a user runs it.
- ``audit``: ``pytest_mlrepro.audit("bench_memory.py:train", runs=2, device="cpu")`` from a fresh process;
  its own peak is the parent's. Each replica writes its own peak into its work folder at exit
  (``atexit``; ``MLREPRO_BENCH_RSS`` set), read back after the audit.

Peak RSS is the kernel's high-water mark (``ru_maxrss``): anonymous and file-backed pages alike, so a
memory-mapped file counts for the pages touched and still mapped.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--width 4080] [--layers 6] [--steps 2]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
RSS_FILE = "peak_rss_kib.txt"


def peak_rss_kib() -> int:
    """This process's peak resident set size so far, in KiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _write_peak_at_exit() -> None:
    Path(RSS_FILE).write_text(str(peak_rss_kib()))


if os.environ.get("MLREPRO_BENCH_RSS") == "1" and __name__ != "__main__":
    atexit.register(_write_peak_at_exit)  # imported as the target in a replica: its cwd is its private work folder


def train(width: int = 4080, layers: int = 6, steps: int = 2):
    """The audited training: returns the trained model (the audit compares its state dict)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(8, width)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model


def child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_json(args: list[str], **env) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), *args], env=child_env(**env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_floor() -> dict:
    import torch  # noqa: F401

    import pytest_mlrepro.auditing  # noqa: F401
    import pytest_mlrepro.compare  # noqa: F401

    return {"peak_kib": peak_rss_kib()}


def cmd_plain(a) -> dict:
    model = train(a.width, a.layers, a.steps)
    return {"peak_kib": peak_rss_kib(), "params": sum(p.numel() for p in model.parameters())}


def cmd_audit(a) -> dict:
    from pytest_mlrepro import audit

    result = audit(f"{HERE}:train", kwargs={"width": a.width, "layers": a.layers, "steps": a.steps},
                   runs=2, device="cpu", workdir=a.workdir)
    if result.error is not None:
        raise SystemExit(f"the audit failed: {result.summary_line()}\n{result.error.traceback}")
    replicas = [int((Path(a.workdir) / f"replica-{i}" / "work" / RSS_FILE).read_text()) for i in range(2)]
    return {"peak_kib": peak_rss_kib(), "replicas_kib": replicas, "verdict": result.verdict,
            "wall_s": result.wall_time_s, "summary": result.summary_line()}


def mib(kib: int) -> float:
    return kib / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="all", choices=["all", "floor", "plain", "audit"])
    p.add_argument("--width", type=int, default=4080)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    if a.command == "floor":
        print(json.dumps(cmd_floor()))
        return
    if a.command == "plain":
        print(json.dumps(cmd_plain(a)))
        return
    if a.command == "audit":
        print(json.dumps(cmd_audit(a)))
        return
    sizes = ["--width", str(a.width), "--layers", str(a.layers), "--steps", str(a.steps)]
    floor = run_json(["floor"])["peak_kib"]
    plain = run_json(["plain", *sizes])
    with tempfile.TemporaryDirectory(prefix="mlrepro-bench-mem-") as tmp:
        audited = run_json(["audit", *sizes, "--workdir", tmp], MLREPRO_BENCH_RSS="1")
    weights_mib = plain["params"] * 4 / 2**20
    print(f"== bench_memory: {a.layers} x Linear({a.width}, {a.width}) = {plain['params'] / 1e6:.1f} M float32 params "
          f"({weights_mib:.0f} MiB of weights), {a.steps} SGD steps, OMP_NUM_THREADS=1")
    print(f"audit: {audited['summary']} (verdict {audited['verdict']}, {audited['wall_s']:.1f} s)")
    print(f"  import floor (torch + pytest_mlrepro)  {mib(floor):8.0f} MiB")
    print(f"  plain run                              {mib(plain['peak_kib']):8.0f} MiB")
    for i, r in enumerate(audited["replicas_kib"]):
        print(f"  replica {i}                              {mib(r):8.0f} MiB   RATIO replica/plain {r / plain['peak_kib']:.2f}"
              f"   above plain {mib(r - plain['peak_kib']):+.0f} MiB")
    parent = audited["peak_kib"]
    print(f"  auditing process (parent)              {mib(parent):8.0f} MiB   RATIO parent/plain {parent / plain['peak_kib']:.2f}"
          f"   above floor {mib(parent - floor):.0f} MiB = {(parent - floor) / 1024 / weights_mib:.2f} x one state dict")


if __name__ == "__main__":
    main()
