"""Controls: one source of run-to-run variation made identical in every replica, from outside.

A diagnosis rerun runs replica 0 and the differing replica again with one control applied before
the program starts (``ReplicaSpec.controls``). If they then agree, that source is the cause,
confirmed by experiment. Every control draws its values from the audit's seed only, never from the
replica's entropy, so both replicas of a rerun see the same values; everything else (entropy, hash
seed, ...) stays as it was in the replicas that differed.

``apply(names, seed)`` installs the controls and returns a function that undoes them (an in-process
replica must leave nothing behind). Importing this module imports neither torch nor numpy.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Control:
    """One controllable factor: its name (a ``ReplicaSpec.controls`` entry), what it makes identical
    (for messages), and whether it needs a replica process of its own (an environment variable)."""

    name: str
    label: str
    process_only: bool = False  # PYTHONHASHSEED: only a fresh interpreter can change it
    cuda_only: bool = False
    may_fail: bool = False  # strict deterministic kernels can make a correct program raise


CONTROLS: tuple[Control, ...] = (
    Control("hash_seed", "PYTHONHASHSEED pinned", process_only=True),
    Control("python_rng", "python `random` (the global and random.Random() made without a seed) seeded alike"),
    Control("numpy_global", "numpy's global RNG seeded alike"),
    Control("numpy_unseeded", "numpy Generators / RandomStates made without a seed seeded alike"),
    Control("torch_cpu", "torch's CPU default generator seeded alike (and torch.seed() made fixed)"),
    Control("worker_seeding", "DataLoader worker base seeds made identical"),
    Control("clock", "time.time / time.time_ns / datetime.now identical"),
    Control("entropy", "os.urandom / uuid.uuid4 identical"),
    Control("listing_order", "os.listdir / os.scandir / glob sorted"),
    Control("torch_cuda", "torch's CUDA generators seeded alike", cuda_only=True),
    Control("threads", "one intra-op thread (set_num_threads ignored)"),
    Control("deterministic_kernels", "torch.use_deterministic_algorithms(True), strict", may_fail=True),
)
BY_NAME = {c.name: c for c in CONTROLS}


def rerun_label(names: frozenset) -> str:
    """The folder label of a diagnosis rerun (``control-<name>`` or ``control-all``): progress lines
    and the output folder show it."""
    if not names:
        return "control-none"  # the same rerun without controls (causes: is the divergence intermittent?)
    return "control-" + (next(iter(names)) if len(names) == 1 else "all")


def validate(names) -> frozenset:
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; known: {sorted(BY_NAME)}")
    return frozenset(names)


class _Seeds:
    """Deterministic seeds for one control: the audit seed, the control's name and a call counter."""

    def __init__(self, seed: int, name: str) -> None:
        self._rng = random.Random(f"{seed}:{name}")

    def next(self, bits: int = 32) -> int:
        return self._rng.getrandbits(bits)


class _Undo:
    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def set(self, owner, attr: str, value) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, value)
        self._steps.append(lambda: setattr(owner, attr, original))

    def call(self, fn: Callable[[], None]) -> None:
        self._steps.append(fn)

    def __call__(self) -> None:
        while self._steps:
            self._steps.pop()()


def _python_rng(undo: _Undo, seeds: _Seeds) -> None:
    global_inst = random._inst  # type: ignore[attr-defined]
    state = random.getstate()
    undo.call(lambda: random.setstate(state))
    random.seed(seeds.next(64))
    original = random.Random.seed

    def seed(self, a=None, version=2):
        if a is None:  # random.SystemRandom never gets here: its seed() is its own no-op
            a = seeds.next(64)
        return original(self, a, version)

    undo.set(random.Random, "seed", seed)
    undo.set(random, "seed", lambda a=None, version=2: seed(global_inst, a, version))


def _numpy_global(undo: _Undo, seeds: _Seeds) -> None:
    import numpy as np

    state = np.random.get_state()
    undo.call(lambda: np.random.set_state(state))
    np.random.seed(seeds.next())
    original = np.random.seed
    undo.set(np.random, "seed", lambda seed=None: original(seeds.next() if seed is None else seed))


