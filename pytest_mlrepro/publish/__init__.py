"""Publishing audit results: JSON report, terminal table, JUnit properties, plots, W&B.

Importing this package is cheap (no matplotlib, torch or wandb at import time), so the plugin may
load it eagerly; the heavy libraries are imported inside the functions that draw or log.
"""
from __future__ import annotations

from .config import PublishConfig, PublishError
from .json_report import REPORT_SCHEMA, REPORT_VERSION, build_report, check_report_path, read_report, validate_report, write_report
from .session import PublishOutcome, publish_session
from .terminal import junit_properties, summary_lines

__all__ = [
    "PublishConfig",
    "PublishError",
    "PublishOutcome",
    "REPORT_SCHEMA",
    "REPORT_VERSION",
    "build_report",
    "check_report_path",
    "junit_properties",
    "plot_metrics",
    "plot_step_divergence",
    "publish_session",
    "read_report",
    "summary_lines",
    "validate_report",
    "write_report",
]


def __getattr__(name: str):
    if name in ("plot_metrics", "plot_step_divergence"):
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
