"""What the audit costs: wall time of a two-replica audit, per-step trace overhead, plugin load time.

Prints figures; asserts nothing about timings (they depend on the machine and its load). Every
figure is a ratio of timings taken in the same run, interleaved, so a busy machine slows both sides.
Child processes get ``OMP_NUM_THREADS=1`` (set it for this process too).

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py wall    # audit / (2 x plain run), training >= 10 s
    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py trace   # traced vs untraced step, in one process
    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py load    # plugin import time, pytest --co with/without it
    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py fixed   # K audits' CPU / 2K plain runs: process vs forkserver
    ... add --quick to any of them for a short smoke run (figures then mean little).

Targets (issue 2): audit wall time <= 1.10 x two plain trainings; trace overhead <= 3 % per step on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT / "benchmarks" / "workloads.py"
HEAVY_MODULES = ("torch", "wandb", "numpy", "matplotlib")


# -- shared helpers ---------------------------------------------------------------------------------
def child_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def load_avg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def banner(title: str) -> None:
    print(f"== {title}")
    print(f"python {platform.python_version()} | {platform.machine()} | cpus {os.cpu_count()} | "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} | load avg {load_avg()}")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3g}, min {min(values):.3g}, max {max(values):.3g}, n={len(values)}"


def timed_run(cmd: list[str], *, cwd=None, env=None) -> tuple[float, subprocess.CompletedProcess]:
    """Run cmd to completion; (wall seconds, the process). Its CPU seconds are left in ``proc.cpu_s``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return elapsed, proc


def import_workloads():
    sys.path.insert(0, str(WORKLOADS.parent))
    import workloads

    return workloads


# -- 1. audit wall time -----------------------------------------------------------------------------
AUDIT_SNIPPET = """
import json, os, resource, sys, time
def cpu():
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
start = time.perf_counter()
import pytest_mlrepro
cpu0 = cpu()
parallel = os.environ.get("MLREPRO_BENCH_PARALLEL", "1")
r = pytest_mlrepro.audit(sys.argv[2], args=tuple(sys.argv[3:]), device="cpu", deterministic=sys.argv[1] == "on",
                         parallel=parallel if parallel == "auto" else int(parallel))
call_cpu = cpu() - cpu0
total = time.perf_counter() - start
print(json.dumps({"audit_s": r.wall_time_s, "call_cpu_s": call_cpu, "in_process_s": total, "deterministic": r.deterministic,
                  "error": None if r.error is None else r.error.message, "seeding": r.seeding, "parallel": r.parallel,
                  "replicas": [{"wall_time_s": s.wall_time_s, "steps": s.steps} for s in r.replicas]}))
"""


def calibrate_epochs(size: str, seconds: float) -> tuple[int, float]:
    """Epochs of the workload that take about ``seconds`` on this machine now (timed in this process)."""
    import torch

    torch.set_num_threads(1)
    w = import_workloads()
    torch.manual_seed(0)
    t = w.make_training(size)
    t.epoch()  # warm-up
    start = time.perf_counter()
    t.epoch()
    per_epoch = time.perf_counter() - start
    return max(1, round(seconds / per_epoch)), per_epoch


def startup_costs() -> tuple[float, float, float]:
    """In a fresh interpreter: seconds to import torch, to make a first Adam step, then to turn on
    deterministic algorithms. Both of the latter import torch._dynamo/_inductor lazily, so whichever
    comes first pays it: a replica pays it in its set-up, a plain run in its first step."""
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "m = torch.nn.Linear(4, 2); o = torch.optim.Adam(m.parameters()); m(torch.ones(1, 4)).sum().backward(); "
            "o.step(); t2 = time.perf_counter(); torch.use_deterministic_algorithms(True, warn_only=True); "
            "t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)")
    _, proc = timed_run([sys.executable, "-c", code])
    return tuple(float(x) for x in proc.stdout.split())