def _numpy_unseeded(undo: _Undo, seeds: _Seeds) -> None:
    import numpy as np

    default_rng = np.random.default_rng
    undo.set(np.random, "default_rng", lambda seed=None: default_rng(seeds.next(64) if seed is None else seed))
    from .probes import StandIn

    base = np.random.RandomState

    class RandomState(base, metaclass=StandIn):  # pickles as numpy's own (its __reduce__ names numpy's constructor)
        _stands_in_for = base

        def __init__(self, seed=None):
            super().__init__(seeds.next(32) if seed is None else seed)

    RandomState.__module__ = base.__module__
    undo.set(np.random, "RandomState", RandomState)


def _torch_cpu(undo: _Undo, seeds: _Seeds) -> None:
    import torch

    state = torch.get_rng_state()
    undo.call(lambda: torch.set_rng_state(state))
    torch.default_generator.manual_seed(seeds.next(63))
    undo.set(torch, "seed", lambda: _manual(torch.default_generator, seeds.next(63)))


def _manual(generator, value: int) -> int:
    generator.manual_seed(value)
    return value


def _torch_cuda(undo: _Undo, seeds: _Seeds) -> None:
    import torch

    torch.cuda.manual_seed_all(seeds.next(63))  # lazy: applied when CUDA starts
    undo.set(torch.cuda, "seed", lambda: torch.cuda.manual_seed(seeds.next(63)))
    undo.set(torch.cuda, "seed_all", lambda: torch.cuda.manual_seed_all(seeds.next(63)))


def _worker_seeding(undo: _Undo, seeds: _Seeds) -> None:
    from torch.utils.data import dataloader as dl

    base = dl._BaseDataLoaderIter
    original = base.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._base_seed = seeds.next(63)  # read when the workers start, after this returns

    undo.set(base, "__init__", init)


class _Clock:
    """A clock that starts at a fixed instant and advances 1 ms per reading."""

    START_NS = 1_700_000_000 * 10**9

    def __init__(self) -> None:
        self.calls = 0

    def time_ns(self) -> int:
        self.calls += 1
        return self.START_NS + self.calls * 10**6

    def time(self) -> float:
        return self.time_ns() / 1e9


def _patch_clock(undo: _Undo, seconds: Callable[[], float], nanoseconds: Callable[[], int]) -> None:
    """time.time, time.time_ns and datetime.datetime.now / today / utcnow read the given clock."""
    import datetime as dt
    import time

    real = dt.datetime

    class Datetime(real):
        @classmethod
        def now(cls, tz=None):
            return real.fromtimestamp(seconds(), tz)

        @classmethod
        def today(cls):
            return real.fromtimestamp(seconds())

        @classmethod
        def utcnow(cls):
            return real.fromtimestamp(seconds(), dt.timezone.utc).replace(tzinfo=None)

    Datetime.__name__ = Datetime.__qualname__ = "datetime"
    Datetime.__module__ = "datetime"
    undo.set(time, "time", seconds)
    undo.set(time, "time_ns", nanoseconds)
    undo.set(dt, "datetime", Datetime)


def _clock(undo: _Undo, seeds: _Seeds) -> None:
    clock = _Clock()
    _patch_clock(undo, clock.time, clock.time_ns)


def _entropy(undo: _Undo, seeds: _Seeds) -> None:
    rng = random.Random(seeds.next(64))
    # uuid.uuid4 reads os.urandom at call time; random.SystemRandom keeps its own reference to the real one
    undo.set(os, "urandom", lambda n: rng.randbytes(n))


class _ListedScandir:
    """What os.scandir returns (an iterator and context manager), over entries already read and ordered."""

    def __init__(self, entries: list) -> None:
        self._entries = iter(entries)

    def __iter__(self):
        return self._entries

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self) -> None:
        pass


