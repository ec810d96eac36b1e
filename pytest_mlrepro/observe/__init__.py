"""Framework callbacks observed from outside, in the audited program's real run.

When the program builds a best-checkpoint or early-stopping callback of Lightning, Keras 3, Hugging
Face ``Trainer`` or fastai, the replica's :class:`~pytest_mlrepro.observe.probe.CallbackProbe` wraps the
framework's own per-evaluation methods (patched when the framework module is imported, never importing
one itself) and records, per callback, the monitored value of every evaluation as the framework saw it,
the evaluations it took as a new best and the one it kept (``records``). The parent turns replica 0's
records into findings with the pure rule function :func:`~pytest_mlrepro.observe.rules.observed_findings`.
"""
from __future__ import annotations

__all__ = ["CallbackProbe", "observed_findings", "META_KEY"]

META_KEY = "framework_callbacks"  # the key of a replica's meta.json holding its observations


def __getattr__(name):
    if name == "CallbackProbe":
        from .probe import CallbackProbe

        return CallbackProbe
    if name == "observed_findings":
        from .rules import observed_findings

        return observed_findings
    raise AttributeError(name)
