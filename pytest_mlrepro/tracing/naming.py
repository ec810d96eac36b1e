"""Module and tensor naming: which modules are the user's models, and the full path of every traced
tensor from them (``net.0.weight``, not ``0.weight``).

A module seen in a forward call names its subtree; climbing from it through the modules that
registered it as a submodule (torch's module-registration hook, installed before the program builds
its model) reaches the user's model even when that model is never called itself (a LightningModule
whose ``training_step`` calls ``self.net``).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .record import BUFFER, PARAM


def _compiling() -> bool:
    """True while torch.compile traces a module: our Python hooks must stay out of its graph."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def traceable(t: torch.Tensor) -> bool:
    """A tensor whose values can be fingerprinted now (not a lazy module's uninitialized parameter, not meta)."""
    return not isinstance(t, torch.nn.parameter.UninitializedTensorMixin) and t.device.type != "meta"


def _keras_state(root: torch.nn.Module) -> list:
    """A Keras layer's non-trainable floating-point variables (its BatchNormalization statistics), as
    (path, torch tensor): Keras keeps them as parameters that no optimizer steps. Only for Keras layers,
    whose module is already imported when one exists."""
    if not type(root).__module__.startswith("keras"):
        return []
    out = []
    for v in getattr(root, "non_trainable_variables", None) or []:
        value = getattr(v, "_value", None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out.append((str(getattr(v, "path", "")), value))
    return out


class ModuleNamer:
    def __init__(self):
        self.seen: dict[int, torch.nn.Module] = {}
        self.children: set[int] = set()  # ids of the submodules of every module seen (call roots are the rest)
        self.roots: list[torch.nn.Module] = []  # the user's models, in the order first seen
        self.module_names: dict[int, str] = {}
        self.owners: dict[int, tuple] = {}  # id(tensor) -> (module name, module type)
        self._prefixes: dict[int, str] = {}
        self._parents: dict[int, tuple] = {}  # id(sub) -> (weakref sub, weakref parent, attribute name)
        self._handle = None

    def install(self) -> None:
        from torch.nn.modules import module as nn_module

        self._handle = nn_module.register_module_module_registration_hook(self._on_register)

    def uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_register(self, module, name, submodule):
        if isinstance(submodule, torch.nn.Module):
            known = self._parents.get(id(submodule))
            if known is None or known[0]() is not submodule:
                self._parents[id(submodule)] = (weakref.ref(submodule), weakref.ref(module), name)

    def note(self, module: torch.nn.Module) -> bool:
        """Remember a called module; True when it is a call root (no module seen so far contains it)."""
        if _compiling():
            return False
        if id(module) not in self.seen:
            self.seen[id(module)] = module
            for sub in module.modules():
                if sub is not module:
                    self.children.add(id(sub))
        return id(module) not in self.children

    def top_of(self, module: torch.nn.Module) -> torch.nn.Module:
        """The outermost module holding ``module`` through registered submodule links."""
        visited = {id(module)}
        while True:
            link = self._parents.get(id(module))
            if link is None or link[0]() is not module:
                return module
            parent = link[1]()
            if parent is None or id(parent) in visited or parent._modules.get(link[2]) is not module:
                return module
            visited.add(id(parent))
            module = parent

    # -- names ----------------------------------------------------------------------------------
    def find_roots(self) -> None:
        tops: list = []
        for m in list(self.seen.values()):
            top = self.top_of(m)
            if all(top is not t for t in tops):
                tops.append(top)
        inner: set[int] = set()
        for t in tops:
            for sub in t.modules():
                if sub is not t:
                    inner.add(id(sub))
        for t in tops:
            if id(t) not in inner and all(t is not r for r in self.roots) and not self._held(t):
                self.roots.append(t)

    def _held(self, module: torch.nn.Module) -> bool:
        """Every parameter of ``module`` already belongs to a root: a Keras layer, which its model
        holds through its tracked variables rather than as a submodule."""
        params = [id(p) for p in module.parameters()]
        if not params or not self.roots:
            return False
        held = {id(p) for r in self.roots for p in r.parameters()}
        return all(p in held for p in params)

    def root_prefix(self, root: torch.nn.Module) -> str:
        """Name prefix for a root, fixed when the root is first seen so names never change: none for
        the first root holding parameters, ``Type[k].`` for later ones, ``Type.`` for parameter-free
        roots (a loss module called on its own is a root too, but must not rename the model)."""
        prefix = self._prefixes.get(id(root))
        if prefix is None:
            if next(root.parameters(), None) is None:
                prefix = f"{type(root).__name__}."
            else:
                earlier = self.roots[: next(i for i, r in enumerate(self.roots) if r is root)]
                k = sum(1 for r in earlier if next(r.parameters(), None) is not None)
                prefix = "" if k == 0 else f"{type(root).__name__}[{k}]."
            self._prefixes[id(root)] = prefix
        return prefix

    def name(self, recorders: list) -> None:
        """Find the roots among the modules called so far and name every module and traced tensor from them
        (a tensor keeps a name once it has one that is not a ``<placeholder>``)."""
        self.find_roots()
        self._name_keras_layers()
        slots = {}
        for rec in recorders:
            for tid, i in rec.index.items():
                slots.setdefault(tid, []).append((rec, i))
        for root in self.roots:
            prefix = self.root_prefix(root)
            by_name = {}
            for mname, sub in root.named_modules():
                full = (prefix + mname).rstrip(".")
                self.module_names.setdefault(id(sub), full)
                by_name[mname] = sub
                owner_name, owner = full, sub
                if isinstance(sub, (torch.nn.ParameterDict, torch.nn.ParameterList)) and "." in mname:
                    parent_name = mname.rsplit(".", 1)[0]
                    owner, owner_name = by_name.get(parent_name, sub), (prefix + parent_name).rstrip(".")
                for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
                    self.owners.setdefault(id(t), (owner_name, type(owner).__name__))
            named = [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]
            for tname, t in named:
                for rec, i in slots.get(id(t), ()):
                    if rec.names[i].startswith("<"):
                        rec.names[i] = prefix + tname

    def _name_keras_layers(self) -> None:
        """Keras layers are modules their model does not hold as submodules (it holds their variables):
        name each by its Keras path, and make it the owner of its own variables."""
        layers = [m for m in self.seen.values() if type(m).__module__.startswith("keras") and hasattr(m, "_torch_params")]
        for m in sorted(layers, key=lambda m: len(m._torch_params)):
            path = str(getattr(m, "path", "") or getattr(m, "name", ""))
            self.module_names.setdefault(id(m), path)
            for t in m._torch_params.values():
                self.owners.setdefault(id(t), (path, type(m).__name__))

    def unnamed(self, recorder) -> bool:
        return any(n.startswith("<") for n in recorder.names)

    # -- state beyond the parameters --------------------------------------------------------------
    def roots_holding(self, tensors: list) -> list:
        ids = {id(t) for t in tensors}
        return [r for r in self.roots if any(id(p) in ids for p in r.parameters())]

    def state_of(self, roots: list, exclude: set) -> list:
        """(placeholder name, tensor, BUFFER) for the floating-point buffers of ``roots`` (and Keras
        non-trainable variables), tensors in ``exclude`` left out."""
        out, taken = [], set(exclude)
        for root in roots:
            found = [(None, b) for b in root.buffers()] + [(p, v) for p, v in _keras_state(root)]
            for path, t in found:
                if id(t) in taken or not t.is_floating_point() and not t.is_complex() or not traceable(t):
                    continue
                taken.add(id(t))
                out.append((path or f"<buffer{len(out)}>", t, BUFFER))
        return out

    def owner(self, t: torch.Tensor) -> Optional[tuple]:
        return self.owners.get(id(t))

    def final_state(self, recorder) -> dict:
        """Weights to compare when the target returned nothing: the roots' state (buffers included),
        plus every traced tensor no root holds (a module first called late)."""
        out: dict = {}
        held: set[int] = set()
        for root in self.roots:
            prefix = self.root_prefix(root)
            for k, v in root.state_dict(keep_vars=True).items():
                if isinstance(v, torch.Tensor):
                    out[prefix + k] = v.detach()
                    held.add(id(v))
        for name, t, kind in zip(recorder.names, recorder.tensors, recorder.kinds):
            if id(t) not in held:
                out.setdefault(name, t.detach())
        return out


__all__ = ["ModuleNamer", "PARAM", "BUFFER", "traceable"]
