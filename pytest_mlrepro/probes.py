"""Evidence a replica records for naming a likely cause: how the program seeded, what its data
loaders did, which generators it created without a seed, which nondeterministic ops it ran.

Each probe wraps a public entry point for the life of the replica and restores it afterwards.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import warnings
from typing import Any, Callable, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))


def _library_roots() -> tuple:
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple({os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})


_LIBRARY_ROOTS = _library_roots()
_API_FILES = frozenset({random.__file__, warnings.__file__})


def call_site_info() -> tuple[str, str]:
    """(site, origin) of a call into a probed API. ``origin`` says who made the call: "user" code,
    a "library" (stdlib or site-packages), or "torch" itself. ``site`` is the first user frame on
    the stack (file:line), or failing that the caller's own frame."""
    frame = sys._getframe(1)
    origin = caller = None
    while frame is not None:
        fname = frame.f_code.co_filename
        # our own frames and the probed APIs' own modules are the call, not its caller
        if not fname.startswith(_HERE) and not fname.startswith("<") and fname not in _API_FILES:
            if fname.startswith(_LIBRARY_ROOTS):
                kind = "torch" if f"{os.sep}torch{os.sep}" in fname else "library"
            else:
                kind = "user"
            if origin is None:
                origin, caller = kind, f"{fname}:{frame.f_lineno}"
            if kind == "user":
                return f"{fname}:{frame.f_lineno}", origin
        frame = frame.f_back
    return caller or "<unknown>", origin or "library"


def call_site() -> str:
    return call_site_info()[0]


def seed_value(value: Any) -> tuple[str, Any]:
    """(kind, value) of what a seeding API was given: ("unseeded", None) for nothing, ("value", v)
    for a number, string or bytes (a one-element tensor or numpy scalar counts), and ("object",
    type name) for anything else: ``default_rng(<Generator>)`` passes a generator through, and an
    object's repr (with its memory address) is never a seed value."""
    if value is None:
        return "unseeded", None
    if isinstance(value, (bool, int, float, str)):
        return "value", value
    if isinstance(value, (bytes, bytearray)):
        return "value", hashlib.sha256(bytes(value)).hexdigest()[:16]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return "value", repr(list(value))[:80]
    size = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", None)
    if callable(getattr(value, "item", None)) and size == 1:  # a tensor, numpy array or numpy scalar
        return "value", value.item()
    if isinstance(getattr(value, "entropy", None), int):  # a numpy SeedSequence with its entropy
        return "value", value.entropy
    return "object", type(value).__name__