def plain_run(size: str, epochs: int) -> tuple[float, float, float]:
    """A user's run: ``python benchmarks/workloads.py ...`` in a fresh process. (wall, training time it printed, CPU s)."""
    wall, proc = timed_run([sys.executable, str(WORKLOADS), "--size", size, "--epochs", str(epochs)], cwd=ROOT)
    match = re.search(r"trained \d+ steps in ([0-9.]+) s", proc.stdout)
    return wall, float(match.group(1)), proc.cpu_s


def audit_run(size: str, epochs: int, deterministic: bool = True) -> tuple[float, dict]:
    """``pytest_mlrepro.audit('benchmarks/workloads.py', args=...)`` from a fresh process, as a user script would."""
    cmd = [sys.executable, "-c", AUDIT_SNIPPET, "on" if deterministic else "off", str(WORKLOADS),
           "--size", size, "--epochs", str(epochs)]
    wall, proc = timed_run(cmd, cwd=ROOT)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["cpu_s"] = proc.cpu_s  # the audit process and its replicas (waited-for descendants count)
    if info["error"]:
        raise SystemExit(f"the audit failed: {info['error']}")
    return wall, info


def bench_wall(args) -> None:
    banner("audit wall time / (2 x one plain training)")
    epochs = args.epochs
    if epochs is None:
        epochs, per_epoch = calibrate_epochs(args.size, args.train_seconds)
        print(f"calibration: one epoch of '{args.size}' took {per_epoch:.3f} s in-process -> {epochs} epochs "
              f"(aiming at {args.train_seconds:g} s of training)")
    cmd_plain = f"python benchmarks/workloads.py --size {args.size} --epochs {epochs}"
    print(f"plain:  OMP_NUM_THREADS=1 {cmd_plain}   (fresh process, imports included)")
    print(f"audit:  pytest_mlrepro.audit('benchmarks/workloads.py', args=('--size', '{args.size}', '--epochs', "
          f"'{epochs}'), device='cpu')   from a fresh `python -c` (2 replicas, process isolation, program seeding)")
    plains: list[tuple[float, float]] = [plain_run(args.size, epochs)]
    print(f"  plain  {plains[-1][0]:7.2f} s wall ({plains[-1][1]:.2f} s training)")
    rows, off_rows = [], []
    for i in range(args.rounds):
        wall, info = audit_run(args.size, epochs)
        plains.append(plain_run(args.size, epochs))
        reference = (plains[-2][0] + plains[-1][0]) / 2  # the plain runs just before and after this audit
        rows.append((wall, info, reference))
        replica_train = ", ".join(f"{s['wall_time_s']:.2f}" for s in info["replicas"])
        print(f"  audit  {wall:7.2f} s wall (audit() call {info['audit_s']:.2f} s; training inside replicas {replica_train} s; "
              f"{info['replicas'][0]['steps']} steps; deterministic={info['deterministic']})")
        print(f"  plain  {plains[-1][0]:7.2f} s wall ({plains[-1][1]:.2f} s training)")
        if args.also_deterministic_off:
            off_wall, off = audit_run(args.size, epochs, deterministic=False)
            plains.append(plain_run(args.size, epochs))
            off_rows.append((off["audit_s"], (plains[-2][0] + plains[-1][0]) / 2))
            print(f"  audit  {off_wall:7.2f} s wall with deterministic=False (audit() call {off['audit_s']:.2f} s; "
                  f"deterministic={off['deterministic']})")
            print(f"  plain  {plains[-1][0]:7.2f} s wall ({plains[-1][1]:.2f} s training)")
    plain_walls = [p[0] for p in plains]
    plain_train = [p[1] for p in plains]
    plain_cpu = [p[2] for p in plains]
    print(f"plain training wall: {spread(plain_walls)} s (of which training {spread(plain_train)} s)")
    if min(plain_walls) < 10:
        print(f"  NOTE: the shortest plain run took {min(plain_walls):.1f} s, under the 10 s the target asks for")
    ratio_call = [info["audit_s"] / (2 * ref) for _, info, ref in rows]
    ratio_proc = [wall / (2 * ref) for wall, _, ref in rows]
    ratio_cpu = [info["call_cpu_s"] / (2 * statistics.median(plain_cpu)) for _, info, _ in rows]
    print(f"replicas at once: {rows[0][1]['parallel']} (--parallel {args.parallel})")
    print(f"RATIO audit() call / (2 x plain run):            {spread(ratio_call)}   (target <= 1.10 sequential)")
    print(f"RATIO audit() call / (1 x plain run):            {spread([2 * r for r in ratio_call])}   "
          "(target <= 1.4 with parallel replicas on 2 cores)")
    print(f"RATIO whole audit process / (2 x plain run):     {spread(ratio_proc)}   (adds the parent's imports)")
    print(f"RATIO CPU time, audit() call / (2 x plain run):  {spread(ratio_cpu)}   (user+sys of the audit and its "
          f"replicas; moves less with the machine's load; plain runs {spread(plain_cpu)} s CPU)")
    if off_rows:
        print(f"RATIO audit() call, deterministic=False:        {spread([a / (2 * ref) for a, ref in off_rows])}")
    print("  where the time goes:")
    tiny_plain = statistics.median(plain_run("tiny", 1)[0] for _ in range(2))
    _, tiny = audit_run("tiny", 1)
    print(f"  - fixed cost, on a 1-epoch 'tiny' training (8 steps): plain run {tiny_plain:.2f} s; audit() call "
          f"{tiny['audit_s']:.2f} s = {tiny['audit_s'] / 2 - tiny_plain:+.2f} s per replica over a plain run "
          "(harness imports, probes, environment, writing and loading weights/trace, comparing)")
    det = startup_costs()
    print(f"  - the rest grows with the training: the trace's per-step cost (see `bench_audit.py trace`)")
    print(f"  - in a fresh process: `import torch` {det[0]:.2f} s; a first Adam step {det[1]:.2f} s; then "
          f"`torch.use_deterministic_algorithms(True, warn_only=True)` {det[2]:.2f} s (both import "
          "torch._dynamo/_inductor lazily: a replica pays that while applying the deterministic settings, "
          "before its training loop starts, a plain run inside its loop)")


