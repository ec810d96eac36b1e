"""A replica's whole process tree: find it, kill it, and never leave it behind.

Parent side (pytest, the ``mlrepro`` CLI):

* every replica gets a unique token in its environment (``MLREPRO_REPLICA_TOKEN``), inherited by
  everything it starts (DataLoader workers, subprocesses, double-forked daemons that ``setsid``);
* :func:`kill_tree` freezes (SIGSTOP) then kills (SIGKILL) every process of this user that is a
  descendant of the replica, carries its token, or is in its process group or session; it repeats
  the search until nothing new turns up, so nothing can fork its way out while we look;
* :func:`tracked` keeps a registry of live replicas, and :func:`interrupt_on_signals` (main
  thread only) turns SIGTERM / SIGHUP / SIGINT into: kill every live tree, then raise
  :class:`Interrupted` (a ``KeyboardInterrupt``), so pytest ends the session as on Ctrl-C and
  ``finally`` blocks (temporary folders) run. The previous handlers come back afterwards.

Replica side (:func:`guard_replica`, called by ``python -m pytest_mlrepro.replica``):

* it becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so orphaned descendants
  re-parent to it and stay findable as descendants;
* a watchdog thread (plus ``PR_SET_PDEATHSIG`` where available) notices when the parent dies
  (kill -9 of pytest) and kills the replica's tree, the replica included;
* at the replica's normal end (last ``atexit`` hook) whatever it started and left running is killed.

Linux gives all of it without privileges; elsewhere psutil (or just the process group) is used and
the Linux-only parts are skipped.
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional

TOKEN_ENV = "MLREPRO_REPLICA_TOKEN"
PARENT_ENV = "MLREPRO_REPLICA_PARENT"
WATCHDOG_INTERVAL_S = 0.2
_MAX_ROUNDS = 50
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


def new_token() -> str:
    return uuid.uuid4().hex


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The parent got SIGTERM / SIGHUP / SIGINT while replicas ran: they were killed with their trees.

    A ``KeyboardInterrupt`` on purpose (not an ``MlreproError``): it must pass every ``except
    Exception`` on its way out, and pytest must treat it as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"mlrepro: {signal_name(signum)} received; running replicas were killed with their process trees")
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# finding processes

class _Proc(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    sid: int
    zombie: bool


def _table() -> dict[int, _Proc]:
    """This user's processes (pid, ppid, process group, session, zombie?)."""
    if os.path.isdir("/proc/self"):
        return _proc_table()
    return _psutil_table()


def _proc_table() -> dict[int, _Proc]:
    uid = os.getuid()
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        try:
            table[int(name)] = _Proc(int(name), int(fields[1]), int(fields[2]), int(fields[3]), fields[0] in (b"Z", b"X"))
        except (IndexError, ValueError):
            continue
    return table


def _psutil_table() -> dict[int, _Proc]:
    try:
        import psutil
    except ImportError:
        return {}
    uid = os.getuid() if hasattr(os, "getuid") else None
    table = {}
    for p in psutil.process_iter(["pid", "ppid", "status", "uids"]):
        try:
            info = p.info
            if uid is not None and info.get("uids") is not None and info["uids"].real != uid:
                continue
            pid = info["pid"]
            pgid = os.getpgid(pid) if hasattr(os, "getpgid") else -1
            sid = os.getsid(pid) if hasattr(os, "getsid") else -1
            table[pid] = _Proc(pid, info["ppid"], pgid, sid, info["status"] == psutil.STATUS_ZOMBIE)
        except Exception:
            continue
    return table


def _has_token(pid: int, token: str) -> bool:
    needle = f"{TOKEN_ENV}={token}".encode()
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return needle in f.read().split(b"\0")
        except OSError:
            return False
    try:
        import psutil

        return psutil.Process(pid).environ().get(TOKEN_ENV) == token
    except Exception:
        return False


def tree_members(root: int, token: Optional[str] = None, *, group: Optional[int] = None,
                 table: Optional[dict[int, _Proc]] = None) -> set[int]:
    """Live (non-zombie) processes of this user that belong to ``root``'s tree: ``root`` itself,
    those carrying ``token`` in their environment, (``group``) those in that process group or
    session, and the descendants of all of these. The calling process is never included."""
    table = _table() if table is None else table
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found = {root} if root in table else set()
    for p in table.values():
        if p.pid in found:
            continue
        if group is not None and group > 0 and (p.pgid == group or p.sid == group):
            found.add(p.pid)
        elif token and _has_token(p.pid, token):
            found.add(p.pid)
    stack = [root, *found]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return {pid for pid in found if not table[pid].zombie}


def kill_tree(root: int, token: Optional[str] = None, *, include_root: bool = True, group: bool = True) -> set[int]:
    """Kill ``root``'s whole tree (see :func:`tree_members`; ``group``: root's process group and
    session too, for a replica started with ``start_new_session``). Everything found is first
    stopped, so nothing forks away while the search repeats until nothing new turns up; what a last
    search still confirms as a member is killed, anything else stopped is let go again (a pid that
    was reused meanwhile). Call it while ``root`` is alive or an unreaped zombie: then its pid, group
    and session cannot be reused by an unrelated process. Returns the pids killed; never raises for
    processes that are gone or not ours."""
    me = os.getpid()
    stop = getattr(signal, "SIGSTOP", None)
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    stopped: set[int] = set()
    confirmed: Optional[set[int]] = None
    try:
        for _ in range(_MAX_ROUNDS):
            members = tree_members(root, token, group=root if group else None) - {me}
            if not include_root:
                members.discard(root)
            new = members - stopped
            if not new:
                confirmed = members
                break
            for pid in new:
                _signal(pid, stop if stop is not None else kill)
            stopped |= new
    finally:
        doomed = stopped if confirmed is None else confirmed
        for pid in doomed:
            _signal(pid, kill)
        if stop is not None:
            for pid in stopped - doomed:
                _signal(pid, signal.SIGCONT)
        if group and include_root and root != me and hasattr(os, "killpg"):
            try:
                if os.getpgid(0) != root:
                    os.killpg(root, kill)
            except OSError:
                pass
    return doomed


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:  # gone, or not ours
        pass