class SeedProbe:
    """Records every seeding call (api, value, call site) and every generator created without a seed."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, attr: str, api: str, seeded: Callable[[tuple, dict], Any]) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        probe = self

        def wrapper(*args, **kwargs):
            probe.record(api, seeded(args, kwargs))
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(owner, attr, wrapper)
        self._restore.append((owner, attr, original))

    def record(self, api: str, value: Any) -> dict:
        site, origin = call_site_info()
        kind, shown = seed_value(value)
        call = {"api": api, "value": shown, "kind": kind, "unseeded": kind == "unseeded", "site": site,
                "origin": origin}
        self.calls.append(call)
        return call

    def install(self) -> None:
        import numpy as np
        import torch

        first = lambda a, k, key="seed": a[0] if a else k.get(key)  # noqa: E731
        # torch.Generator is a C type whose methods cannot be patched: programs that create one
        # during the run get a subclass that reports its manual_seed calls.
        generator = probed_generator_class()
        generator.probe = self
        self._restore.append((torch, "Generator", torch.Generator))
        torch.Generator = generator
        self._patch(random, "seed", "random.seed", lambda a, k: first(a, k, "a"))
        self._patch(np.random, "seed", "numpy.random.seed", first)
        self._probe_default_rng(np)
        self._probe_random_state(np)
        self._patch(torch, "manual_seed", "torch.manual_seed", first)
        self._patch(torch.random, "manual_seed", "torch.manual_seed", first)
        self._patch(torch, "seed", "torch.seed", lambda a, k: None)
        self._patch(torch.cuda, "manual_seed", "torch.cuda.manual_seed", first)
        self._patch(torch.cuda, "manual_seed_all", "torch.cuda.manual_seed_all", first)
        # random.Random(x) instances seed through Random.seed; the module-level random.seed is the
        # hidden global instance's bound method, patched above.
        original_seed = random.Random.seed
        probe = self

        def instance_seed(self_, a=None, version=2):
            if self_ is not getattr(random, "_inst", None):
                call = probe.record("random.Random", a)
                if a is None and call["origin"] == "user" and not isinstance(self_, random.SystemRandom):
                    self_.__class__ = first_draw_class(type(self_))
                    self_.__dict__[_FIRST_DRAW] = call
            return original_seed(self_, a, version)

        random.Random.seed = instance_seed  # type: ignore[method-assign]
        self._restore.append((random.Random, "seed", original_seed))
        import time
        import uuid

        for owner, attr, api in ((uuid, "uuid4", "uuid.uuid4"), (os, "urandom", "os.urandom"),
                                 (time, "time", "time.time"), (time, "time_ns", "time.time_ns")):
            self._patch_read(owner, attr, api)

    READ_CHECKS = 200  # library calls of a clock or entropy API looked at before the probe stops looking

    def _patch_read(self, owner: Any, attr: str, api: str) -> None:
        """Record the first time the program itself reads the clock or OS entropy (kind "read"): a hint
        for which control to try first. Library calls are looked at a bounded number of times."""
        original, probe, left = getattr(owner, attr), self, [self.READ_CHECKS]

        def wrapper(*args, **kwargs):
            if left[0] > 0:
                site, origin = call_site_info()
                left[0] -= 1
                if origin == "user":
                    left[0] = 0
                    probe.calls.append({"api": api, "value": None, "kind": "read", "unseeded": False, "site": site,
                                        "origin": origin})
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(owner, attr, wrapper)
        self._restore.append((owner, attr, original))

    def _probe_default_rng(self, np: Any) -> None:
        """default_rng(None) gives a Generator that records where it is first drawn from."""
        original, probe = np.random.default_rng, self

        def default_rng(seed=None):
            call = probe.record("numpy.random.default_rng", seed)
            rng = original(seed)
            if seed is None and call["origin"] == "user":
                rng = first_draw_class(type(rng))(rng.bit_generator)  # the same stream
                rng.__dict__[_FIRST_DRAW] = call
            return rng

        default_rng.__wrapped__ = original  # type: ignore[attr-defined]
        self._restore.append((np.random, "default_rng", original))
        np.random.default_rng = default_rng

    def _probe_random_state(self, np: Any) -> None:
        """np.random.RandomState is a C type: the program gets a subclass that reports its seed and,
        made without one, where it is first drawn from (pickled as numpy's own, whose ``__reduce__``
        names numpy's constructor)."""
        base, probe = np.random.RandomState, self

        class RandomState(first_draw_class(base), metaclass=StandIn):
            _stands_in_for = base

            def __init__(self, seed=None):
                call = probe.record("numpy.random.RandomState", seed)
                super().__init__(seed)
                if seed is None and call["origin"] == "user":
                    self.__dict__[_FIRST_DRAW] = call

        RandomState.__module__ = base.__module__
        self._restore.append((np.random, "RandomState", base))
        np.random.RandomState = RandomState

    def uninstall(self) -> None:
        while self._restore:
            owner, attr, original = self._restore.pop()
            setattr(owner, attr, original)

    def seeded_generators(self) -> set[str]:
        """Which global generators the program seeded with an explicit value."""
        names = set()
        for c in self.calls:
            if c["unseeded"]:
                continue
            api = c["api"]
            if api == "random.seed":
                names.add("python")
            elif api == "numpy.random.seed":
                names.add("numpy")
            elif api == "torch.manual_seed":
                names.update({"torch", "cuda"})
            elif api.startswith("torch.cuda"):
                names.add("cuda")
        return names


class StandIn(type):
    """Metaclass of a subclass put in place of a class (np.random.RandomState) for a run: ``isinstance``
    and ``issubclass`` against it answer as against the class it stands in for, so objects made before
    it (numpy's global RandomState, an unpickled one) still count, and ``check_random_state``-style
    code in the program and its libraries behaves as without us."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls.__dict__.get("_stands_in_for", cls.__mro__[1]))

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, cls.__dict__.get("_stands_in_for", cls.__mro__[1]))


_FIRST_DRAW = "_mlrepro_first_draw"
# state access, and what seed_value looks at when a generator is passed to a seeding API, is no draw
# (numpy's default_rng(<Generator>) probes for a bit generator's ``capsule``)
_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state", "bit_generator", "numel", "size",
                        "item", "entropy", "capsule", "ctypes", "cffi", "lock", "state", "spawn"})
_FIRST_DRAW_CLASSES: dict = {}


def first_draw_class(base: type) -> type:
    """A subclass of a generator class whose instances, given a seed-call record under
    ``_FIRST_DRAW``, put the call site of their first draw into it as ``first_draw`` (then stop
    looking: one dict lookup per attribute access after that)."""
    if base not in _FIRST_DRAW_CLASSES:
        def __getattribute__(self, name):
            if name[:1] != "_" and name not in _NOT_DRAWS:
                d = object.__getattribute__(self, "__dict__")
                call = d.get(_FIRST_DRAW)
                if call is not None:
                    d[_FIRST_DRAW] = None
                    call["first_draw"] = call_site()
            return base.__getattribute__(self, name)

        attrs = {"__getattribute__": __getattribute__, "__module__": base.__module__}
        if issubclass(base, random.Random):  # Random pickles as its class: keep that the program's own
            attrs["__reduce__"] = lambda self: (base, (), self.getstate())
        _FIRST_DRAW_CLASSES[base] = type(base.__name__, (base,), attrs)
    return _FIRST_DRAW_CLASSES[base]


def _make_probed_generator():
    import torch

    class ProbedGenerator(torch.Generator):
        """torch.Generator that tells the seed probe about manual_seed / seed calls."""

        probe: Optional["SeedProbe"] = None

        def manual_seed(self, seed):
            if ProbedGenerator.probe is not None:
                ProbedGenerator.probe.record("torch.Generator.manual_seed", seed)
            return super().manual_seed(seed)

        def seed(self):
            if ProbedGenerator.probe is not None:
                ProbedGenerator.probe.record("torch.Generator.seed", None)
            return super().seed()

    ProbedGenerator.__module__ = __name__
    ProbedGenerator.__qualname__ = "_ProbedGenerator"
    return ProbedGenerator


class DataLoaderProbe:
    """Records, per DataLoader iterator, its worker base seed and a running hash of the indices it yields."""

    def __init__(self) -> None:
        self.iterators: list[dict] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        from torch.utils.data import dataloader as dl

        base = dl._BaseDataLoaderIter
        original_init = base.__init__
        original_next_index = base._next_index
        probe = self

        def init(self_, loader, *args, **kwargs):
            original_init(self_, loader, *args, **kwargs)
            record = {
                "num_workers": getattr(loader, "num_workers", 0),
                "base_seed": int(getattr(self_, "_base_seed", 0)),
                "sampler": type(getattr(loader, "sampler", None)).__name__,
                "index_hash": hashlib.sha256(),
                "batches": 0,
                "site": call_site(),
            }
            self_._mlrepro_record = record
            probe.iterators.append(record)

        def next_index(self_):
            index = original_next_index(self_)
            record = getattr(self_, "_mlrepro_record", None)
            if record is not None:
                record["index_hash"].update(repr(index).encode())
                record["batches"] += 1
            return index

        base.__init__ = init
        base._next_index = next_index
        self._restore += [(base, "__init__", original_init), (base, "_next_index", original_next_index)]

    def uninstall(self) -> None:
        while self._restore:
            owner, attr, original = self._restore.pop()
            setattr(owner, attr, original)

    def to_list(self) -> list[dict]:
        out = []
        for r in self.iterators:
            r = dict(r)
            r["index_hash"] = r["index_hash"].hexdigest()[:16]
            out.append(r)
        return out


def rng_fingerprints() -> dict:
    """A short hash of each global generator's state (python, numpy, torch CPU, CUDA)."""
    import numpy as np
    import torch

    def h(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    out = {
        "python": h(repr(random.getstate()).encode()),
        "numpy": h(repr(np.random.get_state(legacy=True)[1].tobytes()).encode()),
        "torch": h(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = h(b"".join(t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()))
    return out


class NondeterministicOpProbe:
    """Collects torch's 'does not have a deterministic implementation' warnings with their call sites."""

    MARKER = "does not have a deterministic implementation"

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], int] = {}
        self._original = None

    def install(self) -> None:
        self._original = warnings.showwarning
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        # only torch's determinism alerts are forced to show every time; the program's own filters stay
        warnings.filterwarnings("always", message=".*" + self.MARKER)
        probe = self
        original = self._original

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if probe.MARKER in text:
                op = text.split(probe.MARKER)[0].strip() or text[:80]
                key = (op, call_site())
                probe.ops[key] = probe.ops.get(key, 0) + 1
                return
            original(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning

    def uninstall(self) -> None:
        if self._original is not None:
            warnings.showwarning = self._original
            self._catcher.__exit__(None, None, None)
            self._original = None

    def to_list(self) -> list[dict]:
        return [{"op": op, "call_site": site, "count": n} for (op, site), n in self.ops.items()]


_PROBED_GENERATOR = None


def probed_generator_class():
    """The torch.Generator subclass, built on first use so importing this module imports no torch."""
    global _PROBED_GENERATOR
    if _PROBED_GENERATOR is None:
        _PROBED_GENERATOR = _make_probed_generator()
    return _PROBED_GENERATOR


def __getattr__(name: str):
    if name == "_ProbedGenerator":  # lets pickle find the class by reference (DataLoader workers)
        return probed_generator_class()
    raise AttributeError(name)
