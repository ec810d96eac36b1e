"""One DDP replica: ``nproc`` ranks with torchrun's environment, each a replica of its own.

The replica process (``python -m pytest_mlrepro.replica SPEC OUT`` with ``nproc`` > 1, or a child of the
fork server; it carries the replica token) calls :func:`launch_replica`: it imports torch once and forks
one process per rank (a fresh interpreter per rank would cost a torch import each, as ``torchrun``'s
agent does plus its own); every rank gets
the variables ``torch.distributed.run``'s local agent sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, ROLE_RANK, MASTER_ADDR, MASTER_PORT on a free port, TORCHELASTIC_*), so
``init_process_group()`` (env://) works unchanged; then it runs the ordinary replica code (seeding,
probes, tracer) and writes ``OUT/rank-K/{weights.pt,trace.pt,meta.json}`` plus ``ddp.json`` (the
cross-rank evidence: DataLoader shards, RNG states, whether DDP was used).

This process watches its ranks: when one fails, the others get a short grace and are then killed
with their trees (a peer left alone waits in a collective for gloo's 30-minute timeout), and
``OUT/error.json`` names the rank that failed first. ``OUT/ranks.json`` says how each rank ended.

That is ``ddp_launcher="fork"``, the default; ``"torchrun"`` (``distributed_torchrun``) starts the
same ranks (:func:`rank_main`) through torchrun's own agent instead and ends in the same files
(:func:`write_outcome`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import mmap
import socket
import struct
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

RANK_DIR = "rank-{}"
EVIDENCE_FILE = "ddp.json"
RANKS_FILE = "ranks.json"
PROGRESS_FILE = "progress.bin"  # per rank two int64: optimizer steps taken, DDP forwards begun (shared memory)
PROGRESS = struct.Struct("<qq")
GRACE_S = 3.0  # after the first failing rank, the others' time to end on their own before they are killed
_ENTROPY_STRIDE = 104_729  # program seeding: each rank's entropy differs from every other rank's and replica's


def rank_environment(rank: int, nproc: int, port: int, run_id: str) -> dict:
    """The variables torch.distributed.run's local elastic agent gives worker ``rank`` of one node."""
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun does with more than one process per node (set in the rank too)
    return env


