"""What a regression gate costs on top of the audit it gates: building the baseline record from the
result, reading the stored baseline and comparing (exact: the per-step fingerprints, the curves, the
final fingerprints), measured in one run against the audit's own wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_baseline.py [--epochs 10] [--size mlp] [--repeat 5]

Prints the audit's wall time, the gate's median time (write once, then compare ``--repeat`` times),
the baseline file's size, and the gate ÷ audit ratio. Asserts no timings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pytest_mlrepro import audit  # noqa: E402
from pytest_mlrepro.baseline.gate import run_gate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", default="mlp")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    started = time.perf_counter()
    result = audit(f"{HERE / 'workloads.py'}:train", kwargs={"epochs": a.epochs, "size": a.size})
    audit_s = time.perf_counter() - started
    assert result.deterministic, result.explain()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "__mlrepro__" / "bench" / "test_x.json"
        t0 = time.perf_counter()
        first = run_gate([result], test_id="bench::test_x", path=path, mode="update")
        write_s = time.perf_counter() - t0
        assert first.passed
        times = []
        for _ in range(a.repeat):
            result.findings.clear()
            t0 = time.perf_counter()
            outcome = run_gate([result], test_id="bench::test_x", path=path)
            times.append(time.perf_counter() - t0)
            assert outcome.passed, outcome.message
        size = path.stat().st_size
    steps = result.replicas[0].steps
    gate_s = statistics.median(times)
    print(f"training: {a.size}, {a.epochs} epochs, {steps} optimizer steps, {len(result.tensors)} tensors")
    print(f"audit wall time: {audit_s:.2f} s")
    print(f"baseline written in {write_s * 1e3:.1f} ms, {size / 1024:.1f} KiB")
    print(f"gate (read + exact compare), median of {a.repeat}: {gate_s * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"gate / audit: {gate_s / audit_s * 100:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
