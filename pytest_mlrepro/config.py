"""One table of options, one frozen configuration, one validation.

Every setting of an audit is defined once, in :data:`OPTIONS`. The table generates the pytest
options and ini keys (``plugin.py``), the ``mlrepro`` CLI arguments (``cli.py``), the marker's
signature, and the fields of :class:`AuditConfig` (what ``audit()`` takes and what travels to every
replica) and :class:`SessionConfig` (where results are published). A bad value is rejected once, at
the start, with the same message on every surface: a pytest ``UsageError`` (or a clean per-test
failure for a marker), exit 2 from the CLI, a :class:`~pytest_mlrepro.errors.ConfigError` (a
``ValueError``) from the API.

Kept free of torch so the plugin can load it eagerly.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import ConfigError

# -- the choices, shared by every module that needs them --------------------------------------------
DEVICES = ("auto", "cpu", "cuda")
ISOLATION_MODES = ("process", "forkserver", "inprocess")
PROCESS_ISOLATIONS = ("process", "forkserver")  # each replica a process of its own
SEEDING_MODES = ("harness", "program")
COMPARE_MODES = ("bitwise", "tolerance", "ulp")
CWD_MODES = ("replica", "rootdir")
WANDB_MODES = ("offline", "online", "disabled")
MAX_SEED = 2**32 - 1  # numpy's global generator takes seeds below 2**32
MAX_NPROC = 64  # ranks per replica (one machine: torchrun's --nproc-per-node)
DDP_LAUNCHERS = ("fork", "torchrun")  # how a DDP replica starts its ranks (distributed_rank, distributed_torchrun)


# -- checks of typed values (the single validation) --------------------------------------------------
def _whole(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be a whole number {bound}, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _one_of(name: str, value: Any, choices: tuple, optional: bool = False) -> Optional[str]:
    if optional and value is None:
        return None
    if value not in choices:
        extra = " or None" if optional else ""
        raise ConfigError(f"{name} must be one of {', '.join(choices)}{extra}; got {value!r}")
    return value


def _check_seed(v):
    return _whole("seed", v, 0, MAX_SEED)


def _check_runs(v):
    return _whole("runs", v, 2)


def _check_trace_every(v):
    if v == "auto":
        return v
    return _whole("trace_every", v, 1)


def _check_max_ulp(v):
    return _whole("max_ulp", v, 0)


def _check_parallel(v):
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"parallel must be auto or a whole number >= 1, got {v!r}")
    return v


def _text_parallel(s: str):
    t = s.strip().lower()
    return t if t == "auto" else _text_int(s)


def _check_nproc(v):
    return _whole("nproc", v, 1, MAX_NPROC)


def _check_timeout(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"timeout must be a number of seconds > 0, or none for no limit; got {v!r}")
    return float(v)


def _check_bool(name: str) -> Callable[[Any], bool]:
    def check(v):
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
        return v

    return check


def _check_args(v):
    if isinstance(v, (str, bytes)):
        raise ConfigError(f"args must be a list of command-line words, not one string: got {v!r} "
                          f"(write args={v.split()!r})" if isinstance(v, str) else f"args must be a list, got {v!r}")
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"args must be a list or tuple, got {type(v).__name__}")
    return tuple(v)


def _check_kwargs(v):
    if v is None:
        return {}
    if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
        raise ConfigError(f"kwargs must be a dict with string keys, got {v!r}")
    return dict(v)


def _check_checkpoint(v):
    if v is None:
        return None
    from .checkpoint.audit import CheckpointSpec

    try:
        return CheckpointSpec.coerce(v)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


TOLERANCE_KEYS = ("atol", "rtol", "allow_failing")


INVARIANT_AXES = ("threads", "hashseed", "listing-order", "clock")


def _check_invariant(v):
    """Axes of the invariance matrix, each with an optional absolute tolerance: ``"threads=1e-6,clock"``
    or ``[("threads", 1e-6), "clock"]``; normalised to a tuple of (axis, tolerance or None)."""
    if isinstance(v, str):
        v = _split_tags(v)
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"invariant must be a comma-separated list of axes ({', '.join(INVARIANT_AXES)}), got {v!r}")
    axes: dict = {}
    for given in v:
        item = given
        if isinstance(item, str):
            name, _, tol = item.partition("=")
            item = (name.strip(), tol.strip() or None)
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in INVARIANT_AXES):
            raise ConfigError(f"invariant: unknown axis {given!r}; known: {', '.join(INVARIANT_AXES)} (each may carry "
                              "a tolerance, threads=1e-6)")
        name, tol = item
        if tol is not None:
            try:
                tol = _non_negative(f"the tolerance of invariant axis {name}", float(tol) if isinstance(tol, str) else tol)
            except ValueError:
                raise ConfigError(f"the tolerance of invariant axis {name} must be a number >= 0, got {tol!r}") from None
        axes[name] = tol
    return tuple(axes.items())


def _check_tolerances(v):
    """``{"val_loss": {"rtol": 1e-3, "atol": 0, "allow_failing": 2}}``: per metric (or "loss"), used when a
    baseline comes from another environment."""
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(f"tolerances must be a dict of metric -> {{atol, rtol, allow_failing}}, got {v!r}")
    out = {}
    for metric, tol in v.items():
        if not isinstance(metric, str) or not isinstance(tol, Mapping):
            raise ConfigError(f"tolerances[{metric!r}] must be a dict with atol, rtol or allow_failing, got {tol!r}")
        unknown = sorted(set(tol) - set(TOLERANCE_KEYS))
        if unknown:
            raise ConfigError(f"tolerances[{metric!r}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOLERANCE_KEYS)}")
        out[metric] = {"atol": _non_negative(f"tolerances[{metric!r}].atol", tol.get("atol", 0.0)),
                       "rtol": _non_negative(f"tolerances[{metric!r}].rtol", tol.get("rtol", 0.0)),
                       "allow_failing": _whole(f"tolerances[{metric!r}].allow_failing", tol.get("allow_failing", 0), 0)}
    return out


def _text_json(s: str):
    import json

    try:
        return json.loads(s)
    except ValueError as exc:
        raise ConfigError(f"expected JSON, got {s!r} ({exc})") from None


def _check_text(name: str, optional: bool = True, empty: bool = False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or (not empty and not v.strip()):
            raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
        return v

    return check


def _check_targets(v):
    """``--mlrepro-target``: repeated, comma-separated, or both; a tuple of target texts."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
        raise ConfigError(f"target must be target texts ('prog.py', 'file.py:fn', 'module:fn'), got {v!r}")
    targets = tuple(t.strip() for text in v for t in text.split(",") if t.strip())
    if v and not targets:
        raise ConfigError(f"target must name at least one target, got {v!r}")
    return targets


