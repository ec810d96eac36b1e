"""What a replica ran on: versions, device, threads, deterministic flags. Compared across replicas."""
from __future__ import annotations

import os
import platform
import sys


def collect(device: str) -> dict:
    import numpy as np
    import torch

    from .seeding import deterministic_flags

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "device_name": None,
        "cpu_capability": _cpu_capability(torch),  # the SIMD kernels torch picked: they change float results
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # the replica's device group on a GPU
        "hash_randomization": bool(sys.flags.hash_randomization),
        **deterministic_flags(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _cpu_capability(torch) -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return None


# Keys that legitimately differ between replicas of one audit (replicas on identical devices side by
# side see different CUDA_VISIBLE_DEVICES; a different model still differs in device_name)
PER_REPLICA_KEYS = frozenset({"pythonhashseed", "cuda_visible_devices"})


def differences(a: dict, b: dict) -> dict:
    """Keys whose values differ between two replica environments (ignoring per-replica ones)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in PER_REPLICA_KEYS and a.get(k) != b.get(k)}