# -- 2. per-step trace overhead ---------------------------------------------------------------------
def time_steps(training, n: int) -> float:
    return cpu_and_wall(training, n)[1]


def cpu_and_wall(training, n: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) for n steps. With one torch thread the CPU time
    counts only our own work, so it moves much less than wall time when other jobs share the cores."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        training.step()
    return time.process_time() - cpu, time.perf_counter() - wall


def _every(text: str):
    return text if text == "auto" else int(text)


def trace_one(size: str, *, reps: int, block_s: float, every="auto") -> None:
    import torch

    from pytest_mlrepro.trace import Tracer
    from pytest_mlrepro.tracing import budget

    budget.ALLOWANCE_S = 0.0  # the steady state after the dense start: each repetition chooses after MEASURE_STEPS

    class TimedTracer(Tracer):
        """The real tracer, plus a stopwatch around its optimizer hooks (time spent inside them)."""

        hook_s = 0.0

        def _pre_step(self, *a):
            start = time.perf_counter()
            try:
                return super()._pre_step(*a)
            finally:
                TimedTracer.hook_s += time.perf_counter() - start

        def _post_step(self, *a):
            start = time.perf_counter()
            try:
                return super()._post_step(*a)
            finally:
                TimedTracer.hook_s += time.perf_counter() - start

    w = import_workloads()
    torch.manual_seed(0)
    training = w.make_training(size)
    n_params = w.n_parameters(training.model)
    time_steps(training, 5)  # warm-up (allocator, kernels)
    probe = time_steps(training, 20) / 20
    steps = max(5, round(block_s / probe))

    # one-time cost: the first traced step registers the optimizer, names modules and records the initial state
    plain_first = time_steps(training, 1)
    tracer = Tracer().install()
    try:
        traced_first = time_steps(training, 1)
    finally:
        tracer.uninstall()

    results = {"cpu": {"plain": [], "traced": [], "overhead": []}, "wall": {"plain": [], "traced": [], "overhead": []}}
    hook_ms: list[float] = []
    chosen: list = []  # with auto: each repetition's BudgetChoice
    for rep in range(reps):
        order = ("plain", "traced") if rep % 2 == 0 else ("traced", "plain")  # interleaved, alternating
        timing = {}
        for kind in order:
            if kind == "plain":
                timing[kind] = cpu_and_wall(training, steps)
            else:
                tracer = TimedTracer(every=every).install()
                try:
                    time_steps(training, 1 if every != "auto" else budget.MEASURE_STEPS + 1)  # registration
                    # (and with auto the timed steps that choose the interval): not timed, reported below
                    TimedTracer.hook_s = 0.0
                    timing[kind] = cpu_and_wall(training, steps)
                    hook_ms.append(1e3 * TimedTracer.hook_s / steps)
                finally:
                    tracer.uninstall()
                warm = 1 if every != "auto" else budget.MEASURE_STEPS + 1
                if tracer.steps != steps + warm:
                    raise SystemExit(f"the tracer saw {tracer.steps} steps, expected {steps + warm}")
                if tracer.budget is not None:
                    chosen.append(tracer.budget.choice)
        for j, clock in enumerate(("cpu", "wall")):
            r = results[clock]
            r["overhead"].append(100 * (timing["traced"][j] / timing["plain"][j] - 1))
            r["plain"].append(1e3 * timing["plain"][j] / steps)
            r["traced"].append(1e3 * timing["traced"][j] / steps)
    print(f"-- {size}: {n_params:,} parameters in {len(list(training.model.parameters()))} tensors, "
          f"{reps} x {steps} steps per side, trace_every={every}")
    for clock, r in results.items():
        label = "process CPU time" if clock == "cpu" else "wall time"
        print(f"  [{label}] untraced step {spread(r['plain'])} ms; traced step {spread(r['traced'])} ms")
        print(f"  [{label}] OVERHEAD per step {spread(r['overhead'])} %   (target <= 3 %)")
    in_hooks = [100 * h / p for h, p in zip(hook_ms, results["wall"]["plain"])]
    print(f"  time inside the tracer's optimizer hooks: {spread(hook_ms)} ms/step = {spread(in_hooks)} % of the "
          "untraced step of the same repetition (a floor for the overhead, measured in place, less noisy)")
    if chosen:
        intervals = sorted({c.every for c in chosen})
        print(f"  auto: intervals chosen {intervals}; the budget's own estimate of the recording's share "
              f"{spread([100 * c.overhead for c in chosen])} % (record {spread([1e6 * c.record_s for c in chosen])} us, "
              f"step {spread([1e6 * c.step_s for c in chosen])} us; the hooks' fixed cost per step is not in it)")
    print(f"  one-time cost of the first traced step: {1e3 * (traced_first - plain_first):+.2f} ms")
    breakdown(training, tracer_cls=Tracer)


