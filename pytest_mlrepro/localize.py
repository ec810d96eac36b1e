"""Where two replicas part: the first divergent step from their traces (``TraceRecord``), then (from
a replay of that step) the phase and module: the batch entering the model, the forward of a module
whose inputs matched, a gradient, the optimizer update, or a buffer changed outside the optimizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .result import Divergence
from .tracing.record import BUFFER, ReplayRecord, TraceRecord


@dataclass
class TraceDivergence:
    entry: int
    kind: str  # init | step | structure
    step: int
    tensors: list = field(default_factory=list)
    note: str = ""


def _entry_slices(trace: TraceRecord) -> list[tuple[str, int, int, int, int]]:
    """(kind, step, group, start, length) for every entry of a trace's flat fingerprint array."""
    out, start = [], 0
    for kind, step, opt in trace.entries:
        n = len(trace.opt_indices[opt])
        out.append((kind, step, opt, start, n))
        start += n
    return out


def _sample_slices(trace: TraceRecord) -> list[list[tuple[int, int]]]:
    """Per entry, the (start, length) of each tensor's samples in the flat samples array."""
    out, start = [], 0
    for _kind, _step, opt in trace.entries:
        spans = []
        for n in trace.opt_sample_lens[opt]:
            spans.append((start, n))
            start += n
        out.append(spans)
    return out


def trajectory(trace: TraceRecord) -> dict:
    """The part of a trace a baseline keeps: its structure and per-entry fingerprints, as plain data
    (``TraceRecord.from_trajectory`` reads it back)."""
    return trace.trajectory()


def _pairs(ta: TraceRecord, tb: TraceRecord):
    """(index in a, entry of a, index in b, entry of b) for the entries both traces recorded, matched by (kind, step),
    in replica 0's order. Replicas that chose their own recording interval (``trace_every="auto"``)
    recorded different steps: an entry only one of them has is skipped."""
    sa, sb = _entry_slices(ta), _entry_slices(tb)
    by_key: dict = {}
    for j, e in enumerate(sb):
        by_key.setdefault((e[0], e[1]), []).append(j)
    for i, ea in enumerate(sa):
        js = by_key.get((ea[0], ea[1]))
        if js:
            j = js.pop(0)
            yield i, ea, j, sb[j]


def _same_schedule(ta: TraceRecord, tb: TraceRecord) -> bool:
    return (ta.every, ta.dense_until) == (tb.every, tb.dense_until)


def first_divergence(ta: TraceRecord, tb: TraceRecord, *, params_only: bool = False) -> Optional[TraceDivergence]:
    """The first trace entry whose fingerprints differ (None when the traces are identical).
    ``params_only``: buffers left out (ranks of one DDP replica hold equal parameters, not equal
    BatchNorm statistics: each updates them from its own batches)."""
    fa, fb = ta.fp, tb.fp
    for i, ea, _, eb in _pairs(ta, tb):
        kind, step, opt, start_a, n = ea
        if (ea[0], ea[2], ea[4]) != (eb[0], eb[2], eb[4]) or ta.opt_indices[opt] != tb.opt_indices[eb[2]]:
            return TraceDivergence(i, "structure", step, note=(
                f"the optimizers differ at step {step}: replica 0 stepped optimizer {opt} over {n} tensors, "
                f"the other optimizer {eb[2]} over {eb[4]}"))
        seg_a = fa[start_a:start_a + n]
        seg_b = fb[eb[3]:eb[3] + n]
        if not bool((seg_a == seg_b).all()):
            names = [ta.param_names[ta.opt_indices[opt][j]] for j in (seg_a != seg_b).nonzero().flatten().tolist()]
            if params_only:
                names = [name for name in names if ta.kind_of(name) != BUFFER]
            if names:
                return TraceDivergence(i, kind, step, tensors=_parameters_first(ta, names))
    if ta.steps != tb.steps or _same_schedule(ta, tb) and len(ta.entries) != len(tb.entries):
        n = min(len(ta.entries), len(tb.entries))
        return TraceDivergence(n, "structure", min(ta.steps, tb.steps), note=(
            f"replica 0 made {ta.steps} optimizer steps, the other {tb.steps}"))
    return None


