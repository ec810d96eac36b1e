"""``audit()``: run a seeded training several times and say whether, and where, the weights differ."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import causes, controls, devices, environment, localize
from .config import AUDIT_OPTIONS, PROCESS_ISOLATIONS, AuditConfig
from .errors import ConfigError, MlreproError, ReplicaError, TargetError
from .replica import ReplicaSpec
from .result import AuditError, AuditResult, Divergence, NondeterministicOp, ReplicaSummary
from .runner import ReplicaOutput, run
from .seeding import replica_entropy, replica_hash_seed
from .process_tree import interrupt_on_signals
from .progress import track
from .targets import TargetSpec, resolve


def resolve_device(device: str) -> str:
    """The concrete device of an audit: "auto" becomes cuda when torch sees one, else cpu. Asked of the
    device probe (devices.inventory, a subprocess): ``torch.cuda.is_available()`` here would start the
    CUDA driver in the auditing process, which no later fork of it could then use."""
    if device not in ("auto", "cuda"):
        return device
    listed = devices.inventory()
    if device == "auto":
        return "cuda" if listed.devices else "cpu"
    if not listed.devices:
        import torch

        raise MlreproError("device='cuda' was asked for, but torch sees no CUDA device (torch "
                           f"{torch.__version__}, built with CUDA {torch.version.cuda}"
                           + (f"; {listed.error}" if listed.error else "") + ")")
    return device


def replica_slots(config: AuditConfig, runs: int) -> int:
    """How many replicas run at once (see :func:`parallel_plan`)."""
    return parallel_plan(config, runs).concurrent


def parallel_plan(config: AuditConfig, runs: int) -> devices.DevicePlan:
    """How replicas run at once, and why: one at a time in-process; on a GPU, with ``parallel="auto"``,
    one replica per visible device identical to device 0 (devices.plan); on the CPU, with
    ``parallel="auto"``, as many as the cores allow without oversubscribing (cores ÷ xdist workers ÷
    the training's intra-op threads ÷ ranks); an explicit ``parallel`` is the user's call."""
    if config.isolation not in PROCESS_ISOLATIONS:
        return devices.DevicePlan(1, f"isolation={config.isolation!r}: one at a time (replicas share this process)")
    if config.device == "cuda":
        return devices.plan(devices.inventory(), runs, config.nproc, config.parallel)
    if config.parallel != "auto":
        n = max(1, min(config.parallel, runs))
        return devices.DevicePlan(n, f"parallel={config.parallel}: {n} at once", capacity=n)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or 0) or _torch_threads())
    n = max(1, min(runs, cores // workers // (threads * config.nproc)))  # a DDP replica: nproc ranks
    ranks = f" × {config.nproc} ranks" if config.nproc > 1 else ""
    return devices.DevicePlan(n, f"{cores} cores ÷ {workers} xdist worker{'s' if workers > 1 else ''} ÷ {threads} "
                                 f"thread{'s' if threads > 1 else ''}{ranks}: {n} at once", capacity=n)


def diagnosis_width(config: AuditConfig) -> int:
    """Diagnosis rerun pairs run at once: as many as the cores allow (two replicas a pair), not capped
    by ``runs`` as the replicas are (two replicas would leave every other core idle)."""
    return max(1, replica_slots(config, 2 * len(controls.CONTROLS)) // 2)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def audit(
    target: Union[str, os.PathLike, Callable],
    config: Optional[AuditConfig] = None,
    *,
    workdir: Optional[Union[str, os.PathLike]] = None,
    rootdir: Optional[Union[str, os.PathLike]] = None,
    localize_divergence: bool = True,
    diagnose: bool = True,
    progress: Optional[Callable] = None,
    **overrides: Any,
) -> AuditResult:
    """Run ``target`` ``runs`` times with the same seed and compare the final weights.

    ``config`` (an :class:`~pytest_mlrepro.config.AuditConfig`) holds the settings; keyword
    ``overrides`` change single ones (``audit("train.py", seed=1, runs=3)``). Every value is checked
    before anything runs: a bad one raises :class:`~pytest_mlrepro.errors.ConfigError` (a ValueError).
    ``workdir`` holds each replica's outputs and working folder; when not given a temporary folder is
    used and removed. ``rootdir`` is where relative references resolve (default: the current folder).
    Bad targets raise; a failing target gives a result whose ``error`` says why. ``progress``, when given,
    is called with a :class:`~pytest_mlrepro.progress.ProgressEvent` as each replica or extra run
    (replay, dense re-trace, diagnosis rerun) starts, runs, finishes or fails. The options
    (see docs and :data:`pytest_mlrepro.config.OPTIONS`):
    """
    if config is not None and not isinstance(config, AuditConfig):
        raise ConfigError(f"config must be an AuditConfig, got {type(config).__name__}; pass single options as keywords")
    config = (config or AuditConfig()).merged(overrides)
    spec = resolve(target, rootdir=rootdir)
    if spec.kind == "callable" and config.isolation in PROCESS_ISOLATIONS:
        raise TargetError(
            f"target {spec.display} cannot be run in a fresh process: it is not importable by reference (a lambda, "
            "a closure or a callable object). Define it at module level, pass 'file.py:function', or use "
            "isolation='inprocess'")
    config = dataclasses.replace(config, device=resolve_device(config.device),
                                 seeding=config.seeding or spec.default_seeding)
    result = AuditResult(target=spec.display, seed=config.seed, runs=config.runs, device=config.device,
                         isolation=config.isolation, seeding=config.seeding, comparison=config.comparison,
                         deterministic=False, nproc=config.nproc)
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mlrepro-")) if owned else Path(workdir).resolve()  # replicas run elsewhere
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with interrupt_on_signals():  # SIGTERM between replicas too: stop, remove the owned folder
            _execute(spec, result, root, config, rootdir, localize_divergence, diagnose, progress)
    finally:
        result.wall_time_s = time.perf_counter() - started
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _execute(spec: TargetSpec, result: AuditResult, root: Path, config: AuditConfig, rootdir,
             localize_divergence: bool, diagnose: bool, progress: Optional[Callable] = None) -> None:
    """The replicas, their comparison and diagnosis, then the best-checkpoint checks."""
    run = _Audit(spec, result, root, config, progress=progress,
                 cwd=str(Path(rootdir or Path.cwd()).resolve()) if config.cwd == "rootdir" else None)
    run.execute(localize_divergence=localize_divergence, diagnose=diagnose)
    if config.nproc > 1 and result.error is None:
        from .distributed import review

        review(run, localize_divergence=localize_divergence)  # other ranks, the divergence's rank, cross-rank findings
    if config.invariant and result.error is None:
        from .invariance import invariance_findings

        result.findings.extend(invariance_findings(run, config.invariant))
    if config.checkpoint is not None and result.error is None:
        from .checkpoint.audit import check_audit_checkpoint

        result.findings.extend(check_audit_checkpoint(
            config.checkpoint, [root / f"replica-{i}" / "work" for i in range(config.runs)],
            rootdir=Path(rootdir) if rootdir else Path.cwd(), deterministic=config.deterministic,
            timeout=config.timeout))


audit.__doc__ += "".join(f"\n    - ``{o.name}`` (default {o.default!r}): {o.help}." for o in AUDIT_OPTIONS)


class _Audit:
    """One audit's run: replicas, comparison, localization, diagnosis."""

    def __init__(self, spec: TargetSpec, result: AuditResult, root: Path, config: AuditConfig, *,
                 cwd: Optional[str] = None, progress: Optional[Callable] = None):
        self.spec, self.result, self.root, self.config, self.cwd = spec, result, root, config, cwd
        self.progress = progress  # ProgressEvent callback (progress.track), or None
        self.trace_every, self.isolation = config.trace_every, config.isolation
        plan = parallel_plan(config, config.runs)
        self.slots, result.parallel, result.parallel_reason = plan.concurrent, plan.concurrent, plan.reason
        self.devices = devices.DevicePool(plan)  # every run (replica, replay, re-trace, rerun) leases its devices
        self.inherit_hash_seed = "PYTHONHASHSEED" in os.environ

    def _hash_seed(self, index: int, pinned: Optional[str] = None) -> Optional[str]:
        if self.isolation not in PROCESS_ISOLATIONS or self.inherit_hash_seed:
            return None
        return pinned or replica_hash_seed(self.result.seed, index)

    def _run(self, index: int, label: str, *, replay_step: Optional[int] = None, hash_seed: Optional[str] = None,
             dense_until: Optional[int] = None, controls: frozenset = frozenset(),
             perturb: frozenset = frozenset(), timeout: Optional[float] = None) -> ReplicaOutput:
        folder = self.root / f"{label}-{index}"
        with self.devices.lease() as group:  # held until the run ends: at most the plan's runs per device
            spec = ReplicaSpec(target=self.spec, index=index, config=self.config, workdir=str(folder / "work"),
                               replay_step=replay_step, cwd=self.cwd,
                               trace_every=1 if dense_until is not None else self.trace_every, stop_after=dense_until,
                               entropy=replica_entropy(self.result.seed, index), controls=controls, perturb=perturb,
                               cuda_devices=group)
            with track(self.progress, label, index, folder / "out"):
                return run(spec, folder / "out", isolation=self.isolation, timeout=timeout or self.config.timeout,
                           hash_seed=hash_seed if hash_seed is not None else self._hash_seed(index))

    def _run_all(self, calls: list) -> list:
        """``_run(index, label, **kw)`` for each call, up to ``slots`` at once (on a GPU each on a device
        group leased from ``devices``); outputs in call order (the first failing call's ReplicaError is
        raised once all have ended)."""
        if self.slots <= 1 or len(calls) <= 1:
            return [self._run(i, label, **kw) for i, label, kw in calls]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.slots, len(calls)), thread_name_prefix="mlrepro-replica") as pool:
            futures = [pool.submit(self._run, i, label, **kw) for i, label, kw in calls]
            return [f.result() for f in futures]

    def execute(self, *, localize_divergence: bool, diagnose: bool) -> None:
        from .compare import compare_state_files, nonfinite_finding
        from .context import metrics_finding
        from .observe import META_KEY as OBSERVED_KEY
        from .observe.rules import observed_findings

        r = self.result
        try:
            outputs = self.outputs = self._run_all([(i, "replica", {}) for i in range(r.runs)])
        except ReplicaError as exc:
            r.error = AuditError(type=exc.kind, message=str(exc), replica=exc.replica, traceback=exc.traceback)
            return
        metas = [o.meta() for o in outputs]
        traces = [o.trace() for o in outputs]
        r.environment = metas[0]["environment"]
        r.replicas = [ReplicaSummary(index=m["index"], wall_time_s=m["wall_time_s"], steps=m["steps"],
                                     seeding={k: m["seeding"][k] for k in ("mode", "seed", "seeded")},
                                     metrics=m["metrics"], losses=t.losses, environment=m["environment"],
                                     trace_every=t.every, trace_dense_until=t.dense_until, trace_budget=t.budget)
                      for m, t in zip(metas, traces)]
        r.nondeterministic_ops = _merge_ops(metas)
        other, nonfinite = 1, {}  # replica -> {tensor: NaN/inf counts}, counted while comparing
        for i in range(1, r.runs):  # streamed from the files: never two whole states in memory
            compared = compare_state_files(outputs[0].weights_path, outputs[i].weights_path, **r.comparison,
                                           fingerprint=i == 1)
            if i == 1:
                r.final_fingerprints = compared.fingerprints
            nonfinite.setdefault(0, compared.nonfinite[0])
            nonfinite[i] = compared.nonfinite[1]
            if other == 1 or not compared.equal:
                r.tensors, other = compared.diffs, i
            if not compared.equal:
                break
        problems = [(m["index"], m.get("metric_problems", []), m.get("metric_problem_count", 0)) for m in metas]
        r.findings.extend(f for f in (metrics_finding(problems), nonfinite_finding(nonfinite)) if f is not None)
        r.findings.extend(observed_findings(metas[0].get(OBSERVED_KEY, {}).get("observations", [])))  # replica 0's callbacks
        r.compared = "weights"
        r.trajectory = localize.trajectory(traces[0])
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
                              phase="final", message=(f"every traced step matched (parameters and floating-point "
                                                      f"buffers), but the final `{name}` differs: it is not traced "
                                                      "(an integer buffer, state outside the trained modules) or "
                                                      "changed after the last traced step"))
        if td.kind == "init":
            return localize.describe_init(td, traces[0])
        note = ""
        if not localize.exact_step(td, traces[0], traces[other]):  # a thinned trace: the step before was not recorded
            td, note = self._dense_retrace(td, other, localize.last_common_step_before(td, traces[0], traces[other]))
            if td.kind == "init":
                return localize.describe_init(td, traces[0])
        ra = rb = None
        if localize_divergence and td.kind == "step":
            try:
                self.replays = self._run_all(
                    [(0, "replay", {"replay_step": td.step}), (other, "replay", {"replay_step": td.step})])
                ra, rb = (o.trace().replay for o in self.replays)
            except ReplicaError as exc:
                div = localize.describe_from_replay(td, traces[0], None, None)
                div.message += f" (the replay failed: {exc})"
                return div
        div = localize.describe_from_replay(td, traces[0], ra, rb)
        div.message += note
        return div

    def _dense_retrace(self, td, other, matched_at: Optional[int]):
        """The coarse trace says "somewhere after the last equal recorded step" (``matched_at``, None: only
        the initial weights): re-run both replicas, tracing every step and stopping at the coarse step, to
        find the exact one."""
        since = f"step {matched_at}" if matched_at is not None else "the initial weights"
        where = f" (the traces were thinned: the divergence began after {since}, where both recorded equal weights; "
        try:
            a, b = (o.trace() for o in self._run_all(
                [(0, "dense", {"dense_until": td.step}), (other, "dense", {"dense_until": td.step})]))
        except ReplicaError as exc:
            return td, where + f"the dense re-trace failed: {exc})"
        exact = localize.first_divergence(a, b)
        if exact is None or exact.kind == "structure":
            return td, where + "the dense re-trace did not reproduce it)"
        return exact, ""

    def _diagnose(self, metas, traces, other, divergence):
        """Hints from the recorded evidence order the controlled reruns; the rerun that makes the
        replicas agree names the cause (causes/)."""
        env_diff = environment.differences(metas[0]["environment"], metas[other]["environment"])
        evidence = causes.Evidence(
            a=causes.ReplicaEvidence.from_meta(metas[0], traces[0].rng_at_first_step),
            b=causes.ReplicaEvidence.from_meta(metas[other], traces[other].rng_at_first_step),
            divergence=causes.DivergenceFacts.from_divergence(divergence), env_diff=env_diff)
        hash_seeds_differ = self._hash_seed(0) is not None and self._hash_seed(0) != self._hash_seed(other)
        applicable = [c.name for c in controls.CONTROLS if (c.name != "hash_seed" or hash_seeds_differ)
                      and (not c.cuda_only or self.config.device == "cuda")]

        def run_batch(sets: list) -> list:
            if len(sets) == 1:
                return [self._experiment(other, sets[0])]
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(sets), thread_name_prefix="mlrepro-diagnosis") as pool:
                return list(pool.map(lambda s: self._experiment(other, s), sets))

        return causes.diagnose(evidence, applicable, run_batch, width=diagnosis_width(self.config))

    def _rerun_timeout(self) -> float:
        """A control can slow a program down (the frozen clock of a loop that waits for time to pass): a
        rerun gets the audit's timeout, or when it has none 4 x its slowest replica plus a minute; one
        that runs out proves nothing (an experiment with an error), and the other controls still run."""
        if self.config.timeout is not None:
            return self.config.timeout
        return 60.0 + 4 * max((s.wall_time_s for s in self.result.replicas), default=0.0)

    def _experiment(self, other: int, names: frozenset) -> "causes.Experiment":
        """A diagnosis rerun: replicas 0 and ``other`` again, as before but with the named controls
        applied (hash_seed: both get replica 0's PYTHONHASHSEED); agreed if traces and weights match."""
        from .compare import compare_state_files

        label = controls.rerun_label(names)
        kw = {"controls": names, "hash_seed": self._hash_seed(0) if "hash_seed" in names else None,
              "timeout": self._rerun_timeout()}
        try:
            a, b = self._run_all([(0, label, kw), (other, label, kw)])
        except ReplicaError as exc:
            return causes.Experiment(names, False, label, error=str(exc))
        agreed = (localize.first_divergence(a.trace(), b.trace()) is None
                  and compare_state_files(a.weights_path, b.weights_path, **self.result.comparison).equal)
        return causes.Experiment(names, agreed, label)


def _merge_ops(metas: list[dict]) -> list[NondeterministicOp]:
    merged: dict[tuple[str, str], int] = {}
    for m in metas:
        for op in m.get("nondeterministic_ops", []):
            key = (op["op"], op["call_site"])
            merged[key] = max(merged.get(key, 0), op["count"])
    return [NondeterministicOp(op=k[0], call_site=k[1], count=n) for k, n in merged.items()]
