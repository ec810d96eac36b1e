"""Name the likely cause of a divergence from the evidence the replicas recorded.

Evidence, strongest first: seeding calls with different values (a seed from the clock or OS);
DataLoader worker base seeds or sampler orders that differ; replicas run with different thread
counts; generators the program used without seeding; a module whose inputs and RNG state matched
but whose output did not (a nondeterministic kernel); and, by experiment, PYTHONHASHSEED.
"""
from __future__ import annotations

from typing import Optional

from .result import Cause, Divergence

GENERATOR_LABELS = {"python": "python `random`", "numpy": "numpy's global RNG", "torch": "torch's default generator",
                    "cuda": "torch's CUDA generator"}


def _seed_values_differ(ma: dict, mb: dict) -> Optional[Cause]:
    # torch's own seeding of internal generators (a sampler seeding its Generator from the global
    # RNG) is a consequence, not a cause: only the program's and its libraries' calls count
    ca = [c for c in ma["seeding"]["calls"] if not c["unseeded"] and c.get("origin") != "torch"]
    cb = [c for c in mb["seeding"]["calls"] if not c["unseeded"] and c.get("origin") != "torch"]
    for x, y in zip(ca, cb):
        if x["api"] == y["api"] and x["value"] != y["value"]:
            return Cause("time_seed",
                         f"{x['api']} was called with different values ({x['value']} vs {y['value']}) at {x['site']}: "
                         "the seed comes from the clock, the process id or OS entropy",
                         {"api": x["api"], "values": [x["value"], y["value"]], "site": x["site"]})
    return None


def _unseeded_instances(ma: dict) -> list[dict]:
    """Generators created without a seed by the program itself (a library's own, such as tempfile's
    name generator that DataLoader workers make multiprocessing create, do not count)."""
    return [c for c in ma["seeding"]["calls"] if c["unseeded"] and c.get("origin", "user") == "user"]


def _dataloaders(ma: dict, mb: dict, phase: Optional[str]) -> Optional[Cause]:
    for i, (a, b) in enumerate(zip(ma.get("dataloaders", []), mb.get("dataloaders", []))):
        if a["index_hash"] != b["index_hash"]:
            return Cause("data_order",
                         f"DataLoader iterator #{i} (created at {a['site']}, {a['sampler']}) yielded its samples in a "
                         "different order: its shuffling draws from a generator that was not seeded the same way "
                         "(pass generator=torch.Generator().manual_seed(seed))",
                         {"iterator": i, "sampler": a["sampler"], "site": a["site"]})
        if a["num_workers"] > 0 and a["base_seed"] != b["base_seed"] and phase in (None, "input", "init"):
            return Cause("worker_seeding",
                         f"DataLoader iterator #{i} (created at {a['site']}) gave its {a['num_workers']} workers different "
                         f"base seeds ({a['base_seed']} vs {b['base_seed']}): they are drawn from torch's default generator, "
                         "which the program did not seed (seed torch, or pass a seeded generator= and a worker_init_fn)",
                         {"iterator": i, "base_seeds": [a["base_seed"], b["base_seed"]], "site": a["site"]})
    return None


def infer(ma: dict, mb: dict, divergence: Optional[Divergence], env_diff: dict, *, hash_seed_confirmed: Optional[bool],
          rng_a: Optional[dict] = None, rng_b: Optional[dict] = None) -> Cause:
    phase = divergence.phase if divergence else None
    cause = _seed_values_differ(ma, mb)
    if cause:
        return cause
    cause = _dataloaders(ma, mb, phase)
    if cause:
        return cause
    if "num_threads" in env_diff or "num_interop_threads" in env_diff:
        a, b = env_diff.get("num_threads", env_diff.get("num_interop_threads"))
        return Cause("thread_count", f"the replicas ran with different thread counts ({a} vs {b}); reductions split "
                     "differently and round differently", {"threads": [a, b]})
    if hash_seed_confirmed:
        return Cause("hash_seed", "the runs agree once PYTHONHASHSEED is pinned: the program depends on the iteration "
                     "order of a set or dict of strings (sort it, or pin PYTHONHASHSEED)", {})
    kernel = phase in ("forward", "backward") and divergence is not None and divergence.inputs_matched
    rng_matched = divergence.evidence.get("rng_matched", True) if divergence else True
    if kernel and rng_matched:
        flagged = [f"{op['op']} at {op['call_site']}" for op in ma.get("nondeterministic_ops", [])]
        seen = f"; torch flagged: {'; '.join(flagged[:3])}" if flagged else ""
        return Cause("nondeterministic_kernel",
                     f"{divergence.message.split(': ', 1)[-1]}; the same inputs and the same RNG state gave different "
                     "results, so the computation itself is nondeterministic (atomics, thread timing, a kernel without "
                     f"a deterministic implementation){seen}", {"module": divergence.module, "phase": phase,
                                                               "flagged_ops": flagged})
    seeded = set(ma["seeding"].get("seeded", []))
    differing = []
    if rng_a and rng_b:
        differing = [g for g in rng_a if rng_b.get(g) != rng_a[g]]
    unseeded_used = [g for g in differing if g not in seeded]
    instances = _unseeded_instances(ma)
    if instances:
        c = instances[0]
        return Cause("unseeded_rng", f"{c['api']} created a generator without a seed at {c['site']} (it draws from OS "
                     "entropy)", {"site": c["site"], "api": c["api"]})
    if ma["seeding"]["mode"] == "program" and unseeded_used:
        names = ", ".join(GENERATOR_LABELS.get(g, g) for g in unseeded_used)
        did = ", ".join(GENERATOR_LABELS.get(g, g) for g in sorted(seeded)) or "none"
        return Cause("unseeded_rng", f"the program never seeded {names} (it seeded: {did}); that state differed "
                     "between the runs when training started", {"unseeded": unseeded_used, "seeded": sorted(seeded)})
    if phase == "forward" and divergence is not None and divergence.inputs_matched and not rng_matched:
        return Cause("unseeded_rng", f"{divergence.message.split(': ', 1)[-1]}: a random draw with a generator state "
                     "that differed between the runs", {"module": divergence.module})
    if phase == "input":
        return Cause("data_order", "the batch entering the model differs while every generator the harness can see "
                     "was seeded alike: the data pipeline has its own source of variation (file listing order, an "
                     "unseeded library RNG, OS entropy)", {})
    return Cause("unknown", "no recorded evidence explains the divergence", {})
