"""From hints and rerun outcomes to one :class:`~pytest_mlrepro.result.Cause`.

The named cause is the control whose rerun made the replicas agree; the hints only add the call
site and pick the wording. Without a confirming rerun the best hint is reported, marked
unconfirmed, or "unknown". The fix advice follows the mechanism found (the control and the API),
not the symptom: a sampler shuffling with ``random.Random()`` is not fixed by ``generator=``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..controls import BY_NAME, CONTROLS
from ..result import Cause
from .evidence import Evidence
from .rules import API_CONTROL, API_NOUN, TORCH_SAMPLERS, Hint


@dataclass(frozen=True)
class Experiment:
    """One diagnosis rerun: replica 0 and the differing replica again, with ``controls`` applied.
    ``agreed`` is True when their traces and final weights then matched; ``error`` says why a rerun
    failed (a failed rerun confirms nothing)."""

    controls: frozenset
    agreed: bool
    label: str = ""
    error: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["controls"] = sorted(self.controls)
        return d


# the cause a confirming control names; with a hint of one of these kinds the hint's kind is kept
CONTROL_KIND = {"python_rng": "unseeded_rng", "numpy_global": "unseeded_rng", "numpy_unseeded": "unseeded_rng",
                "torch_cpu": "unseeded_rng", "torch_cuda": "unseeded_rng", "worker_seeding": "worker_seeding",
                "clock": "clock", "entropy": "os_entropy", "hash_seed": "hash_seed", "listing_order": "listing_order",
                "threads": "thread_count", "deterministic_kernels": "nondeterministic_kernel"}
KEEPS_HINT = {"data_order": set(CONTROL_KIND) - {"hash_seed", "listing_order", "clock", "entropy"},
              "worker_seeding": {"torch_cpu"}, "time_seed": {"clock", "entropy"}}

ADVICE = {
    "python_rng": "seed it: random.seed(seed) for the global, random.Random(seed) for an instance",
    "numpy_global": "call np.random.seed(seed), or better draw from np.random.default_rng(seed)",
    "numpy_unseeded": "pass a seed where it is created: np.random.default_rng(seed) / np.random.RandomState(seed)",
    "torch_cpu": "call torch.manual_seed(seed) before the model and data are built",
    "torch_cuda": "call torch.manual_seed(seed) (it seeds every CUDA device too)",
    "worker_seeding": "seed torch, or pass a seeded generator= and a worker_init_fn to the DataLoader",
    "clock": "derive seeds and random choices from a fixed seed, not from time.time() / datetime.now()",
    "entropy": "derive seeds and random choices from a fixed seed, not from uuid.uuid4() / os.urandom()",
    "hash_seed": "sort the set or dict of strings before depending on its order, or pin PYTHONHASHSEED",
    "listing_order": "sort the listing: sorted(os.listdir(...)) / sorted(glob.glob(...))",
    "threads": "pin the thread count (torch.set_num_threads) in every run",
    "deterministic_kernels": "call torch.use_deterministic_algorithms(True) (and set CUBLAS_WORKSPACE_CONFIG on CUDA)",
}

THREAD_KEYS = ("num_threads", "num_interop_threads")  # environment keys of a thread-count difference
# the threads control confirmed although both replicas ran with the same thread count
ADVICE_SAME_THREADS = ("the replicas ran with the same thread count, so pinning it does not help: an op whose "
                       "multi-threaded reduction order varies run to run is the source; run it single-threaded "
                       "(torch.set_num_threads(1)) or replace it (torch.use_deterministic_algorithms(True) names "
                       "the ops torch knows)")


def plan(hints: list, applicable: list) -> list:
    """The controls to try, in order: those the hints name (strongest hint first), then every other
    applicable one in the table's order (cheapest, most common first)."""
    ordered = [c for h in hints for c in h.controls] + [c.name for c in CONTROLS]
    seen: list = []
    for c in ordered:
        if c in applicable and c not in seen:
            seen.append(c)
    return seen


def needs_uncontrolled_rerun(e: Evidence, control: Optional[str]) -> bool:
    """A rerun that agreed with strict deterministic kernels, or with one thread when both replicas
    already had the same count, proves something only if the replicas still differ without it: a race
    (atomics, a multi-threaded reduction) can come out the same in one pair by chance. The sources the
    other controls fix (seeds, clock, hash seed, listing order) differ in every run of the pair."""
    return control == "deterministic_kernels" or (
        control == "threads" and not any(k in e.env_diff for k in THREAD_KEYS))


