"""What naming a cause costs: the controlled reruns of a broken fixture, one pair at a time or in parallel.

For each fixture: one audit with ``diagnose=False`` (replicas, comparison, localization only), then with
diagnosis at ``parallel=1`` and ``parallel=2`` (rerun pairs at once, as the cores allow). Prints the
reruns run, the cause, whether a rerun confirmed it, and wall times (diagnosis = with - without).
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
        rows = []
        for label, kw in (("no diagnosis", {"diagnose": False, "parallel": 1}),
                          ("diagnosis, parallel=1", {"parallel": 1}), ("diagnosis, parallel=2", {"parallel": 2})):
            start = time.perf_counter()
            r = audit(entry["target"], args=entry["args"], device="cpu", rootdir=ROOT, isolation=args.isolation, **kw)
            rows.append((label, time.perf_counter() - start, r))
        base = rows[0][1]
        print(f"== {name} (expected cause {entry['cause']}, control {entry['control']})")
        for label, wall, r in rows:
            cause = r.cause
            reruns = len(cause.reruns) if cause is not None else 0
            said = f"{cause.kind}, control {cause.control}, confirmed {cause.confirmed}" if cause is not None else "-"
            extra = f", diagnosis {wall - base:+.1f} s" if label != "no diagnosis" else ""
            print(f"  {label:24s} wall {wall:6.1f} s{extra}; rerun pairs {reruns}; cause: {said}")
    print(f"load avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
