"""Kill -9 a BestCheckpoint training while it saves; count what the checkpoint/history pair survives.

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint_faults.py [--trials 120] [--crash-points]
        [--width 1000] [--window 0.1] [--no-fsync] [--seed 0] [--json PATH]

One process imports torch once. Every trial forks a child that trains "forever" with
``BestCheckpoint("val_loss")`` in one shared folder: a ``width x width`` linear layer (1000 -> 4 MB
checkpoint) whose weights are all set to the epoch's ``val_loss`` and its bias to the epoch, a
curve that improves, gets worse, ties and improves again (so about half the epochs save). The
parent waits until the child has finished epoch 0, sleeps ``uniform(0, --window)`` seconds and
SIGKILLs it. ``--crash-points`` adds one trial per write boundary of epochs 1-4: the child kills
itself right before or right after its k-th ``os.replace``, so every gap between two writes of
the pair is hit once, deterministically.

After each kill the parent judges what is on disk:

- checkpoint intact: it loads, its weights and bias are those of the epoch its metadata names,
  and their hash is the recorded one;
- sidecar consistent: the history ``check_reload`` reads (after reconciling the sidecar) is a
  prefix of the true log that contains the checkpoint's epoch, and a best-only saver fed that
  prefix would hold exactly the checkpoint's epoch;
- stray temp files: ``*.tmp`` files this kill left in the folder, and all ``*.tmp`` files left
  after the next save (a new ``BestCheckpoint`` run saving epoch 0 into the same folder);
- false check_reload failures: an intact checkpoint for which ``check_reload`` (in process)
  returns anything but ``pass``.

Prints the counts and the mean time per trial; asserts nothing (``--json`` writes every row).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MONITOR = "val_loss"
CRASH_EPOCHS = 4  # --crash-points covers the writes of epochs 1..CRASH_EPOCHS


def curve(n: int) -> list:
    """val_loss per epoch: improve, worse, tie, improve, repeated (integers: exact in float32)."""
    out, best = [], 4096.0
    for e in range(n):
        step = (-1.0, 5.0, 0.0, -2.0)[e % 4]
        v = best if e == 0 else best + step
        best = min(best, v)
        out.append(v)
    return out


VALUES = curve(20000)


def metrics(epoch: int) -> dict:
    return {MONITOR: VALUES[epoch], "train_loss": 0.5 * epoch}


def saver_holds(values) -> int | None:
    """The epoch a best-only saver (mode min, min_delta 0) holds after ``values``: the first arg-min."""
    best, held = None, None
    for e, v in enumerate(values):
        if best is None or v < best:
            best, held = v, e
    return held


def make_model(width: int):
    import torch

    return torch.nn.Linear(width, width)


def set_epoch(model, epoch: int) -> None:
    """Weights = the epoch's val_loss, bias = the epoch: the file says which epoch it holds."""
    import torch

    with torch.no_grad():
        model.weight.fill_(VALUES[epoch])
        model.bias.fill_(float(epoch))


def evaluate(model) -> dict:
    return {MONITOR: float(model.weight[0, 0])}


def _patch_replace(kill_at: int, when: str) -> None:
    """Make this process SIGKILL itself right before/after its ``kill_at``-th ``os.replace``."""
    real, count = os.replace, [0]

    def replace(src, dst, **kw):
        count[0] += 1
        if count[0] == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, **kw)
        if count[0] == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def _child(directory: Path, width: int, fsync: bool, ready_fd: int, crash) -> None:
    """Train until killed; signal the parent once epoch 0 is saved."""
    from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint

    model = make_model(width)
    ckpt = BestCheckpoint(MONITOR, dirpath=directory, seed=0, fsync=fsync)
    for epoch in range(len(VALUES)):
        set_epoch(model, epoch)
        ckpt.on_epoch_end(epoch, metrics(epoch), model, step=10 * epoch)
        if epoch == 0:
            if crash is not None:
                _patch_replace(*crash)
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        if crash is not None and epoch >= CRASH_EPOCHS:
            return