def _check_tags(v):
    if isinstance(v, str):
        v = _split_tags(v)
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in v):
        raise ConfigError(f"wandb_tags must be a list of non-empty strings, got {v!r}")
    return tuple(t.strip() for t in v)


# -- parsers of text (command line, environment, ini, CLI) -------------------------------------------
def _text_int(s: str) -> int:
    try:
        return int(s.strip())
    except ValueError:
        raise ConfigError(f"expected a whole number, got {s!r}") from None


def _text_float(s: str) -> float:
    try:
        return float(s.strip())
    except ValueError:
        raise ConfigError(f"expected a number, got {s!r}") from None


def _text_optional_float(s: str) -> Optional[float]:
    return None if s.strip().lower() in ("none", "") else _text_float(s)


def _text_bool(s: str) -> bool:
    t = s.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true or false, got {s!r}")


def _text_choice(s: str) -> str:
    return s.strip().lower()


def _text_optional_choice(s: str) -> Optional[str]:
    t = s.strip().lower()
    return None if t in ("none", "auto", "") else t


def _text_str(s: str) -> str:
    return s


def _split_tags(s: str) -> tuple:
    return tuple(t.strip() for t in s.split(",") if t.strip())


@dataclass(frozen=True)
class Option:
    """One setting: its name, default, help, how to read it from text and how to check a value.

    ``audit``: part of :class:`AuditConfig` (marker and ``audit()`` keyword) rather than of the
    session's publishing settings. ``text``: can be given as text (pytest command line, ``MLREPRO_*``,
    ini, ``mlrepro`` CLI); options that hold Python objects (args, kwargs, checkpoint) cannot.
    """

    name: str
    default: Any
    help: str
    check: Callable[[Any], Any]
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple] = None
    audit: bool = True
    switch: bool = False  # given on a command line without a value (``--mlrepro-update``)
    cli: bool = True  # also an argument of the ``mlrepro audit`` command (not the pytest-only baseline options)
    repeat: bool = False  # may be given more than once on pytest's command line (the values add up)

    @property
    def text(self) -> bool:
        return self.parse is not None

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    def from_text(self, raw: str) -> Any:
        return self.check(self.parse(raw))


