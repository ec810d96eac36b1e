"""DDP audits (``nproc`` > 1): what the parent reads from a replica's ranks, and what it concludes.

A DDP replica (``distributed_rank``) leaves one ordinary replica folder per rank
(``out/rank-K/{weights.pt,trace.pt,meta.json,ddp.json}``). The audit compares rank 0's like any
replica's; :func:`review` then adds what only ranks can tell:

- each rank's final weights across replicas (a rank whose weights DDP does not sync can differ alone);
- ``first_divergence.rank``: the rank where the difference starts (:func:`origin_rank`, rules in order);
- cross-rank findings, in every replica: parameters DDP keeps in sync agree on every rank at every
  traced step (``ddp.params_in_sync``); every rank read the same batches (``ddp.data_shards``); random
  generators that draw during training start from the same state on every rank (``ddp.rng_per_rank``,
  a warning: identical dropout masks on every rank, transformers#31412). Each check is reported once,
  with the replicas it held in (:func:`merge_findings`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import checks, localize
from .distributed_rank import EVIDENCE_FILE, RANK_DIR, RANKS_FILE, RankEvidence, read_progress
from .result import Divergence, Finding
from .runner import ReplicaOutput
from .tracing.record import TraceRecord

GENERATORS = ("torch", "cuda", "numpy", "python")  # rng_fingerprints' keys, the draws a rank may share


@dataclass
class DistributedOutput(ReplicaOutput):
    """A DDP replica: reads as its rank 0 (``meta``, ``trace``, ``weights_path``); ``ranks`` has them all."""

    root: Path = field(default=Path("."))
    ranks: list = field(default_factory=list)  # list[ReplicaOutput], rank k at k

    @classmethod
    def of(cls, index: int, out_dir: Path, nproc: int) -> "DistributedOutput":
        out_dir = Path(out_dir)
        ranks = [ReplicaOutput(index, out_dir / RANK_DIR.format(k)) for k in range(nproc)]
        return cls(index, ranks[0].out_dir, root=out_dir, ranks=ranks)

    def evidence(self, rank: int) -> RankEvidence:
        """The rank's ddp.json: DataLoader shards, RNG states at the end, DDP modules built."""
        return RankEvidence.from_plain(json.loads((self.ranks[rank].out_dir / EVIDENCE_FILE).read_text()))

    def rank_ends(self) -> dict:
        return json.loads((self.root / RANKS_FILE).read_text())


def hang_detail(out_dir: Path, nproc: int) -> str:
    """For a DDP replica killed at its timeout: how far each rank got (steps taken, and whether its next
    DDP forward had begun). The rank behind is the one the others wait for in a collective; when every
    running rank is equally far, the message says the ranks cannot be told apart."""
    progress = read_progress(out_dir, nproc)
    if progress is None:
        return "; the ranks had not started"
    done = {k for k in range(nproc) if (Path(out_dir) / RANK_DIR.format(k) / "meta.json").exists()}
    running = [k for k in range(nproc) if k not in done]

    def where(k: int) -> str:
        steps, forwards = progress[k]
        if k in done:
            return f"rank {k} had finished"
        inside = f", inside step {steps} (its forward ran)" if forwards > steps else ""
        return f"rank {k} after {steps} steps{inside}"

    parts = ", ".join(where(k) for k in range(nproc))
    if not running:
        return f"; {parts}"
    behind = [k for k in running if progress[k] == min(progress[j] for j in running)]
    if len(behind) < len(running) or done:  # behind the others, or the one still running
        who = f"rank {behind[0]} is" if len(behind) == 1 else f"ranks {', '.join(map(str, behind))} are"
        return f"; {parts}: {who} behind, the likely hang (the others wait for it in a collective)"
    return f"; {parts}: every running rank got equally far (a hang no rank's progress tells apart)"


# -- where a difference starts ---------------------------------------------------------------------------

@dataclass
class RankOrigin:
    """Which rank a divergence starts on, the rule that decided it, and what it could not prove."""

    rank: Optional[int]
    step: Optional[int]
    rule: str
    note: str
    ranks_diverged: list = field(default_factory=list)


def _loss(trace: TraceRecord, step: int) -> Optional[float]:
    losses = trace.losses or []
    return losses[step] if 0 <= step < len(losses) else None


