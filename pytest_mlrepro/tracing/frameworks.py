"""Optimizers that do not go through ``torch.optim`` become trace steps: Keras 3's optimizers (torch
backend, ``BaseOptimizer.apply``) and fastai's ``Optimizer.step``, patched from outside while the
replica runs and restored after.

Nothing here imports Keras or fastai: a framework is patched only once the program has imported it
(``check`` looks in ``sys.modules``; the tracer calls it at install and from its forward and backward
hooks, which every training passes through before its first optimizer step).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch


def _keras_apply(original: Callable, steps) -> Callable:
    def apply(optimizer, grads, trainable_variables=None, *args, **kwargs):
        if steps.busy or len(grads) == 0:
            return original(optimizer, grads, trainable_variables, *args, **kwargs)
        variables = list(trainable_variables) if trainable_variables is not None else list(
            getattr(optimizer, "_trainable_variables", None) or [])
        tensors = [getattr(v, "_value", None) for v in variables]
        if not variables or not all(isinstance(t, torch.Tensor) for t in tensors):  # another backend: not ours
            return original(optimizer, grads, trainable_variables, *args, **kwargs)
        names = [str(getattr(v, "path", "") or f"<keras.param{j}>") for j, v in enumerate(variables)]
        steps.framework_pre(optimizer, "keras", tensors, names)
        with steps.stepping():
            out = original(optimizer, grads, trainable_variables, *args, **kwargs)
        steps.framework_post(optimizer)
        return out

    return apply


def _fastai_step(original: Callable, steps) -> Callable:
    def step(optimizer, *args, **kwargs):
        if steps.busy:
            return original(optimizer, *args, **kwargs)
        params = [p for group in optimizer.param_lists for p in group]
        steps.framework_pre(optimizer, "fastai", params, None)
        with steps.stepping():
            out = original(optimizer, *args, **kwargs)
        steps.framework_post(optimizer)
        return out

    return step


# (module, class, method, wrapper factory): each patched once its module is in sys.modules
TARGETS = (
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer", "apply", _keras_apply),
    ("fastai.optimizer", "Optimizer", "step", _fastai_step),
)


class FrameworkSteps:
    """Patches the known framework optimizers while installed; ``steps`` is the tracer's step interface
    (``busy``, ``stepping()``, ``framework_pre``, ``framework_post``)."""

    def __init__(self, steps):
        self.steps = steps
        self._patched: list[tuple] = []  # (class, method, original)
        self._pending = list(TARGETS)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def check(self) -> None:
        """Patch every target whose module the program has imported by now."""
        for target in list(self._pending):
            module_name, class_name, method, factory = target
            module = sys.modules.get(module_name)
            cls = getattr(module, class_name, None) if module is not None else None
            if cls is None:
                continue
            original = cls.__dict__.get(method)
            if original is None:
                continue
            setattr(cls, method, factory(original, self.steps))
            self._patched.append((cls, method, original))
            self._pending.remove(target)

    def uninstall(self) -> None:
        for cls, method, original in reversed(self._patched):
            setattr(cls, method, original)
        self._patched.clear()
        self._pending = list(TARGETS)
