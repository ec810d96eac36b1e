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


def _short(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return value.item()
    return repr(value)[:80]


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

    def record(self, api: str, value: Any) -> None:
        site, origin = call_site_info()
        self.calls.append({"api": api, "value": _short(value), "unseeded": value is None, "site": site, "origin": origin})

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
        self._patch(np.random, "default_rng", "numpy.random.default_rng", first)
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
                probe.record("random.Random", a)
            return original_seed(self_, a, version)

        random.Random.seed = instance_seed  # type: ignore[method-assign]
        self._restore.append((random.Random, "seed", original_seed))

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
