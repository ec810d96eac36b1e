"""Drivers that feed the REAL early-stopping / checkpoint callbacks of four frameworks.

One module per framework (``lightning``, ``keras``, ``transformers``, ``fastai``); each imports its
framework only inside functions, so importing this package costs nothing and a missing framework
shows up as an ``ImportError`` naming the extra to install, at the moment a driver is built.

Every driver follows ``pytest_mlrepro.checkpoint.conformance.CallbackDriver``: ``spec`` is what the
callback's configuration claims (read back from the configured callback, mode as the framework
resolved it), ``run(values)`` trains a tiny model in the framework's own loop for ``len(values)``
epochs with the monitored metric scripted to ``values[epoch]`` and returns the ``Outcome`` the
callback produced. ``last_run`` keeps what else was seen (files written, the epoch whose weights a
checkpoint holds).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings

__all__ = ["FRAMEWORKS", "NO_STOP_PATIENCE", "require", "quiet", "empty_outcome", "as_float"]

# The patience a checkpoint-only driver claims: it never stops, and no scripted run is this long.
NO_STOP_PATIENCE = 32

# module name -> (adapter module, extra to install)
FRAMEWORKS = {
    "pytorch_lightning": ("lightning", "lightning"),
    "keras": ("keras", "keras"),
    "transformers": ("transformers", "transformers"),
    "fastai": ("fastai", "fastai-deps"),
}

_HINTS = {
    "fastai-deps": "pip install --no-deps fastai fastcore fastprogress fasttransform fastdownload && "
    "pip install 'pytest-mlrepro[fastai-deps]'",
}


def require(module: str, extra: str):
    """Import ``module`` or raise an ``ImportError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _HINTS.get(extra, f"pip install 'pytest-mlrepro[{extra}]'")
        raise ImportError(f"{module} is needed for this adapter but could not be imported ({exc}); "
                          f"install it with: {hint}") from exc


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence a framework's progress prints, warnings and INFO logs while a scripted run trains."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def empty_outcome():
    """The outcome of zero epochs (no framework runs a zero-epoch fit meaningfully)."""
    from pytest_mlrepro.checkpoint.oracle import Outcome

    return Outcome(0, None, None, None, ())


def as_float(x):
    """A Python float from a float, numpy scalar or 0-d tensor; None stays None."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    return float(x)
