"""Replicas forked from a warm interpreter: ``import torch`` paid once per environment, not per replica.

``isolation="forkserver"``. A server (``python -m pytest_mlrepro.forkserver``) starts with a replica's
environment (PYTHONHASHSEED included, so every child has the hash secret a fresh interpreter would),
imports torch, numpy, ``torch._dynamo`` (what the first optimizer step imports) and the replica
harness, runs no torch op (so no thread pool exists to be lost in a fork), and then forks one child per
request. The child starts a session of its own, takes the replica's token, parent, working folder and
output files, and runs :func:`pytest_mlrepro.replica.main` as ``python -m pytest_mlrepro.replica``
would, up to a normal interpreter exit (``atexit`` hooks run). No user code ever runs in the server,
so every child starts from the same pristine state; python's ``random`` reseeds itself in a forked
child, and the harness seeds or scrambles every other global generator as it does in a fresh process.

Servers are kept per environment for the life of this process and shared by its audits (the two
replicas of an audit have two hash seeds: two servers, each reused by every later audit, replay and
dense re-trace with that seed). What differs from ``isolation="process"``: torch and numpy are
imported before the program runs, so a program that sets a thread count (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ...) to a new value before importing them would not get it; the child refuses
such a program with an error naming the variable (use ``isolation="process"``).

Protocol, one JSON object per line: requests on the server's stdin (``fork``, ``reap``), replies on
its stdout (``ready``; ``forked`` with the child's pid; ``exited`` with its status, reported while the
child is still unreaped, so its pid, group and session cannot be reused before the parent has swept
its tree; the parent then sends ``reap``).
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional

START_TIMEOUT_S = 300.0  # importing torch on a loaded 2-core machine can take a minute
# thread counts read by torch's and numpy's OpenMP / BLAS runtimes when they load: set later, no effect
THREAD_VARIABLES = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
                              "VECLIB_MAXIMUM_THREADS", "GOTO_NUM_THREADS"})
RUNTIMES = ("torch", "numpy")  # importing either loads those runtimes in a fresh interpreter


class ForkServerError(RuntimeError):
    """The server could not be started or stopped answering."""


# ---------------------------------------------------------------------------------------------
# the parent's side

@dataclass
class _Pending:
    forked: threading.Event
    exited: threading.Event
    pid: Optional[int] = None
    status: Optional[int] = None  # returncode: >= 0 exit status, < 0 the signal that killed it
    error: Optional[str] = None


class ForkServer:
    """One running server and the children it forked for this process."""

    def __init__(self, env: dict):
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._by_id: dict[int, _Pending] = {}
        self._by_pid: dict[int, _Pending] = {}
        self._ready = threading.Event()
        self.dead: Optional[str] = None
        self._log = tempfile.TemporaryFile()  # the server's stderr: why it failed to start, if it does
        self.proc = _start_server(
            [sys.executable, "-m", "pytest_mlrepro.forkserver", str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=os.path.abspath(os.sep), start_new_session=True)
        threading.Thread(target=self._read, name="mlrepro-forkserver", daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.dead:
            self.close()
            self._log.seek(0)
            tail = self._log.read()[-2000:].decode(errors="replace")
            raise ForkServerError(f"the fork server did not start ({self.dead or 'no answer'}): {tail}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            kind = msg.get("kind")
            with self._lock:
                if kind == "ready":
                    self._ready.set()
                elif kind == "forked":
                    pending = self._by_id.pop(msg["id"], None)
                    if pending is not None:
                        pending.pid, pending.error = msg.get("pid"), msg.get("error")
                        if pending.pid is not None:
                            self._by_pid[pending.pid] = pending
                        pending.forked.set()
                elif kind == "exited":
                    pending = self._by_pid.get(msg["pid"])
                    if pending is not None:
                        pending.status = msg["status"]
                        pending.exited.set()
        with self._lock:  # the server is gone: nothing it forked will be reported any more
            self.dead = self.dead or f"the server exited (status {self.proc.poll()})"
            for pending in [*self._by_id.values(), *self._by_pid.values()]:
                pending.error = pending.error or self.dead
                pending.forked.set()
                pending.exited.set()
            self._by_id.clear()
        self._ready.set()

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ForkServerError(f"the fork server stopped answering: {exc}") from None

    def fork(self, *, argv: list, env: dict, cwd: str, stdout: str, stderr: str) -> "ForkedChild":
        pending = _Pending(threading.Event(), threading.Event())
        with self._lock:
            if self.dead:
                raise ForkServerError(self.dead)
            request = next(self._ids)
            self._by_id[request] = pending
            self._send({"op": "fork", "id": request, "argv": argv, "env": env, "cwd": cwd,
                        "stdout": stdout, "stderr": stderr})
        pending.forked.wait()
        if pending.pid is None:
            raise ForkServerError(f"the fork server could not start the replica: {pending.error}")
        return ForkedChild(self, pending)

    def reap(self, pid: int) -> None:
        with self._lock:
            self._by_pid.pop(pid, None)
            if not self.dead:
                try:
                    self._send({"op": "reap", "pid": pid})
                except ForkServerError:
                    pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ForkedChild:
    """A replica forked by a server: ``pid``, :meth:`wait_exited` (it stays unreaped), :meth:`reap`."""

    def __init__(self, server: ForkServer, pending: _Pending):
        self.server, self._pending, self.pid = server, pending, pending.pid

    def wait_exited(self, timeout: Optional[float]) -> None:
        """Block until the child has exited; ``subprocess.TimeoutExpired`` past ``timeout``."""
        if not self._pending.exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"replica {self.pid}", timeout)

    def reap(self, timeout: Optional[float] = None) -> int:
        """Let the server reap the child; its return code (``-N``: killed by signal N). A child the
        server could not report on (the server died) counts as killed by SIGKILL."""
        self.wait_exited(timeout)
        self.server.reap(self.pid)
        if self._pending.status is None:
            return -signal.SIGKILL
        return self._pending.status


def _start_server(cmd: list, **popen) -> subprocess.Popen:
    """Start a server from one thread that lives as long as this process: the server's
    ``PR_SET_PDEATHSIG`` fires when the *thread* that started it ends, and replicas run on short-lived
    threads when they run in parallel."""
    global _starter
    with _servers_lock:
        if _starter is None or not _starter.is_alive():
            _starter = threading.Thread(target=_starter_loop, name="mlrepro-forkserver-starter", daemon=True)
            _starter.start()
    done: dict = {}
    finished = threading.Event()
    _start_requests.put((cmd, popen, done, finished))
    finished.wait()
    if "error" in done:
        raise ForkServerError(f"the fork server could not be started: {done['error']}")
    return done["proc"]


def _starter_loop() -> None:
    while True:
        cmd, popen, done, finished = _start_requests.get()
        try:
            done["proc"] = subprocess.Popen(cmd, **popen)
        except OSError as exc:
            done["error"] = exc
        finished.set()


_start_requests: "queue.Queue" = queue.Queue()
_starter: Optional[threading.Thread] = None
_servers: dict[tuple, ForkServer] = {}
_starting: dict[tuple, threading.Lock] = {}  # one lock per environment: two environments start at once
_servers_lock = threading.Lock()


# set per replica or per test, read by nobody at import time: not part of a server's identity (each
# child gets the replica's whole environment anyway)
VOLATILE_VARIABLES = ("MLREPRO_REPLICA_TOKEN", "MLREPRO_REPLICA_PARENT", "PYTEST_CURRENT_TEST")


def server_for(env: dict) -> ForkServer:
    """The server for this environment (volatile variables aside), started once per process."""
    env = {k: v for k, v in env.items() if k not in VOLATILE_VARIABLES}
    key = (os.getpid(), sys.executable, tuple(sorted(env.items())))  # a forked parent starts its own
    with _servers_lock:
        starting = _starting.setdefault(key, threading.Lock())
    with starting:
        server = _servers.get(key)
        if server is None or server.dead:
            server = ForkServer(env)
            with _servers_lock:
                _servers[key] = server
        return server


@atexit.register
def close_all() -> None:
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


# ---------------------------------------------------------------------------------------------
# the server

def _exit_status(info) -> int:
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


def _reply(msg: dict) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def _serve() -> Optional[dict]:
    """The server loop. Returns (in a forked child only) the request that child is to run. The
    server ends when the parent closes its stdin, or dies (``PR_SET_PDEATHSIG``, set before the
    imports, so a server still importing torch goes at once too; its children are cleared of it)."""
    from .process_tree import _PR_SET_PDEATHSIG, _prctl

    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(sys.argv[1]):  # the parent died before we could ask to go with it
        return None
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    from . import replica  # noqa: F401  (the harness and what it imports: trace, probes, seeding...)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    unreported: set[int] = set()
    buffer = b""
    _reply({"kind": "ready", "pid": os.getpid()})
    while True:
        for pid in list(unreported):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            except ChildProcessError:
                unreported.discard(pid)
                continue
            if info is not None:
                unreported.discard(pid)
                _reply({"kind": "exited", "pid": pid, "status": _exit_status(info)})
        ready, _, _ = select.select([0, wake_r], [], [], 1.0)
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        if 0 not in ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the parent closed our stdin (or died): children carry on, watched by their own guard
            return None
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            msg = json.loads(line)
            if msg["op"] == "reap":
                try:
                    os.waitpid(msg["pid"], 0)
                except ChildProcessError:
                    pass
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                _reply({"kind": "forked", "id": msg["id"], "pid": None, "error": str(exc)})
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                return msg
            unreported.add(pid)
            _reply({"kind": "forked", "id": msg["id"], "pid": pid})


def _become_replica(msg: dict) -> None:
    """In the forked child: what a fresh ``python -m pytest_mlrepro.replica`` would have been given."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, msg["stdout"]), (2, msg["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()  # exactly the replica's environment (the server's may differ in volatile variables)
    os.environ.update(msg["env"])
    os.chdir(msg["cwd"])
    sys.path[0] = os.getcwd()  # as `python -m` puts the working folder first
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "replica.py"), *msg["argv"]]
    # the module by its name, not this ``__main__`` copy: the replica calls program_starts() on that one
    from pytest_mlrepro import forkserver

    forkserver._refuse_late_thread_variables()