def _patch_listing(undo: _Undo, arrange: Callable[[list, Callable], list]) -> None:
    """os.listdir, os.scandir, glob.glob and glob.iglob return their entries as ``arrange`` orders
    them (pathlib's iterdir and glob go through these)."""
    import glob

    listdir, scandir, glob_glob, glob_iglob = os.listdir, os.scandir, glob.glob, glob.iglob
    same = lambda x: x  # noqa: E731

    def scandir_arranged(path="."):
        with scandir(path) as it:
            return _ListedScandir(arrange(list(it), lambda e: e.name))

    undo.set(os, "listdir", lambda path=".": arrange(listdir(path), same))
    undo.set(os, "scandir", scandir_arranged)
    undo.set(glob, "glob", lambda *a, **k: arrange(glob_glob(*a, **k), same))
    undo.set(glob, "iglob", lambda *a, **k: iter(arrange(list(glob_iglob(*a, **k)), same)))


def _listing_order(undo: _Undo, seeds: _Seeds) -> None:
    _patch_listing(undo, lambda entries, key: sorted(entries, key=key))


def _threads(undo: _Undo, seeds: _Seeds) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    undo.call(lambda: torch.set_num_threads(before))
    undo.set(torch, "set_num_threads", lambda n: None)


def _deterministic_kernels(undo: _Undo, seeds: _Seeds) -> None:
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore():
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if workspace is None:  # an in-process replica must not leave it to later audits
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

    undo.call(restore)


_APPLY: dict[str, Optional[Callable[[_Undo, _Seeds], None]]] = {
    "hash_seed": None,  # an environment variable of the replica process (auditing passes it)
    "python_rng": _python_rng, "numpy_global": _numpy_global, "numpy_unseeded": _numpy_unseeded,
    "torch_cpu": _torch_cpu, "torch_cuda": _torch_cuda, "worker_seeding": _worker_seeding, "clock": _clock,
    "entropy": _entropy, "listing_order": _listing_order, "threads": _threads,
    "deterministic_kernels": _deterministic_kernels,
}
assert set(_APPLY) == set(BY_NAME)


# -- perturbations: the invariance matrix changes one axis in one extra replica -----------------------
CLOCK_SHIFT_S = 400 * 86400 + 12345.678  # the perturbed clock runs this far ahead


def _other_thread_count(n: int) -> int:
    return 2 if n <= 1 else n - 1


def _more_threads(undo: _Undo) -> None:
    """Another intra-op thread count than replica 0 runs with, including when the program sets its own
    (``torch.set_num_threads(n)`` gets another n): else such a program would defeat the axis."""
    import torch

    before = torch.get_num_threads()
    original = torch.set_num_threads
    original(_other_thread_count(before))
    undo.call(lambda: original(before))
    undo.set(torch, "set_num_threads", lambda n: original(_other_thread_count(int(n))))


def _reversed_listing(undo: _Undo) -> None:
    _patch_listing(undo, lambda entries, key: entries[::-1])


def _shifted_clock(undo: _Undo) -> None:
    import time

    real_time, real_ns, shift_ns = time.time, time.time_ns, int(CLOCK_SHIFT_S * 1e9)
    _patch_clock(undo, lambda: real_time() + CLOCK_SHIFT_S, lambda: real_ns() + shift_ns)


# axis -> what changes in the extra replica ("hashseed" is its process's PYTHONHASHSEED: auditing passes it)
PERTURBATIONS: dict[str, Optional[Callable[[_Undo], None]]] = {
    "threads": _more_threads, "hashseed": None, "listing-order": _reversed_listing, "clock": _shifted_clock,
}


def apply(names: frozenset, seed: int, perturb: frozenset = frozenset()) -> Callable[[], None]:
    """Install the named controls (after the harness's seeding, before the program runs) and the
    perturbations of ``perturb`` (invariance axes); returns the undo. The order is fixed, so both
    replicas of a rerun draw the same values."""
    undo = _Undo()
    try:
        for control in CONTROLS:
            fn = _APPLY[control.name]
            if control.name in names and fn is not None:
                fn(undo, _Seeds(seed, control.name))
        for axis, change in PERTURBATIONS.items():
            if axis in perturb and change is not None:
                change(undo)
    except BaseException:
        undo()
        raise
    return undo
