"""Best-only checkpointing vs saving every epoch, on the checkpoint training fixture.

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py [--width 512] [--epochs 40] [--repeats 3]

Trains the fixture (``fixtures/checkpoint_training.py``) twice per repeat with the same seed:
once with ``BestCheckpoint`` (saves only on improvement), once with a save at every epoch (same
atomic writer, same metadata). Prints the number of saves, bytes written, time spent saving and
its share of the wall-clock time of the training loop. ``--width`` sets the hidden layer so the
checkpoint is big enough for saving to matter (512 -> about 12 KB; 65536 -> about 1.5 MB).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixture():
    spec = importlib.util.spec_from_file_location("checkpoint_training", ROOT / "fixtures" / "checkpoint_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_every_epoch(fx, workdir, *, width, epochs, fsync):
    """The fixture's loop, saving every epoch (no early stopping, for the same number of epochs)."""
    import torch

    from pytest_mlrepro.checkpoint.storage import environment_info, save_checkpoint, weights_sha256

    torch.manual_seed(0)
    model = fx.make_model(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.16 / width)
    x, y = fx.train_data()
    saves = nbytes = 0
    save_s = 0.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for i in range(0, len(x), 16):
            opt.zero_grad()
            loss = torch.mean((model(x[i:i + 16]) - y[i:i + 16]) ** 2)
            loss.backward()
            opt.step()
        metrics = {"train_loss": float(loss.detach()), **fx.evaluate(model)}
        model.train()
        ts = time.perf_counter()
        state = model.state_dict()
        meta = {"epoch": epoch, "metrics": metrics, "weights_sha256": weights_sha256(state),
                "environment": environment_info()}
        nbytes += save_checkpoint(Path(workdir) / f"epoch-{epoch}.pt", state, meta, fsync=fsync)
        save_s += time.perf_counter() - ts
        saves += 1
    return {"saves": saves, "bytes": nbytes, "save_s": save_s, "wall_s": time.perf_counter() - t0}


def run_best_only(fx, workdir, *, width, epochs, fsync):
    t0 = time.perf_counter()
    r = fx.train(workdir, max_epochs=epochs, patience=epochs, width=width, fsync=fsync)
    return {"saves": r["saves"], "bytes": r["bytes_written"], "save_s": r["save_seconds"],
            "wall_s": time.perf_counter() - t0, "best_epoch": r["best_epoch"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-fsync", action="store_true")
    a = p.parse_args(argv)
    fx = _fixture()
    rows = {"best-only": [], "every-epoch": []}
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            rows["best-only"].append(run_best_only(fx, Path(d) / "b", width=a.width, epochs=a.epochs, fsync=not a.no_fsync))
            rows["every-epoch"].append(run_every_epoch(fx, Path(d) / "e", width=a.width, epochs=a.epochs,
                                                       fsync=not a.no_fsync))
    print(f"checkpoint benchmark: width={a.width}, {a.epochs} epochs (no early stop), repeats={a.repeats}, "
          f"fsync={not a.no_fsync}, median of repeats")
    print(f"{'strategy':<12} {'saves':>6} {'bytes written':>14} {'save s':>8} {'loop s':>8} {'save share':>10}")
    med = lambda xs: sorted(xs)[len(xs) // 2]
    for name, rs in rows.items():
        save_s, wall_s = med([r["save_s"] for r in rs]), med([r["wall_s"] for r in rs])
        print(f"{name:<12} {rs[0]['saves']:>6} {rs[0]['bytes']:>14,} {save_s:>8.3f} {wall_s:>8.3f} {save_s / wall_s:>10.1%}")
    b = rows["best-only"][0]
    print(f"best epoch {b['best_epoch']}; best-only writes {b['bytes'] / rows['every-epoch'][0]['bytes']:.0%} of the bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