def origin_rank(step: Optional[int], kind: str, diverged: list[int], traces_a: list[TraceRecord], traces_b: list[TraceRecord],
                replay_phases: dict, ddp: bool) -> RankOrigin:
    """The rank a divergence at ``step`` starts on, by the first rule that decides (in order):

    1. init: the initial weights differ: with DDP rank 0's (DDP broadcasts them), else the lowest rank;
    2. one rank alone diverged (no sync carried it): that rank;
    3. loss: the ranks whose loss at ``step`` differs between replicas, while the others' matched. The
       loss comes before the all-reduce, from weights that still matched: a rank whose loss matched
       received the difference through the gradient all-reduce;
    4. replay: the ranks whose replayed forward (batch or a module's output) differs;
    otherwise no rank is named: the difference arose in backward, the all-reduce or the optimizer, which
    every rank shares under DDP, and nothing recorded before the all-reduce differs.
    """
    first = RankOrigin(None, step, "none", "", ranks_diverged=list(diverged))
    if not diverged:
        return first
    if kind == "init":
        rank = 0 if ddp and 0 in diverged else min(diverged)
        return RankOrigin(rank, step, "init", "the initial weights differ" + (
            "; DDP broadcasts rank 0's to every rank" if ddp and rank == 0 else ""), list(diverged))
    if len(diverged) == 1 and len(traces_a) > 1:
        return RankOrigin(diverged[0], step, "alone", f"only rank {diverged[0]}'s weights differ between replicas",
                          list(diverged))
    if step is not None:
        differs = []
        for k in range(len(traces_a)):
            la, lb = _loss(traces_a[k], step), _loss(traces_b[k], step)
            if la is None or lb is None:
                differs = None
                break
            if la != lb:
                differs.append(k)
        if differs and len(differs) < len(traces_a):
            others = [k for k in range(len(traces_a)) if k not in differs]
            return RankOrigin(differs[0], step, "loss", (
                f"the loss at step {step} differs between replicas on rank{'s' if len(differs) > 1 else ''} "
                f"{', '.join(map(str, differs))} only; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} "
                "computed the same loss from the same weights and received the difference through the all-reduce"),
                list(diverged))
    forward = sorted(k for k, phase in replay_phases.items() if phase in ("input", "forward"))
    if forward and len(forward) < len(traces_a):
        return RankOrigin(forward[0], step, "replay", (
            f"the replayed forward of step {step} differs on rank{'s' if len(forward) > 1 else ''} "
            f"{', '.join(map(str, forward))} only"), list(diverged))
    return RankOrigin(None, step, "none", (
        "every rank diverges at this step and nothing recorded before the all-reduce (loss, replayed forward) "
        "tells the ranks apart: the difference arose in backward, the all-reduce or the optimizer"), list(diverged))


# -- cross-rank findings (one replica) -------------------------------------------------------------------

def params_in_sync(traces: list[TraceRecord], ddp: bool) -> Optional[Finding]:
    """With DDP every rank holds the same parameters after each step: the first traced step where one
    does not. Buffers are left out: DDP broadcasts rank 0's buffers at the start of each forward, and
    the forward then updates them from each rank's own batch (BatchNorm statistics), so at the step
    they differ on a correct program."""
    if not ddp:
        return None
    for k in range(1, len(traces)):
        td = localize.first_divergence(traces[0], traces[k], params_only=True)
        if td is None:
            continue
        where = td.note if td.kind == "structure" else (
            f"after step {td.step}" if td.kind == "step" else f"before step {td.step} (the initial weights)")
        names = td.tensors[:5]
        return Finding(checks.DDP_PARAMS, "fail", (
            f"rank {k}'s parameters differ from rank 0's {where}"
            + (f": `{names[0]}`" + (f" and {len(td.tensors) - 1} more" if len(td.tensors) > 1 else "") if names else "")
            + "; DistributedDataParallel keeps every rank's parameters equal, so something changed them outside the "
              "all-reduce (a rank-only update, parameters outside the DDP-wrapped model, or a skipped sync)"),
            {"rank": k, "reference_rank": 0, "step": td.step, "kind": td.kind, "tensors": td.tensors})
    return None


