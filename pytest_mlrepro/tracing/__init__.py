"""Per-step traces of a training, whatever steps it (see ``tracer.py``), as typed records (``record.py``).

Names are loaded on first use (PEP 562): ``tracing.record`` needs no torch, so the localizer and the
baselines import it without a training stack; the tracer itself imports torch.
"""
from importlib import import_module

_WHERE = {"BUFFER": "record", "PARAM": "record", "GradRecord": "record", "ModuleCall": "record",
          "ReplayRecord": "record", "TraceRecord": "record", "ReplayDone": "replay",
          "SAMPLES_PER_TENSOR": "steps", "sample_indices": "steps", "NAMING_STEPS": "tracer", "Tracer": "tracer"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
