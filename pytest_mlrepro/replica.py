"""One replica: seed, trace, run the target, and write what the parent compares into a folder.

Run as ``python -m pytest_mlrepro.replica SPEC OUT`` in a fresh interpreter (process isolation), or
called in-process through :func:`run_replica`. Writes ``weights.pt`` (tensors only, loadable with
``weights_only=True``), ``trace.pt`` and ``meta.json``; on failure ``error.json`` with the traceback.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import runpy
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import AuditConfig
from .targets import TargetSpec


@dataclass
class ReplicaSpec:
    """One replica's run: the audit's validated config (device and seeding resolved) plus what is
    particular to this run (its index and entropy, its folder, a replay or a dense re-trace)."""

    target: TargetSpec
    index: int
    config: AuditConfig
    workdir: str
    replay_step: Optional[int] = None
    entropy: int = 0
    cwd: Optional[str] = None  # working directory of the replica; None: its private workdir
    trace_every: Any = 1  # record the trace after every k-th optimizer step, or "auto" (1 for a dense re-trace)
    stop_after: Optional[int] = None  # a dense re-trace: end the program after this step
    controls: frozenset = frozenset()  # a diagnosis rerun: sources made identical from outside (controls.py)
    perturb: frozenset = frozenset()  # an invariance replica: the axis changed in it (controls.PERTURBATIONS)
    cuda_devices: tuple = ()  # its CUDA_VISIBLE_DEVICES entries (a device group of devices.plan); (): this process's

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def seeding(self) -> str:
        return self.config.seeding

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def deterministic(self) -> bool:
        return self.config.deterministic

    @property
    def args(self) -> tuple:
        return self.config.args

    @property
    def kwargs(self) -> dict:
        return self.config.kwargs


def _write_json(path: Path, obj: Any) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, default=str), fsync=False)


def _is_library_file(path: Optional[str]) -> bool:
    if not path:
        return True
    return os.path.abspath(path).startswith(_library_roots())


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple:
    """The interpreter's library folders (``sysconfig.get_paths`` costs about a millisecond a call, and an
    in-process replica that imported torch._dynamo asks once per new module: hundreds of times)."""
    import sysconfig

    return tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                  for k in ("stdlib", "platstdlib", "purelib", "platlib")})


class _Restore:
    """Saves the global state an in-process replica may change and puts it back: RNGs, deterministic
    flags, default dtype, thread counts, argv, cwd, environment, sys.path, and the user modules it
    imported (so the next replica runs their module-level code afresh, as a fresh process would)."""

    def __enter__(self):
        import random

        import numpy as np
        import torch

        self.dtype = torch.get_default_dtype()
        self.threads = torch.get_num_threads()
        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.modules = set(sys.modules)

        self.py = random.getstate()
        self.np = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        self.cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        self.argv = list(sys.argv)
        self.cwd = os.getcwd()
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np
        import torch

        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.use_deterministic_algorithms(self.det[0], warn_only=self.det[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self.cudnn
        sys.argv = self.argv
        os.chdir(self.cwd)
        torch.set_default_dtype(self.dtype)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        os.environ.clear()
        os.environ.update(self.environ)
        sys.path[:] = self.path
        for name in set(sys.modules) - self.modules:
            module = sys.modules.get(name)
            if name.startswith("_mlrepro_target_") or not _is_library_file(getattr(module, "__file__", None)):
                if not name.startswith("pytest_mlrepro"):
                    del sys.modules[name]
        return False


def run_replica(spec: ReplicaSpec, out_dir: Path, *, in_process: bool = False) -> bool:
    """Run one replica and write its outputs into out_dir. Returns True on success."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    if in_process:
        with _Restore():
            os.chdir(spec.cwd or spec.workdir)
            return _run(spec, out_dir)
    return _run(spec, out_dir)


