"""Cause rules: an ordered list of named functions over typed evidence. Each says what the
evidence suggests (a :class:`Hint`) and which controls would confirm it, most likely first. Hints
only order the experiments; a rerun decides (conclude.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .evidence import Evidence

RNG_CONTROLS = ("python_rng", "numpy_unseeded", "numpy_global", "torch_cpu", "torch_cuda")
GENERATOR_LABELS = {"python": "python `random`", "numpy": "numpy's global RNG", "torch": "torch's default generator",
                    "cuda": "torch's CUDA generator"}
GENERATOR_CONTROL = {"python": "python_rng", "numpy": "numpy_global", "torch": "torch_cpu", "cuda": "torch_cuda"}
# which control makes an unseeded generator of each API identical
API_CONTROL = {"random.Random": "python_rng", "random.seed": "python_rng", "numpy.random.default_rng": "numpy_unseeded",
               "numpy.random.RandomState": "numpy_unseeded", "numpy.random.seed": "numpy_global",
               "torch.seed": "torch_cpu", "torch.Generator.seed": "torch_cpu", "torch.manual_seed": "torch_cpu",
               "torch.cuda.manual_seed": "torch_cuda", "torch.cuda.manual_seed_all": "torch_cuda"}
API_NOUN = {"random.Random": "random.Random() instance", "numpy.random.default_rng": "numpy Generator",
            "numpy.random.RandomState": "numpy RandomState", "random.seed": "python `random` (reseeded)",
            "numpy.random.seed": "numpy's global RNG (reseeded)", "torch.seed": "torch's default generator (reseeded)",
            "torch.Generator.seed": "torch.Generator (reseeded)"}
TORCH_SAMPLERS = frozenset({"RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler", "DistributedSampler"})


@dataclass(frozen=True)
class Hint:
    """What one rule read from the evidence: the cause it suggests, the controls that would confirm
    it (most likely first), one sentence of evidence, and the call site / API involved."""

    rule: str
    kind: str
    controls: tuple
    detail: str
    site: Optional[str] = None
    api: Optional[str] = None
    sampler: Optional[str] = None


def seed_values_differ(e: Evidence) -> Optional[Hint]:
    """The program seeded, but with values that differ per run. torch's own seeding of internal
    generators (a sampler seeding its Generator from the global RNG) is a consequence, not a cause."""
    pick = lambda r: [c for c in r.calls if c.kind == "value" and c.origin != "torch"]  # noqa: E731
    for x, y in zip(pick(e.a), pick(e.b)):
        if x.api == y.api and x.value != y.value:
            return Hint("seed_values_differ", "time_seed", ("clock", "entropy"),
                        f"{x.api} was called with different values ({x.value} vs {y.value}) at {x.site}",
                        site=x.site, api=x.api)
    return None


def loader_order_differs(e: Evidence) -> Optional[Hint]:
    for i, (a, b) in enumerate(zip(e.a.loaders, e.b.loaders)):
        if a.index_hash != b.index_hash:
            order = (("torch_cpu",) + tuple(c for c in RNG_CONTROLS if c != "torch_cpu") if a.sampler in TORCH_SAMPLERS
                     else RNG_CONTROLS)
            return Hint("loader_order_differs", "data_order", order,
                        f"DataLoader iterator #{i} (created at {a.site}, {a.sampler}) yielded its samples in a "
                        "different order", site=a.site, sampler=a.sampler)
    return None


def worker_seeds_differ(e: Evidence) -> Optional[Hint]:
    if e.divergence.phase not in (None, "input", "init"):
        return None
    for i, (a, b) in enumerate(zip(e.a.loaders, e.b.loaders)):
        if a.num_workers > 0 and a.base_seed != b.base_seed:
            return Hint("worker_seeds_differ", "worker_seeding", ("worker_seeding", "torch_cpu"),
                        f"DataLoader iterator #{i} (created at {a.site}) gave its {a.num_workers} workers different "
                        f"base seeds ({a.base_seed} vs {b.base_seed})", site=a.site)
    return None


def thread_counts_differ(e: Evidence) -> Optional[Hint]:
    key = next((k for k in ("num_threads", "num_interop_threads") if k in e.env_diff), None)
    if key is None:
        return None
    a, b = e.env_diff[key]
    return Hint("thread_counts_differ", "thread_count", ("threads",),
                f"the replicas ran with different thread counts ({a} vs {b})")


def unseeded_generator_made(e: Evidence) -> Optional[Hint]:
    """A generator the program (not a library: tempfile's name generator does not count) made or
    reseeded without a seed: it draws from OS entropy."""
    for c in e.a.calls:
        if c.kind == "unseeded" and c.origin == "user" and c.api in API_CONTROL:
            return Hint("unseeded_generator_made", "unseeded_rng", (API_CONTROL[c.api],),
                        c.made_without_seed(API_NOUN.get(c.api, c.api)), site=c.site, api=c.api)
    return None


def unseeded_globals(e: Evidence) -> Optional[Hint]:
    """Program seeding: a global generator the program never seeded was in a different state when
    training started (the harness gave each replica different entropy there)."""
    if e.a.seeding_mode != "program":
        return None
    unseeded = [g for g in e.rng_differs() if g not in e.a.seeded]
    if not unseeded:
        return None
    names = ", ".join(GENERATOR_LABELS.get(g, g) for g in unseeded)
    did = ", ".join(GENERATOR_LABELS.get(g, g) for g in sorted(e.a.seeded)) or "none"
    controls = tuple(GENERATOR_CONTROL[g] for g in unseeded if g in GENERATOR_CONTROL)
    return Hint("unseeded_globals", "unseeded_rng", controls,
                f"the program never seeded {names} (it seeded: {did})")


READ_CONTROL = {"uuid.uuid4": "entropy", "os.urandom": "entropy", "time.time": "clock", "time.time_ns": "clock"}


def _first_read(e: Evidence, control: str, rule: str, kind: str) -> Optional[Hint]:
    for c in e.a.calls:
        if c.kind == "read" and READ_CONTROL.get(c.api) == control:
            return Hint(rule, kind, (control,), f"the program read {c.api}() at {c.site}", site=c.site, api=c.api)
    return None


def reads_entropy(e: Evidence) -> Optional[Hint]:
    """The program itself read OS entropy (uuid.uuid4, os.urandom): rare in training code, so tried early."""
    return _first_read(e, "entropy", "reads_entropy", "os_entropy")


def reads_clock(e: Evidence) -> Optional[Hint]:
    """The program read the clock (common for timing, so a late hint)."""
    return _first_read(e, "clock", "reads_clock", "clock")


def kernel_with_matching_inputs(e: Evidence) -> Optional[Hint]:
    d = e.divergence
    if d.phase in ("forward", "backward") and d.inputs_matched and d.rng_matched is not False:
        flagged = "; torch flagged: " + "; ".join(e.a.flagged_ops[:3]) if e.a.flagged_ops else ""
        return Hint("kernel_with_matching_inputs", "nondeterministic_kernel", ("deterministic_kernels", "threads"),
                    f"the {d.phase} of `{d.module}` differs although its inputs and RNG state matched{flagged}")
    return None


def draw_in_forward(e: Evidence) -> Optional[Hint]:
    d = e.divergence
    if d.phase == "forward" and d.inputs_matched and d.rng_matched is False:
        return Hint("draw_in_forward", "unseeded_rng", RNG_CONTROLS,
                    f"the forward of `{d.module}` drew random numbers from a generator whose state differed")
    return None


def input_differs(e: Evidence) -> Optional[Hint]:
    if e.divergence.phase != "input":
        return None
    return Hint("input_differs", "data_order", ("hash_seed", "entropy", "clock") + RNG_CONTROLS + ("listing_order",),
                "the batch entering the model differs while every generator the harness can see was seeded alike")


RULES: tuple[Callable[[Evidence], Optional[Hint]], ...] = (
    seed_values_differ, loader_order_differs, worker_seeds_differ, thread_counts_differ, unseeded_generator_made,
    unseeded_globals, reads_entropy, kernel_with_matching_inputs, draw_in_forward, input_differs, reads_clock,
)


def hints(e: Evidence) -> list:
    """Every rule's hint, in rule order."""
    return [h for h in (rule(e) for rule in RULES) if h is not None]
