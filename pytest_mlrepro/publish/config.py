"""What the user asked the publishers to produce, in one validated place.

The plugin and the CLI turn options into a ``PublishConfig``; every publisher reads only this, so
precedence (marker > command line > environment > ini) stays the plugin's business. No heavy
imports here: the plugin may build a config while loading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import WANDB_MODES  # the shared choices
from ..errors import MlreproError

DEFAULT_WANDB_DIR = Path("mlrepro-out")
DEFAULT_PROJECT = "pytest-mlrepro"
DEFAULT_JOB_TYPE = "determinism-audit"
# Characters W&B refuses in a project name (wandb.Settings.validate_project), and its length limit.
_PROJECT_FORBIDDEN = "/\\#?%:"
_PROJECT_MAX_LEN = 128


class PublishError(MlreproError):
    """A publishing request that cannot be carried out as given (bad path, bad option value)."""


@dataclass
class PublishConfig:
    """Where results go: a JSON report, PNG plots, W&B runs (offline by default).

    ``report_path``: the JSON report (``--mlrepro-report``); None writes none.
    ``plots_dir``: where PNGs go; None puts them beside the report (``<report stem>-plots/``), or
    writes none on disk when there is no report (W&B still gets them).
    ``wandb_dir``: the folder handed to ``wandb.init(dir=...)``; runs land in ``<wandb_dir>/wandb/``.
    ``init_timeout`` / ``finish_timeout``: seconds W&B may spend starting / uploading a run, so a
    network-less machine gets a warning instead of a hang.
    """

    report_path: Optional[Path] = None
    plots_dir: Optional[Path] = None
    wandb_mode: str = "offline"
    wandb_dir: Path = DEFAULT_WANDB_DIR
    project: str = DEFAULT_PROJECT
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: tuple = ()
    job_type: str = DEFAULT_JOB_TYPE
    init_timeout: float = 30.0
    finish_timeout: float = 60.0
    report_title: Optional[str] = None

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise PublishError(
                f"W&B mode {self.wandb_mode!r} is not one of {', '.join(WANDB_MODES)} (--mlrepro-wandb)"
            )
        if self.report_path is not None:
            self.report_path = Path(self.report_path)
        if self.plots_dir is not None:
            self.plots_dir = Path(self.plots_dir)
        self.wandb_dir = Path(self.wandb_dir) if self.wandb_dir is not None else DEFAULT_WANDB_DIR
        if isinstance(self.tags, str):
            self.tags = tuple(t.strip() for t in self.tags.split(",") if t.strip())
        else:
            self.tags = tuple(str(t) for t in (self.tags or ()))
        if self.init_timeout <= 0 or self.finish_timeout <= 0:
            raise PublishError("W&B init_timeout and finish_timeout must be positive numbers of seconds")

    def effective_wandb_mode(self) -> tuple[str, Optional[str]]:
        """The mode W&B will really run in, and why it differs from the asked one (or None).

        ``WANDB_MODE=disabled`` (or ``dryrun`` / ``offline``) in the environment wins over an
        online/offline request, the way wandb itself treats it, and the caller says so.
        """
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if self.wandb_mode == "disabled":
            return "disabled", None
        if env == "disabled":
            return "disabled", "WANDB_MODE=disabled is set in the environment"
        if env in ("offline", "dryrun") and self.wandb_mode == "online":
            return "offline", f"WANDB_MODE={env} is set in the environment; logging offline instead of online"
        return self.wandb_mode, None

    def project_problem(self) -> Optional[str]:
        """Why W&B would refuse ``project`` (same rule as wandb's own validator), or None."""
        p = self.project
        if not p or not p.strip():
            return "the W&B project name is empty"
        if len(p) > _PROJECT_MAX_LEN:
            return f"the W&B project name {p!r} is longer than {_PROJECT_MAX_LEN} characters"
        bad = sorted({c for c in _PROJECT_FORBIDDEN if c in p})
        if bad:
            return f"the W&B project name {p!r} contains {''.join(bad)!r}; W&B forbids any of {_PROJECT_FORBIDDEN!r}"
        return None

    def resolved_plots_dir(self) -> Optional[Path]:
        """Where PNGs are written on disk: ``plots_dir``, else beside the report, else nowhere."""
        if self.plots_dir is not None:
            return self.plots_dir
        if self.report_path is not None:
            return self.report_path.parent / f"{self.report_path.stem}-plots"
        return None
