"""Throughput of ``fingerprint_many`` and of ``compare_states`` (bitwise) on a ~1 GiB state dict.

Prints figures; asserts nothing about timings (they depend on the machine and its load).

    OMP_NUM_THREADS=2 python benchmarks/bench_fingerprint.py            # 1 GiB, best of 3
    python benchmarks/bench_fingerprint.py --gib 0.25 --repeats 5 --threads 1

Target (issue 2): fingerprint throughput >= 5 GB/s on CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from pytest_mlrepro.compare import compare_states
from pytest_mlrepro.fingerprint import fingerprint, fingerprint_many, word_sum_many

MIB = 1 << 20


def make_state(gib: float, device: str) -> dict:
    """``gib`` GiB of 16 MiB float32 tensors plus a few odd-sized ones of other dtypes."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(max(1, int(gib * 1024 / 16))):
        state[f"layers.{i}.weight"] = torch.randn(2048, 2048, generator=g).to(device)
    state["odd.float32"] = torch.randn(1000, 777, generator=g).to(device)
    state["odd.bfloat16"] = torch.randn(12345, generator=g).to(torch.bfloat16).to(device)
    state["odd.float16"] = torch.randn(3, 5, 7, generator=g).to(torch.float16).to(device)
    state["odd.int64"] = torch.arange(7).to(device)
    state["odd.bool"] = (torch.arange(13) % 3 == 0).to(device)
    state["odd.transposed"] = torch.randn(640, 480, generator=g).to(device).t()
    return state


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up: tables, allocator, caches
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the state dict in GiB. Default: %(default)r")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported. Default: %(default)r")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads. Default: torch's own")
    parser.add_argument("--device", default="cpu", help="cpu or cuda. Default: %(default)r")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    state = make_state(args.gib, args.device)
    tensors = list(state.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__} | {platform.processor() or platform.machine()} | cpus {os.cpu_count()} | "
          f"torch threads {torch.get_num_threads()} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} | "
          f"load avg {load:.2f} | device {args.device}")
    print(f"state: {len(tensors)} tensors, {nbytes / MIB:.1f} MiB")

    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors if t.is_contiguous()])
    words = flat[: flat.numel() // 8 * 8].view(torch.int64)
    floor = best_of(args.repeats, lambda: words.sum())
    print(f"  reference: plain int64 sum of the same bytes           {words.numel() * 8 / floor / 1e9:6.2f} GB/s")
    del flat, words

    t_words = best_of(args.repeats, lambda: word_sum_many(tensors))
    print(f"  word_sum_many (the per-step trace fingerprint)         {nbytes / t_words / 1e9:6.2f} GB/s  ({t_words * 1e3:.0f} ms)")
    t_many = best_of(args.repeats, lambda: fingerprint_many(tensors))
    print(f"  fingerprint_many (strong; replays) (all tensors)               {nbytes / t_many / 1e9:6.2f} GB/s  ({t_many * 1e3:.0f} ms)")
    t_each = best_of(args.repeats, lambda: [fingerprint(t) for t in tensors])
    print(f"  fingerprint (one call per tensor)                      {nbytes / t_each / 1e9:6.2f} GB/s  ({t_each * 1e3:.0f} ms)")

    other = {k: v.clone() for k, v in state.items()}
    t_cmp = best_of(args.repeats, lambda: compare_states(state, other))
    print(f"  compare_states bitwise, all equal (bytes of one state) {nbytes / t_cmp / 1e9:6.2f} GB/s  ({t_cmp * 1e3:.0f} ms)")
    victim = next(iter(other))
    other[victim] = other[victim].view(torch.int32).add(1).view(torch.float32)  # every element 1 ULP off
    t_diff = best_of(args.repeats, lambda: compare_states(state, other))
    print(f"  compare_states bitwise, one 16 MiB tensor differing    {nbytes / t_diff / 1e9:6.2f} GB/s  ({t_diff * 1e3:.0f} ms)")
    del other

    # What a per-step trace pays for a small model: many small parameters, one call.
    mlp = [p.detach().to(args.device) for p in torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).parameters()]
    small = [torch.randn(64, device=args.device) for _ in range(32)]
    for label, params in (("MLP 784-256-64-10 (6 params, 0.9 MiB)", mlp), ("32 tensors of 64 floats", small)):
        calls = 200
        def run(params=params):
            for _ in range(calls):
                fingerprint_many(params)
        per_call = best_of(args.repeats, run) / calls
        print(f"  fingerprint_many per call, {label:38s} {per_call * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
