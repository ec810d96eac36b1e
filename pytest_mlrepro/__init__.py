"""pytest-mlrepro: prove a training is reproducible and its best model really is the best.

The public API is loaded lazily so that pytest loading the plugin imports neither torch nor wandb.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "audit": ("pytest_mlrepro.auditing", "audit"),
    "compare_commits": ("pytest_mlrepro.commits", "compare_commits"),
    "AuditConfig": ("pytest_mlrepro.config", "AuditConfig"),
    "ConfigError": ("pytest_mlrepro.errors", "ConfigError"),
    "AuditResult": ("pytest_mlrepro.result", "AuditResult"),
    "Divergence": ("pytest_mlrepro.result", "Divergence"),
    "TensorDiff": ("pytest_mlrepro.result", "TensorDiff"),
    "Finding": ("pytest_mlrepro.result", "Finding"),
    "MlreproError": ("pytest_mlrepro.errors", "MlreproError"),
    "TargetError": ("pytest_mlrepro.errors", "TargetError"),
    "ReplicaError": ("pytest_mlrepro.errors", "ReplicaError"),
    "infer_direction": ("pytest_mlrepro.checkpoint.direction", "infer_direction"),
    "BestCheckpoint": ("pytest_mlrepro.checkpoint.callbacks", "BestCheckpoint"),
    "EarlyStopping": ("pytest_mlrepro.checkpoint.callbacks", "EarlyStopping"),
    "CheckpointSpec": ("pytest_mlrepro.checkpoint.audit", "CheckpointSpec"),
    "check_reload": ("pytest_mlrepro.checkpoint.reload", "check_reload"),
    "check_conformance": ("pytest_mlrepro.checkpoint.conformance", "check_conformance"),
    "check_comparator": ("pytest_mlrepro.checkpoint.conformance", "check_comparator"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_mlrepro' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