# ---------------------------------------------------------------------------------------------
# parent side: the registry of live replicas and the signal handlers

_live: dict[int, tuple[int, Optional[str]]] = {}  # id -> (pid, token); plain dict ops: safe in a signal handler
_next_id = itertools.count(1)


@contextmanager
def tracked(pid: int, token: Optional[str]) -> Iterator[Callable[[], None]]:
    """While inside, a SIGTERM / SIGHUP / SIGINT handled by :func:`interrupt_on_signals` kills this
    tree. Yields ``release()``: call it before reaping the process (its pid may be reused after)."""
    key = next(_next_id)
    _live[key] = (pid, token)
    try:
        yield lambda: _live.pop(key, None)
    finally:
        _live.pop(key, None)


def kill_live_trees() -> None:
    for pid, token in list(_live.values()):
        try:
            kill_tree(pid, token)
        except Exception:
            pass


_depth = 0
_previous: dict[int, object] = {}
interrupted_by: Optional[int] = None  # the signal that made us kill the live trees (replicas then die of SIGKILL)


def _on_signal(signum, frame):
    # a second signal interrupts the clean-up the first one started, as a second Ctrl-C does in pytest
    global interrupted_by
    interrupted_by = signum
    kill_live_trees()
    raise Interrupted(signum)


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turn SIGTERM, SIGHUP and SIGINT into "kill every live replica tree, then raise
    :class:`Interrupted`" while inside. Only signals at their default disposition are taken over
    (SIG_DFL; for SIGINT Python's ``default_int_handler``): an ignored SIGHUP (``nohup``) stays
    ignored, and a handler someone installed keeps working (if it raises, the runner kills the
    replica on the way out anyway). Re-entrant: the outermost use installs, and restores the previous
    handlers at its end. Outside the main thread it does nothing (Python runs handlers there only);
    replicas then still die with their parent through their own watchdog."""
    global _depth, interrupted_by
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        interrupted_by = None
        for signum in HANDLED_SIGNALS:
            try:
                current = signal.getsignal(signum)
                default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                if current is default:
                    _previous[signum] = signal.signal(signum, _on_signal)
            except (ValueError, OSError):
                continue
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for signum, previous in list(_previous.items()):
                try:
                    if signal.getsignal(signum) is _on_signal:  # still ours (not replaced meanwhile): restore
                        signal.signal(signum, previous)
                except (ValueError, OSError, TypeError):
                    pass
            _previous.clear()


# ---------------------------------------------------------------------------------------------
# replica side

def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0
    except Exception:
        return False


def guard_replica() -> None:
    """Called first thing in a replica process: die with the parent, take the tree along, and clean
    up what the target left running at the normal end. Safe to call when not started by the runner
    (no parent recorded: only the end-of-run clean-up is set up)."""
    me = os.getpid()
    token = os.environ.get(TOKEN_ENV)
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        parent = None
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def clean_up_at_exit():
        if os.getpid() == me:  # not in a forked child that runs atexit hooks it inherited
            try:
                kill_tree(me, token, include_root=False, group=False)
            except Exception:
                pass

    atexit.register(clean_up_at_exit)  # registered first, so it runs last (after wandb & co. finished)
    if parent is None:
        return
    wake = threading.Event()
    wake_signal = getattr(signal, "SIGRTMIN", None)
    if wake_signal is not None:
        wake_signal += 5
        try:
            signal.signal(wake_signal, lambda s, f: wake.set())
            _prctl(_PR_SET_PDEATHSIG, wake_signal)
        except (ValueError, OSError):
            pass

    first_parent = os.getppid()  # the runner itself, or a launcher between us (a wrapper that forked python)

    def orphaned() -> bool:
        # re-parented (the runner, or the launcher in between, died), or the runner is gone
        return os.getppid() != first_parent or not _exists(parent)

    def watchdog():
        while not orphaned():
            wake.wait(WATCHDOG_INTERVAL_S)
            wake.clear()
        _die_with_tree(me, token)

    if orphaned():  # the parent died before we got here
        _die_with_tree(me, token)
    threading.Thread(target=watchdog, name="mlrepro-parent-watchdog", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def _die_with_tree(me: int, token: Optional[str]) -> None:
    try:
        sys.stderr.write(f"mlrepro replica {me}: the parent process is gone; killing the replica's process tree\n")
        sys.stderr.flush()
    except Exception:
        pass
    try:
        kill_tree(me, token, include_root=False, group=False)
    finally:
        try:
            if os.getpgid(0) == me:  # our own group (start_new_session): whatever appeared meanwhile, and us
                os.killpg(me, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        os._exit(128 + getattr(signal, "SIGKILL", 9))