def breakdown(training, *, tracer_cls, calls: int = 200) -> None:
    """What one traced step adds, on this model's parameters: ``Tracer._record`` timed alone (median of
    5 x ``calls`` calls, parameters hot in cache) and the fingerprint functions it may use."""
    import torch

    from pytest_mlrepro import fingerprint as fp

    params = [p.detach() for p in training.model.parameters()]

    def per_call(fn) -> float:
        fn()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter() - start) / calls)
        return 1e6 * statistics.median(runs)

    tracer = tracer_cls()
    tracer._register_optimizer(training.optimizer)
    record = lambda: tracer._record("step", 0)  # noqa: E731
    parts = {"Tracer._record (everything a step records)": per_call(record)}
    for name in ("word_sum_many", "fingerprint_many"):  # the cheap per-step sum (if any) and the strong fingerprint
        if hasattr(fp, name):
            parts[f"  {name}(params) alone"] = per_call(lambda fn=getattr(fp, name): fn(params))
    for label, us in parts.items():
        print(f"    {label:55s} {us:8.1f} us")


def bench_trace(args) -> None:
    import torch

    torch.set_num_threads(1)
    banner("per-step trace overhead (same loop without / with Tracer().install(), one process)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); blocks of ~{args.block_s:g} s per side, "
          "alternating which side goes first; deterministic settings off on both sides")
    for size in args.sizes.split(","):
        trace_one(size.strip(), reps=args.reps, block_s=args.block_s, every=args.every)
    print(f"load avg at the end: {load_avg()}")