def exact_step(td: TraceDivergence, ta: TraceRecord, tb: TraceRecord) -> bool:
    """True when the step before ``td`` was recorded, and matched, in both traces: ``td.step`` is then the
    first divergent step, not just the first recorded one after it (which a dense re-trace finds)."""
    if td.kind != "step" or td.step == 0:
        return True
    before = ("step", td.step - 1)
    return any((e[0], e[1]) == before for e in ta.entries) and any((e[0], e[1]) == before for e in tb.entries)


def last_common_step_before(td: TraceDivergence, ta: TraceRecord, tb: TraceRecord) -> Optional[int]:
    """The last step before ``td`` both traces recorded (where they still agreed), None when only the
    initial weights were: a divergence first seen at ``td.step`` began after it."""
    steps_a = {e[1] for e in ta.entries if e[0] == "step" and e[1] < td.step}
    common = [e[1] for e in tb.entries if e[0] == "step" and e[1] in steps_a]
    return max(common) if common else None


def _parameters_first(trace: TraceRecord, names: list) -> list:
    """Differing tensors, parameters before buffers: a buffer that differs with its parameters followed them."""
    return sorted(names, key=lambda n: trace.kind_of(n) == BUFFER)


def step_divergence(ta: TraceRecord, tb: TraceRecord, limit: int = 2000) -> list[dict]:
    """Per step: the largest |a - b| over the sampled elements, and how many fingerprints differ (for plots)."""
    import torch

    pa, pb = _sample_slices(ta), _sample_slices(tb)
    rows = []
    for i, ea, j, eb in _pairs(ta, tb):
        spans_a, spans_b = pa[i], pb[j]
        if ea[0] != "step" or ea[4] != eb[4] or [n for _, n in spans_a] != [n for _, n in spans_b]:
            continue
        start_a, start_b = spans_a[0][0] if spans_a else 0, spans_b[0][0] if spans_b else 0
        total = sum(n for _, n in spans_a)
        xa, xb = ta.samples[start_a:start_a + total], tb.samples[start_b:start_b + total]
        diff = (xa - xb).abs()
        both_nan = torch.isnan(xa) & torch.isnan(xb)
        diff = torch.where(both_nan | (xa == xb), torch.zeros_like(diff), diff)
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        fa, fb = ta.fp[ea[3]:ea[3] + ea[4]], tb.fp[eb[3]:eb[3] + eb[4]]
        rows.append({"step": ea[1], "max_abs_diff_sampled": float(diff.max()) if diff.numel() else 0.0,
                     "tensors_differing": int((fa != fb).sum())})
    if len(rows) > limit:  # thin evenly for plots and reports
        stride = -(-len(rows) // limit)
        rows = [r for i, r in enumerate(rows) if i % stride == 0]
    return rows


def owner_of(trace: TraceRecord, tensor: str) -> tuple[Optional[str], Optional[str]]:
    owner = trace.param_owner.get(tensor)
    if owner:
        return owner[0], owner[1]
    return None, None


def _module_label(name: Optional[str], type_name: Optional[str]) -> str:
    shown = name if name else "<root>"
    return f"`{shown}` ({type_name})" if type_name else f"`{shown}`"


def describe_init(td: TraceDivergence, trace: TraceRecord) -> Divergence:
    tensor = td.tensors[0] if td.tensors else None
    module, mtype = owner_of(trace, tensor) if tensor else (None, None)
    more = f" and {len(td.tensors) - 1} more" if len(td.tensors) > 1 else ""
    whose = "any update" if td.step == 0 else f"their optimizer's first update, which came after {td.step} steps"
    return Divergence(step=td.step, tensor=tensor, tensors=td.tensors, phase="init", module=module, module_type=mtype,
                      message=f"step {td.step}: the initial weights already differ (before {whose}): `{tensor}`{more}"
                      + (f" of {_module_label(module, mtype)}" if module is not None else ""))


def describe_from_replay(td: TraceDivergence, trace: TraceRecord, ra: Optional[ReplayRecord],
                         rb: Optional[ReplayRecord]) -> Divergence:
    """Name phase and module from the replay records of both replicas (None when no replay ran)."""
    tensor = td.tensors[0] if td.tensors else None
    base = Divergence(step=td.step, tensor=tensor, tensors=td.tensors)
    lead = f"step {td.step}: `{tensor}` differs after the update" if tensor else f"step {td.step}"
    if td.kind == "structure":
        base.phase = "structure"
        base.message = f"step {td.step}: {td.note}"
        return base
    if ra is None or rb is None or ra.step != td.step:
        base.message = lead + " (no replay to name the module)"
        return base
    calls_a, calls_b = ra.calls, rb.calls
    for i, (ca, cb) in enumerate(zip(calls_a, calls_b)):
        if ca.name != cb.name:
            base.phase, base.module, base.module_type = "forward", ca.name, ca.type
            base.message = (f"step {td.step}: control flow differs: module call {i} is {_module_label(ca.name, ca.type)} "
                            f"in one replica and {_module_label(cb.name, cb.type)} in the other")
            return base
        if ca.outputs != cb.outputs:
            base.module, base.module_type = ca.name, ca.type
            base.inputs_matched = ca.inputs == cb.inputs
            label = _module_label(ca.name, ca.type)
            if not base.inputs_matched:
                base.phase = "input"
                base.message = (f"step {td.step}: the batch entering the model differs: the inputs of {label} differ "
                                "before any module computed anything different")
            else:
                base.phase = "forward"
                rng = "; it draws random numbers" if ca.rng_changed else ""
                state = "" if ca.rng_in == cb.rng_in else " and the torch RNG state differed when it ran"
                base.message = f"step {td.step}: forward of {label} differs; its inputs matched{rng}{state}"
            base.evidence = {"rng_changed": ca.rng_changed, "rng_matched": ca.rng_in == cb.rng_in}
            return base
    if len(calls_a) != len(calls_b):
        base.phase = "forward"
        base.message = f"step {td.step}: control flow differs: {len(calls_a)} module calls in one replica, {len(calls_b)} in the other"
        return base
    ga, gb = ra.grads, rb.grads
    if ga is not None and gb is not None and ga.fp is not None and gb.fp is not None:
        names = [trace.param_names[trace.opt_indices[ga.group][j]] for j, present in enumerate(ga.present) if present]
        differing = [n for n, x, y in zip(names, ga.fp, gb.fp) if x != y]
        if differing or ga.present != gb.present:
            first = differing[0] if differing else None
            module, mtype = owner_of(trace, first) if first else (None, None)
            base.phase, base.tensor, base.module, base.module_type = "backward", first or tensor, module, mtype
            base.tensors = differing or td.tensors
            base.inputs_matched = True
            base.message = (f"step {td.step}: gradient of `{first}` differs"
                            + (f" (in {_module_label(module, mtype)})" if module is not None else "")
                            + "; every forward output matched")
            return base
    module, mtype = owner_of(trace, tensor) if tensor else (None, None)
    base.module, base.module_type, base.inputs_matched = module, mtype, True
    if tensor and trace.kind_of(tensor) == BUFFER:
        base.phase = "buffer"
        base.message = (f"step {td.step}: buffer `{tensor}`" + (f" of {_module_label(module, mtype)}" if module is not None else "")
                        + " differs after the step, though every forward output and gradient matched: it was changed "
                        "outside the optimizer and the module's computation (code writing to it, or state loaded into it)")
        return base
    base.phase = "optimizer"
    base.message = f"step {td.step}: the optimizer update of `{tensor}` differs; its forward outputs and gradients matched"
    return base
