"""kill -9 while BestCheckpoint saves: the checkpoint and its history sidecar always form a
consistent pair that check_reload accepts, and the next save removes the temp files a kill left.

The kills run in one helper process (``benchmarks/bench_checkpoint_faults.py``, which imports torch
once and forks a training per trial): a handful at random moments, plus one right before and one
right after every ``os.replace`` of epochs 1-4 (so every gap between two writes is hit).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_mlrepro.checkpoint import storage
from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint
from pytest_mlrepro.checkpoint.reload import check_reload
from pytest_mlrepro.checks import HISTORY
from pytest_mlrepro.errors import MlreproError

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_checkpoint_faults.py"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--trials", "5", "--crash-points", "--no-fsync", "--seed", "3",
                           "--width", "500", "--window", "0.05",
                           "--dir", str(out / "run"), "--json", str(out / "faults.json")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "faults.json").read_text())


def _assert_consistent(rows):
    assert all(r["killed"] for r in rows), rows
    for r in rows:
        assert r["intact"], r
        assert r["consistent"], r  # the history read back holds the checkpoint's epoch as its best
        assert not r["false_failure"] and set(r["verdicts"].values()) == {"pass"}, r["problems"]
        assert r["strays_after_next_save"] == [], r


def test_random_kills_leave_a_consistent_pair(faults):
    rows = [r for r in faults["rows"] if r["mode"] == "random"]
    assert len(rows) == 5
    _assert_consistent(rows)


def test_a_kill_at_every_write_boundary_leaves_a_consistent_pair(faults):
    rows = [r for r in faults["rows"] if r["mode"] != "random"]
    assert len(rows) >= 12, [r["mode"] for r in rows]  # epochs 1-4 write at least 6 times
    _assert_consistent(rows)
    # the kills really left temp files (which the next save removed) and saves that never landed
    assert sum(bool(r["strays_after_kill"]) for r in rows) >= 4, rows
    assert any(r["reconciled"] for r in rows), rows


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_our_dead_writers_temp_files_are_removed(tmp_path):
    path = tmp_path / "best.pt"
    mine = f".best.pt.mlrepro-{storage._HOST}"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f"{mine}-{dead}-{'a' * 16}.tmp"
    keep = [tmp_path / f"{mine}-{alive}-{'b' * 16}.tmp",  # a live writer's (another thread of ours)
            tmp_path / f".best.pt.mlrepro-otherhost-{dead}-{'c' * 16}.tmp",  # another machine's
            tmp_path / f".other.pt.mlrepro-{storage._HOST}-{dead}-{'d' * 16}.tmp",  # another target's
            tmp_path / ".best.pt.abcd1234.tmp",  # not a name we create
            tmp_path / "notes.tmp"]
    for p in [stale, *keep]:
        p.write_bytes(b"partial")
    assert storage.stale_temp_files(path) == [stale]
    storage.save_checkpoint(path, {"w": torch.zeros(2)}, {"epoch": 0})
    assert not stale.exists() and all(p.exists() for p in keep)
    assert storage.load_checkpoint(path)[1] == {"epoch": 0}


def test_a_new_run_cleans_up_even_before_its_first_save(tmp_path):
    """A killed run's temp files go at the first epoch of the next run, saved or not."""
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    stale = [tmp_path / f".{n}.mlrepro-{storage._HOST}-{_dead_pid()}-{'e' * 16}.tmp"
             for n in (ckpt.path.name, ckpt.history_path.name)]
    for p in stale:
        p.write_bytes(b"partial")
    assert not ckpt.on_epoch_end(0, {"val_loss": float("nan")}, torch.nn.Linear(1, 1))  # NaN: no save
    assert not any(p.exists() for p in stale)


def _reload(path):
    return {f.check: f for f in check_reload(path, evaluate=lambda m: {"val_loss": float(m.weight[0, 0])},
                                             model_factory=lambda: torch.nn.Linear(1, 1), fresh_process=False)}


def _model(v):
    m = torch.nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(v)
    return m


@pytest.mark.parametrize("fail_at", ["checkpoint", "intent"])
def test_a_save_that_raises_leaves_a_consistent_pair_and_is_not_recorded(tmp_path, monkeypatch, fail_at):
    """Disk full (or any error) mid-save: the pair on disk and the callback's record agree."""
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    ckpt.on_epoch_end(0, {"val_loss": 2.0}, _model(2.0))
    real_save, real_write = storage.save_checkpoint, storage.write_history

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    if fail_at == "checkpoint":
        monkeypatch.setattr(storage, "save_checkpoint", boom)
    else:
        def write_history(*a, pending=None, **kw):  # the intent record (before the checkpoint) fails
            return boom() if pending else real_write(*a, pending=pending, **kw)

        monkeypatch.setattr(storage, "write_history", write_history)
    with pytest.raises(OSError, match="No space"):
        ckpt.on_epoch_end(1, {"val_loss": 1.0}, _model(1.0))
    assert [h["epoch"] for h in ckpt.history] == [0] and ckpt.best_epoch == 0
    f = _reload(ckpt.path)
    assert f[HISTORY].verdict == "pass" and f["best_checkpoint.reload"].verdict == "pass", f[HISTORY].message
    assert [h["epoch"] for h in f[HISTORY].details["history"]] == [0]
    if fail_at == "checkpoint":  # the sidecar announced epoch 1; the checkpoint never got it
        assert "never landed" in f[HISTORY].details["history_reconciled"]
    monkeypatch.setattr(storage, "save_checkpoint", real_save)
    monkeypatch.setattr(storage, "write_history", real_write)
    ckpt.on_epoch_end(2, {"val_loss": 3.0}, _model(3.0))  # training goes on: still consistent
    ckpt.on_epoch_end(3, {"val_loss": 0.5}, _model(0.5))
    f = _reload(ckpt.path)
    assert f[HISTORY].verdict == "pass" and f[HISTORY].details["argbest_epoch"] == 3, f[HISTORY].message