# -- 3. plugin load cost ----------------------------------------------------------------------------
def importtime(code: str, module: str) -> tuple[int, int]:
    """(cumulative us of ``module`` as -X importtime reports it, sum of self us of pytest_mlrepro modules)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    cumulative, ours = None, 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        self_us, cum_us, name = int(m.group(1)), int(m.group(2)), m.group(4)
        if name.startswith("pytest_mlrepro"):
            ours += self_us
        if name == module and m.group(3) == " ":  # the top-level entry for this module
            cumulative = cum_us
    return cumulative, ours


TEST_FILE = '''
import pytest

@pytest.mark.parametrize("n", range(10))
def test_number_{i}(n):
    assert n >= 0

class TestThings{i}:
    def test_a(self):
        pass

    def test_b(self):
        pass
'''

PROBE_CONFTEST = '''
import json, os, sys

def pytest_collection_finish(session):
    heavy = {"torch", "wandb", "numpy", "matplotlib"}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy and "." not in m)
    with open(os.environ["MLREPRO_BENCH_PROBE"], "w") as f:
        json.dump({"plugin": session.config.pluginmanager.has_plugin("mlrepro"), "heavy": loaded}, f)
'''


def make_test_folder(root: Path, files: int) -> Path:
    folder = root / "suite"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: nothing from the repo's config
    for i in range(files):
        (folder / f"test_mod{i}.py").write_text(TEST_FILE.format(i=i))
    return folder


def bench_load(args) -> None:
    banner("plugin load cost")
    code = "import pytest_mlrepro.plugin"
    runs = [importtime(code, "pytest_mlrepro.plugin") for _ in range(args.reps)]
    print(f"python -X importtime -c \"{code}\"   ({args.reps} runs)")
    print(f"  pytest_mlrepro.plugin cumulative (pytest included): {spread([r[0] / 1e3 for r in runs])} ms")
    print(f"  self time of pytest_mlrepro.* modules:               {spread([r[1] / 1e3 for r in runs])} ms")
    on_top = [importtime("import pytest; " + code, "pytest_mlrepro.plugin") for _ in range(args.reps)]
    print(f"python -X importtime -c \"import pytest; {code}\"")
    print(f"  pytest_mlrepro.plugin cumulative on top of pytest:  {spread([r[0] / 1e3 for r in on_top])} ms")

    check = ("import sys, json; import pytest_mlrepro.plugin; "
             f"print(json.dumps(sorted(m for m in {list(HEAVY_MODULES)!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", check], env=child_env(), capture_output=True, text=True, check=True)
    heavy = json.loads(proc.stdout)
    print(f"CHECK after `import pytest_mlrepro.plugin`: heavy modules in sys.modules: {heavy or 'none'} "
          f"-> {'OK' if not heavy else 'FAIL'} (torch/wandb must not be there)")

    with tempfile.TemporaryDirectory(prefix="mlrepro-bench-") as tmp:
        folder = make_test_folder(Path(tmp), args.files)
        base = [sys.executable, "-m", "pytest", "--co", "-q"]
        variants = {"with plugin": base, "-p no:mlrepro": base + ["-p", "no:mlrepro"]}
        # the plugin really loads in one and not the other, and loading it pulls in nothing heavy
        probe_dir = Path(tmp) / "probe"
        probe_dir.mkdir()
        (probe_dir / "conftest.py").write_text(PROBE_CONFTEST)
        (probe_dir / "pytest.ini").write_text("[pytest]\n")
        (probe_dir / "test_x.py").write_text("def test_x():\n    pass\n")
        for label, cmd in variants.items():
            env = child_env()
            env["MLREPRO_BENCH_PROBE"] = str(Path(tmp) / "probe.json")
            subprocess.run(cmd, cwd=probe_dir, env=env, capture_output=True, check=True)
            probe = json.loads((Path(tmp) / "probe.json").read_text())
            print(f"CHECK pytest --co {label:15s}: plugin loaded={probe['plugin']}, heavy modules after collection: "
                  f"{probe['heavy'] or 'none'}")
        times = {clock: {label: [] for label in variants} for clock in ("wall", "cpu")}
        for rep in range(args.reps):
            for label in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                elapsed, proc = timed_run(variants[label], cwd=folder)
                times["wall"][label].append(elapsed)
                times["cpu"][label].append(proc.cpu_s)
        n_tests = re.search(r"(\d+) tests? collected", proc.stdout)
        print(f"pytest --co -q [-p no:mlrepro] on {args.files} files "
              f"({n_tests.group(1) if n_tests else '?'} tests), {args.reps} runs each, interleaved")
        for clock, label_times in times.items():
            name = "wall time" if clock == "wall" else "CPU time (user+sys of the pytest process)"
            for label, values in label_times.items():
                print(f"  [{name}] {label:15s} {spread([1e3 * v for v in values])} ms")
            delta = [1e3 * (a - b) for a, b in zip(label_times["with plugin"], label_times["-p no:mlrepro"])]
            share = 100 * statistics.median(delta) / (1e3 * statistics.median(label_times["-p no:mlrepro"]))
            print(f"PLUGIN COST on pytest --co [{name}]: {spread(delta)} ms per run (paired differences), "
                  f"median {share:+.1f} % of a run without it")
    print(f"load avg at the end: {load_avg()}")


# -- 4. fixed cost per audit: fresh interpreters against a fork server ------------------------------
SERIES_SNIPPET = """
import json, sys, time
import pytest_mlrepro
walls = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    r = pytest_mlrepro.audit(sys.argv[3], args=tuple(sys.argv[4:]), device="cpu", isolation=sys.argv[1], parallel=1)
    walls.append(time.perf_counter() - start)
    if r.error is not None or not r.deterministic:
        raise SystemExit(f"the audit failed: {r.explain()}")
