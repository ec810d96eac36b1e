"""The replica's probe: installs the framework patches for the run, hands back typed observations."""
from __future__ import annotations

from . import fastai, keras, lightning, transformers
from .hooks import ImportPatcher
from .recorder import Recorder

__all__ = ["CallbackProbe"]


class CallbackProbe:
    """``install()`` before the program runs, ``uninstall()`` after; ``to_dict()`` goes into meta.json."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        table: dict = {}
        for framework in (lightning, keras, transformers, fastai):
            table.update(framework.patchers(self.recorder))
        self._patcher = ImportPatcher(table)

    def install(self) -> None:
        self._patcher.install()

    def uninstall(self) -> None:
        self._patcher.uninstall()

    def to_dict(self) -> dict:
        return {"observations": self.recorder.to_list(),
                "problems": self._patcher.problems + self.recorder.problems}
