"""Signals and crashes: a cancelled CI job (SIGTERM to pytest or to the CLI), a parent killed with
kill -9, processes that double-fork away from the replica, and a replica that dies by a signal.
Nothing may be left running, and the error must name the signal.

Every process these tests start carries ``FAULTS_TAG=<unique>`` in its environment (replicas, their
DataLoader workers, escapees that keep their environment), so "the tree is gone" is checked by
scanning /proc for the tag, independently of how the runner finds trees; the escapee that drops its
environment is checked by its pid. Whatever a test leaves behind is killed at its end (also on
failure); every wait polls with a deadline.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees are checked through /proc")

REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "targets" / "faults"
WORKERS = f"{FAULTS / 'workers.py'}:train"
ESCAPES = str(FAULTS / "escapes.py")
STARTUP_S = 60  # the most a parent + replica + DataLoader workers may take to come up on a busy machine
GONE_S = 5  # "within a few seconds"
# deterministic=False everywhere: torch.use_deterministic_algorithms imports torch._inductor (~2 s a
# replica), and nothing here is about determinism


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _tagged(tag: str) -> set[int]:
    """Live processes whose environment carries FAULTS_TAG=tag."""
    needle = f"FAULTS_TAG={tag}".encode()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if _alive(int(name)):
            found.add(int(name))
    return found


def _wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Scene:
    """One test's processes: a unique tag, a folder of pid marks, and a clean-up that kills the lot."""

    def __init__(self, tmp_path: Path):
        self.tag = uuid.uuid4().hex
        self.tmp_path = tmp_path
        self.pid_dir = tmp_path / "pids"
        self.log = tmp_path / "parent.log"
        self.proc = None
        self.started = 0.0

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        path = [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        env.update(FAULTS_TAG=self.tag, FAULTS_PID_DIR=str(self.pid_dir), OMP_NUM_THREADS="1",
                   MLREPRO_WANDB="disabled", PYTHONPATH=os.pathsep.join(path))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, cmd, **extra) -> subprocess.Popen:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.tmp_path, env=self.env(**extra), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        return self.proc

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def marked(self, kind: str) -> list[int]:
        return [int(p.stem) for p in self.pid_dir.glob(f"*.{kind}")] if self.pid_dir.is_dir() else []

    def wait_in_flight(self) -> None:
        """Until the replica, its two DataLoader workers and its two escapees are up."""
        def ready():
            assert self.proc.poll() is None, f"the parent exited early ({self.proc.returncode}):\n{self.output()}"
            return len(self.marked("replica")) == 1 and len(self.marked("worker")) >= 2

        assert _wait_for(ready, STARTUP_S, 0.1), f"the audit did not get going:\n{self.output()}"
        assert all(map(_alive, self.marked("replica") + self.marked("worker") + self.marked("escaped")))
        assert len(self.marked("escaped")) == 2
        print(f"in flight after {time.monotonic() - self.started:.2f}s")

    def leftovers(self) -> list[int]:
        """What still runs of the replica's tree (the parent itself aside)."""
        return sorted((_tagged(self.tag) | set(filter(_alive, self.marked("escaped")))) - {self.proc.pid})

    def clean_up(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        _kill(_tagged(self.tag) | set(self.marked("escaped")))


@pytest.fixture
def scene(tmp_path):
    s = Scene(tmp_path)
    yield s
    s.clean_up()


def test_sigterm_to_pytest_kills_the_replica_tree(scene, tmp_path):
    test_file = tmp_path / "test_cancelled.py"
    test_file.write_text(f"import pytest\n\n\n@pytest.mark.mlrepro({WORKERS!r}, deterministic=False)\ndef test_train():\n    pass\n")
    proc = scene.start([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                        "--mlrepro", "-q", str(test_file)])
    scene.wait_in_flight()
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert _wait_for(lambda: not scene.leftovers(), GONE_S), f"left running {GONE_S}s after SIGTERM: {scene.leftovers()}"
    gone = time.monotonic() - sent
    proc.wait(timeout=30)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, scene.output()  # as on Ctrl-C
    assert "SIGTERM" in scene.output()
    print(f"replica tree gone {gone:.2f}s after SIGTERM to pytest; pytest ended after {time.monotonic() - sent:.2f}s")


def test_sigterm_to_the_cli_kills_the_tree_removes_its_temp_folder_and_exits_143(scene, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = scene.start([sys.executable, "-m", "pytest_mlrepro.cli", "audit", WORKERS, "--device", "cpu", "--deterministic", "false",
                        "--out", str(tmp_path / "out"), "--wandb", "disabled"], TMPDIR=tmp)
    scene.wait_in_flight()
    assert list(tmp.glob("mlrepro-*")), "the audit's temporary folder should exist while it runs"
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert _wait_for(lambda: not scene.leftovers(), GONE_S), f"left running {GONE_S}s after SIGTERM: {scene.leftovers()}"
    gone = time.monotonic() - sent
    proc.wait(timeout=30)
    assert not list(tmp.glob("mlrepro-*")), f"temporary folder left behind: {list(tmp.iterdir())}"
    assert proc.returncode == 128 + signal.SIGTERM, scene.output()
    lines = [line for line in scene.output().splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "SIGTERM" in lines[0], scene.output()
    print(f"replica tree gone {gone:.2f}s after SIGTERM to the CLI; the CLI ended after {time.monotonic() - sent:.2f}s")


# a bare audit() as the parent: pytest or the CLI die the same way, and the replica notices the same way
PARENT = ("import sys; from pytest_mlrepro import audit; "
          "audit(sys.argv[1], workdir=sys.argv[2], device='cpu', deterministic=False, isolation=sys.argv[3])")
ISOLATIONS = pytest.mark.parametrize("isolation", ["process", "forkserver"])


@ISOLATIONS
def test_kill_9_of_the_parent_takes_the_replica_tree_along(scene, tmp_path, isolation):
    """(With a fork server, the server goes too: it carries the tag, so it counts as left running.)"""
    proc = scene.start([sys.executable, "-c", PARENT, WORKERS, str(tmp_path / "audit"), isolation])
    scene.wait_in_flight()
    proc.kill()
    sent = time.monotonic()
    proc.wait(timeout=30)
    assert _wait_for(lambda: not scene.leftovers(), GONE_S), \
        f"left running {GONE_S}s after kill -9 of the parent: {scene.leftovers()}"
    print(f"replica tree gone {time.monotonic() - sent:.2f}s after kill -9 of its parent")


def _audit(target: str, root: Path, timeout=None, isolation="process"):
    from pytest_mlrepro import audit

    return audit(target, workdir=root, device="cpu", timeout=timeout, deterministic=False, isolation=isolation)


def _escaped(root: Path) -> list[int]:
    return [int(p) for path in sorted(root.glob("replica-*/work/escaped.pids")) for p in path.read_text().split()]


@ISOLATIONS
def test_double_forked_setsid_grandchildren_die_with_the_replica(scene, tmp_path, monkeypatch, isolation):
    """Each replica starts two grandchildren that leave its process group and session and are
    re-parented away from it; one also drops its environment. None may survive the normal end of
    the replica, nor the timeout kill."""
    monkeypatch.setenv("FAULTS_TAG", scene.tag)
    normal = tmp_path / "normal"
    survivors = {}  # both cases are checked before failing, so a failure says which ones broke
    try:
        result = _audit(f"{ESCAPES}:escape_and_train", normal, isolation=isolation)
        assert result.error is None, result.error
        pids = _escaped(normal)
        assert len(pids) == 4  # two per replica
        if not _wait_for(lambda: not any(map(_alive, pids)), GONE_S):
            survivors["the replica's normal end"] = [p for p in pids if _alive(p)]

        # the timeout must leave the replica time to start and escape: calibrated on the run above
        first = normal / "replica-0"
        startup = (first / "work" / "escaped.pids").stat().st_mtime - (first / "out" / "spec.pkl").stat().st_mtime
        for attempt, timeout in enumerate((1.5 * startup + 1, 3 * startup + 3)):
            hung = tmp_path / f"hung-{attempt}"
            result = _audit(f"{ESCAPES}:escape_and_hang", hung, timeout=timeout, isolation=isolation)
            assert result.error is not None and result.error.type == "timeout", result.error
            pids = _escaped(hung)
            if pids:
                break
        # two per replica that got going (both, when the replicas run in parallel)
        assert len(pids) in (2, 4), f"the target did not get to escape within {timeout:.0f}s: {pids}"
        if not _wait_for(lambda: not any(map(_alive, pids)), GONE_S):
            survivors["the timeout kill"] = [p for p in pids if _alive(p)]
        assert not survivors, f"escaped grandchildren outlived {survivors}"
    finally:
        _kill(p for folder in tmp_path.iterdir() for p in _escaped(folder))


def test_a_replica_killed_by_a_signal_names_it(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTS_TAG", scene.tag)
    result = _audit(f"{ESCAPES}:segfault", tmp_path)
    assert result.verdict == "error" and result.error.type == "signal" and result.error.replica == 0
    assert f"replica 0 of {ESCAPES}:segfault was killed by signal SIGSEGV (11)" in result.error.message
    # faulthandler's dump of the Python stack at the crash
    assert "escapes.py" in result.error.traceback and "in segfault" in result.error.traceback


def test_sigkill_without_a_timeout_points_at_the_oom_killer(tmp_path):
    """(The message only: a replica dying of SIGKILL takes the same path as the SIGSEGV one above.)"""
    from types import SimpleNamespace

    from pytest_mlrepro.errors import MlreproError, ReplicaError
    from pytest_mlrepro.runner import _signal_error

    spec = SimpleNamespace(index=1, target=SimpleNamespace(display="train.py"))
    err = _signal_error(spec, tmp_path, signal.SIGKILL)
    assert isinstance(err, ReplicaError) and isinstance(err, MlreproError) and err.kind == "signal"
    assert str(err).startswith("replica 1 of train.py was killed by signal SIGKILL (9)") and "OOM killer" in str(err)
    assert "SIGBUS (7)" in str(_signal_error(spec, tmp_path, signal.SIGBUS))


def test_a_replica_we_killed_because_of_sigterm_is_not_blamed_on_the_oom_killer(tmp_path, monkeypatch):
    """Replicas running on other threads when SIGTERM arrives die of our SIGKILL: say so."""
    from types import SimpleNamespace

    from pytest_mlrepro import process_tree
    from pytest_mlrepro.runner import _signal_error

    monkeypatch.setattr(process_tree, "interrupted_by", signal.SIGTERM)
    spec = SimpleNamespace(index=0, target=SimpleNamespace(display="train.py"))
    err = _signal_error(spec, tmp_path, signal.SIGKILL)
    assert err.kind == "interrupted" and "OOM" not in str(err)
    assert str(err) == "replica 0 of train.py was stopped with its process tree: the audit was interrupted by SIGTERM"


def test_signal_handlers_are_taken_at_their_default_only_and_given_back():
    from pytest_mlrepro import process_tree

    def custom(signum, frame):
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: stays ignored
        signal.signal(signal.SIGINT, custom)  # someone else's: stays theirs
        with process_tree.interrupt_on_signals():
            with process_tree.interrupt_on_signals():  # nested: nothing changes
                assert signal.getsignal(signal.SIGTERM) is process_tree._on_signal
            assert signal.getsignal(signal.SIGTERM) is process_tree._on_signal
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is custom
            with pytest.raises(process_tree.Interrupted, match="SIGTERM") as info:
                os.kill(os.getpid(), signal.SIGTERM)
                _wait_for(lambda: False, 5)  # the handler raises during the wait
            assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is custom
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# the CLI with its audit replaced by one that gets the signal (so that the whole run is covered); in
# a subprocess, so that a broken handler cannot take this test session down
INTERRUPTED_CLI = """
import os, signal, sys, time
from pytest_mlrepro import cli

def audit_interrupted(ns):
    os.kill(os.getpid(), int(sys.argv[1]))
    time.sleep(10)
    return 0

cli._audit = audit_interrupted
before = signal.getsignal(int(sys.argv[1]))
status = cli.main(["audit", "train.py"])
assert signal.getsignal(int(sys.argv[1])) is before, "handler not given back"
sys.exit(status)
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_the_cli_ends_with_128_plus_the_signal(signum, status):
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_CLI, str(int(signum))], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == status, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mlrepro: interrupted by {signal.Signals(signum).name}"), done.stderr
