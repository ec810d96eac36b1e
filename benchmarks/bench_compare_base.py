"""What ``mlrepro compare --base`` costs against running the training twice yourself.

Builds a temporary git repository holding a copy of ``benchmarks/workloads.py`` (one commit), then
times, interleaved, a plain run of the training (``python workloads.py --size mlp --epochs N``, from
outside: interpreter, imports, training) and ``mlrepro compare --base HEAD workloads.py -- ...``
(the CLI in a fresh process: a temporary worktree of HEAD, one replica there and one in the work
tree, both compared; the two sides agree, so no replay runs). Prints compare ÷ (2 × the mean of the
plain runs just before and after it). Asserts nothing about timings. Child processes get
``OMP_NUM_THREADS=1``.

    OMP_NUM_THREADS=1 python benchmarks/bench_compare_base.py [--epochs 20] [--rounds 1] [--size mlp] [--parallel N] [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_audit import WORKLOADS, banner, child_env, timed_run  # noqa: E402


def make_repo(folder: Path) -> Path:
    repo = folder / "repo"
    repo.mkdir()
    shutil.copy(WORKLOADS, repo / "workloads.py")
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = {**child_env(), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    for args in (["init", "-q"], ["config", "user.name", "bench"], ["config", "user.email", "bench@example.invalid"],
                 ["config", "commit.gpgsign", "false"], ["add", "-A"], ["commit", "-q", "-m", "workload"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)
    return repo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs of the training (mlp: about 0.3 s each here)")
    p.add_argument("--size", default="mlp", help="workload size (benchmarks/workloads.py)")
    p.add_argument("--rounds", type=int, default=1, help="compare runs, each between two plain runs")
    p.add_argument("--parallel", help="passed to compare (auto: both sides at once when two cores are free; 1: one after the other)")
    p.add_argument("--quick", action="store_true", help="a smoke run (2 epochs); the figure then means little")
    a = p.parse_args(argv)
    epochs = 2 if a.quick else a.epochs
    banner(f"compare --base wall time / (2 x plain run), workload {a.size}, {epochs} epochs, parallel {a.parallel or 'auto'}")
    train_args = ["--size", a.size, "--epochs", str(epochs), "--device", "cpu"]
    with tempfile.TemporaryDirectory(prefix="mlrepro-bench-compare-") as tmp:
        repo = make_repo(Path(tmp))
        plain_cmd = [sys.executable, "workloads.py", *train_args]
        compare_cmd = [sys.executable, "-m", "pytest_mlrepro.cli", "compare", "--base", "HEAD", "workloads.py",
                       "--device", "cpu", *(["--parallel", a.parallel] if a.parallel else []), "--", *train_args]
        plain, compares = [timed_run(plain_cmd, cwd=repo)[0]], []
        for _ in range(a.rounds):
            elapsed, proc = timed_run(compare_cmd, cwd=repo)
            if "matches HEAD" not in proc.stdout:
                raise SystemExit(f"the comparison did not agree:\n{proc.stdout}\n{proc.stderr}")
            compares.append(elapsed)
            plain.append(timed_run(plain_cmd, cwd=repo)[0])
        ratios = [c / (2 * statistics.mean(plain[i:i + 2])) for i, c in enumerate(compares)]
        print(f"plain runs (s): {', '.join(f'{t:.2f}' for t in plain)}")
        print(f"compare --base runs (s): {', '.join(f'{t:.2f}' for t in compares)}")
        print(f"last compare output: {proc.stdout.strip().splitlines()[0]}")
        print(f"compare --base / (2 x plain): {', '.join(f'{r:.3f}' for r in ratios)}"
              + (f" (median {statistics.median(ratios):.3f})" if len(ratios) > 1 else ""))
        left = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
        print(f"worktrees registered afterwards: {len(left.splitlines())} (the main one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
