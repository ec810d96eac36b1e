"""Helper process for the kill-during-save test (not a test module).

usage: python _kill_writer.py DIR SEED MODE:TRIALS [MODE:TRIALS ...]   (MODE: atomic | naive)

Imports torch once; per MODE, in DIR/MODE: writes an initial checkpoint, then TRIALS times forks a
child that saves new checkpoints (4 MB each) in a loop, SIGKILLs it a random delay after the child
says it starts writing, and checks what is left at the checkpoint path. Prints one JSON object {mode: [per-trial results]}.
"""
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from pytest_mlrepro.checkpoint.storage import CheckpointError, load_checkpoint, save_checkpoint

root, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
base = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: a save takes milliseconds


def state(epoch):
    return {"w": base + epoch, "marker": torch.tensor([epoch])}


def write(path, mode, epoch):
    if mode == "atomic":
        save_checkpoint(path, state(epoch), {"epoch": epoch})
    else:  # the control: write in place, as torch.save(path) does
        torch.save({"format": "pytest-mlrepro/best-checkpoint", "version": 1, "metadata": json.dumps({"epoch": epoch}),
                    "state_dict": state(epoch)}, path)


def run(mode, trials):
    directory = root / mode
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "best.pt"
    write(path, mode, 0)
    results, epoch = [], 1
    for trial in range(trials):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, b"1")  # about to write: the delay below counts from here, not from fork()
                e = epoch
                while True:
                    write(path, mode, e)
                    e += 1
            finally:
                os._exit(1)
        os.close(w)
        os.read(r, 1)  # on a loaded machine the child may take longer than the delay just to start
        os.close(r)
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = [p for p in directory.iterdir() if p.name.endswith(".tmp")]
        row = {"trial": trial, "mid_write": bool(leftovers)}
        try:
            sd, meta = load_checkpoint(path)
            e = meta["epoch"]
            row.update(ok=bool(torch.equal(sd["w"], base + e) and int(sd["marker"]) == e), epoch=e)
        except CheckpointError as exc:
            row.update(ok=False, error=str(exc)[:200])
        results.append(row)
        for p in leftovers:
            p.unlink()
        if not row["ok"]:
            write(path, mode, 0)  # naive control: restore a loadable file for the next trial
        epoch = max(epoch, row.get("epoch", 0)) + 1000
    return results


print(json.dumps({m: run(m, int(n)) for m, n in (a.split(':') for a in sys.argv[3:])}))
