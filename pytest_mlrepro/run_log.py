"""The CLI's side of an audit's progress: a line on stderr per event, each run's stdout/stderr copied
under the output folder (``OUT/logs/<target>/<label>-<index>.stdout.txt``), and the tail of both shown
when a run fails, so the program's own words are never lost with the audit's temporary folder."""
from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path
from typing import Optional, TextIO

from .progress import FAILED, FINISHED, ProgressEvent, describe

TAIL_LINES = 20
STREAMS = ("stdout", "stderr")


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class RunLog:
    """A progress callback for one target's audit (runs may report from several threads at once)."""

    def __init__(self, target: str, logs_dir: Optional[Path], stream: TextIO = None):
        self.target, self.logs_dir = target, logs_dir
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self.kept: list[Path] = []  # the log files copied so far

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            self._write(f"mlrepro: {self.target}: {describe(event)}")
            if event.state in (FINISHED, FAILED) and event.out_dir:
                kept = self._keep(event)
                if event.state == FAILED:
                    self._show_tails(event, kept)

    def _write(self, line: str) -> None:
        try:
            print(line, file=self.stream, flush=True)
        except OSError:  # the terminal went away: the audit goes on
            pass

    def _keep(self, event: ProgressEvent) -> dict:
        """Copy the run's stdout.txt / stderr.txt (process isolation writes them) under logs_dir."""
        kept = {}
        for name in STREAMS:
            source = Path(event.out_dir) / f"{name}.txt"
            if not source.is_file():
                continue
            kept[name] = source
            if self.logs_dir is not None:
                target = self.logs_dir / f"{event.label}-{event.index}.{name}.txt"
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
                    kept[name] = target
                    self.kept.append(target)
                except OSError as exc:
                    self._write(f"mlrepro: could not keep {source} as {target}: {exc.strerror or exc}")
        return kept

    def _show_tails(self, event: ProgressEvent, kept: dict) -> None:
        for name, path in kept.items():
            text = tail(path)
            if text.strip():
                self._write(f"--- {event.name} {name}, last {TAIL_LINES} lines ({path}) ---")
                self._write(text)
