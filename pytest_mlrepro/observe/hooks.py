"""Patch a module when the program imports it (or now, if it already has), and undo every patch.

``ImportPatcher(patchers)`` maps module names to ``patch(module, patches)`` functions. ``install``
runs the patch of every watched module already in ``sys.modules`` and puts a finder at the front of
``sys.meta_path`` that wraps the loader of a watched module so its patch runs right after the module's
code. Nothing is ever imported here: a framework the program does not import stays unimported.
"""
from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

__all__ = ["Patches", "ImportPatcher"]


class Patches:
    """Attribute replacements that can all be put back, newest first."""

    def __init__(self) -> None:
        self._saved: list = []

    def wrap(self, owner, attr: str, make: Callable) -> None:
        """Replace ``owner.attr`` by ``make(original)``; only attributes ``owner`` itself defines."""
        if attr not in vars(owner):
            return
        original = vars(owner)[attr]
        wrapped = make(original)
        wrapped.__wrapped__ = original
        setattr(owner, attr, wrapped)
        self._saved.append((owner, attr, original))

    def restore(self) -> None:
        while self._saved:
            owner, attr, original = self._saved.pop()
            setattr(owner, attr, original)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, on_loaded: Callable) -> None:
        self._loader, self._on_loaded = loader, on_loaded

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._on_loaded(module)

    def __getattr__(self, name):  # get_source, is_package, ... as the real loader has them
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, owner: "ImportPatcher") -> None:
        self._owner = owner

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._owner.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, self._owner.patch)
                return spec
        return None


class ImportPatcher:
    """Runs each module's patch exactly once per install, at import or at install time."""

    def __init__(self, patchers: dict) -> None:
        self.patchers = dict(patchers)
        self.pending: set = set()
        self.patches = Patches()
        self.problems: list = []  # patches that failed (the program runs on, unobserved)
        self._finder = _Finder(self)

    def install(self) -> None:
        self.pending = set(self.patchers)
        sys.meta_path.insert(0, self._finder)
        for name in list(self.patchers):
            module = sys.modules.get(name)
            if module is not None:
                self.patch(module)

    def patch(self, module) -> None:
        name = module.__name__
        if name in self.pending:
            self.pending.discard(name)
            try:
                self.patchers[name](module, self.patches)
            except Exception as exc:  # a framework version we do not know: observe nothing, break nothing
                self.problems.append(f"could not patch {name}: {type(exc).__name__}: {exc}")

    def uninstall(self) -> None:
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        self.patches.restore()
        self.pending = set()
