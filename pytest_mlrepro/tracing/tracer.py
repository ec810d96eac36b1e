"""The tracer: sees every step of a training, whatever steps it, and records it.

Steps come from torch's global ``register_optimizer_step_{pre,post}_hook`` (every ``torch.optim``
optimizer: plain loops, Lightning, Transformers), from Keras 3's and fastai's own optimizers
(``frameworks.py``), and, for a loop with no optimizer we know, from its parameters changing between
two forwards of a root module (``fallback.py``; dropped as soon as a known optimizer steps). Each
step records the stepped parameters and the floating-point buffers of their modules
(``steps.py``); ``naming.py`` names them, ``replay.py`` records one chosen step in detail.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

from .budget import TraceBudget
from .fallback import ForwardWatch
from .frameworks import FrameworkSteps
from .naming import ModuleNamer, traceable
from .record import PARAM, TraceRecord
from .replay import ReplayDone, ReplayRecorder
from .steps import StepRecorder

NAMING_STEPS = 8  # keep watching module calls for at most this many steps while some tensor has no name


def _loss_value(tensor: torch.Tensor):
    """The loss a backward starts from, as it is now (a copy: a program may add to its loss tensor in place
    afterwards). On the CPU a Python float (the cheapest copy: a cloned tensor costs a few microseconds,
    which is most of the trace's cost per unrecorded step of a small model); on an accelerator a
    detached clone, which does not wait for the device."""
    if tensor.is_cpu:
        return tensor.detach().item()
    return tensor.detach().reshape(()).clone()


class Tracer:
    def __init__(self, *, replay_step: Optional[int] = None, every=1, stop_after: Optional[int] = None):
        if every != "auto" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"trace every must be an integer >= 1 or 'auto', got {every!r}")
        self.replay_step = replay_step
        # record after steps 0, every, 2*every, ...; "auto": every step while timing the first ones, then
        # the interval that keeps the trace within budget.py's share of the step time
        self.budget = TraceBudget() if every == "auto" and replay_step is None else None
        self.every = 1 if every == "auto" else every
        self.stop_after = stop_after  # end the program after this step (a dense re-trace needs no more)
        self.known = StepRecorder(self.every)  # steps of optimizers we know
        self.fallback = StepRecorder(self.every)  # steps seen as parameter changes between forwards
        self.namer = ModuleNamer()
        self.watch = ForwardWatch(self.fallback, self.namer)
        self.frameworks = FrameworkSteps(self)
        self.replay = ReplayRecorder(replay_step) if replay_step is not None else None
        self.rng_at_first_step: Optional[dict] = None
        self._groups: dict[int, tuple] = {}  # id(optimizer) -> (weakref or the object, group)
        self._handles: list = []
        self._forward_handle = None
        self._orig_backward = None
        self._pending_loss = None  # the loss of the coming step: a float, or a 0-dim tensor on an accelerator
        self._depth = 0  # > 0 while a Keras or fastai optimizer steps: torch optimizers it calls are part of that step
        self._ended = False  # a ReplayDone ended the program

    # -- what the replica reads -----------------------------------------------------------------
    @property
    def recorder(self) -> StepRecorder:
        """The steps that count: the known optimizers' once one has stepped, else the fallback's."""
        return self.known if self.known.groups or not self.fallback.groups else self.fallback

    @property
    def steps(self) -> int:
        return self.recorder.steps

    @property
    def roots(self) -> list:
        return self.namer.roots

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> "Tracer":
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module

        self.namer.install()
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._pre_step))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._post_step))
        self._forward_handle = nn_module.register_module_forward_pre_hook(self._on_forward)
        if self.replay is not None:
            self.replay.install()
        self.frameworks.check()
        tracer = self
        self._orig_backward = original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            if tensor.numel() == 1:
                tracer._pending_loss = _loss_value(tensor)
            if tracer.frameworks.pending:
                tracer.frameworks.check()
            return original(tensor, *args, **kwargs)

        torch.Tensor.backward = backward  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        try:
            self._finish()
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if self._forward_handle is not None:
                self._forward_handle.remove()
                self._forward_handle = None
            if self.replay is not None:
                self.replay.uninstall()
            self.frameworks.uninstall()
            self.namer.uninstall()
            if self._orig_backward is not None:
                torch.Tensor.backward = self._orig_backward  # type: ignore[method-assign]
                self._orig_backward = None

    def _finish(self) -> None:
        """The fallback's last step: the update after the last forward."""
        if self.known.groups or self._forward_handle is None or self._ended:
            return
        for g in self.watch.changed_any():
            try:
                self._step_done(self.fallback, g)
            except ReplayDone:
                return

    # -- forward: naming, frameworks, the fallback ----------------------------------------------
    def _on_forward(self, module, args):
        if self.frameworks.pending:
            self.frameworks.check()
        if not self.namer.note(module) or self.known.groups:
            return
        g = self.watch.changed(module)
        if g is not None:
            self._step_done(self.fallback, g)

    def _stop_watching_forwards(self) -> None:
        """Naming needs the modules called before a tensor's first step: keep watching for a few steps
        (a second model or a new head may come late), then stop paying for the hook."""
        if self._forward_handle is None or self.replay is not None:
            return
        if self.namer.unnamed(self.known):
            self.namer.name([self.known])
        if self.known.steps >= NAMING_STEPS:
            self._forward_handle.remove()
            self._forward_handle = None

    # -- steps ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def stepping(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _group_of(self, optimizer, kind: str, tensors: list, names: Optional[list]) -> int:
        known = self._groups.get(id(optimizer))
        if known is not None and known[0]() is optimizer:
            return known[1]
        if self.rng_at_first_step is None:
            from ..probes import rng_fingerprints

            self.rng_at_first_step = rng_fingerprints()
        self.namer.name([self.known])
        g_index = len(self.known.groups)
        names = names or [f"<optimizer{g_index}.param{j}>" for j in range(len(tensors))]
        params = [t for t in tensors if traceable(t)]
        names = [n for n, t in zip(names, tensors) if traceable(t)]
        extra = self.namer.state_of(self.namer.roots_holding(params), exclude={id(t) for t in params} | set(self.known.index))
        g = self.known.add_group(params + [t for _, t, _ in extra], names + [n for n, _, _ in extra],
                                 [PARAM] * len(params) + [k for _, _, k in extra], kind)
        try:
            ref = weakref.ref(optimizer)
        except TypeError:
            ref = lambda obj=optimizer: obj  # noqa: E731  (an optimizer without weakref support lives as long as we do)
        self._groups[id(optimizer)] = (ref, g)
        self.namer.name([self.known])
        self.known.record("init", g)
        return g

    def _before(self, g: int) -> None:
        self._stop_watching_forwards()
        if self.replay is not None and self.replay_step == self.known.steps:
            self.replay.note_grads(g, [t.grad for t in self.known.group_tensors(g)])

    def _step_done(self, recorder: StepRecorder, g: int) -> None:
        if self.rng_at_first_step is None:
            from ..probes import rng_fingerprints

            self.rng_at_first_step = rng_fingerprints()
        loss, self._pending_loss = self._pending_loss, None
        budget = self.budget if self.budget is not None and not self.budget.measured else None
        began = budget.begin() if budget is not None else 0.0
        recorder.step_done(g, loss, force=self.replay is not None)
        if budget is not None:
            choice = budget.end(began, recorder.steps)
            if choice is not None:
                recorder.dense_until, recorder.every = choice.dense_until, choice.every
        try:
            if self.stop_after is not None and recorder.steps > self.stop_after:
                raise ReplayDone()
            if self.replay is not None:
                self.replay.after_step(recorder.steps)
        except ReplayDone:
            self._ended = True
            raise

    # torch.optim (the global hooks)
    def _register_optimizer(self, optimizer) -> int:
        known = self._groups.get(id(optimizer))
        if known is not None and known[0]() is optimizer:
            return known[1]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return self._group_of(optimizer, "torch.optim", params, None)

    def _pre_step(self, optimizer, args, kwargs):
        if not self.busy:
            self._before(self._register_optimizer(optimizer))

    def _post_step(self, optimizer, args, kwargs):
        if not self.busy:
            self._step_done(self.known, self._register_optimizer(optimizer))

    # frameworks.py calls these around Keras' and fastai's optimizers
    def framework_pre(self, optimizer, kind: str, tensors: list, names: Optional[list]) -> None:
        self._before(self._group_of(optimizer, kind, tensors, names))

    def framework_post(self, optimizer) -> None:
        self._step_done(self.known, self._groups[id(optimizer)][1])

    def _record(self, kind: str, g: int) -> None:
        """One record of a known group (the benchmark times this alone)."""
        self.known.record(kind, g)

    # -- results --------------------------------------------------------------------------------
    def final_state(self) -> dict:
        self.namer.name([self.known, self.fallback])
        return self.namer.final_state(self.recorder)

    def record(self) -> TraceRecord:
        rec = self.recorder
        if self.replay is None and self.stop_after is None:
            rec.record_last_step()
        self.namer.name([self.known, self.fallback])
        parts = rec.parts()
        owners = {}
        for name, t in zip(rec.names, rec.tensors):
            owners[name] = self.namer.owner(t)
        return TraceRecord(param_names=list(rec.names), opt_indices=[list(g) for g in rec.groups], entries=list(rec.entries),
                           fp=parts["fp"], samples=parts["samples"], opt_sample_lens=parts["opt_sample_lens"],
                           losses=parts["losses"], steps=rec.steps, every=rec.every, dense_until=rec.dense_until,
                           param_owner=owners,
                           tensor_kinds=list(rec.kinds), group_kinds=list(rec.group_kinds),
                           rng_at_first_step=self.rng_at_first_step,
                           budget=None if self.budget is None or self.budget.choice is None else self.budget.choice.to_plain(),
                           replay=None if self.replay is None else self.replay.to_record(self.namer.module_names))

    def to_record(self) -> dict:
        """Everything on the host, as plain Python and CPU tensors (``trace.pt``, loaded with ``weights_only=True``)."""
        return self.record().to_plain()
