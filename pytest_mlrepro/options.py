"""Option resolution: marker > command line > environment (MLREPRO_*) > ini (mlrepro_*) > default.

Kept free of torch so the plugin can load it eagerly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional


def _opt_float(v: Any) -> Optional[float]:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "0")):
        return None
    f = float(v)
    if f <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {v!r}")
    return f


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {v!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {v!r}")
        return s

    return parse


def _seed(v: Any) -> int:
    i = int(v)
    if i < 0:
        raise ValueError(f"seed must be >= 0, got {v!r}")
    return i


def _tags(v: Any) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return tuple(t.strip() for t in str(v).split(",") if t.strip())


# name -> (parser, default, help)
OPTIONS: dict[str, tuple[Callable[[Any], Any], Any, str]] = {
    "seed": (_seed, 0, "seed every replica is given"),
    "device": (_choice("auto", "cpu", "cuda"), "auto", "device replicas train on: auto, cpu or cuda"),
    "isolation": (_choice("process", "inprocess"), "process", "run each replica in a fresh interpreter (process) or in the test process (inprocess)"),
    "timeout": (_opt_float, None, "seconds a replica may run before its process tree is killed (none: no limit)"),
    "runs": (int, 2, "how many replicas each audit runs"),
    "trace_every": (int, 1, "fingerprint the weights after every k-th optimizer step (1: every step; a dense re-trace still finds the exact step)"),
    "deterministic": (_bool, True, "apply torch's deterministic settings (use_deterministic_algorithms warn_only, cuDNN flags, cuBLAS workspace)"),
    "report": (str, None, "write the JSON report to this path"),
    "wandb": (_choice("offline", "online", "disabled"), "offline", "publish audits to Weights & Biases: offline, online or disabled"),
    "wandb_dir": (str, None, "folder W&B runs are written under (default: <rootdir>/mlrepro-out)"),
    "wandb_project": (str, "pytest-mlrepro", "W&B project"),
    "wandb_entity": (str, None, "W&B entity"),
    "wandb_group": (str, None, "W&B group (default: one per pytest session)"),
    "wandb_tags": (_tags, (), "comma-separated W&B tags"),
}

MARKER_KEYS = ("seed", "device", "isolation", "timeout", "runs", "deterministic", "trace_every")
AUDIT_KEYWORDS = ("args", "kwargs", "seeding", "mode", "atol", "rtol", "max_ulp", "checkpoint", "cwd")


@dataclass(frozen=True)
class MlreproOptions:
    enabled: bool = False
    seed: int = 0
    device: str = "auto"
    isolation: str = "process"
    timeout: Optional[float] = None
    runs: int = 2
    trace_every: int = 1
    deterministic: bool = True
    report: Optional[str] = None
    wandb: str = "offline"
    wandb_dir: Optional[str] = None
    wandb_project: str = "pytest-mlrepro"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: tuple = field(default_factory=tuple)
    sources: dict = field(default_factory=dict, compare=False)

    def with_marker(self, marker_kwargs: dict) -> "MlreproOptions":
        values = {k: OPTIONS[k][0](v) for k, v in marker_kwargs.items() if k in MARKER_KEYS}
        return replace(self, **values)


def resolve(getoption: Callable[[str], Any], getini: Callable[[str], Any], environ: Optional[dict] = None) -> MlreproOptions:
    """Build options from pytest's command line and ini, and the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {"enabled": bool(getoption("mlrepro"))}
    sources: dict[str, str] = {}
    for name, (parse, default, _help) in OPTIONS.items():
        raw, source = getoption(f"mlrepro_{name}"), "command line"
        if raw is None:
            raw, source = environ.get(f"MLREPRO_{name.upper()}"), f"MLREPRO_{name.upper()}"
        if raw is None or raw == "":
            ini = getini(f"mlrepro_{name}")
            raw, source = (ini, f"ini mlrepro_{name}") if ini not in (None, "", []) else (None, "default")
        try:
            values[name] = default if raw is None else parse(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"mlrepro option {name} from {source}: {exc}") from None
        sources[name] = source
    valid = {f.name for f in fields(MlreproOptions)}
    return MlreproOptions(**{k: v for k, v in values.items() if k in valid}, sources=sources)
