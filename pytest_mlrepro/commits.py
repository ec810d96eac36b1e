"""Compare one training across two commits: the work tree (as it is) against a git ref.

``mlrepro compare --base REF TARGET`` checks REF out into a temporary git worktree, runs the target
there and in the work tree with the same seed, settings and environment (one replica a side, with the
same replica index, entropy and hash seed, so the only difference is the code), compares the traces
step by step and the final weights, and, when they differ, replays both sides at the first divergent
step to name the phase and module: "HEAD first differs from origin/main at step 16: the batch entering
`0` (Linear) differs". The answer is an :class:`~pytest_mlrepro.result.AuditResult` (``deterministic``:
the two commits agree) with a ``commits.compare`` finding saying which commits were compared and
whether the work tree had uncommitted changes (it is compared as it is).

Each side imports its own copy of the user's modules: its replica runs in a fresh interpreter with
that side's folder of the current directory and its tree's root first on ``sys.path`` (set from the
replica's own spec, once the harness, always this one, is loaded), and file targets load from that
side's tree. Both sides may run at once (the audit's ``parallel``).
Replica outputs go under a temporary folder; the worktree is removed (``git worktree remove --force``,
``git worktree prune``) on success, errors, SIGINT/SIGTERM/SIGHUP and KeyboardInterrupt alike.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .auditing import _Audit, resolve_device
from .checks import COMMITS  # the check of the finding every comparison carries
from .config import PROCESS_ISOLATIONS, AuditConfig
from .errors import ConfigError, MlreproError
from .replica import ReplicaSpec
from .result import AuditResult, Divergence, Finding
from .runner import ReplicaOutput, run
from .seeding import replica_entropy
from .targets import TargetSpec, resolve

REPLICA = 0  # both sides run as replica 0 of the same seed: same entropy, same hash seed
_GIT_WORKTREE_ENV_CLEAR = ("GIT_INDEX_FILE", "GIT_WORK_TREE")  # set inside hooks; would misdirect worktree add


class CommitError(MlreproError):
    """The comparison cannot start: not a git repository, an unknown ref, a target missing at the ref."""


@dataclass(frozen=True)
class _Side:
    name: str  # "base" | "work": the folder names of its runs
    label: str  # how messages name it ("HEAD~1", "HEAD", "the work tree (...)")
    target: TargetSpec
    paths: tuple  # folders put first on the replica's sys.path (and PYTHONPATH)
    cwd: Optional[str]  # the replica's working folder (None: its private folder)


@dataclass(frozen=True)
class _Repo:
    root: Path
    head: Optional[str]  # None: no commit yet
    branch: Optional[str]
    dirty: tuple  # paths with uncommitted changes (untracked included)


# -- git -------------------------------------------------------------------------------------------
def _git(root: Union[str, Path], *args: str, env: Optional[dict] = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, encoding="utf-8", errors="replace",
                              env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommitError("git was not found on PATH; compare --base needs it") from None
    if check and proc.returncode != 0:
        raise CommitError(f"git {' '.join(args)} failed in {root}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _repository(cwd: Path) -> _Repo:
    proc = _git(cwd, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no repository found"
        raise CommitError(f"{cwd} is not inside a git work tree ({reason}); compare --base compares commits of one")
    root = Path(proc.stdout.strip()).resolve()
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).stdout.strip() or None
    branch = _git(root, "symbolic-ref", "--short", "--quiet", "HEAD", check=False).stdout.strip() or None
    return _Repo(root, head, branch, _dirty_paths(root))


def _dirty_paths(root: Path) -> tuple:
    out = _git(root, "status", "--porcelain", "-z", "--untracked-files=normal").stdout
    items, paths = out.split("\0"), []
    i = 0
    while i < len(items):
        item = items[i]
        if len(item) > 3:
            paths.append(item[3:])
            if item[0] in "RC":  # a rename or copy: the next field is the old path
                i += 1
        i += 1
    return tuple(paths)


def _resolve_ref(repo: _Repo, ref: str) -> str:
    if not ref or ref.startswith("-") or any(c in ref for c in "\0\n"):
        raise CommitError(f"unknown ref {ref!r}: not a commit of the repository {repo.root}")
    proc = _git(repo.root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CommitError(f"unknown ref {ref!r}: not a commit of the repository {repo.root}")
    return proc.stdout.strip()


def _exists_at(repo: _Repo, commit: str, rel: str) -> bool:
    return _git(repo.root, "cat-file", "-e", f"{commit}:{rel}", check=False).returncode == 0


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP while cleaning up: a second Ctrl-C cannot leave a worktree half
    removed; a held signal is delivered (and raises) once the block is done."""
    from .process_tree import HANDLED_SIGNALS

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _worktree(repo: _Repo, commit: str) -> Iterator[tuple[Path, Path]]:
    """A temporary folder holding a detached worktree of ``commit``: (folder, tree). Both are gone
    afterwards, whatever happened inside (the worktree unregistered too)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_WORKTREE_ENV_CLEAR}
    folder = Path(tempfile.mkdtemp(prefix="mlrepro-compare-")).resolve()
    tree = folder / "base"
    try:
        _git(repo.root, "worktree", "add", "--detach", str(tree), commit, env=env)
        yield folder, tree
    finally:
        with _signals_deferred():
            _git(repo.root, "worktree", "remove", "--force", str(tree), env=env, check=False)
            shutil.rmtree(folder, ignore_errors=True)
            _git(repo.root, "worktree", "prune", env=env, check=False)


# -- the target on each side -----------------------------------------------------------------------
def _module_candidates(module: str) -> tuple:
    parts = module.split(".")
    return ("/".join(parts) + ".py", "/".join(parts) + "/__init__.py")


def _side_paths(tree: Path, rel_cwd: Path) -> tuple:
    here = tree / rel_cwd
    return tuple(str(p) for p in ((here, tree) if rel_cwd != Path(".") else (tree,)) if p.is_dir())


def _locate(spec: TargetSpec, text: str, repo: _Repo, rel_cwd: Path) -> Optional[str]:
    """The target's file relative to the repository root (None for a module target, checked below)."""
    if spec.path is None:
        dirs = [rel_cwd, Path(".")] if rel_cwd != Path(".") else [Path(".")]
        found = [d / c for d in dirs for c in _module_candidates(spec.module) if (repo.root / d / c).is_file()]
        if not found:
            raise CommitError(f"target {text!r}: module {spec.module!r} is not a file of the repository {repo.root} "
                              f"(looked for {', '.join(_module_candidates(spec.module))} in "
                              f"{', '.join(str(repo.root / d) for d in dirs)}); an installed module would be the same "
                              "on both sides")
        return None
    try:
        return Path(spec.path).resolve().relative_to(repo.root).as_posix()
    except ValueError:
        raise CommitError(f"target {text!r}: {spec.path} is outside the repository {repo.root}") from None


