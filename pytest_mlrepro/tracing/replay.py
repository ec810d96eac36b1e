"""Replay recording: for one chosen step, every module call's input/output fingerprints, the torch
RNG state around each call, and the gradients the step's optimizer saw, so the localizer can name
the phase and module where two replicas part. Only replay runs pay for this."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..fingerprint import fingerprint_many
from .naming import _compiling
from .record import GradRecord, ModuleCall, ReplayRecord


class ReplayDone(BaseException):
    """Raised from a step hook once the replayed step is recorded (or a dense re-trace has what it
    needs), to end the program early. A BaseException so that training code catching ``Exception``
    does not swallow it."""


def _leaves(obj: Any) -> list:
    try:
        from torch.utils._pytree import tree_leaves

        leaves = tree_leaves(obj)
    except Exception:  # exotic containers: fall back to a flat look
        leaves = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _fp_of(obj: Any) -> Optional[torch.Tensor]:
    tensors = [t.detach() for t in _leaves(obj)]
    if not tensors:
        return None
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    return fingerprint_many(tensors)


def _rng_fp() -> torch.Tensor:
    """Fingerprint of torch's CPU generator, and of the current CUDA generator once CUDA is in use
    (dropout on a GPU draws from the latter)."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return fingerprint_many([torch.cat(states)]) if len(states) > 1 else fingerprint_many(states)


class ReplayRecorder:
    """Module calls while ``active``, and the gradients of the replayed step."""

    def __init__(self, step: int):
        self.step = step
        self.active = step == 0
        self.completed = False
        self._stack: list[tuple] = []
        self._calls: list[tuple] = []  # (module, in fp, out fp, rng in, rng out)
        self._grads: Optional[tuple] = None  # (group, present, fp)
        self._handles: list = []

    def install(self) -> None:
        from torch.nn.modules import module as nn_module

        self._handles.append(nn_module.register_module_forward_pre_hook(self._pre_forward))
        self._handles.append(nn_module.register_module_forward_hook(self._post_forward))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_forward(self, module, args):
        if self.active and not _compiling():
            self._stack.append((module, _fp_of(args), _rng_fp()))

    def _post_forward(self, module, args, output):
        if self.active and not _compiling() and self._stack and self._stack[-1][0] is module:
            _, in_fp, rng_in = self._stack.pop()
            self._calls.append((module, in_fp, _fp_of(output), rng_in, _rng_fp()))

    def note_grads(self, group: int, grads: list) -> None:
        """The gradients the replayed step's optimizer is about to apply (None where a tensor has none)."""
        with torch.no_grad():
            present = [g is not None for g in grads]
            fp = fingerprint_many([g.detach() for g in grads if g is not None]) if any(present) else None
        self._grads = (group, present, fp)

    def after_step(self, steps_done: int) -> None:
        """Called once ``steps_done`` steps have finished: start recording before the replayed step, end after it."""
        if steps_done == self.step:
            self.active = True
        elif steps_done == self.step + 1:
            self.active = False
            self.completed = True
            raise ReplayDone()

    def to_record(self, module_names: dict) -> ReplayRecord:
        calls = [ModuleCall(name=module_names.get(id(m), f"<unnamed {type(m).__name__}>"), type=type(m).__name__,
                            inputs=None if i is None else i.cpu().tolist(), outputs=None if o is None else o.cpu().tolist(),
                            rng_in=int(ri.cpu()[0]), rng_changed=bool((ri != ro).any()))
                 for m, i, o, ri, ro in self._calls]
        grads = None
        if self._grads is not None:
            g, present, fp = self._grads
            grads = GradRecord(group=g, present=present, fp=None if fp is None else fp.cpu().tolist())
        return ReplayRecord(step=self.step, completed=self.completed, calls=calls, grads=grads)

    def modules(self) -> list:
        return [c[0] for c in self._calls]
