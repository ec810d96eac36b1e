"""The fallback for training loops without an optimizer the tracer knows (``p.data -= lr * g`` by
hand, a custom update rule): a *step* is a change of a call root's trained parameters between two of
its forward calls (and once more at the end of the program, for the last update).

A change is a moved parameter ``_version`` counter or data pointer, or different word sums (updates
through ``.data`` move neither): one pass over the parameters per root forward, paid only until a
known optimizer steps (in a program with none, for the whole training).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ..fingerprint import word_sum_many
from .naming import ModuleNamer, traceable
from .record import PARAM
from .steps import StepRecorder


def _signature(params: list) -> tuple:
    return tuple((p._version, p.data_ptr()) for p in params)


@dataclass
class _Watched:
    ref: weakref.ref
    params: list
    signature: tuple
    sums: Optional[torch.Tensor]
    group: int


class ForwardWatch:
    """Watches each call root's trained parameters; its steps go into its own ``StepRecorder``."""

    def __init__(self, recorder: StepRecorder, namer: ModuleNamer):
        self.recorder = recorder
        self.namer = namer
        self._watched: dict[int, _Watched] = {}

    def changed(self, module: torch.nn.Module) -> Optional[int]:
        """The group of ``module`` when its trained parameters changed since its previous forward
        (the first forward registers the group and records its initial state)."""
        w = self._watched.get(id(module))
        if w is None or w.ref() is not module:
            self._watch(module)
            return None
        return w.group if self._moved(w) else None

    def changed_any(self) -> list:
        """Groups whose parameters changed since their root's last forward (the end of the program)."""
        return [w.group for w in list(self._watched.values()) if w.ref() is not None and self._moved(w)]

    def _watch(self, module: torch.nn.Module) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params or not all(traceable(p) for p in params):
            return  # nothing trained, or a lazy module not materialized yet: look again next call
        extra = self.namer.state_of([module], exclude={id(p) for p in params})
        g = self.recorder.add_group(params + [t for _, t, _ in extra],
                                    [f"<forward{len(self.recorder.groups)}.param{j}>" for j in range(len(params))]
                                    + [name for name, _, _ in extra],
                                    [PARAM] * len(params) + [kind for _, _, kind in extra], "forward")
        self.recorder.record("init", g)
        with torch.no_grad():
            sums = word_sum_many([p.detach() for p in params])
        self._watched[id(module)] = _Watched(weakref.ref(module), params, _signature(params), sums, g)

    def _moved(self, w: _Watched) -> bool:
        signature = _signature(w.params)
        with torch.no_grad():
            sums = word_sum_many([p.detach() for p in w.params])
        moved = signature != w.signature or not torch.equal(sums, w.sums)
        w.signature, w.sums = signature, sums
        return moved
