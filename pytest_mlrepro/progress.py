"""Progress of an audit while it runs: one typed event per replica and per extra run (replay, dense
re-trace, diagnosis reruns), so a caller (the CLI) can say what is going on instead of staying silent.

The audit emits :class:`ProgressEvent` records to an optional callback (``audit(..., progress=fn)``);
it never prints. Steps so far come from a tiny file the replica rewrites about once a second
(:class:`StepsWriter`); the parent reads it (:func:`read_steps`) at each heartbeat. Kept free of torch.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

STEPS_FILE = "steps.txt"  # in a run's output folder: the optimizer steps taken so far, as a whole number
HEARTBEAT_S = 10.0  # a "running" event this often while a run lasts

STARTED, RUNNING, FINISHED, FAILED = "started", "running", "finished", "failed"


@dataclass(frozen=True)
class ProgressEvent:
    """One run of an audit changed state. ``label`` says which kind of run (replica, replay, dense,
    hashpin, or a diagnosis rerun's label), ``index`` which replica it reproduces."""

    label: str
    index: int
    state: str  # started | running | finished | failed
    elapsed_s: float = 0.0
    steps: Optional[int] = None  # optimizer steps so far, when the replica reported them
    out_dir: Optional[str] = None  # the run's folder: stdout.txt, stderr.txt (process isolation)
    message: str = ""  # a failed run: why

    @property
    def name(self) -> str:
        return f"{self.label} {self.index}"


ProgressCallback = Callable[[ProgressEvent], None]


def read_steps(out_dir: Path) -> Optional[int]:
    """The step count a replica last wrote into ``out_dir``, or None (not written yet, or unreadable)."""
    try:
        return int((Path(out_dir) / STEPS_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def track(callback: Optional[ProgressCallback], label: str, index: int, out_dir: Path,
          heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Emit started, running (every ``heartbeat_s``) and finished / failed events around one run.
    Without a callback it does nothing. A callback that raises never stops the audit."""
    if callback is None:
        yield
        return
    started = time.perf_counter()

    def emit(state: str, message: str = "") -> None:
        event = ProgressEvent(label=label, index=index, state=state, elapsed_s=time.perf_counter() - started,
                              steps=read_steps(out_dir), out_dir=str(out_dir), message=message)
        try:
            callback(event)
        except Exception:  # reporting progress must never change an audit
            pass

    emit(STARTED)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat_s):
            emit(RUNNING)

    beater = threading.Thread(target=beat, name="mlrepro-progress", daemon=True)
    beater.start()
    try:
        yield
    except BaseException as exc:
        done.set()
        beater.join()
        emit(FAILED, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    done.set()
    beater.join()
    emit(FINISHED)


def describe(event: ProgressEvent) -> str:
    """One line for a terminal: ``replica 0: finished after 3.2s, 18 steps``."""
    steps = f", {event.steps} step{'s' if event.steps != 1 else ''}" if event.steps is not None else ""
    if event.state == STARTED:
        return f"{event.name}: started"
    if event.state == RUNNING:
        return f"{event.name}: running, {event.elapsed_s:.0f}s{steps}"
    if event.state == FINISHED:
        return f"{event.name}: finished after {event.elapsed_s:.1f}s{steps}"
    return f"{event.name}: FAILED after {event.elapsed_s:.1f}s{steps}: {event.message}"


class StepsWriter:
    """Inside a replica: rewrite ``out_dir/steps.txt`` with ``count()`` about once a second (only when it
    changed), from a daemon thread, until stopped. Costs one small write per second at most."""

    def __init__(self, out_dir: Path, count: Callable[[], int], interval_s: float = 1.0):
        self.path, self.count, self.interval_s = Path(out_dir) / STEPS_FILE, count, interval_s
        self._done = threading.Event()
        self._last: Optional[int] = None
        self._thread = threading.Thread(target=self._loop, name="mlrepro-steps", daemon=True)

    def _write(self) -> None:
        try:
            n = int(self.count())
        except Exception:
            return
        if n == self._last:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(str(n))
            os.replace(tmp, self.path)
            self._last = n
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self._write()

    def start(self) -> "StepsWriter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write()  # the final count