OPTIONS: tuple[Option, ...] = (
    Option("seed", 0, "seed every replica is given", _check_seed, _text_int),
    Option("device", "auto", "device replicas train on", lambda v: _one_of("device", v, DEVICES), _text_choice, DEVICES),
    Option("isolation", "process", "run each replica in a fresh interpreter (process), forked from a warm one that "
           "imported torch once (forkserver: faster; a program that sets OMP_NUM_THREADS & co. before importing torch "
           "is refused), "
           "or in this process (inprocess)",
           lambda v: _one_of("isolation", v, ISOLATION_MODES), _text_choice, ISOLATION_MODES),
    Option("timeout", None, "seconds a replica may run before its process tree is killed (none: no limit)",
           _check_timeout, _text_optional_float),
    Option("runs", 2, "how many replicas each audit runs (>= 2)", _check_runs, _text_int),
    Option("parallel", "auto", "replicas (and replays, diagnosis reruns) run at once in process isolation: auto (on "
           "the CPU the cores, shared among xdist workers, divided by the training's threads; on GPUs one replica per "
           "device identical to device 0, nproc devices for a DDP replica, each its own CUDA_VISIBLE_DEVICES; one at "
           "a time on one GPU) or N (on one GPU: N share it); the result says which and why",
           _check_parallel, _text_parallel),
    Option("nproc", 1, "ranks per replica: N > 1 runs the target as a torch.distributed program, N processes with "
           "torchrun's environment (gloo on CPU, NCCL on GPU), traced per rank", _check_nproc, _text_int),
    Option("ddp_launcher", "fork", "how a DDP replica (nproc > 1) starts its ranks: forked from one interpreter that "
           "imported torch once, with torchrun's environment (fork), or by torchrun's own agent, a fresh interpreter "
           "per rank (torchrun: slower to start)", lambda v: _one_of("ddp_launcher", v, DDP_LAUNCHERS), _text_choice,
           DDP_LAUNCHERS),
    Option("trace_every", "auto", "fingerprint the weights after every k-th optimizer step, or auto: every step "
           "while the recording has cost less than 1 s in all, then the power-of-two interval keeping it within 2 % "
           "of the step time (a dense re-trace still finds the exact step)", _check_trace_every, _text_parallel),
    Option("deterministic", True, "apply torch's deterministic settings (use_deterministic_algorithms warn_only, "
           "cuDNN flags, cuBLAS workspace)", _check_bool("deterministic"), _text_bool),
    Option("seeding", None, "who seeds: harness (every global generator seeded alike) or program (the program "
           "seeds itself; replicas get different entropy); none: harness for functions, program for scripts",
           lambda v: _one_of("seeding", v, SEEDING_MODES, optional=True), _text_optional_choice, SEEDING_MODES),
    Option("mode", "bitwise", "how final tensors are compared", lambda v: _one_of("mode", v, COMPARE_MODES),
           _text_choice, COMPARE_MODES),
    Option("atol", 0.0, "absolute tolerance (mode tolerance)", lambda v: _non_negative("atol", v), _text_float),
    Option("rtol", 0.0, "relative tolerance (mode tolerance)", lambda v: _non_negative("rtol", v), _text_float),
    Option("max_ulp", 0, "largest distance in units in the last place (mode ulp)", _check_max_ulp, _text_int),
    Option("cwd", "replica", "working folder of each replica: its private folder, or the rootdir (programs that "
           "read data through relative paths)", lambda v: _one_of("cwd", v, CWD_MODES), _text_choice, CWD_MODES),
    Option("args", (), "argv of a script target, or positional arguments of a function target", _check_args),
    Option("kwargs", None, "keyword arguments of a function target", _check_kwargs),
    Option("checkpoint", None, "best-checkpoint checks: {path, evaluate, model_factory[, tolerance, monitor, mode]}",
           _check_checkpoint),
    Option("tolerances", None, "per-metric tolerances for baselines from another environment, JSON: "
           '{"val_loss": {"rtol": 1e-3, "atol": 0, "allow_failing": 0}} ("loss" is the traced per-step loss)',
           _check_tolerances, _text_json, cli=False),
    Option("invariant", (), "invariance matrix (opt-in): one extra replica per axis (threads, hashseed, listing-order, "
           "clock), each compared with replica 0 and reported as a finding, unchanged or changed at step k; an axis "
           "may carry an absolute tolerance (threads=1e-6)", _check_invariant, _split_tags),
    Option("report", None, "write the JSON report to this path (plots beside it)", _check_text("report"), _text_str,
           audit=False),
    Option("wandb", "offline", "publish audits to Weights & Biases", lambda v: _one_of("wandb", v, WANDB_MODES),
           _text_choice, WANDB_MODES, audit=False),
    Option("wandb_dir", None, "folder W&B runs are written under (pytest: <rootdir>/mlrepro-out; CLI: --out)",
           _check_text("wandb_dir"), _text_str, audit=False),
    Option("wandb_project", "pytest-mlrepro", "W&B project", _check_text("wandb_project", optional=False), _text_str,
           audit=False),
    Option("wandb_entity", None, "W&B entity", _check_text("wandb_entity"), _text_str, audit=False),
    Option("wandb_group", None, "W&B group (default: one per session)", _check_text("wandb_group"), _text_str,
           audit=False),
    Option("wandb_tags", (), "comma-separated W&B tags", _check_tags, _split_tags, audit=False),
    Option("baseline", False, "compare each audit with its stored baseline (__mlrepro__/ next to the test file); "
           "a missing one is written and its test fails", _check_bool("baseline"), _text_bool, audit=False,
           switch=True, cli=False),
    Option("update", False, "write missing and failing baselines (those tests pass, with a note); implies "
           "--mlrepro-baseline", _check_bool("update"), _text_bool, audit=False, switch=True, cli=False),
    Option("update_all", False, "rewrite every baseline this session audits; implies --mlrepro-baseline",
           _check_bool("update_all"), _text_bool, audit=False, switch=True, cli=False),
    Option("base", None, "compare every audit's target across commits instead: the target at this git ref (in a "
           "temporary worktree) against the work tree; a test fails where they part", _check_text("base"), _text_str,
           audit=False, cli=False),
    Option("prune", False, "remove the baselines no test uses any more (they are listed either way)",
           _check_bool("prune"), _text_bool, audit=False, switch=True, cli=False),
    Option("target", (), "audit these targets without a test file: one test item per check of each (mlrepro::"
           "<target>::reproducible, ...); repeat the option or separate targets by commas", _check_targets,
           _text_str, audit=False, cli=False, repeat=True),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
AUDIT_OPTIONS = tuple(o for o in OPTIONS if o.audit)
SESSION_OPTIONS = tuple(o for o in OPTIONS if not o.audit)
TEXT_OPTIONS = tuple(o for o in OPTIONS if o.text)
CLI_OPTIONS = tuple(o for o in TEXT_OPTIONS if o.cli)


def _unknown(names, allowed, what: str) -> ConfigError:
    parts = []
    for n in sorted(names):
        close = difflib.get_close_matches(n, list(allowed), n=1)
        parts.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"unknown {what} {', '.join(parts)}; known: {', '.join(allowed)}")