def free_port() -> int:
    """A port nobody listens on now (rank 0 binds it for the rendezvous store moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what a rank leaves for the cross-rank checks (ddp.json) -------------------------------------------

@dataclass
class LoaderShard:
    """One DataLoader iterator of one rank: which indices it yielded and what its first batch held."""

    sampler: str  # the sampler's class name (DistributedSampler shards; RandomSampler does not)
    index_hash: str  # a running hash of every index it yielded
    first_batch: Optional[str]  # a hash of its first batch's content
    batches: int
    training: bool  # optimizer steps were taken while it was iterated


@dataclass
class RankEvidence:
    rank: int
    ddp_modules: int  # DistributedDataParallel wrappers the rank built
    loaders: list = field(default_factory=list)  # [LoaderShard], in creation order
    rng_at_end: dict = field(default_factory=dict)  # probes.rng_fingerprints() after the program

    def to_plain(self) -> dict:
        return {**dataclasses.asdict(self)}

    @classmethod
    def from_plain(cls, d: dict) -> "RankEvidence":
        return cls(rank=d["rank"], ddp_modules=d["ddp_modules"],
                   loaders=[LoaderShard(**x) for x in d["loaders"]], rng_at_end=dict(d["rng_at_end"]))


# -- rank side ----------------------------------------------------------------------------------------

class ShardProbe:
    """Per DataLoader iterator of one rank: the indices it yielded (a running hash), a fingerprint of its
    first batch's content, and the optimizer steps taken while it was iterated (a training loader
    advances them; an evaluation loop does not)."""

    def __init__(self, progress: Optional[mmap.mmap] = None, rank: int = 0) -> None:
        self.iterators: list[dict] = []
        self.steps = 0
        self.forwards = 0
        self.ddp_modules = 0
        self._progress, self._rank = progress, rank  # what the parent reads when the replica hangs
        self._restore: list[tuple[Any, str, Any]] = []
        self._hook = None

    def install(self) -> "ShardProbe":
        from torch.nn.parallel import DistributedDataParallel
        from torch.optim import optimizer as optim_module
        from torch.utils.data import dataloader as dl

        probe, base = self, dl._BaseDataLoaderIter
        init, next_index, next_ = base.__init__, base._next_index, base.__next__
        ddp_init, ddp_forward = DistributedDataParallel.__init__, DistributedDataParallel.forward

        def wrapped_init(self_, loader, *args, **kwargs):
            init(self_, loader, *args, **kwargs)
            self_._mlrepro_shard = {"sampler": type(getattr(loader, "sampler", None)).__name__,
                                    "index_hash": hashlib.sha256(), "batches": 0, "first_batch": None,
                                    "steps_at_first": None, "steps_at_last": None}
            probe.iterators.append(self_._mlrepro_shard)

        def wrapped_next_index(self_):
            index = next_index(self_)
            record = getattr(self_, "_mlrepro_shard", None)
            if record is not None:
                record["index_hash"].update(repr(index).encode())
            return index

        def wrapped_next(self_):
            batch = next_(self_)
            record = getattr(self_, "_mlrepro_shard", None)
            if record is not None:
                if record["first_batch"] is None:
                    record["first_batch"] = batch_fingerprint(batch)
                    record["steps_at_first"] = probe.steps
                record["batches"] += 1
                record["steps_at_last"] = probe.steps
            return batch

        def wrapped_ddp_init(self_, *args, **kwargs):
            ddp_init(self_, *args, **kwargs)
            probe.ddp_modules += 1

        def wrapped_ddp_forward(self_, *args, **kwargs):
            probe.forwards += 1
            probe._publish()
            return ddp_forward(self_, *args, **kwargs)

        base.__init__, base._next_index, base.__next__ = wrapped_init, wrapped_next_index, wrapped_next
        DistributedDataParallel.__init__, DistributedDataParallel.forward = wrapped_ddp_init, wrapped_ddp_forward
        self._restore = [(base, "__init__", init), (base, "_next_index", next_index), (base, "__next__", next_),
                         (DistributedDataParallel, "__init__", ddp_init),
                         (DistributedDataParallel, "forward", ddp_forward)]
        self._hook = optim_module.register_optimizer_step_post_hook(self._count)
        return self

    def _count(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self._publish()

    def _publish(self) -> None:
        if self._progress is not None:
            PROGRESS.pack_into(self._progress, PROGRESS.size * self._rank, self.steps, self.forwards)

    def uninstall(self) -> None:
        while self._restore:
            owner, attr, original = self._restore.pop()
            setattr(owner, attr, original)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def shards(self) -> list[LoaderShard]:
        # training: optimizer steps were taken between its first and its last batch (an epoch's loader)
        return [LoaderShard(sampler=r["sampler"], index_hash=r["index_hash"].hexdigest()[:16], first_batch=r["first_batch"],
                            batches=r["batches"], training=r["steps_at_last"] is not None
                            and r["steps_at_last"] > r["steps_at_first"]) for r in self.iterators]


def batch_fingerprint(batch: Any) -> str:
    """A short hash of every tensor (and number) in a batch, in order: equal only for equal content."""
    import torch
    from torch.utils._pytree import tree_leaves

    h = hashlib.sha256()
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def run_rank(spec: Any, out_dir: Path, rank: int, progress: Optional[mmap.mmap] = None) -> bool:
    """Rank ``rank``'s replica: the replica code with this rank's entropy, device and folder."""
    from . import probes
    from .replica import run_replica

    spec = dataclasses.replace(spec, entropy=(spec.entropy + rank * _ENTROPY_STRIDE) % 2**63)
    if spec.device == "cuda":
        import torch

        torch.cuda.set_device(rank)  # LOCAL_RANK: one device per rank, as every DDP program expects
    rank_dir = out_dir / RANK_DIR.format(rank)
    shards = ShardProbe(progress, rank).install()
    try:
        ok = run_replica(spec, rank_dir)
    finally:
        shards.uninstall()
    from .atomic import atomic_write_text

    evidence = RankEvidence(rank=rank, ddp_modules=shards.ddp_modules,
                            loaders=shards.shards(),
                            rng_at_end=probes.rng_fingerprints())
    atomic_write_text(rank_dir / EVIDENCE_FILE, json.dumps(evidence.to_plain()), fsync=False)
    return ok


def rank_main(spec: Any, out_dir: Path, rank: int, env: dict, progress: Optional[mmap.mmap]) -> int:
    """A rank's process, forked by :func:`launch` (``env``: torchrun's variables) or a worker torchrun's
    agent started (``env`` empty: the agent set them): its group and guard, then :func:`run_rank`; the
    exit status (0 ok, 1 the program failed, 3 the harness did)."""
    from .process_tree import guard_replica

    from .process_tree import TOKEN_ENV

    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # torch is imported already: the variable alone would come too late
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if os.getpgid(0) != os.getpid():  # torchrun's agent starts each worker in a session of its own already
        os.setpgid(0, 0)  # its own group: this rank's tree can be told from its peers'
    # subreaper, dies with the launcher, sweeps what it started at its end: its descendants and group
    # only, not every holder of the replica token (the launcher and the peer ranks hold it too)
    token = os.environ.pop(TOKEN_ENV, None)
    try:
        guard_replica()
    finally:
        if token is not None:
            os.environ[TOKEN_ENV] = token  # what the rank starts still carries it: the runner's sweep finds it
    try:
        return 0 if run_rank(spec, out_dir, rank, progress) else 1
    except BaseException:
        d = out_dir / RANK_DIR.format(rank)
        d.mkdir(parents=True, exist_ok=True)
        (d / "error.json").write_text(json.dumps({"type": "HarnessError", "message": f"rank {rank}'s harness failed",
                                                  "traceback": traceback.format_exc()}))
        return 3


# -- launcher side ------------------------------------------------------------------------------------

def _fork_rank(spec: Any, out_dir: Path, rank: int, env: dict, progress: Optional[mmap.mmap]) -> int:
    pid = os.fork()
    if pid == 0:  # the rank: never return into the launcher's code
        code = 1
        try:
            code = rank_main(spec, out_dir, rank, env, progress)
        finally:
            try:
                import atexit

                atexit._run_exitfuncs()  # as a rank's own interpreter would at its end (the sweep of its tree last)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def _status(code: int) -> dict:
    if os.WIFSIGNALED(code):
        from .process_tree import signal_name

        return {"status": "signal", "signal": signal_name(os.WTERMSIG(code))}
    exit_code = os.WEXITSTATUS(code) if os.WIFEXITED(code) else code
    return {"status": "ok" if exit_code == 0 else "failed", "exit_code": exit_code}


def progress_map(path: Path, nproc: int, *, create: bool = True) -> mmap.mmap:
    """Shared memory the ranks write their progress into (inherited through the fork, or opened by path
    with ``create=False`` in a rank torchrun started); a file, so the parent can read it after this
    process was killed at a timeout."""
    with open(path, "w+b" if create else "r+b") as f:
        if create:
            f.truncate(PROGRESS.size * nproc)
        return mmap.mmap(f.fileno(), PROGRESS.size * nproc)


def read_progress(out_dir: Path, nproc: int) -> Optional[list]:
    """[(steps, DDP forwards begun)] per rank, or None when the ranks never started."""
    try:
        data = (Path(out_dir) / PROGRESS_FILE).read_bytes()
    except OSError:
        return None
    if len(data) < PROGRESS.size * nproc:
        return None
    return [PROGRESS.unpack_from(data, PROGRESS.size * k) for k in range(nproc)]


def _preload() -> None:
    """Import, once and before the fork, what every rank imports anyway: the ranks share it."""
    import importlib

    for name in ("torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel", "torch.utils.data", "numpy",
                 "pytest_mlrepro.replica", "pytest_mlrepro.trace", "pytest_mlrepro.compare", "pytest_mlrepro.probes",
                 "pytest_mlrepro.context", "pytest_mlrepro.environment", "pytest_mlrepro.seeding"):
        try:
            importlib.import_module(name)
        except ImportError:  # a rank reports what it cannot import itself
            pass


def launch(spec: Any, out_dir: Path) -> int:
    """Start every rank, wait for them all, write ranks.json (and error.json naming the first failing rank)."""
    _preload()
    from .process_tree import kill_tree

    nproc = spec.config.nproc
    port, run_id = free_port(), uuid.uuid4().hex[:12]
    progress = progress_map(out_dir / PROGRESS_FILE, nproc)
    pids = {_fork_rank(spec, out_dir, r, rank_environment(r, nproc, port, run_id), progress): r for r in range(nproc)}
    ended: dict[int, dict] = {}
    order: list[int] = []  # ranks in the order they were seen to fail
    deadline: Optional[float] = None
    while len(ended) < nproc:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for p, r in pids.items():
                    if r not in ended:
                        kill_tree(p, None)
                        ended[r] = {"status": "stopped", "at_ns": time.time_ns(),
                                    "reason": f"still running {GRACE_S:g}s after rank {order[0]} failed"}
                deadline = None
            time.sleep(0.01)
            continue
        rank = pids.get(pid)
        if rank is None or rank in ended:
            continue
        ended[rank] = {**_status(code), "at_ns": time.time_ns()}
        if ended[rank]["status"] != "ok":
            order.append(rank)
            deadline = deadline or time.monotonic() + GRACE_S
    for p, r in pids.items():  # reap what was killed
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass
    ranks = [{"rank": r, **ended[r]} for r in range(nproc)]
    return write_outcome(out_dir, ranks, order, launcher="fork", master_port=port)


def write_outcome(out_dir: Path, ranks: list[dict], order: list[int], **how: Any) -> int:
    """ranks.json (how each rank ended, ``how`` they were started) and, when a rank
    failed, error.json naming the first; the launcher's exit status (0, or 1: a rank failed)."""
    from .atomic import atomic_write_text

    atomic_write_text(out_dir / RANKS_FILE, json.dumps({"nproc": len(ranks), **how, "ranks": ranks,
                                                        "failed_order": order}), fsync=False)
    if not order:
        return 0
    atomic_write_text(out_dir / "error.json", json.dumps(rank_failure(out_dir, ranks, order)), fsync=False)
    return 1


