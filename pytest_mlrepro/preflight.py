"""Check a target before any audit runs, without importing it: the file exists and compiles, a
``file.py:fn`` defines ``fn`` at top level, a ``module:fn``'s package can be found. A target that fails
here is a usage error (CLI exit 2, a pytest usage error) instead of two replicas that crash alike.

Only what can be told for sure from outside: a function defined dynamically (``from x import *``, a
module ``__getattr__``) is left for the replica to find.
"""
from __future__ import annotations

import ast
import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import TargetError
from .targets import TargetSpec, resolve


def check_target(target: str, *, rootdir: Optional[os.PathLike] = None) -> TargetSpec:
    """The resolved target, or TargetError saying what is wrong with it."""
    spec = resolve(target, rootdir=rootdir)
    if spec.path is not None:
        tree = _parse(spec)
        if spec.kind == "function":
            _check_defines(spec, tree)
    elif spec.module is not None:
        _check_module(spec, Path(rootdir) if rootdir else Path.cwd())
    return spec


def _parse(spec: TargetSpec) -> ast.Module:
    try:
        source = Path(spec.path).read_bytes()
    except OSError as exc:
        raise TargetError(f"target {spec.display!r}: cannot read {spec.path}: {exc.strerror or exc}") from None
    try:
        return ast.parse(source, filename=spec.path)
    except SyntaxError as exc:
        raise TargetError(f"target {spec.display!r}: syntax error in {spec.path}, line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # null bytes
        raise TargetError(f"target {spec.display!r}: {spec.path} is not Python source: {exc}") from None


def _top_level_names(tree: ast.Module) -> tuple[set, bool]:
    """Names bound at module level, and whether some may be bound in ways not visible here."""
    names, dynamic = set(), False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node in tree.body:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names, dynamic or "__getattr__" in names or "globals" in {
        n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _check_defines(spec: TargetSpec, tree: ast.Module) -> None:
    first = spec.qualname.split(".")[0]
    names, dynamic = _top_level_names(tree)
    if first in names or dynamic:
        return
    functions = sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    known = f"functions defined there: {', '.join(functions)}" if functions else "it defines no function"
    raise TargetError(f"target {spec.display!r}: {spec.path} has no {first!r} ({known})")


def _check_module(spec: TargetSpec, rootdir: Path) -> None:
    """The top-level package must be findable where a replica looks (this package's folder, the
    rootdir, PYTHONPATH, site-packages); nothing is imported."""
    top = spec.module.split(".")[0]
    if top in sys.modules:
        return
    package_root = str(Path(__file__).resolve().parent.parent)
    search = [package_root, str(rootdir), *os.environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path]
    if importlib.machinery.PathFinder.find_spec(top, [p for p in search if p]) is None \
            and importlib.machinery.BuiltinImporter.find_spec(top) is None:
        raise TargetError(f"target {spec.display!r}: no module named {top!r} (searched the current folder, "
                          "PYTHONPATH and the installed packages)")