def rng_per_rank(traces: list[TraceRecord], evidence: list[RankEvidence]) -> Optional[Finding]:
    """Generators with the same state on every rank at the first step that the training then drew from:
    every rank drew the same dropout masks (or noise, or augmentations)."""
    shared = []
    for name in GENERATORS:
        states = [(t.rng_at_first_step or {}).get(name) for t in traces]
        end = evidence[0].rng_at_end.get(name)
        if states[0] is not None and all(s == states[0] for s in states) and end is not None and end != states[0]:
            shared.append(name)
    if not shared:
        return None
    return Finding(checks.DDP_RNG, "warn", (
        f"the {', '.join(shared)} generator{'s' if len(shared) > 1 else ''} had the same state on all {len(traces)} "
        "ranks at the first step and the training drew from it: dropout masks and other random draws are identical "
        "on every rank (seed each rank differently for its own draws, e.g. seed + rank, after building the model)"),
        {"generators": shared, "ranks": len(traces)})


def data_shards(traces: list[TraceRecord], evidence: list[RankEvidence]) -> Optional[Finding]:
    """Every rank trained on the same batches: a training DataLoader gave every rank the same indices and
    the same first batch (no DistributedSampler), or, without one, every rank's loss matched at every step."""
    loaders = [e.loaders for e in evidence]
    for i in range(min(len(x) for x in loaders)):
        first = loaders[0][i]
        same = all((x[i].index_hash, x[i].first_batch) == (first.index_hash, first.first_batch) for x in loaders[1:])
        if first.training and first.batches and same:
            return Finding(checks.DDP_SHARDS, "fail", (
                f"every one of the {len(traces)} ranks read the same batches from a training DataLoader (sampler "
                f"{first.sampler}, {first.batches} batches: same indices, same first batch): each rank should "
                "read its own shard; give the DataLoader a DistributedSampler (and call set_epoch each epoch)"),
                {"loader": i, "sampler": first.sampler, "batches": first.batches, "ranks": len(traces),
                 "evidence": "dataloader"})
    if any(x.training for x in loaders[0]):
        return None
    losses = [list(t.losses or []) for t in traces]
    known = [i for i, v in enumerate(losses[0]) if v is not None]
    if len(known) >= 2 and all(len(l) == len(losses[0]) for l in losses) and \
            all(all(l[i] == losses[0][i] for l in losses[1:]) for i in known):
        return Finding(checks.DDP_SHARDS, "fail", (
            f"every one of the {len(traces)} ranks computed the same loss at each of {len(known)} steps: they trained "
            "on the same batches; each rank should read its own shard of the data"),
            {"ranks": len(traces), "steps": len(known), "evidence": "loss"})
    return None


def cross_rank_findings(output: DistributedOutput) -> list[Finding]:
    """One replica's cross-rank findings, from its ranks' traces and ddp.json."""
    traces = [r.trace() for r in output.ranks]
    evidence = [output.evidence(k) for k in range(len(output.ranks))]
    ddp = all(e.ddp_modules > 0 for e in evidence)
    found = (params_in_sync(traces, ddp), data_shards(traces, evidence), rng_per_rank(traces, evidence))
    return [f for f in found if f is not None]


# -- cross-rank findings (every replica) -----------------------------------------------------------------

def replica_findings(outputs: list) -> list[Finding]:
    """Every replica's cross-rank findings, each check reported once (:func:`merge_findings`)."""
    return merge_findings([(o.index, cross_rank_findings(o)) for o in outputs])


def merge_findings(per_replica: list[tuple[int, list[Finding]]]) -> list[Finding]:
    """One finding per check, however many replicas it held in: the first such replica's, with
    ``details["replicas"]`` listing them all. Replicas that disagree (the check held in some only, or
    with other details) are themselves a sign of nondeterminism: ``details["per_replica"]`` then holds
    each replica's details (None where it did not hold) and the message says so. The verdict stays the
    check's own, so a finding never counts twice and a disagreement adds no verdict of its own."""
    held: dict[str, dict[int, Finding]] = {}  # check -> replica -> its finding, checks in first-seen order
    for index, findings in per_replica:
        for f in findings:
            held.setdefault(f.check, {})[index] = f
    everyone = [index for index, _ in per_replica]
    merged = []
    for check, by_replica in held.items():
        first = next(iter(by_replica.values()))
        replicas = sorted(by_replica)
        details = {**first.details, "replicas": replicas}
        message = first.message
        if replicas != sorted(everyone) or any(f.details != first.details for f in by_replica.values()):
            details["per_replica"] = {str(i): by_replica[i].details if i in by_replica else None for i in everyone}
            where = (f"replica{'s' if len(replicas) > 1 else ''} {', '.join(map(str, replicas))} of "
                     f"{', '.join(map(str, everyone))}")
            message += (f" (in {where}; the cross-rank evidence differs between replicas, itself a sign of "
                        "nondeterminism)")
        merged.append(Finding(check, first.verdict, message, details))
    return merged