def rank_failure(out_dir: Path, ranks: list[dict], order: list[int]) -> dict:
    """error.json for a DDP replica: the rank that failed first (the earliest error report; without one,
    the first seen to end), what it raised or the signal that killed it, and how the others ended."""
    def report(rank: int) -> Optional[dict]:
        path = out_dir / RANK_DIR.format(rank) / "error.json"
        try:
            return {**json.loads(path.read_text()), "_at": path.stat().st_mtime_ns}
        except (OSError, ValueError):
            return None

    reports = {r: report(r) for r in order}
    # when each failed: its report was written before it exited; a rank killed by a signal has none
    failed_at = {r: min(ranks[r]["at_ns"], reports[r]["_at"] if reports[r] else ranks[r]["at_ns"]) for r in order}
    first = min(order, key=lambda r: (failed_at[r], r))
    rep, end = reports.get(first), ranks[first]
    if rep is not None:
        what = f"{rep['type']}: {rep['message']}"
        tb = rep.get("traceback", "")
    elif end["status"] == "signal":
        what = f"killed by signal {end['signal']}"
        tb = _tail(out_dir / "stderr.txt")
    else:
        what = f"exited with status {end.get('exit_code')} without a report"
        tb = _tail(out_dir / "stderr.txt")
    others = [f"rank {e['rank']} {_ended(e)}" for e in ranks if e["rank"] != first]
    return {"type": "RankFailed", "rank": first, "rank_error": rep["type"] if rep is not None else None,
            "message": f"rank {first} failed first: {what} ({'; '.join(others)})", "traceback": tb}


def _ended(e: dict) -> str:
    if e["status"] == "ok":
        return "finished"
    if e["status"] == "signal":
        return f"was killed by {e['signal']}"
    if e["status"] == "stopped":
        return f"was killed ({e['reason']})"
    return f"failed (exit status {e['exit_code']})"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def launch_replica(spec: Any, out_dir: Path, start: Callable[[Any, Path], int] = launch,
                   name: str = "the DDP launcher") -> int:
    """The replica process's part (``python -m pytest_mlrepro.replica`` with ``nproc`` > 1, guarded there):
    start the ranks with ``start`` (this module's :func:`launch`, or torchrun's), wait for them; the exit
    status the runner expects (0 ok, 1 a rank failed, 3 harness)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return start(spec, out_dir)
    except BaseException:
        (out_dir / "error.json").write_text(json.dumps({"type": "HarnessError", "message": f"{name} failed",
                                                        "traceback": traceback.format_exc()}))
        return 3