_watching = False  # the program runs and has not imported torch or numpy yet (forked children only)
_in_child = False


def _refuse_late_thread_variables() -> None:
    """A thread count the program sets before it imports torch or numpy would size their thread pools
    in a fresh interpreter, but not here (they are loaded): refuse it. Set afterwards (a library that
    imported torch, Lightning's DDP) it has no effect in a fresh interpreter either: allowed. The
    harness's own settings, before the program starts (:func:`program_starts`), are never checked."""
    global _in_child
    _in_child = True
    environ_type = type(os.environ)
    original = environ_type.__setitem__

    def setitem(self, key, value):
        if _watching and self is os.environ and key in THREAD_VARIABLES and os.environ.get(key) != value:
            raise RuntimeError(
                f"the program sets {key}={value!r} before importing torch or numpy, which in a fresh interpreter "
                f"sizes their thread pools; with isolation='forkserver' they are already loaded, so it would have no "
                "effect and the audit would not run the training you run: use isolation='process', or set "
                f"{key} before starting the audit")
        original(self, key, value)

    environ_type.__setitem__ = setitem


def program_starts() -> None:
    """Called by the replica right before the program runs: watch its thread variables until its first
    ``import torch`` / ``import numpy`` (an ``__import__`` hook, removed at that import). No-op
    outside a fork server's child."""
    global _watching
    if not _in_child:
        return
    import builtins

    original = builtins.__import__

    def tracking_import(name, globals=None, locals=None, fromlist=(), level=0):
        global _watching
        if level == 0 and name.partition(".")[0] in RUNTIMES:
            _watching = False
            builtins.__import__ = original
        return original(name, globals, locals, fromlist, level)

    _watching = True
    builtins.__import__ = tracking_import


def main() -> None:
    msg = _serve()
    if msg is None:
        return
    _become_replica(msg)
    from .replica import main as replica_main

    raise SystemExit(replica_main(list(msg["argv"])))


if __name__ == "__main__":
    main()
