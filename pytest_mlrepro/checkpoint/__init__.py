"""Best checkpoints and early stopping: direction table, oracle, reference callbacks, checks.

Names are loaded on first use (PEP 562) so importing the package stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "infer_direction": "direction",
    "StopSpec": "oracle",
    "Outcome": "oracle",
    "is_improvement": "oracle",
    "simulate": "oracle",
    "BestCheckpoint": "callbacks",
    "EarlyStopping": "callbacks",
    "MetricMissingError": "callbacks",
    "CallbackDriver": "conformance",
    "UnsupportedSpec": "conformance",
    "check_conformance": "conformance",
    "probe_direction": "conformance",
    "check_comparator": "conformance",
    "check_reload": "reload",
    "weights_sha256": "storage",
    "save_checkpoint": "storage",
    "load_checkpoint": "storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
