"""Atomic saves survive SIGKILL; loading never runs pickled code; bad files are named."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_mlrepro.checkpoint.storage import (
    CheckpointCorrupt,
    CheckpointMissing,
    CheckpointRefused,
    load_checkpoint,
    save_checkpoint,
    weights_sha256,
)

HERE = Path(__file__).parent


class CreatesMarker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def kill_results(tmp_path_factory):
    """One helper process (one torch import): 50 kills of an atomic writer, 20 of an in-place one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path_factory.mktemp("kill")
    proc = subprocess.run([sys.executable, str(HERE / "_kill_writer.py"), str(out), "7", "atomic:50", "naive:20"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_mid_save_never_destroys_the_previous_best(kill_results):
    rows = kill_results["atomic"]
    assert len(rows) == 50
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:3]
    epochs = [r["epoch"] for r in rows]
    assert epochs == sorted(epochs)  # never rolled back to an older checkpoint
    # the test really killed writers in the middle of a save (a temp file was left behind)
    assert sum(r["mid_write"] for r in rows) >= 5, rows


def test_control_in_place_writes_do_get_corrupted(kill_results):
    """Shows the kill test can fail: the same kills on a non-atomic writer corrupt the file."""
    rows = kill_results["naive"]
    assert any(not r["ok"] for r in rows), rows


def test_roundtrip_torch_and_safetensors(tmp_path):
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    for name in ("a.pt", "a.safetensors"):
        save_checkpoint(tmp_path / name, sd, {"epoch": 3, "metrics": {"val_loss": 0.5}})
        state, meta = load_checkpoint(tmp_path / name)
        assert meta == {"epoch": 3, "metrics": {"val_loss": 0.5}}
        assert weights_sha256(state) == weights_sha256(sd)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_weights_hash_sees_every_byte():
    sd = {"a": torch.zeros(4), "b": torch.ones(2, dtype=torch.bfloat16)}
    h = weights_sha256(sd)
    assert h == weights_sha256({"b": sd["b"].clone(), "a": sd["a"].clone()})  # order-free
    sd2 = {"a": torch.zeros(4), "b": torch.ones(2, dtype=torch.bfloat16)}
    sd2["a"][3] = 1e-30
    assert weights_sha256(sd2) != h
    assert weights_sha256({"a": torch.zeros(2, 2), "b": sd["b"]}) != h  # shape counts


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": CreatesMarker(marker)}))
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": CreatesMarker(marker)}, path)
    with pytest.raises(CheckpointRefused, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # control: the payload really would run on an ordinary unpickle
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(CreatesMarker(control)))
    assert control.exists()


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointMissing, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "ok.pt", {"w": torch.randn(1000)}, {"epoch": 1})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorrupt, match="trunc.pt: truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointCorrupt, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointCorrupt, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
