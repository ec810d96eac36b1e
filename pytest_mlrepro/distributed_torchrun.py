"""DDP replicas started by torchrun itself (``ddp_launcher="torchrun"``): its agent starts the ranks.

The replica process (``python -m pytest_mlrepro.replica`` with ``nproc`` > 1, guarded there) becomes
torchrun's agent: it runs ``torch.distributed.run``'s own ``parse_args`` and ``run`` on the arguments
of ``torchrun --nnodes 1 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0
--max-restarts 0 -m pytest_mlrepro.distributed_torchrun SPEC OUT``. That is what ``python -m
torch.distributed.run`` with those arguments does, run in this interpreter instead of a new one, so
the workers that failed come back as records (``ChildFailedError.failures``: each one's exit status
or signal) rather than as text to parse.

- Rendezvous: the c10d store the agent hosts, on a port the kernel picks when the agent binds it
  (``:0``, as ``--standalone`` does, but on 127.0.0.1 and always hosted here: no other replica can
  take the port first, as it could take one picked in advance). The workers get its address as
  MASTER_ADDR / MASTER_PORT.
- Every worker is a fresh interpreter running :func:`worker_main`. It reads RANK and WORLD_SIZE
  from torchrun's environment and runs ``distributed_rank.rank_main``, so it leaves the same
  ``OUT/rank-K/`` files, progress map and ``ddp.json`` as a forked rank.
- A worker inherits the agent's environment, the replica token included. At a timeout or an
  interrupt, the runner's sweep finds the agent and every worker. When the agent dies, each
  worker's guard kills the worker's own children.
- When a worker fails, the agent stops the others (SIGTERM, then SIGKILL after ``GRACE_S``).
  :func:`rank_ends` tells the ranks that failed from the ranks the agent stopped, and ranks.json /
  error.json are written as the fork launcher writes them (``distributed_rank.write_outcome``).
"""
from __future__ import annotations

import math
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed_rank import GRACE_S, PROGRESS_FILE, RANK_DIR, progress_map, rank_main, write_outcome

WORKER_MODULE = "pytest_mlrepro.distributed_torchrun"
SPEC_FILE = "ranks-spec.pkl"  # the spec every worker loads
LOG_DIR = "torchrun"  # torchrun's --log-dir (its per-attempt folders), inside the replica's folder
RENDEZVOUS = "127.0.0.1:0"
STOP_SIGNALS = ("SIGTERM", "SIGKILL")  # how the agent ends the workers still running after a failure


@dataclass
class WorkerExit:
    """A worker torchrun's agent saw end badly (one of its ``ProcessFailure``\\ s)."""

    rank: int
    exitcode: int  # < 0: killed by signal -exitcode
    at_s: float  # when the agent saw it, in whole seconds (its failure timestamp)

    @property
    def signal(self) -> str:
        from .process_tree import signal_name

        return signal_name(-self.exitcode) if self.exitcode < 0 else ""


def torchrun_arguments(nproc: int, run_id: str, spec_path: Path, out_dir: Path) -> list[str]:
    """torchrun's command line for one replica's ranks (what follows ``python -m torch.distributed.run``)."""
    return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", RENDEZVOUS,
            "--rdzv-conf", "is_host=1", "--rdzv-id", run_id, "--max-restarts", "0",
            "--local-addr", "127.0.0.1",  # one node: MASTER_ADDR need not be the host's name (which may not resolve)
            "--shutdown-timeout", str(math.ceil(GRACE_S)), "--log-dir", str(out_dir / LOG_DIR),
            "-m", WORKER_MODULE, str(spec_path), str(out_dir)]


def launch(spec: Any, out_dir: Path) -> int:
    """Run the ranks under torchrun's agent, in this process; write ranks.json (and error.json naming
    the first failing rank) as the fork launcher does."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    nproc, out_dir = spec.config.nproc, Path(out_dir).resolve()
    spec_path = out_dir / SPEC_FILE
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)
    progress_map(out_dir / PROGRESS_FILE, nproc).close()  # each worker maps it by path
    run_id = uuid.uuid4().hex[:12]
    exits: dict[int, WorkerExit] = {}
    try:
        torchrun.run(torchrun.parse_args(torchrun_arguments(nproc, run_id, spec_path, out_dir)))
    except ChildFailedError as exc:
        exits = {rank: WorkerExit(rank, f.exitcode, float(f.timestamp)) for rank, f in exc.failures.items()}
    ranks, order = rank_ends(out_dir, nproc, exits, time.time_ns())
    return write_outcome(out_dir, ranks, order, launcher="torchrun", rdzv_endpoint=RENDEZVOUS, run_id=run_id)


def rank_ends(out_dir: Path, nproc: int, exits: dict[int, WorkerExit], ended_ns: int) -> tuple[list[dict], list[int]]:
    """How each rank ended (ranks.json's entries) and the ranks that failed, in the order they failed.

    The agent reports every worker that did not exit 0, those it stopped included. A rank failed on
    its own when it left an error report (rank-K/error.json, which also tells when) or ended in a way
    the agent does not stop workers with (an exit status, or a signal like SIGSEGV). A rank ended by
    SIGTERM / SIGKILL without a report was stopped by the agent, if some other rank failed on its own.
    If none did (an OOM kill, say), those ranks are the failures, timed by the agent's timestamps."""
    reported = {r: t for r in exits if (t := _report_time(Path(out_dir) / RANK_DIR.format(r) / "error.json"))}

    def on_its_own(e: WorkerExit) -> bool:
        return e.rank in reported or e.signal not in STOP_SIGNALS

    some_on_their_own = any(on_its_own(e) for e in exits.values())
    ranks, failed = [], []
    for r in range(nproc):
        e = exits.get(r)
        if e is None:
            ranks.append({"rank": r, "status": "ok", "exit_code": 0, "at_ns": ended_ns})
        elif some_on_their_own and not on_its_own(e):
            ranks.append({"rank": r, "status": "stopped", "at_ns": ended_ns,
                          "reason": f"by torchrun's agent, {e.signal}, once another rank had failed"})
        else:
            how = {"status": "signal", "signal": e.signal} if e.exitcode < 0 else {"status": "failed",
                                                                                    "exit_code": e.exitcode}
            # the report's time when there is one: finer than the agent's whole second
            ranks.append({"rank": r, **how, "at_ns": reported.get(r, int(e.at_s * 1e9))})
            failed.append(r)
    return ranks, sorted(failed, key=lambda r: (ranks[r]["at_ns"], r))


def _report_time(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def launch_replica(spec: Any, out_dir: Path) -> int:
    """The replica process's part with ``ddp_launcher="torchrun"`` (see ``distributed_rank.launch_replica``)."""
    from .distributed_rank import launch_replica as guarded

    return guarded(spec, out_dir, launch, "torchrun's launcher")


# -- worker side ------------------------------------------------------------------------------------

def worker_main(argv: list[str] | None = None) -> int:
    """A worker torchrun started (``python -m pytest_mlrepro.distributed_torchrun SPEC OUT``): rank RANK."""
    import faulthandler

    from . import replica

    replica.AS_PROCESS = True  # a replica process (a spec's __setstate__ may depend on it)
    if sys.stderr is not None:
        faulthandler.enable()  # a native crash leaves the Python stack in the replica's stderr.txt
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_dir = Path(argv[0]), Path(argv[1])
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.config.nproc:
        raise RuntimeError(f"torchrun started {world} workers for nproc={spec.config.nproc}")
    return rank_main(spec, out_dir, rank, {}, progress_map(out_dir / PROGRESS_FILE, world, create=False))


if __name__ == "__main__":
    sys.exit(worker_main())
