"""Resolve what to run: ``pkg.module:fn``, ``path/file.py:fn``, ``path/script.py`` or a callable.

Resolution that needs no import happens in the parent (so a missing file fails fast); loading a
module happens where the replica runs, so the parent process stays free of the user's imports.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import TargetError


@dataclass(frozen=True)
class TargetSpec:
    kind: str  # "function" (module or file) | "script" | "callable" (in-process only)
    display: str
    module: Optional[str] = None  # for module:function
    path: Optional[str] = None  # absolute file path for file:function and scripts
    qualname: Optional[str] = None
    func: Optional[Callable] = None  # only for in-process callables with no importable reference

    @property
    def default_seeding(self) -> str:
        return "program" if self.kind == "script" else "harness"


def resolve(target: Any, *, rootdir: str | os.PathLike | None = None) -> TargetSpec:
    """Turn a user's target into a TargetSpec, or raise TargetError saying why it cannot run."""
    if callable(target) and not isinstance(target, str):
        return _resolve_callable(target)
    if not isinstance(target, (str, os.PathLike)):
        raise TargetError(f"target must be 'module:function', 'file.py:function', 'script.py' or a callable; got {target!r}")
    text = os.fspath(target).strip()
    if not text:
        raise TargetError("target is empty")
    base = Path(rootdir) if rootdir else Path.cwd()
    left, sep, right = text.rpartition(":")
    if sep and right and not (len(left) == 1 and left.isalpha()):  # not a Windows drive letter
        if not right.replace(".", "_").isidentifier():
            raise TargetError(f"target {text!r}: {right!r} is not a function name")
        if left.endswith(".py") or "/" in left or os.sep in left:
            path = (base / left).resolve()
            if not path.is_file():
                raise TargetError(f"target {text!r}: file {path} does not exist")
            return TargetSpec("function", text, path=str(path), qualname=right)
        if not all(part.isidentifier() for part in left.split(".")):
            raise TargetError(f"target {text!r}: {left!r} is not a module name")
        return TargetSpec("function", text, module=left, qualname=right)
    if text.endswith(".py"):
        path = (base / text).resolve()
        if not path.is_file():
            raise TargetError(f"target {text!r}: script {path} does not exist")
        return TargetSpec("script", text, path=str(path))
    raise TargetError(
        f"target {text!r} is neither 'module:function', 'file.py:function' nor a 'script.py' path"
    )


def _resolve_callable(fn: Callable) -> TargetSpec:
    qualname = getattr(fn, "__qualname__", None)
    display = qualname or repr(fn)
    importable = bool(qualname) and "<" not in qualname and inspect.isfunction(fn)
    if importable:
        try:
            path = inspect.getsourcefile(fn)
        except TypeError:
            path = None
        if path and os.path.isfile(path):
            return TargetSpec("function", f"{Path(path).name}:{qualname}", path=str(Path(path).resolve()), qualname=qualname)
    return TargetSpec("callable", display, func=fn)


def load_function(spec: TargetSpec) -> Callable:
    """Import the target's module (or file) and return the function. Runs inside the replica."""
    if spec.func is not None:
        return spec.func
    if spec.module:
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:
            raise TargetError(f"target {spec.display!r}: cannot import module {spec.module!r}: {type(exc).__name__}: {exc}") from exc
    else:
        module = import_file(spec.path)
    obj: Any = module
    for part in spec.qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"target {spec.display!r}: {spec.module or spec.path} has no attribute {spec.qualname!r}") from None
    if not callable(obj):
        raise TargetError(f"target {spec.display!r}: {spec.qualname!r} is a {type(obj).__name__}, not callable")
    return obj


def import_file(path: str):
    """Import a .py file by path under a private module name, its folder first on sys.path."""
    folder = str(Path(path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import hashlib

    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    name = f"_mlrepro_target_{Path(path).stem}_{digest}"  # two train.py in two folders stay two modules
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise TargetError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def wants_ctx(fn: Callable) -> bool:
    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