# -- the audit's part ------------------------------------------------------------------------------------

def review(run, *, localize_divergence: bool = True) -> None:
    """After the audit compared rank 0: the other ranks' weights, the rank a divergence starts on, and
    the cross-rank findings. ``run`` is the audit's ``_Audit`` (its outputs, replays and ``_run_all``)."""
    from .compare import compare_state_files
    from .errors import ReplicaError

    r, outputs = run.result, run.outputs
    nproc = len(outputs[0].ranks)
    r.findings.extend(replica_findings(outputs))
    traces_a = [x.trace() for x in outputs[0].ranks]
    other, traces_b = _first_other(outputs, traces_a)
    divs = {k: localize.first_divergence(traces_a[k], traces_b[k]) for k in range(nproc)}
    if r.deterministic:  # rank 0 matched: a rank DDP does not sync may still differ alone
        for k in range(1, nproc):
            diffs = compare_state_files(outputs[0].ranks[k].weights_path, outputs[other].ranks[k].weights_path,
                                        **r.comparison).diffs
            if not all(d.equal for d in diffs) or (divs[k] is not None and r.comparison["mode"] == "bitwise"):
                r.deterministic, r.tensors = False, diffs
                break
        if r.deterministic:
            return
    diverged = [k for k in range(nproc) if divs[k] is not None]
    if not diverged:  # only the final weights differ: no step to attribute
        return
    earliest = min(divs[k].step for k in diverged)
    diverged = [k for k in diverged if divs[k].step == earliest]
    step = r.first_divergence.step if r.first_divergence is not None and r.first_divergence.step is not None \
        and 0 in diverged else earliest
    kind = divs[diverged[0]].kind
    replays = getattr(run, "replays", None)
    if (replays is None or replays[0].trace().replay.step != step) and localize_divergence and kind == "step":
        try:
            replays = run._run_all([(0, "replay", {"replay_step": step}), (other, "replay", {"replay_step": step})])
        except ReplicaError:
            replays = None
    phases = {}
    described = {}
    if replays is not None:
        for k in range(nproc):
            ra, rb = replays[0].ranks[k].trace().replay, replays[1].ranks[k].trace().replay
            td = divs[k] if divs[k] is not None else localize.TraceDivergence(0, "step", step)
            td = localize.TraceDivergence(td.entry, td.kind, step, td.tensors, td.note)
            described[k] = localize.describe_from_replay(td, traces_a[k], ra, rb)
            phases[k] = described[k].phase
    ddp = all(outputs[0].evidence(k).ddp_modules > 0 for k in range(nproc))
    origin = origin_rank(step, kind, diverged, traces_a, traces_b, phases, ddp)
    div = r.first_divergence
    if origin.rank is not None and origin.rank != 0 or div is None:
        k = origin.rank if origin.rank is not None else diverged[0]
        if k in described:
            div = described[k]
        elif kind == "init":
            div = localize.describe_init(divs[k], traces_a[k])
        else:
            div = localize.describe_from_replay(divs[k], traces_a[k], None, None)
    div.rank = origin.rank
    div.evidence = {**div.evidence, "rank_rule": origin.rule, "ranks_diverged": origin.ranks_diverged}
    lead = f"rank {origin.rank}: " if origin.rank is not None else "rank unknown: "
    div.message = lead + div.message + (f" ({origin.note})" if origin.note else "")
    r.first_divergence = div


def _first_other(outputs: list, traces_a: list) -> tuple:
    """The first replica whose traces on some rank differ from replica 0's (else replica 1), with its traces."""
    for i in range(1, len(outputs)):
        traces = [x.trace() for x in outputs[i].ranks]
        if any(localize.first_divergence(a, b) is not None for a, b in zip(traces_a, traces)) or i == len(outputs) - 1:
            return i, traces
    return 1, [x.trace() for x in outputs[1].ranks]
