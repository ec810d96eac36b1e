"""What a DDP audit costs: ``audit(target, nproc=N)`` wall time ÷ one plain ``torchrun`` of the same program,
for each DDP launcher (``ddp_launcher``: fork, the default, and torchrun).

Prints figures; asserts nothing about timings (they depend on the machine and its load). The plain
runs and the audits alternate, so a busy machine slows both sides alike. Every process gets
``OMP_NUM_THREADS=1``. The audit runs its two replicas at once when the cores allow
(``parallel="auto"``: cores ÷ (threads × nproc)); on 2 cores with nproc=2 they run one after the other.
The audits use the default isolation (``process``): every replica starts cold.

    OMP_NUM_THREADS=1 python benchmarks/bench_ddp.py [--nproc 2] [--steps 200] [--repeat 3] [--launchers fork,torchrun]

The program is ``fixtures/ddp/ddp_train.py`` (a tiny MLP under DistributedDataParallel over gloo); with
few steps the figure is mostly start-up (imports, the gloo rendezvous), with many it is the trace.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "fixtures" / "ddp" / "ddp_train.py"


def plain_run(nproc: int, steps: int) -> float:
    """One ``torchrun --standalone`` of the program, as a user would start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    str(PROGRAM), "--steps", str(steps)], check=True, env=env, cwd=tempfile.gettempdir(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def audit_run(nproc: int, steps: int, launcher: str) -> tuple[float, str]:
    sys.path.insert(0, str(ROOT))
    from pytest_mlrepro import audit

    started = time.perf_counter()
    result = audit(str(PROGRAM), nproc=nproc, ddp_launcher=launcher, args=["--steps", str(steps)])
    return time.perf_counter() - started, result.verdict


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the fixture's data has 8 batches "
                   "per epoch and rank with --nproc 2: more steps than that end at the epoch)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--launchers", default="fork,torchrun", help="ddp_launcher values to audit with, comma-separated")
    a = p.parse_args()
    launchers = [x.strip() for x in a.launchers.split(",") if x.strip()]
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch  # noqa: F401  the parent's own import is not part of either figure

    plain, audited, verdicts = [], {x: [] for x in launchers}, set()
    for _ in range(a.repeat):
        plain.append(plain_run(a.nproc, a.steps))
        for launcher in launchers:
            wall, verdict = audit_run(a.nproc, a.steps, launcher)
            audited[launcher].append(wall)
            verdicts.add(verdict)
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    mp = statistics.median(plain)
    print(f"== DDP audit ÷ plain torchrun (nproc={a.nproc}, {a.steps} steps, {os.cpu_count()} cores, load {load})")
    print(f"plain torchrun: median {mp:.2f}s  {[round(x, 2) for x in plain]}  verdicts {sorted(verdicts)}")
    for launcher, walls in audited.items():
        ma = statistics.median(walls)
        print(f"audit, ddp_launcher={launcher} (2 replicas): median {ma:.2f}s  {[round(x, 2) for x in walls]}  "
              f"÷ plain run: {ma / mp:.2f}  (the floor with replicas one after the other: 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