def _check_at_ref(spec: TargetSpec, text: str, rel: Optional[str], repo: _Repo, ref: str, commit: str,
                  rel_cwd: Path) -> None:
    if rel is not None:
        if not _exists_at(repo, commit, rel):
            raise CommitError(f"target {text!r}: {rel} does not exist at {ref} ({commit[:10]}) in {repo.root}")
        return
    dirs = [rel_cwd, Path(".")] if rel_cwd != Path(".") else [Path(".")]
    if not any(_exists_at(repo, commit, (d / c).as_posix()) for d in dirs for c in _module_candidates(spec.module)):
        raise CommitError(f"target {text!r}: module {spec.module!r} does not exist at {ref} ({commit[:10]}) in {repo.root}")


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class _SideSpec(ReplicaSpec):
    """One side's replica. When the replica process loads it (``python -m pytest_mlrepro.replica``
    unpickles its spec before anything else runs), ``import_paths`` (the side's folder of the current
    directory, then its tree's root) go first on ``sys.path``, ahead of site-packages and of this
    package's own root (the harness is already loaded), and first on ``PYTHONPATH`` for the processes
    the training starts. Carried by the spec, not by this process's environment, so sides that run at
    once (``parallel``) cannot see each other's paths."""

    import_paths: tuple = ()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        from . import replica

        if replica.AS_PROCESS:  # only in a replica process, not in the parent that pickled it
            paths = [p for p in self.import_paths if p not in sys.path]
            sys.path[0:0] = paths
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [*self.import_paths, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])


