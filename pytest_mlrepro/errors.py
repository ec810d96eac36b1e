"""Errors an audit raises for bad input, each naming the target and the cause."""
from __future__ import annotations


class MlreproError(Exception):
    """Base class: every error pytest-mlrepro raises on purpose."""


class TargetError(MlreproError):
    """The target cannot be resolved: not importable, not callable, not a file, not runnable."""


class ReplicaError(MlreproError):
    """A replica failed: raised, exited non-zero, hung past the timeout, or returned nothing comparable."""

    def __init__(self, message: str, *, replica: int | None = None, traceback: str = "", kind: str = "error"):
        super().__init__(message)
        self.replica = replica
        self.traceback = traceback
        self.kind = kind


class ConfigError(MlreproError, ValueError):
    """An option has a bad value, an unknown name, or a combination that cannot work."""