def _intermittent(experiments: list) -> bool:
    """The rerun without any control agreed too: the divergence did not recur in it."""
    return any(not x.controls and x.agreed for x in experiments)


def confirmed_control(plan_order: list, experiments: list) -> Optional[str]:
    """The first control, in plan order, whose rerun alone made the replicas agree."""
    agreed = {next(iter(x.controls)) for x in experiments if x.agreed and len(x.controls) == 1}
    return next((c for c in plan_order if c in agreed), None)


def _context(hints: list, control: str) -> Optional[Hint]:
    """The first hint that named this control (it carries the call site and the symptom)."""
    return next((h for h in hints if control in h.controls), None)


def _site_of(e: Evidence, control: str) -> Optional[str]:
    """Where the program created or reseeded, without a seed, the source this control fixes."""
    for c in e.a.calls:
        if c.kind == "unseeded" and c.origin == "user" and API_CONTROL.get(c.api) == control:
            return c.made_without_seed(API_NOUN.get(c.api, c.api))
    return None


def _advice(control: str, hint: Optional[Hint]) -> str:
    if hint is not None and hint.kind == "data_order" and hint.sampler is not None:
        if control == "torch_cpu" and hint.sampler in ("RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler"):
            return "pass generator=torch.Generator().manual_seed(seed) to the DataLoader (or seed torch)"
        if control != "torch_cpu" and hint.sampler not in TORCH_SAMPLERS:  # torch's own draw from torch
            return (f"the sampler ({hint.sampler}) shuffles with its own generator, which generator= does not reach: "
                    + ADVICE[control])
    return ADVICE[control]


def conclude(e: Evidence, hints: list, plan_order: list, experiments: list) -> Cause:
    reruns = [x.to_dict() for x in experiments]
    control = confirmed_control(plan_order, experiments)
    if control is not None and _intermittent(experiments):
        top = hints[0] if hints else None
        note = (f"not confirmed: the replicas agreed with {BY_NAME[control].label}, but also in a rerun without "
                "any control: the divergence is intermittent (a race that may come out either way), so that "
                "rerun proves nothing")
        return Cause(top.kind if top else "nondeterministic_kernel", f"{top.detail} ({note})" if top else note,
                     {"rule": top.rule if top else None, "site": top.site if top else None,
                      "api": top.api if top else None, "intermittent": True},
                     confirmed=False, reruns=reruns)
    if control is not None:
        hint = _context(hints, control)
        kind = CONTROL_KIND[control]
        if hint is not None and control in KEEPS_HINT.get(hint.kind, ()):
            kind = hint.kind
        same_threads = control == "threads" and not any(k in e.env_diff for k in THREAD_KEYS)
        if same_threads:  # both ran with one count: a kernel that is nondeterministic when multi-threaded
            kind = "nondeterministic_kernel"
        site = _site_of(e, control)
        parts = [f"confirmed by rerun: with {BY_NAME[control].label}, the replicas agree"]
        if hint is not None:
            parts.append(hint.detail)
        if site and (hint is None or hint.site is None or hint.site not in site):
            parts.append(site)
        parts.append(ADVICE_SAME_THREADS if same_threads else _advice(control, hint))
        evidence = {"rule": hint.rule if hint else None, "site": (hint.site if hint else None) or site,
                    "api": hint.api if hint else None}
        return Cause(kind, "; ".join(parts), evidence, confirmed=True, control=control, reruns=reruns)
    together = any(x.agreed and len(x.controls) > 1 for x in experiments)
    if hints:
        top = hints[0]
        if together:
            note = ("not confirmed: no single control made the replicas agree, only all of them together "
                    "(several sources vary)")
        elif experiments:
            note = "not confirmed: no control made the replicas agree"
        else:
            note = "not confirmed by rerun (diagnosis reruns were not run)"
        failed = "".join(f"; the {x.label} rerun failed: {x.error[:200]}" for x in experiments if x.error)
        return Cause(top.kind, f"{top.detail} ({note}){failed}", {"rule": top.rule, "site": top.site, "api": top.api},
                     confirmed=False, reruns=reruns)
    detail = ("no recorded evidence explains the divergence, and no control made the replicas agree" if experiments
              else "no recorded evidence explains the divergence")
    if together:
        detail = "the replicas agree only with every control applied at once; no single source explains it"
    return Cause("unknown", detail, {}, confirmed=False, reruns=reruns)