class _SideAudit(_Audit):
    """``_Audit`` whose replica 0 is the base side and replica 1 the work side, both run as replica
    ``REPLICA`` of the seed: comparison, dense re-trace and replays are the audit's own."""

    def __init__(self, sides: tuple, result: AuditResult, root: Path, config: AuditConfig):
        super().__init__(sides[0].target, result, root, config)
        self.sides = sides

    def _run(self, index: int, label: str, *, replay_step: Optional[int] = None, hash_seed: Optional[str] = None,
             dense_until: Optional[int] = None) -> ReplicaOutput:
        side = self.sides[index]
        folder = self.root / f"{label}-{side.name}"
        with self.devices.lease() as group:  # on GPUs, the two sides on devices of their own, as replicas are
            spec = _SideSpec(target=side.target, index=REPLICA, config=self.config, workdir=str(folder / "work"),
                             replay_step=replay_step, cwd=side.cwd,
                             trace_every=1 if dense_until is not None else self.trace_every, stop_after=dense_until,
                             entropy=replica_entropy(self.result.seed, REPLICA), import_paths=side.paths,
                             cuda_devices=group)
            return run(spec, folder / "out", isolation=self.isolation, timeout=self.config.timeout,
                       hash_seed=hash_seed if hash_seed is not None else self._hash_seed(REPLICA))


def compare_commits(
    target: Union[str, os.PathLike],
    base: str,
    config: Optional[AuditConfig] = None,
    *,
    rootdir: Optional[Union[str, os.PathLike]] = None,
    localize_divergence: bool = True,
    **overrides: Any,
) -> AuditResult:
    """Run ``target`` at the commit ``base`` and in the work tree (as it is, uncommitted changes
    included) and compare them. ``target`` ('file.py:fn', 'script.py' or 'module:fn') is relative to
    ``rootdir`` (default: the current folder; it must be inside a git work tree); at ``base`` the same
    path relative to the repository root is used. ``config`` / ``overrides`` are the audit options
    (``runs``, ``checkpoint`` and ``isolation="inprocess"`` do not apply). Raises ``CommitError`` /
    ``ConfigError`` / ``TargetError`` before anything runs; a side that fails gives a result whose
    ``error`` says which side and why."""
    from .process_tree import interrupt_on_signals

    if config is not None and not isinstance(config, AuditConfig):
        raise ConfigError(f"config must be an AuditConfig, got {type(config).__name__}; pass single options as keywords")
    if "runs" in overrides:
        raise ConfigError("runs does not apply to a comparison of commits: it runs one replica on each side")
    config = (config or AuditConfig()).merged(overrides)
    if config.isolation not in PROCESS_ISOLATIONS:
        raise ConfigError("compare --base runs each side in its own process, so that each imports its own copy of "
                          f"the code; isolation={config.isolation!r} cannot do that")
    if config.checkpoint is not None:
        raise ConfigError("checkpoint checks do not apply to a comparison of commits; audit each commit instead")
    text = os.fspath(target)
    here = Path(rootdir if rootdir is not None else os.getcwd()).resolve()
    repo = _repository(here)
    commit = _resolve_ref(repo, base)
    rel_cwd = here.relative_to(repo.root)
    work_target = resolve(text, rootdir=here)
    rel = _locate(work_target, text, repo, rel_cwd)
    _check_at_ref(work_target, text, rel, repo, base, commit, rel_cwd)
    config = dataclasses.replace(config, device=resolve_device(config.device),
                                 seeding=config.seeding or work_target.default_seeding)
    result = AuditResult(target=text, seed=config.seed, runs=2, device=config.device, isolation=config.isolation,
                         seeding=config.seeding, comparison=config.comparison, deterministic=False)
    work_label = ("HEAD" if repo.head else "the work tree") if not repo.dirty else (
        "the work tree (HEAD with uncommitted changes)" if repo.head else "the work tree")
    info = {"target": text, "target_path": rel, "base_ref": base, "base_commit": commit, "head_commit": repo.head,
            "head_branch": repo.branch, "work_tree_dirty": bool(repo.dirty), "dirty_paths": list(repo.dirty[:50]),
            "dirty_count": len(repo.dirty), "repository": str(repo.root), "replicas": [base, "work tree"],
            "labels": [base, work_label]}
    started = time.perf_counter()
    try:
        with interrupt_on_signals(), _worktree(repo, commit) as (folder, tree):
            if config.cwd == "rootdir" and not (tree / rel_cwd).is_dir():
                raise CommitError(f"--cwd rootdir: the folder {rel_cwd.as_posix()} does not exist at {base} ({commit[:10]})")
            base_target = work_target if rel is None else dataclasses.replace(work_target, path=str(tree / rel))
            sides = (
                _Side("base", base, dataclasses.replace(base_target, display=f"{text} at {base}"),
                      _side_paths(tree, rel_cwd), str(tree / rel_cwd) if config.cwd == "rootdir" else None),
                _Side("work", work_label, dataclasses.replace(work_target, display=f"{text} in the work tree"),
                      _side_paths(repo.root, rel_cwd), str(here) if config.cwd == "rootdir" else None),
            )
            _SideAudit(sides, result, folder / "runs", config).execute(
                localize_divergence=localize_divergence, diagnose=False)
    finally:
        result.wall_time_s = time.perf_counter() - started
    _conclude(result, info)
    return result


