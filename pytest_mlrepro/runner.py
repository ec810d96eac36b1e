"""Run replicas: each in a fresh interpreter (default) or in this process, with a timeout that
kills the whole process tree (DataLoader workers included) so nothing is left behind.

A replica process runs in its own session with a unique token in its environment
(``process_tree``): its tree is killed on timeout, when it ends (whatever it left running), when
this process gets SIGTERM / SIGHUP / SIGINT (then :class:`process_tree.Interrupted` is raised), and
by the replica itself when this process dies."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from . import process_tree
from .devices import replica_environment
from .errors import ReplicaError
from .replica import ReplicaSpec, run_replica
from .seeding import child_environment

if TYPE_CHECKING:
    from .tracing.record import TraceRecord



@dataclass
class ReplicaOutput:
    index: int
    out_dir: Path

    def meta(self) -> dict:
        return json.loads((self.out_dir / "meta.json").read_text())

    def trace(self) -> TraceRecord:
        """The replica's trace as a typed record (``trace.pt`` holds plain data: ``weights_only=True``)."""
        import torch

        from .tracing.record import TraceRecord

        return TraceRecord.from_plain(torch.load(self.out_dir / "trace.pt", weights_only=True))

    @property
    def weights_path(self) -> Path:
        """The replica's final weights (``torch.save`` format); ``compare.compare_state_files`` streams them."""
        return self.out_dir / "weights.pt"

    def weights(self, *, mmap: bool = False) -> dict:
        """The final weights, read whole; ``mmap=True`` maps the file instead (pages are read on use)."""
        import torch

        return torch.load(self.weights_path, weights_only=True, mmap=mmap)


