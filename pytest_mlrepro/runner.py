"""Run replicas: each in a fresh interpreter (default) or in this process, with a timeout that
kills the whole process tree (DataLoader workers included) so nothing is left behind."""
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
from typing import Optional

from .errors import ReplicaError
from .replica import ReplicaSpec, run_replica
from .seeding import child_environment

ISOLATION_MODES = ("process", "inprocess")


@dataclass
class ReplicaOutput:
    index: int
    out_dir: Path

    def meta(self) -> dict:
        return json.loads((self.out_dir / "meta.json").read_text())

    def trace(self) -> dict:
        import torch

        return torch.load(self.out_dir / "trace.pt", weights_only=True)

    def weights(self) -> dict:
        import torch

        return torch.load(self.out_dir / "weights.pt", weights_only=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the replica's process group, then any descendant that left it."""
    descendants = []
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        try:
            child.kill()
        except Exception:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def run(spec: ReplicaSpec, out_dir: Path, *, isolation: str, timeout: Optional[float], hash_seed: Optional[str]) -> ReplicaOutput:
    """Run one replica; raise ReplicaError (with the replica's traceback) if it fails."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    return ReplicaOutput(spec.index, out_dir)


def _run_subprocess(spec: ReplicaSpec, out_dir: Path, timeout: Optional[float], hash_seed: Optional[str]) -> bool:
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.pkl"
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)
    env = child_environment(os.environ, deterministic=spec.deterministic, hash_seed=hash_seed)
    # the replica must import this very package, wherever pytest loaded it from
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    cmd = [sys.executable, "-m", "pytest_mlrepro.replica", str(spec_path), str(out_dir)]
    with open(out_dir / "stdout.txt", "wb") as out, open(out_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=spec.cwd or spec.workdir, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise ReplicaError(
                f"replica {spec.index} of {spec.target.display} hung past the timeout of {timeout:g}s and was killed "
                "(with its process tree)", replica=spec.index, traceback=_tail(out_dir / "stderr.txt"), kind="timeout",
            ) from None
        except BaseException:
            _kill_tree(proc)
            raise
        if _has_leftovers(proc):  # e.g. DataLoader workers orphaned by a crash
            _kill_tree(proc)
    if code != 0 and not (out_dir / "error.json").exists():
        (out_dir / "error.json").write_text(json.dumps({
            "type": "ExitStatus", "message": f"replica process exited with status {code}",
            "traceback": _tail(out_dir / "stderr.txt"),
        }))
    return code == 0


def _has_leftovers(proc: subprocess.Popen) -> bool:
    """True when something the replica started is still alive in its process group."""
    try:
        os.killpg(proc.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


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
