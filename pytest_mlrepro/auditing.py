"""``audit()``: run a seeded training several times and say whether, and where, the weights differ."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import causes, environment, localize
from .errors import MlreproError, ReplicaError, TargetError
from .replica import ReplicaSpec
from .result import AuditError, AuditResult, Divergence, NondeterministicOp, ReplicaSummary
from .runner import ISOLATION_MODES, ReplicaOutput, run
from .seeding import SEEDING_MODES, replica_entropy, replica_hash_seed
from .targets import TargetSpec, resolve

DEVICES = ("auto", "cpu", "cuda")
COMPARE_MODES = ("bitwise", "tolerance", "ulp")


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MlreproError("device='cuda' was asked for, but torch sees no CUDA device (torch "
                           f"{torch.__version__}, built with CUDA {torch.version.cuda})")
    return device


def _validate(runs: int, isolation: str, seeding: Optional[str], mode: str, atol: float, rtol: float, max_ulp: int,
              timeout: Optional[float], seed: int) -> None:
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 2:
        raise ValueError(f"runs must be an integer >= 2, got {runs!r}")
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if seeding is not None and seeding not in SEEDING_MODES:
        raise ValueError(f"seeding must be one of {SEEDING_MODES} or None, got {seeding!r}")
    if mode not in COMPARE_MODES:
        raise ValueError(f"mode must be one of {COMPARE_MODES}, got {mode!r}")
    if atol < 0 or rtol < 0 or max_ulp < 0:
        raise ValueError("atol, rtol and max_ulp must be >= 0")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def audit(
    target: Union[str, os.PathLike, Callable],
    *,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    seed: int = 0,
    runs: int = 2,
    device: str = "auto",
    isolation: str = "process",
    timeout: Optional[float] = None,
    seeding: Optional[str] = None,
    deterministic: bool = True,
    mode: str = "bitwise",
    atol: float = 0.0,
    rtol: float = 0.0,
    max_ulp: int = 0,
    localize_divergence: bool = True,
    diagnose: bool = True,
    workdir: Optional[Union[str, os.PathLike]] = None,
    rootdir: Optional[Union[str, os.PathLike]] = None,
    checkpoint: Optional[Any] = None,
    cwd: str = "replica",
    trace_every: int = 1,
) -> AuditResult:
    """Run ``target`` ``runs`` times with the same seed and compare the final weights.

    ``seeding`` defaults to "harness" for functions and "program" for scripts. ``workdir`` holds each
    replica's outputs and working folder; when not given a temporary folder is used and removed.
    ``checkpoint`` (a ``CheckpointSpec`` or dict: path, evaluate, model_factory, tolerance) adds the
    best-checkpoint checks: reload + re-evaluate replica 0's best, and the same best in every replica.
    ``cwd``: "replica" runs each replica in its own private folder (``ctx.workdir``; nothing lands in
    your tree and replicas cannot overwrite each other's files), "rootdir" in ``rootdir`` (for
    programs that read data through relative paths; they must not write there in ways that collide).
    ``trace_every``: fingerprint the weights after every k-th optimizer step (1: every step). A
    larger k cuts the trace's cost by k; when replicas differ, a dense re-trace up to the first
    differing recorded step still finds the exact first divergent step.
    Bad arguments raise; a failing target gives a result whose ``error`` says why.
    """
    _validate(runs, isolation, seeding, mode, atol, rtol, max_ulp, timeout, seed)
    if not isinstance(trace_every, int) or isinstance(trace_every, bool) or trace_every < 1:
        raise ValueError(f"trace_every must be an integer >= 1, got {trace_every!r}")
    if cwd not in ("replica", "rootdir"):
        raise ValueError(f"cwd must be 'replica' or 'rootdir', got {cwd!r}")
    if checkpoint is not None:
        from .checkpoint_audit import CheckpointSpec

        checkpoint = CheckpointSpec.coerce(checkpoint)
        if cwd == "rootdir":
            raise ValueError("checkpoint checks need cwd='replica': with cwd='rootdir' every replica writes the "
                             "same checkpoint file, so their best checkpoints cannot be compared")
    spec = resolve(target, rootdir=rootdir)
    if spec.kind == "callable" and isolation == "process":
        raise TargetError(
            f"target {spec.display} cannot be run in a fresh process: it is not importable by reference (a lambda, "
            "a closure or a callable object). Define it at module level, pass 'file.py:function', or use "
            "isolation='inprocess'")
    device = resolve_device(device)
    seeding = seeding or spec.default_seeding
    comparison = {"mode": mode, "atol": atol, "rtol": rtol, "max_ulp": max_ulp}
    result = AuditResult(target=spec.display, seed=seed, runs=runs, device=device, isolation=isolation,
                         seeding=seeding, comparison=comparison, deterministic=False)
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mlrepro-")) if owned else Path(workdir).resolve()  # replicas run elsewhere
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        run = _Audit(spec, result, root, args=tuple(args), kwargs=dict(kwargs or {}), device=device, seeding=seeding,
                     deterministic=deterministic, timeout=timeout, isolation=isolation,
                     cwd=str(Path(rootdir or Path.cwd()).resolve()) if cwd == "rootdir" else None,
                     trace_every=trace_every)
        run.execute(localize_divergence=localize_divergence, diagnose=diagnose)
        if checkpoint is not None and result.error is None:
            from .checkpoint_audit import check_audit_checkpoint

            result.findings.extend(check_audit_checkpoint(
                checkpoint, [root / f"replica-{i}" / "work" for i in range(runs)],
                rootdir=Path(rootdir) if rootdir else Path.cwd(), deterministic=deterministic, timeout=timeout))
    finally:
        result.wall_time_s = time.perf_counter() - started
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    return result


class _Audit:
    """One audit's run: replicas, comparison, localization, diagnosis."""

    def __init__(self, spec: TargetSpec, result: AuditResult, root: Path, *, args, kwargs, device, seeding,
                 deterministic, timeout, isolation, cwd=None, trace_every=1):
        self.cwd, self.trace_every = cwd, trace_every
        self.spec, self.result, self.root = spec, result, root
        self.args, self.kwargs, self.device, self.seeding = args, kwargs, device, seeding
        self.deterministic, self.timeout, self.isolation = deterministic, timeout, isolation
        self.inherit_hash_seed = "PYTHONHASHSEED" in os.environ

    def _hash_seed(self, index: int, pinned: Optional[str] = None) -> Optional[str]:
        if self.isolation != "process" or self.inherit_hash_seed:
            return None
        return pinned or replica_hash_seed(self.result.seed, index)

    def _run(self, index: int, label: str, *, replay_step: Optional[int] = None, hash_seed: Optional[str] = None,
             dense_until: Optional[int] = None) -> ReplicaOutput:
        folder = self.root / f"{label}-{index}"
        spec = ReplicaSpec(target=self.spec, index=index, seed=self.result.seed, seeding=self.seeding, device=self.device,
                           deterministic=self.deterministic, workdir=str(folder / "work"), args=self.args,
                           kwargs=self.kwargs, replay_step=replay_step, cwd=self.cwd,
                           trace_every=1 if dense_until is not None else self.trace_every, stop_after=dense_until,
                           entropy=replica_entropy(self.result.seed, index))
        return run(spec, folder / "out", isolation=self.isolation, timeout=self.timeout,
                   hash_seed=hash_seed if hash_seed is not None else self._hash_seed(index))

    def execute(self, *, localize_divergence: bool, diagnose: bool) -> None:
        from .compare import compare_states

        r = self.result
        try:
            outputs = [self._run(i, "replica") for i in range(r.runs)]
        except ReplicaError as exc:
            r.error = AuditError(type=exc.kind, message=str(exc), replica=exc.replica, traceback=exc.traceback)
            return
        metas = [o.meta() for o in outputs]
        traces = [o.trace() for o in outputs]
        r.environment = metas[0]["environment"]
        r.replicas = [ReplicaSummary(index=m["index"], wall_time_s=m["wall_time_s"], steps=m["steps"],
                                     seeding={k: m["seeding"][k] for k in ("mode", "seed", "seeded")},
                                     metrics=m["metrics"], losses=t["losses"], environment=m["environment"])
                      for m, t in zip(metas, traces)]
        r.nondeterministic_ops = _merge_ops(metas)
        reference = outputs[0].weights()
        other = 1
        for i in range(1, r.runs):
            diffs = compare_states(reference, outputs[i].weights(), **r.comparison)
            if other == 1 or not all(d.equal for d in diffs):
                r.tensors, other = diffs, i
            if not all(d.equal for d in diffs):
                break
        r.compared = "weights"
        r.deterministic = all(d.equal for d in r.tensors)
        trace_div = localize.first_divergence(traces[0], traces[other])
        r.step_divergence = localize.step_divergence(traces[0], traces[other])
        if r.deterministic and trace_div is None:
            return
        if r.deterministic:
            # final weights equal within the comparison mode, but the trajectory differed bitwise on the way
            if r.comparison["mode"] == "bitwise":
                r.deterministic = False
            else:
                return
        r.first_divergence = self._describe(trace_div, traces, other, localize_divergence)
        if diagnose:
            r.cause = self._diagnose(metas, traces, other, r.first_divergence)

    def _describe(self, td, traces, other, localize_divergence) -> Divergence:
        if td is None:
            first = next((d for d in self.result.tensors if not d.equal), None)
            name = first.name if first else None
            return Divergence(step=None, tensor=name, tensors=[d.name for d in self.result.tensors if not d.equal],
                              phase="final", message=(f"every optimizer step matched, but the final `{name}` differs "
                                                      "(a buffer, or a change after the last step)"))
        if td.kind == "init":
            return localize.describe_init(td, traces[0])
        note = ""
        if td.kind == "step" and self.trace_every > 1:
            td, note = self._dense_retrace(td, other)
            if td.kind == "init":
                return localize.describe_init(td, traces[0])
        ra = rb = None
        if localize_divergence and td.kind == "step":
            try:
                ra = self._run(0, "replay", replay_step=td.step).trace()["replay"]
                rb = self._run(other, "replay", replay_step=td.step).trace()["replay"]
            except ReplicaError as exc:
                div = localize.describe_from_replay(td, traces[0], None, None)
                div.message += f" (the replay failed: {exc})"
                return div
        div = localize.describe_from_replay(td, traces[0], ra, rb)
        div.message += note
        return div

    def _dense_retrace(self, td, other):
        """The coarse trace says "somewhere after the last equal recorded step": re-run both replicas,
        tracing every step and stopping at the coarse step, to find the exact one."""
        try:
            a = self._run(0, "dense", dense_until=td.step).trace()
            b = self._run(other, "dense", dense_until=td.step).trace()
        except ReplicaError as exc:
            return td, f" (traced every {self.trace_every} steps; the dense re-trace failed: {exc})"
        exact = localize.first_divergence(a, b)
        if exact is None or exact.kind == "structure":
            return td, f" (traced every {self.trace_every} steps; the dense re-trace did not reproduce it)"
        return exact, ""

    def _diagnose(self, metas, traces, other, divergence):
        env_diff = environment.differences(metas[0]["environment"], metas[other]["environment"])
        rng_a, rng_b = traces[0].get("rng_at_first_step"), traces[other].get("rng_at_first_step")
        cause = causes.infer(metas[0], metas[other], divergence, env_diff, hash_seed_confirmed=None, rng_a=rng_a, rng_b=rng_b)
        if cause.kind in ("data_order", "unknown") and self._hash_seed(0) is not None and self._hash_seed(0) != self._hash_seed(other):
            if self._pinned_hash_seed_agrees(other):
                cause = causes.infer(metas[0], metas[other], divergence, env_diff, hash_seed_confirmed=True)
        return cause

    def _pinned_hash_seed_agrees(self, other: int) -> bool:
        """Experiment: rerun both replicas with one PYTHONHASHSEED; True if traces and weights then agree."""
        from .compare import compare_states

        pinned = self._hash_seed(0)
        try:
            a = self._run(0, "hashpin", hash_seed=pinned)
            b = self._run(other, "hashpin", hash_seed=pinned)
        except ReplicaError:
            return False
        if localize.first_divergence(a.trace(), b.trace()) is not None:
            return False
        return all(d.equal for d in compare_states(a.weights(), b.weights(), **self.result.comparison))


def _merge_ops(metas: list[dict]) -> list[NondeterministicOp]:
    merged: dict[tuple[str, str], int] = {}
    for m in metas:
        for op in m.get("nondeterministic_ops", []):
            key = (op["op"], op["call_site"])
            merged[key] = max(merged.get(key, 0), op["count"])
    return [NondeterministicOp(op=k[0], call_site=k[1], count=n) for k, n in merged.items()]