def _run(spec: ReplicaSpec, out_dir: Path) -> bool:
    import torch

    from . import controls, environment, seeding
    from .compare import flatten_state
    from .context import ReplicaContext
    from .observe import META_KEY as OBSERVED_KEY
    from .observe.probe import CallbackProbe
    from .probes import DataLoaderProbe, NondeterministicOpProbe, SeedProbe
    from .progress import StepsWriter
    from .targets import load_function, wants_ctx
    from .trace import ReplayDone, Tracer

    if spec.seeding == "harness":
        seeding.seed_everything(spec.seed)
    else:
        seeding.scramble_globals(spec.entropy)
    seeding.apply_deterministic_settings(spec.deterministic)
    undo_controls = controls.apply(spec.controls, spec.seed, spec.perturb)  # before the program, after the seeding
    ctx = ReplicaContext(seed=spec.seed, device=spec.device, workdir=Path(spec.workdir), replica=spec.index)
    seeds, loaders, ops = SeedProbe(), DataLoaderProbe(), NondeterministicOpProbe()
    callbacks = CallbackProbe()  # framework checkpoint / early-stopping callbacks, observed (observe/)
    tracer = Tracer(replay_step=spec.replay_step, every=spec.trace_every, stop_after=spec.stop_after)
    returned: Any = None
    error: Optional[dict] = None
    start = time.perf_counter()
    installed: list = []
    try:  # a probe that cannot install is the harness's failure: undo what is in place (in-process too)
        for probe in (seeds, loaders, ops, tracer, callbacks):
            probe.install()
            installed.append(probe)
    except BaseException:
        for probe in reversed(installed):
            probe.uninstall()
        undo_controls()
        raise
    steps_so_far = StepsWriter(out_dir, lambda: tracer.steps).start()  # the parent's progress lines read it
    from .forkserver import program_starts

    program_starts()  # in a fork server's child: watch thread variables set before the program imports torch
    try:
        try:
            if spec.target.kind == "script":
                sys.argv = [spec.target.path, *map(str, spec.args)]
                sys.path.insert(0, os.path.dirname(spec.target.path))  # as `python script.py` does
                runpy.run_path(spec.target.path, run_name="__main__")
            else:
                fn = load_function(spec.target)
                kwargs = dict(spec.kwargs)
                if wants_ctx(fn) and "ctx" not in kwargs:
                    kwargs["ctx"] = ctx
                returned = fn(*spec.args, **kwargs)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise RuntimeError(f"{spec.target.display} exited with status {exc.code}") from exc
    except ReplayDone:
        pass
    except BaseException as exc:  # the target's failure is data for the parent, not a crash here
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    finally:
        steps_so_far.stop()
        for probe in (callbacks, tracer, ops, loaders, seeds):
            probe.uninstall()
        undo_controls()
    wall = time.perf_counter() - start
    if error is None and spec.replay_step is None and spec.stop_after is None:
        try:
            if returned is None:
                if tracer.steps == 0:
                    raise ValueError(
                        f"target {spec.target.display} returned nothing and no training step was observed (no "
                        "optimizer stepped and no module's parameters changed between its forward calls): "
                        "return an nn.Module, a state dict or a dict of tensors"
                    )
                weights = tracer.final_state()
                compared = "final_state"
            else:
                weights = flatten_state(returned)
                compared = "returned"
                if not any(isinstance(v, torch.Tensor) for v in weights.values()):
                    raise ValueError(
                        f"target {spec.target.display} returned {type(returned).__name__}, which holds no tensors: "
                        "return an nn.Module, a state dict, a dict of tensors, or nothing"
                    )
            weights = {k: _storable(v) for k, v in weights.items()}
            tmp = out_dir / "weights.pt.tmp"
            torch.save(weights, tmp)
            os.replace(tmp, out_dir / "weights.pt")
        except Exception as exc:
            error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
            compared = None
    else:
        compared = None
    trace = tracer.to_record()
    tmp = out_dir / "trace.pt.tmp"
    torch.save(trace, tmp)
    os.replace(tmp, out_dir / "trace.pt")
    meta = {
        "index": spec.index,
        "wall_time_s": wall,
        "steps": tracer.steps,
        "compared": compared,
        "seeding": {"mode": spec.seeding, "seed": spec.seed, "calls": seeds.calls, "seeded": sorted(seeds.seeded_generators())},
        "dataloaders": loaders.to_list(),
        "nondeterministic_ops": ops.to_list(),
        "metrics": ctx.metrics,
        "metric_problems": ctx.metric_problems,  # values ctx.log could not keep (the audit's training.metrics finding)
        "metric_problem_count": ctx.metric_problem_count,
        OBSERVED_KEY: callbacks.to_dict(),  # the audit's framework.* findings
        "environment": environment.collect(spec.device),
    }
    _write_json(out_dir / "meta.json", meta)
    if error is not None:
        _write_json(out_dir / "error.json", error)
        return False
    return True


def _storable(value: Any) -> Any:
    """A leaf the parent can load with ``weights_only=True``: tensors (numpy arrays become tensors),
    plain numbers, strings, booleans, None; anything else is kept as its repr."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return _storable_tensor(value.detach())
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _storable_tensor(t: Any) -> Any:
    """``t`` on the CPU, copied only when it must be: another device, or a view into a larger storage
    (which torch.save would write whole). Saving the trained tensors themselves keeps a replica's peak
    memory at the training's (a clone of every tensor would add a second copy of the weights)."""
    import torch

    if t.device.type != "cpu":
        return t.cpu()
    if t.layout == torch.strided and not t.is_quantized and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


AS_PROCESS = False  # True in a replica process (a new interpreter or a fork server's child), once main() runs


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    from .process_tree import guard_replica

    global AS_PROCESS
    AS_PROCESS = True

    # die with the parent (taking the tree along) and kill what the target leaves running at the end
    guard_replica()
    if sys.stderr is not None:
        faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT...) leaves the Python stack in stderr.txt
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_dir = Path(argv[0]), Path(argv[1])
    with open(spec_path, "rb") as f:
        spec: ReplicaSpec = pickle.load(f)
    if spec.config.nproc > 1:  # a DDP replica: this process starts its ranks, each runs run_replica
        if spec.config.ddp_launcher == "torchrun":
            from .distributed_torchrun import launch_replica
        else:
            from .distributed_rank import launch_replica

        return launch_replica(spec, out_dir)
    try:
        ok = run_replica(spec, out_dir)
    except BaseException:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "error.json", {"type": "HarnessError", "message": "the replica harness failed", "traceback": traceback.format_exc()})
        return 3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