@dataclass(frozen=True)
class AuditConfig:
    """Everything that decides how one audit runs; frozen, validated, and pickled into each replica."""

    seed: int = 0
    device: str = "auto"
    isolation: str = "process"
    timeout: Optional[float] = None
    runs: int = 2
    parallel: Any = "auto"
    nproc: int = 1
    ddp_launcher: str = "fork"
    trace_every: Any = "auto"  # k >= 1, or "auto"
    deterministic: bool = True
    seeding: Optional[str] = None
    mode: str = "bitwise"
    atol: float = 0.0
    rtol: float = 0.0
    max_ulp: int = 0
    cwd: str = "replica"
    args: tuple = ()
    kwargs: dict = field(default_factory=dict, hash=False)
    checkpoint: Any = None
    tolerances: Optional[dict] = field(default=None, hash=False)
    invariant: tuple = ()  # ((axis, tolerance or None), ...)

    def validate(self) -> "AuditConfig":
        """Check every value and their combinations; return the normalised config (raise ConfigError)."""
        values = {o.name: o.check(getattr(self, o.name)) for o in AUDIT_OPTIONS}
        if values["checkpoint"] is not None and values["cwd"] == "rootdir":
            raise ConfigError("checkpoint checks need cwd='replica': with cwd='rootdir' every replica writes the "
                              "same checkpoint file, so their best checkpoints cannot be compared")
        if values["nproc"] > 1 and values["isolation"] not in PROCESS_ISOLATIONS:
            raise ConfigError(f"nproc={values['nproc']} needs isolation='process' (or 'forkserver'): every rank is a "
                              "process of its own")
        if values["ddp_launcher"] == "torchrun" and values["nproc"] == 1:
            raise ConfigError("ddp_launcher='torchrun' needs nproc > 1: it starts the ranks of a DDP replica, and with "
                              "nproc=1 there are none")
        return dataclasses.replace(self, **values)

    def merged(self, overrides: Mapping[str, Any], *, what: str = "audit option") -> "AuditConfig":
        """This config with ``overrides`` applied (unknown names rejected), validated."""
        unknown = set(overrides) - set(BY_NAME_AUDIT)
        if unknown:
            raise _unknown(unknown, tuple(BY_NAME_AUDIT), what)
        return dataclasses.replace(self, **dict(overrides)).validate()

    @property
    def comparison(self) -> dict:
        return {"mode": self.mode, "atol": self.atol, "rtol": self.rtol, "max_ulp": self.max_ulp}