def test_the_sidecar_of_another_checkpoint_is_an_error_not_a_verdict(tmp_path):
    a = BestCheckpoint("val_loss", dirpath=tmp_path / "a", fsync=False)
    b = BestCheckpoint("val_loss", dirpath=tmp_path / "b", fsync=False)
    for e, v in enumerate([2.0, 1.0]):
        a.on_epoch_end(e, {"val_loss": v}, _model(v))
    b.on_epoch_end(0, {"val_loss": 5.0}, _model(5.0))
    b.history_path.write_bytes(a.history_path.read_bytes())  # b's checkpoint with a's history
    f = _reload(b.path)[HISTORY]
    assert f.verdict == "error" and "does not describe this checkpoint" in f.message and str(b.history_path) in f.message


def test_reconcile_rules():
    hist = [{"epoch": 0, "m": 2.0}, {"epoch": 1, "m": 1.0}]
    s0, s1 = {"epoch": 0, "save_id": "s0"}, {"epoch": 1, "save_id": "s1"}
    doc = {"history": hist, "saved": s0, "pending": s1}
    assert storage.reconcile_history(doc, {"save_id": "s1"}) == (hist, None)  # landed, commit not written
    cut, note = storage.reconcile_history(doc, {"save_id": "s0"})  # never landed
    assert cut == hist[:1] and "epoch 1 never landed" in note
    assert storage.reconcile_history({"history": hist, "saved": s1, "pending": None}, {"save_id": "s1"}) == (hist, None)
    assert storage.reconcile_history({"history": hist}, {}) == (hist, None)  # version 1 sidecar: as is
    with pytest.raises(storage.SidecarError, match="does not describe this checkpoint"):
        storage.reconcile_history(doc, {"save_id": "other"})
    with pytest.raises(storage.SidecarError, match="pending"):
        storage.reconcile_history({"history": hist, "saved": None, "pending": {"epoch": "1"}}, {})


@pytest.mark.parametrize("epochs, message", [((0, 0), "epoch 0 logged after epoch 0"),
                                             ((3, 1), "epoch 1 logged after epoch 3"),
                                             ((0, 1.5), "epoch must be an int")])
def test_epochs_must_be_increasing_ints(tmp_path, epochs, message):
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    ckpt.on_epoch_end(epochs[0], {"val_loss": 1.0}, _model(1.0))
    with pytest.raises(storage.CheckpointError, match=message):
        ckpt.on_epoch_end(epochs[1], {"val_loss": 0.5}, _model(0.5))
    assert len(ckpt.history) == 1 and ckpt.best_epoch == epochs[0]


def test_numpy_and_tensor_epochs_and_steps_are_ints(tmp_path):
    import numpy as np

    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    ckpt.on_epoch_end(np.int64(0), {"val_loss": 1.0}, _model(1.0), step=torch.tensor(7))
    assert ckpt.history[0]["epoch"] == 0 and type(ckpt.history[0]["epoch"]) is int and ckpt.history[0]["step"] == 7
    with pytest.raises(storage.CheckpointError, match="step must be an int or None"):
        ckpt.on_epoch_end(1, {"val_loss": 0.5}, _model(0.5), step=1.5)


def test_bad_inputs_to_the_writers_write_nothing(tmp_path):
    with pytest.raises(storage.CheckpointError, match="not JSON-serialisable"):
        storage.save_checkpoint(tmp_path / "a.pt", {"w": torch.zeros(1)}, {"epoch": object()})
    with pytest.raises(storage.CheckpointError, match="state_dict must be a dict"):
        storage.save_checkpoint(tmp_path / "a.pt", [torch.zeros(1)], {})
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    with pytest.raises(storage.CheckpointError, match="model must be an nn.Module or a state dict"):
        ckpt.on_epoch_end(0, {"val_loss": 1.0}, "model")
    assert list(tmp_path.iterdir()) == [] and ckpt.history == []
    assert issubclass(storage.SidecarError, storage.CheckpointError) and issubclass(storage.CheckpointError, MlreproError)
