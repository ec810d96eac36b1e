"""Seeding modes and deterministic settings applied inside a replica.

*harness* seeding seeds every global generator identically in all replicas (function targets).
*program* seeding leaves seeding to the program and instead gives each replica DIFFERENT entropy in
every global generator it should have seeded, so a forgotten seed shows up as a difference instead
of being masked by a lucky identical start.
"""
from __future__ import annotations

import os
import random

CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device's default generator


def scramble_globals(entropy: int) -> None:
    """Put python, numpy and torch (CPU and CUDA) global generators in a replica-specific state."""
    import numpy as np
    import torch

    rng = random.Random(entropy)
    random.seed(rng.getrandbits(64))
    np.random.seed(rng.getrandbits(32))
    torch.default_generator.manual_seed(rng.getrandbits(63))
    if torch.cuda.is_available():
        # queued until CUDA starts (torch.cuda.default_generators is empty before that: indexing it failed)
        torch.cuda.manual_seed_all(rng.getrandbits(63))


def replica_entropy(seed: int, replica: int) -> int:
    """Different, but reproducible, entropy per replica (so a replay sees the same start)."""
    return (seed * 1_000_003 + replica * 7_919 + 0x5EED) % 2**63


def replica_hash_seed(seed: int, replica: int) -> str:
    return str((seed * 31 + replica * 7 + 1) % 4294967295 or 1)


def child_environment(base: dict, *, deterministic: bool, hash_seed: str | None) -> dict:
    """Environment for a replica process: the parent's, plus what determinism needs before CUDA starts."""
    env = dict(base)
    if deterministic:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def apply_deterministic_settings(enabled: bool) -> dict:
    """Turn on deterministic algorithms in warn_only mode (so we can inventory offenders) and cuDNN flags."""
    import torch

    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return deterministic_flags()


def deterministic_flags() -> dict:
    import torch

    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