class _Exec:
    """A replica in a new interpreter (``isolation="process"``), as the runner waits for and reaps it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.pid = proc, proc.pid

    def wait_exited(self, timeout: Optional[float]) -> None:
        _wait_exited(self.proc, timeout)

    def reap(self, timeout: Optional[float] = None) -> int:
        return self.proc.wait(timeout=timeout)


def _fork(spec_path: Path, out_dir: Path, server_env: dict, env: dict, *, cwd: str):
    """A replica (environment ``env``) forked from the warm server for ``server_env`` (``isolation="forkserver"``)."""
    from . import forkserver

    try:
        return forkserver.server_for(server_env).fork(argv=[str(spec_path), str(out_dir)], env=env, cwd=cwd,
                                               stdout=str(out_dir / "stdout.txt"), stderr=str(out_dir / "stderr.txt"))
    except forkserver.ForkServerError as exc:
        raise ReplicaError(f"isolation='forkserver': {exc}", kind="harness") from None


def _kill_tree(proc, token: Optional[str], release) -> None:
    """Kill the replica with its whole tree (descendants, token holders, its group and session), then reap it."""
    process_tree.kill_tree(proc.pid, token)
    release()
    try:
        proc.reap(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def run(spec: ReplicaSpec, out_dir: Path, *, isolation: str, timeout: Optional[float], hash_seed: Optional[str]) -> ReplicaOutput:
    """Run one replica; raise ReplicaError (with the replica's traceback) if it fails.

    SIGTERM / SIGHUP / SIGINT meanwhile kill the replica's tree and raise ``process_tree.Interrupted``
    (a KeyboardInterrupt)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with process_tree.interrupt_on_signals():
        if isolation == "inprocess":
            ok = _run_inprocess(spec, out_dir, timeout)
        else:
            ok = _run_subprocess(spec, out_dir, timeout, hash_seed)
    if not ok:
        err_path = out_dir / "error.json"
        if err_path.exists():
            err = json.loads(err_path.read_text())
            raise ReplicaError(
                f"replica {spec.index} of {spec.target.display} failed: {err['type']}: {err['message']}",
                replica=spec.index, traceback=err.get("traceback", ""), kind=err["type"],
            )
        raise ReplicaError(
            f"replica {spec.index} of {spec.target.display} failed without a report",
            replica=spec.index, traceback=_tail(out_dir / "stderr.txt"),
        )
    if spec.config.nproc > 1:
        from .distributed import DistributedOutput

        return DistributedOutput.of(spec.index, out_dir, spec.config.nproc)
    return ReplicaOutput(spec.index, out_dir)


_SIGNAL_HINTS = {
    "SIGSEGV": "a crash in native code (a C/C++/CUDA extension, or a corrupted tensor); the replica's stderr "
               "below has the Python stack at the crash",
    "SIGBUS": "a bad memory access in native code (often a full /dev/shm with DataLoader workers)",
    "SIGABRT": "native code aborted (a failed C/C++ assertion or a fatal library error; see stderr)",
    "SIGFPE": "an arithmetic fault in native code",
    "SIGILL": "an illegal instruction (a library built for another CPU)",
}


def _wait_exited(proc: subprocess.Popen, timeout: Optional[float]) -> None:
    """Block until the replica has exited, without reaping it: until it is reaped its pid (and with it
    its process group and session id) cannot be reused, so the sweep after it kills nothing unrelated.
    Raise ``subprocess.TimeoutExpired`` past ``timeout``."""
    if not hasattr(os, "waitid"):
        proc.wait(timeout=timeout)
        return
    flags = os.WEXITED | os.WNOWAIT
    try:
        if timeout is None:
            os.waitid(os.P_PID, proc.pid, flags)
            return
        deadline, delay = time.monotonic() + timeout, 0.001
        while os.waitid(os.P_PID, proc.pid, flags | os.WNOHANG) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            delay = min(delay * 2, remaining, 0.05)
            time.sleep(delay)
    except ChildProcessError:  # someone else reaped it (a SIGCHLD handler): proc.wait() copes
        return


def _signal_error(spec: ReplicaSpec, out_dir: Path, signum: int) -> ReplicaError:
    name = process_tree.signal_name(signum)
    if name == "SIGKILL" and process_tree.interrupted_by is not None:
        return ReplicaError(f"replica {spec.index} of {spec.target.display} was stopped with its process tree: the audit "
                            f"was interrupted by {process_tree.signal_name(process_tree.interrupted_by)}",
                            replica=spec.index, traceback=_tail(out_dir / "stderr.txt"), kind="interrupted")
    if name == "SIGKILL":
        hint = ("no timeout fired, so the kernel's OOM killer is the likely sender (the machine ran out of memory: "
                "look for 'Out of memory' in `dmesg` or `journalctl -k`), unless someone killed it by hand")
    else:
        hint = _SIGNAL_HINTS.get(name, "something sent it that signal, or it raised it itself")
    if (out_dir / "meta.json").exists():
        hint += "; it had already written its results (it died while shutting down)"
    return ReplicaError(f"replica {spec.index} of {spec.target.display} was killed by signal {name} ({signum}): {hint}",
                        replica=spec.index, traceback=_tail(out_dir / "stderr.txt"), kind="signal")


def _ranks_at_timeout(spec: ReplicaSpec, out_dir: Path) -> str:
    if spec.config.nproc <= 1:
        return ""
    from .distributed import hang_detail

    return hang_detail(out_dir, spec.config.nproc)


def _run_subprocess(spec: ReplicaSpec, out_dir: Path, timeout: Optional[float], hash_seed: Optional[str]) -> bool:
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.pkl"
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)
    env = child_environment(os.environ, deterministic=spec.deterministic, hash_seed=hash_seed)
    # the replica must import this very package, wherever pytest loaded it from
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    token = process_tree.new_token()
    env[process_tree.TOKEN_ENV] = token  # inherited by everything the replica starts: how we find its tree
    env[process_tree.PARENT_ENV] = str(os.getpid())  # the replica dies (with its tree) when we do
    # its device group: the replica's alone; a fork server never starts CUDA, so one server (started
    # without the group) serves every device, and each child's CUDA reads the group when it starts
    replica_env = replica_environment(env, spec.cuda_devices)
    cmd = [sys.executable, "-m", "pytest_mlrepro.replica", str(spec_path), str(out_dir)]
    with open(out_dir / "stdout.txt", "wb") as out, open(out_dir / "stderr.txt", "wb") as err:
        if spec.config.isolation == "forkserver":
            proc = _fork(spec_path, out_dir, env, replica_env, cwd=spec.cwd or spec.workdir)
        else:
            proc = _Exec(subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=replica_env,
                                          cwd=spec.cwd or spec.workdir, start_new_session=True))
        with process_tree.tracked(proc.pid, token) as release:
            try:
                proc.wait_exited(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc, token, release)
                raise ReplicaError(
                    f"replica {spec.index} of {spec.target.display} hung past the timeout of {timeout:g}s and was killed "
                    "(with its process tree)" + _ranks_at_timeout(spec, out_dir), replica=spec.index, traceback=_tail(out_dir / "stderr.txt"), kind="timeout",
                ) from None
            except BaseException:
                _kill_tree(proc, token, release)
                raise
            # whatever it started and left running (DataLoader workers orphaned by a crash, a daemon
            # that double-forked away) goes too, swept before the replica is reaped
            process_tree.kill_tree(proc.pid, token)
            release()
            code = proc.reap()
    if code < 0 and not (out_dir / "error.json").exists():
        raise _signal_error(spec, out_dir, -code)
    if code != 0 and not (out_dir / "error.json").exists():
        (out_dir / "error.json").write_text(json.dumps({
            "type": "ExitStatus", "message": f"replica process exited with status {code}",
            "traceback": _tail(out_dir / "stderr.txt"),
        }))
    return code == 0


class _Alarm:
    """SIGALRM-based timeout for in-process replicas (main thread only; elsewhere not enforced)."""

    def __init__(self, timeout: Optional[float]):
        self.timeout = timeout
        self.active = False

    def __enter__(self):
        import threading

        if self.timeout and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            def on_alarm(signum, frame):
                raise TimeoutError(f"in-process replica exceeded the timeout of {self.timeout:g}s")

            self.previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            self.active = True
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _run_inprocess(spec: ReplicaSpec, out_dir: Path, timeout: Optional[float]) -> bool:
    started = time.perf_counter()
    with _Alarm(timeout):
        ok = run_replica(spec, out_dir, in_process=True)
    if not ok:
        err = json.loads((out_dir / "error.json").read_text())
        if err["type"] == "TimeoutError":
            raise ReplicaError(f"replica {spec.index} of {spec.target.display} hung past the timeout of {timeout:g}s "
                               f"(in-process, stopped after {time.perf_counter() - started:.1f}s)",
                               replica=spec.index, traceback=err.get("traceback", ""), kind="timeout")
    return ok
