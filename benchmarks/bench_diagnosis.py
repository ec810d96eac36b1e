"""What naming a cause costs: the controlled reruns of a broken fixture, one pair at a time or in parallel.

For each fixture and ``parallel`` in 1, 2 (replicas and rerun pairs one at a time, or two replicas at
once): an audit with ``diagnose=False`` (replicas, comparison, localization only), then one with the
diagnosis. Prints the reruns run, the cause, whether a rerun confirmed it, and wall times (diagnosis =
with - without, at the same parallel).
Prints figures only; timings depend on the machine and its load.

    OMP_NUM_THREADS=1 python benchmarks/bench_diagnosis.py [--fixtures time_seed,unseeded_augmentation]
        [--isolation process|forkserver]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", default="time_seed,unseeded_augmentation",
                        help="catalog names (fixtures/catalog.json), comma-separated. Default: %(default)r")
    parser.add_argument("--isolation", default="process", help="process or forkserver. Default: %(default)r")
    args = parser.parse_args()
    from pytest_mlrepro import audit

    catalog = {e["name"]: e for e in json.loads((ROOT / "fixtures" / "catalog.json").read_text())}
    print(f"isolation={args.isolation} | cpus {os.cpu_count()} | load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.fixtures.split(","):
        entry = catalog[name]
        print(f"== {name} (expected cause {entry['cause']}, control {entry['control']})")
        for parallel in (1, 2):
            walls = {}
            for diagnose in (False, True):
                start = time.perf_counter()
                r = audit(entry["target"], args=entry["args"], device="cpu", rootdir=ROOT, isolation=args.isolation,
                          parallel=parallel, diagnose=diagnose)
                walls[diagnose] = time.perf_counter() - start
            cause = r.cause
            said = f"{cause.kind}, control {cause.control}, confirmed {cause.confirmed}" if cause is not None else "-"
            print(f"  parallel={parallel}: wall {walls[False]:5.1f} s without diagnosis, {walls[True]:5.1f} s with it "
                  f"(diagnosis {walls[True] - walls[False]:+.1f} s); rerun pairs {len(cause.reruns) if cause else 0}; "
                  f"cause: {said}")
    print(f"load avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