def _run_child(directory: Path, width: int, fsync: bool, window: float, rng, crash) -> dict:
    """Fork the training, kill it (or let it kill itself), return how it ended."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            _child(directory, width, fsync, w, crash)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60.0)
    started = bool(ready) and os.read(r, 1) == b"1"
    os.close(r)
    delay = None
    if crash is None and started:
        delay = rng.uniform(0.0, window)
        time.sleep(delay)
    if crash is None or not started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"started": started, "killed": killed, "delay_s": delay}


def _strays(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _intact(path: Path):
    """(intact, epoch or None, error) of the checkpoint at ``path``."""
    import torch

    from pytest_mlrepro.checkpoint.storage import CheckpointError, load_checkpoint, weights_sha256

    try:
        state, meta = load_checkpoint(path)
    except CheckpointError as exc:
        return False, None, str(exc)[:200]
    epoch = (meta or {}).get("epoch")
    if not isinstance(epoch, int):
        return False, None, f"no epoch in metadata: {meta!r}"[:200]
    ok = (bool(torch.all(state["weight"] == VALUES[epoch])) and bool(torch.all(state["bias"] == float(epoch)))
          and meta.get("weights_sha256") == weights_sha256(state))
    return ok, epoch, None if ok else "weights are not those of the recorded epoch"


def _consistent(history, epoch) -> bool:
    """The history read back is a true prefix, holds ``epoch``, and a saver fed it would hold ``epoch``."""
    if not history:
        return False
    for i, entry in enumerate(history):
        if entry.get("epoch") != i or entry.get(MONITOR) != VALUES[i]:
            return False
    return saver_holds([h[MONITOR] for h in history]) == epoch


def judge(directory: Path, width: int) -> dict:
    """What the kill left on disk, and what check_reload says about it."""
    from functools import partial

    from pytest_mlrepro.checkpoint.reload import check_reload
    from pytest_mlrepro.checks import HISTORY

    path = directory / "best.pt"
    strays = _strays(directory)
    intact, epoch, error = _intact(path)
    findings = check_reload(path, evaluate=evaluate, model_factory=partial(make_model, width), fresh_process=False)
    verdicts = {f.check: f.verdict for f in findings}
    hist = next((f for f in findings if f.check == HISTORY), None)
    history = hist.details.get("history") if hist is not None else None
    bad = [f"{f.check}: {f.verdict}: {f.message[:300]}" for f in findings if f.verdict != "pass"]
    return {"intact": intact, "epoch": epoch, "error": error, "strays_after_kill": strays,
            "reconciled": bool(hist is not None and hist.details.get("history_reconciled")),
            "consistent": _consistent(history, epoch), "history_len": len(history) if history else 0,
            "verdicts": verdicts, "false_failure": intact and bool(bad), "problems": bad}


def next_save(directory: Path, width: int, fsync: bool) -> list:
    """A new run saves into the same folder; returns the temp files left after it."""
    from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint

    model = make_model(width)
    set_epoch(model, 0)
    BestCheckpoint(MONITOR, dirpath=directory, seed=0, fsync=fsync).on_epoch_end(0, metrics(0), model, step=0)
    return _strays(directory)


def _trial(directory: Path, width: int, fsync: bool, window: float, rng, crash) -> dict:
    """One kill: how the child ended, what it left, what the next save left."""
    t0 = time.perf_counter()
    row = {"mode": "random" if crash is None else f"{crash[1]} replace #{crash[0]}"}
    before = set(_strays(directory))
    row.update(_run_child(directory, width, fsync, window, rng, crash))
    if row["killed"]:
        row.update(judge(directory, width))
        row["strays_after_kill"] = sorted(set(row["strays_after_kill"]) - before)  # this kill's own
    row["strays_after_next_save"] = next_save(directory, width, fsync)
    row["seconds"] = time.perf_counter() - t0
    return row


def run_trials(directory: Path, *, trials: int, crash_points: bool, width: int, window: float, fsync: bool,
               seed: int) -> list:
    """All trials in one folder (so a stray temp file would pile up): random kills, then crash points."""
    import torch  # noqa: F401  (imported once, before forking)

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [_trial(directory, width, fsync, window, rng, None) for _ in range(trials)]
    for when in ("before", "after") if crash_points else ():
        for k in range(1, 100):  # until the k-th os.replace lies beyond epoch CRASH_EPOCHS
            row = _trial(directory, width, fsync, window, rng, (k, when))
            if not row["killed"]:
                break
            rows.append(row)
    return rows


def summarize(rows: list) -> dict:
    n = len(rows)
    return {
        "trials": n,
        "killed": sum(r["killed"] for r in rows),
        "checkpoint_intact": sum(r.get("intact", False) for r in rows),
        "sidecar_consistent": sum(r.get("consistent", False) for r in rows),
        "history_cut_at_a_save_that_never_landed": sum(r.get("reconciled", False) for r in rows),
        "trials_with_strays_after_kill": sum(bool(r.get("strays_after_kill")) for r in rows),
        "stray_files_after_kill": sum(len(r.get("strays_after_kill", ())) for r in rows),
        "trials_with_strays_after_next_save": sum(bool(r["strays_after_next_save"]) for r in rows),
        "stray_files_at_end": len(rows[-1]["strays_after_next_save"]) if rows else 0,
        "false_check_reload_failures": sum(r.get("false_failure", False) for r in rows),
        "mean_seconds_per_trial": sum(r["seconds"] for r in rows) / n if n else 0.0,
    }


def _print(title: str, s: dict) -> None:
    n = s["trials"]
    print(f"{title}")
    print(f"  trials                              {n} (killed: {s['killed']})")
    print(f"  checkpoint intact                   {s['checkpoint_intact']}/{n}")
    print(f"  sidecar consistent                  {s['sidecar_consistent']}/{n} (of them, history cut at a save "
          f"that never landed: {s['history_cut_at_a_save_that_never_landed']})")
    print(f"  stray temp files right after kill   {s['stray_files_after_kill']} files in "
          f"{s['trials_with_strays_after_kill']}/{n} trials")
    print(f"  stray temp files after next save    in {s['trials_with_strays_after_next_save']}/{n} trials; "
          f"{s['stray_files_at_end']} files in the folder at the end")
    print(f"  false check_reload failures         {s['false_check_reload_failures']}/{n}")
    print(f"  mean time per trial                 {s['mean_seconds_per_trial']:.3f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=120, help="random-moment kills (default 120)")
    p.add_argument("--crash-points", action="store_true", help="also kill at every write boundary of epochs 1-4")
    p.add_argument("--width", type=int, default=1000, help="linear layer width; 1000 -> 4 MB checkpoint")
    p.add_argument("--window", type=float, default=0.1, help="kill within this many seconds after epoch 0")
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="folder for the runs (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the summary and every row here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlrepro-faults-") as tmp:
        rows = run_trials(a.dir or Path(tmp) / "run", trials=a.trials, crash_points=a.crash_points, width=a.width,
                          window=a.window, fsync=not a.no_fsync, seed=a.seed)
    random_rows = [r for r in rows if r["mode"] == "random"]
    crash_rows = [r for r in rows if r["mode"] != "random"]
    out = {"settings": {"width": a.width, "window_s": a.window, "fsync": not a.no_fsync, "seed": a.seed},
           "random": summarize(random_rows), "crash_points": summarize(crash_rows), "rows": rows}
    print(f"checkpoint fault injection: kill -9 during BestCheckpoint saves, {4 * a.width * (a.width + 1):,} B "
          f"checkpoint, fsync={not a.no_fsync}, kill within {a.window} s after epoch 0, seed {a.seed}")
    if random_rows:
        _print("random-moment kills", out["random"])
    if crash_rows:
        _print("kills at each write boundary (before/after each os.replace, epochs 1-4)", out["crash_points"])
    print(f"total {time.perf_counter() - t0:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
