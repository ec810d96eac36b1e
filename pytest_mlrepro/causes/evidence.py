"""Typed evidence for naming a cause: what two differing replicas recorded, read once from their
meta records, plus the facts about the divergence the localizer found. The rules read these
records only; no rule reads a dict key by key or another stage's message text."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..result import Divergence


@dataclass(frozen=True)
class SeedCall:
    """One call of a seeding API. ``kind``: "value" (a seed value), "unseeded" (a generator made or
    reseeded without one: OS entropy), "object" (a generator or other object passed through: never a
    seed value), "read" (the program's first read of the clock or OS entropy: time.time, uuid.uuid4).
    ``origin``: "user", "library" or "torch" (who made the call)."""

    api: str
    kind: str
    value: object = None
    site: str = "<unknown>"
    origin: str = "user"
    first_draw: Optional[str] = None  # where a generator made without a seed was first drawn from

    @classmethod
    def from_record(cls, d: dict) -> "SeedCall":
        kind = d.get("kind") or ("unseeded" if d.get("unseeded") else "value")
        return cls(api=d["api"], kind=kind, value=d.get("value"), site=d.get("site", "<unknown>"),
                   origin=d.get("origin", "user"), first_draw=d.get("first_draw"))

    def made_without_seed(self, noun: str) -> str:
        drawn = f", first drawn at {self.first_draw}" if self.first_draw else ""
        return f"{noun} created without a seed at {self.site}{drawn}"


@dataclass(frozen=True)
class LoaderRecord:
    """One DataLoader iterator: its sampler, workers, worker base seed and a hash of its index order."""

    site: str
    sampler: str
    num_workers: int
    base_seed: int
    index_hash: str

    @classmethod
    def from_record(cls, d: dict) -> "LoaderRecord":
        return cls(site=d["site"], sampler=d["sampler"], num_workers=d["num_workers"], base_seed=d["base_seed"],
                   index_hash=d["index_hash"])


@dataclass(frozen=True)
class ReplicaEvidence:
    seeding_mode: str  # harness | program
    calls: tuple = ()  # tuple[SeedCall, ...]
    seeded: frozenset = frozenset()  # global generators the program seeded with a value
    loaders: tuple = ()  # tuple[LoaderRecord, ...]
    flagged_ops: tuple = ()  # "op at site" strings torch's warn-only pass reported
    rng_at_first_step: Optional[dict] = None  # generator name -> state hash

    @classmethod
    def from_meta(cls, meta: dict, rng_at_first_step: Optional[dict] = None) -> "ReplicaEvidence":
        seeding = meta["seeding"]
        return cls(seeding_mode=seeding["mode"], calls=tuple(SeedCall.from_record(c) for c in seeding["calls"]),
                   seeded=frozenset(seeding.get("seeded", [])),
                   loaders=tuple(LoaderRecord.from_record(r) for r in meta.get("dataloaders", [])),
                   flagged_ops=tuple(f"{o['op']} at {o['call_site']}" for o in meta.get("nondeterministic_ops", [])),
                   rng_at_first_step=rng_at_first_step)


@dataclass(frozen=True)
class DivergenceFacts:
    """What the localizer established, as fields: phase (init | input | forward | backward |
    optimizer | final | None), the module, whether its inputs and RNG state matched."""

    phase: Optional[str] = None
    module: Optional[str] = None
    inputs_matched: Optional[bool] = None
    rng_matched: Optional[bool] = None
    step: Optional[int] = None

    @classmethod
    def from_divergence(cls, d: Optional[Divergence]) -> "DivergenceFacts":
        if d is None:
            return cls()
        rng = d.evidence.get("rng_matched") if isinstance(d.evidence, dict) else None
        return cls(phase=d.phase, module=d.module, inputs_matched=d.inputs_matched, rng_matched=rng, step=d.step)


@dataclass(frozen=True)
class Evidence:
    """Everything the rules see: the two replicas (0 and the first that differs), the divergence,
    the environment keys that differ (name -> (a, b))."""

    a: ReplicaEvidence
    b: ReplicaEvidence
    divergence: DivergenceFacts = field(default_factory=DivergenceFacts)
    env_diff: dict = field(default_factory=dict)

    def rng_differs(self) -> list:
        """Global generators whose state differed between the replicas when training started."""
        ra, rb = self.a.rng_at_first_step or {}, self.b.rng_at_first_step or {}
        return [g for g in ra if g in rb and ra[g] != rb[g]]