BY_NAME_AUDIT = {o.name: o for o in AUDIT_OPTIONS}
assert [f.name for f in dataclasses.fields(AuditConfig)] == list(BY_NAME_AUDIT), "AuditConfig fields follow OPTIONS"
assert all(BY_NAME_AUDIT[f.name].default == (f.default if f.default is not dataclasses.MISSING else f.default_factory())
           or (f.name == "kwargs" and BY_NAME_AUDIT[f.name].default is None)
           for f in dataclasses.fields(AuditConfig)), "AuditConfig defaults follow OPTIONS"


@dataclass(frozen=True)
class SessionConfig:
    """Where a session publishes: the JSON report and Weights & Biases."""

    report: Optional[str] = None
    wandb: str = "offline"
    wandb_dir: Optional[str] = None
    wandb_project: str = "pytest-mlrepro"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: tuple = ()
    baseline: bool = False
    update: bool = False
    update_all: bool = False
    base: Optional[str] = None
    prune: bool = False
    target: tuple = ()

    @property
    def baseline_mode(self) -> Optional[str]:
        """None (no gate), "check", "update" (missing and failing) or "update_all"."""
        if self.update_all:
            return "update_all"
        if self.update:
            return "update"
        return "check" if self.baseline or self.prune else None

    def validate(self) -> "SessionConfig":
        checked = dataclasses.replace(self, **{o.name: o.check(getattr(self, o.name)) for o in SESSION_OPTIONS})
        if checked.base is not None and checked.baseline_mode is not None:
            raise ConfigError("base (compare with a commit) and the baseline options (baseline, update, update_all, "
                              "prune) do not combine: gate against stored baselines, or against a commit")
        return checked


assert [f.name for f in dataclasses.fields(SessionConfig)] == [o.name for o in SESSION_OPTIONS]


@dataclass(frozen=True)
class Resolved:
    """What the pytest surfaces resolved: the audit and session configs, and where each value came from."""

    enabled: bool
    audit: AuditConfig
    session: SessionConfig
    sources: dict = field(default_factory=dict, compare=False)


def resolve_text(lookup: Callable[[Option], tuple[Optional[Any], str]]) -> tuple[dict, dict]:
    """Read every text option through ``lookup(option) -> (raw text or None, source)``.

    Returns (values, sources) for the options that were given; raises ConfigError naming the source.
    """
    values, sources = {}, {}
    for option in TEXT_OPTIONS:
        raw, source = lookup(option)
        if raw is None:
            continue
        try:
            values[option.name] = option.from_text(raw) if isinstance(raw, str) else option.check(raw)
        except ConfigError as exc:
            raise ConfigError(f"mlrepro option {option.name} from {source}: {exc}") from None
        sources[option.name] = source
    return values, sources


def split(values: Mapping[str, Any]) -> tuple[AuditConfig, SessionConfig]:
    """Build both validated configs from option values (the rest keep their defaults)."""
    audit = AuditConfig(**{k: v for k, v in values.items() if k in BY_NAME_AUDIT}).validate()
    session = SessionConfig(**{k: v for k, v in values.items() if k not in BY_NAME_AUDIT}).validate()
    return audit, session


def marker_signature() -> str:
    """The marker's documented signature, generated from the table."""
    params = ", ".join(f"{o.name}={o.default!r}" for o in AUDIT_OPTIONS)
    return f"mlrepro(target=None, *, {params})"