print(json.dumps({"walls": walls}))
"""


def bench_fixed(args) -> None:
    """K audits in one process, CPU time (the process and every descendant) against 2K plain runs."""
    banner("fixed cost: CPU of K audits in one process / CPU of 2K plain runs, per isolation")
    epochs = args.epochs
    if epochs is None:
        epochs, per_epoch = calibrate_epochs(args.size, args.train_seconds)
        print(f"calibration: one epoch of '{args.size}' took {per_epoch:.3f} s in-process -> {epochs} epochs")
    plains = [plain_run(args.size, epochs)]
    rows = []
    for isolation in args.isolations.split(","):
        cmd = [sys.executable, "-c", SERIES_SNIPPET, isolation, str(args.audits), str(WORKLOADS),
               "--size", args.size, "--epochs", str(epochs)]
        wall, proc = timed_run(cmd, cwd=ROOT)
        plains.append(plain_run(args.size, epochs))
        rows.append((isolation, wall, proc.cpu_s, json.loads(proc.stdout.strip().splitlines()[-1])["walls"]))
    plain_cpu = statistics.mean(p[2] for p in plains)
    plain_wall = statistics.mean(p[0] for p in plains)
    print(f"plain run (fresh process): wall {plain_wall:.2f} s, CPU {plain_cpu:.2f} s (mean of {len(plains)})")
    for isolation, wall, cpu_s, walls in rows:
        print(f"isolation={isolation:10s} {args.audits} audits: CPU {cpu_s:.1f} s -> "
              f"CPU / (2 x {args.audits} plain) = {cpu_s / (2 * args.audits * plain_cpu):.3f}; "
              f"audit walls {', '.join(f'{w:.1f}' for w in walls)} s (one replica at a time; "
              f"later audits / 2 plain = {statistics.mean(walls[1:] or walls) / (2 * plain_wall):.3f})")
    print(f"load avg at the end: {load_avg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("fixed", help="CPU of K audits in one process / CPU of 2K plain runs, process vs forkserver")
    p.add_argument("--size", default="mlp", help="workload size (benchmarks/workloads.py). Default: %(default)r")
    p.add_argument("--train-seconds", type=float, default=7.0, help="aim the training at this many seconds. Default: %(default)r")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs instead of calibrating. Default: calibrate")
    p.add_argument("--audits", type=int, default=3, help="audits in the one process (K). Default: %(default)r")
    p.add_argument("--isolations", default="process,forkserver", help="comma-separated. Default: %(default)r")
    p.add_argument("--quick", action="store_true", help="a ~1 s training, 2 audits")
    p = sub.add_parser("wall", help="audit wall time / (2 x one plain training)")
    p.add_argument("--size", default="mlp", help="workload size (benchmarks/workloads.py). Default: %(default)r")
    p.add_argument("--train-seconds", type=float, default=9.0,
                   help="aim the training at this many seconds (epochs calibrated in-process). Default: %(default)r")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs instead of calibrating. Default: calibrate")
    p.add_argument("--rounds", type=int, default=2, help="audits, each between two plain runs. Default: %(default)r")
    p.add_argument("--also-deterministic-off", action="store_true",
                   help="also time an audit with deterministic=False in each round (to isolate that cost)")
    p.add_argument("--quick", action="store_true", help="a ~2 s training and one round (a smoke run)")
    p.add_argument("--parallel", default="1", help="replicas at once: 1 (sequential), N or auto. Default: %(default)r")
    p = sub.add_parser("trace", help="per-step overhead of the optimizer-step tracer")
    p.add_argument("--sizes", default="mlp,cnn,tiny,mlp-b256", help="workload sizes, comma-separated. Default: %(default)r")
    p.add_argument("--reps", type=int, default=60, help="interleaved repetitions per size. Default: %(default)r")
    p.add_argument("--block-s", type=float, default=0.06, help="seconds of training per side and repetition. Default: %(default)r")
    p.add_argument("--every", type=_every, default="auto",
                   help="trace every k-th optimizer step (audit(trace_every=k)), or auto: the self-budgeting trace "
                        "after its dense start (each repetition chooses from its own first steps; the dense "
                        "start costs at most its 1 s allowance per replica, not measured here). Default: %(default)r")
    p.add_argument("--quick", action="store_true", help="3 repetitions of 0.1 s blocks")
    p = sub.add_parser("load", help="plugin import time and pytest --co with/without the plugin")
    p.add_argument("--reps", type=int, default=15, help="runs of each command. Default: %(default)r")
    p.add_argument("--files", type=int, default=20, help="test files in the generated suite. Default: %(default)r")
    p.add_argument("--quick", action="store_true", help="2 runs of each command, 3 files")
    args = parser.parse_args()
    if args.quick:
        if args.bench == "fixed":
            args.train_seconds, args.audits = 1.0, 2
        elif args.bench == "wall":
            args.train_seconds, args.rounds = 2.0, 1
        elif args.bench == "trace":
            args.reps, args.block_s = 3, 0.1
        else:
            args.reps, args.files = 2, 3
    if args.bench == "wall":
        os.environ["MLREPRO_BENCH_PARALLEL"] = args.parallel
    {"wall": bench_wall, "trace": bench_trace, "load": bench_load, "fixed": bench_fixed}[args.bench](args)


if __name__ == "__main__":
    main()