# -- the answer ------------------------------------------------------------------------------------
def _module(name: Optional[str], type_name: Optional[str]) -> str:
    shown = f"`{name if name else '<root>'}`"
    return f"{shown} ({type_name})" if type_name else shown


def _phrase(div: Divergence) -> str:
    """What differs at the first divergent step, without the step."""
    where = _module(div.module, div.module_type) if div.module is not None else None
    if div.phase == "input" and where:
        return f"the batch entering {where} differs"
    if div.phase == "forward" and div.inputs_matched and where:
        return f"the forward of {where} differs (its inputs matched)"
    if div.phase == "backward" and div.tensor:
        return f"the gradient of `{div.tensor}`" + (f" (in {where})" if where else "") + " differs; every forward output matched"
    if div.phase == "optimizer" and div.tensor:
        return f"the optimizer update of `{div.tensor}` differs; its forward outputs and gradients matched"
    message = div.message
    prefix = f"step {div.step}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _conclude(result: AuditResult, info: dict) -> None:
    base, work = info["base_ref"], info["labels"][1]
    div = result.first_divergence
    if result.error is not None:
        verdict, head = "error", f"could not compare {work} with {base}: {result.error.message}"
    elif result.deterministic:
        verdict = "pass"
        how = "bitwise-equal" if result.comparison.get("mode") == "bitwise" else f"equal within {result.comparison}"
        steps = result.replicas[0].steps if result.replicas else 0
        head = f"{work} matches {base}: {len(result.tensors)} tensors {how}, every one of {steps} optimizer steps identical"
    else:
        verdict = "fail"
        detail = div.message if div is not None else ""
        if div is None:
            head = f"{work} differs from {base}"
        elif div.step is None:
            head = f"{work} differs from {base} in the final weights: {_phrase(div)}"
        else:
            head = f"{work} first differs from {base} at step {div.step}: {_phrase(div)}"
        if div is not None:
            div.message = head
        info.update(detail=detail, first_step=div.step if div else None, first_tensor=div.tensor if div else None,
                    phase=div.phase if div else None, module=div.module if div else None)
    short = (info["base_commit"] or "")[:10]
    where = f"HEAD {info['head_commit'][:10]}" if info["head_commit"] else "no commit yet"
    if info["head_branch"]:
        where += f", branch {info['head_branch']}"
    if info["work_tree_dirty"]:
        shown = ", ".join(info["dirty_paths"][:5]) + (", …" if info["dirty_count"] > 5 else "")
        state = (f"the work tree ({where}) has uncommitted changes in {info['dirty_count']} "
                 f"path{'s' if info['dirty_count'] != 1 else ''} ({shown}) and was compared as it is")
    else:
        state = f"the work tree ({where}) is clean"
    compared = f"compared {info['target']} at {base} ({short}) with the work tree; {state}"
    info["compared"], info["headline"] = compared, head
    result.findings.insert(0, Finding(COMMITS, verdict, f"{head}. {compared[0].upper()}{compared[1:]}", details=info))


def comparison_finding(result: AuditResult) -> Optional[Finding]:
    return next((f for f in result.findings if f.check == COMMITS), None)


def report_lines(result: AuditResult) -> list[str]:
    """The comparison for a terminal: the verdict line, which commits, what differs."""
    finding = comparison_finding(result)
    info = finding.details if finding else {}
    lines = [info.get("headline") or result.summary_line()]
    if info.get("compared"):
        lines.append(info["compared"])
    if result.error is not None and result.error.traceback:
        lines.append("--- traceback of the failing side ---")
        lines.append(result.error.traceback.rstrip())
    lines.extend(result.tensor_diff_lines("tensors differ in the final weights:"))
    for f in result.findings:
        if f.check != COMMITS and f.verdict != "pass":
            lines.append(f"[{f.check}] {f.verdict}: {f.message}")
    return lines
