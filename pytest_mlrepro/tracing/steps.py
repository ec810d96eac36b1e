"""Step fingerprints: per recorded step, the word sum of every tensor of the group that stepped,
plus a few sampled values per tensor for the divergence curve.

Fingerprints are computed where the tensors live and kept there until the replica ends (no host
copy per step). One recorder per way of seeing steps (known optimizers; the forward fallback), so
the tracer can keep one and drop the other without renumbering anything.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..fingerprint import PackedLayout, packed_layout, word_sum_many, word_sums_packed
from .record import PARAM

SAMPLES_PER_TENSOR = 16  # elements per tensor recorded each step, for the per-step divergence curve
PACK_MAX_BYTES = 256 * 1024  # a CPU group of one dtype up to this size is recorded packed (one pass, not one per tensor)


def _flat_numel(t: torch.Tensor) -> int:
    """Length of ``_flat(t)``: complex elements count twice (real and imaginary parts)."""
    return t.numel() * 2 if t.is_complex() else t.numel()


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def sample_indices(t: torch.Tensor) -> torch.Tensor:
    """``SAMPLES_PER_TENSOR`` evenly spread flat indices into ``t`` (first and last included), on its device.

    Integer arithmetic: a float32 ``linspace`` rounds indices past 2**24 (16.8 M elements), up to one
    past the end for a GPT-2 embedding. No element is left out of the trace by this: the word sums
    cover every element, the samples only feed the divergence curve.
    """
    n = _flat_numel(t)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=t.device)
    steps = torch.arange(SAMPLES_PER_TENSOR, dtype=torch.long, device=t.device)
    return steps * (n - 1) // (SAMPLES_PER_TENSOR - 1)


class StepRecorder:
    """Tensors, the groups stepping them, and one block of fingerprints per recorded entry."""

    def __init__(self, every: int = 1):
        self.every = every
        self.dense_until = 0  # every step before this one is recorded (then every ``every``-th)
        self.steps = 0
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []  # placeholders until ModuleNamer names them
        self.kinds: list[str] = []
        self.index: dict[int, int] = {}  # id(tensor) -> tensor index
        self.groups: list[list[int]] = []
        self.group_kinds: list[str] = []
        self._group_samples: list[list[torch.Tensor]] = []
        self._group_uniform: list[bool] = []  # all tensors of one dtype: one cast per step
        self._group_packed: list = []  # per group: a _Packed when it is recorded packed, else None
        self._group_numels: list[list[int]] = []  # per group: each tensor's flat size when the group was made
        self.entries: list[tuple[str, int, int]] = []
        self._fps: list[torch.Tensor] = []
        self._samples: list[torch.Tensor] = []
        self.losses: list = []  # per step: a float, a 0-dim tensor on an accelerator, or None
        self._last_group: Optional[int] = None

    def add_group(self, tensors: list, names: list, kinds: list, group_kind: str) -> int:
        """A new group over ``tensors`` (a tensor already in another group keeps its index and name)."""
        indices = []
        for t, name, kind in zip(tensors, names, kinds):
            if id(t) not in self.index:
                self.index[id(t)] = len(self.tensors)
                self.tensors.append(t)
                self.names.append(name)
                self.kinds.append(kind)
            indices.append(self.index[id(t)])
        g = len(self.groups)
        self.groups.append(indices)
        self.group_kinds.append(group_kind)
        self._group_samples.append([sample_indices(self.tensors[i]) for i in indices])
        self._group_numels.append([_flat_numel(self.tensors[i]) for i in indices])
        self._group_uniform.append(len({self.tensors[i].dtype for i in indices}) <= 1)
        self._group_packed.append(_Packed.of([self.tensors[i] for i in indices], self._group_samples[g])
                                  if self._group_uniform[g] else None)
        return g

    def group_tensors(self, g: int) -> list:
        return [self.tensors[i] for i in self.groups[g]]

    def record(self, kind: str, g: int, step: Optional[int] = None) -> None:
        tensors = [t.detach() for t in self.group_tensors(g)]
        packed = self._group_packed[g]
        with torch.no_grad():
            if packed is not None and packed.record(tensors, self._fps, self._samples):
                self.entries.append((kind, self.steps if step is None else step, g))
                return
            self._fps.append(word_sum_many(tensors))
            picked = [_picked(t, idx, n) for t, idx, n in zip(tensors, self._group_samples[g], self._group_numels[g])]
            if not picked:
                self._samples.append(torch.zeros(0, dtype=torch.float64))
            elif self._group_uniform[g]:
                self._samples.append(torch.cat(picked).to(torch.float64))
            else:
                self._samples.append(torch.cat([x.to(torch.float64) for x in picked]))
        self.entries.append((kind, self.steps if step is None else step, g))

    def step_done(self, g: int, loss, *, force: bool = False) -> None:
        """Group ``g`` finished step ``self.steps``: record it when the schedule (or ``force``) says so."""
        self.losses.append(loss)
        self._last_group = g
        if force or self.steps < self.dense_until or self.steps % self.every == 0:
            self.record("step", g)
        self.steps += 1

    def record_last_step(self) -> None:
        """A thinned trace ends with its last step recorded (taken when the program has ended), so a
        divergence in the steps after the last scheduled record still has a recorded step to show in."""
        last = self.steps - 1
        if self._last_group is not None and not any(e[0] == "step" and e[1] == last for e in self.entries[-1:]):
            self.record("step", self._last_group, step=last)

    def parts(self) -> dict:
        """Fingerprints, samples and losses on the host, for the record."""
        fps = _host_cat(self._fps, torch.int64)
        samples = _host_cat(self._samples, torch.float64)
        return {"fp": fps, "samples": samples,
                "losses": _host_losses(self.losses),
                "opt_sample_lens": [[int(idx.numel()) for idx in per] for per in self._group_samples]}


class _Packed:
    """A small CPU group of one dtype, recorded from one packed copy of its tensors: fingerprints
    (``word_sums_packed``, equal to ``word_sum_many``'s) and samples (one ``index_select``) in a fixed
    number of operations, where the per-tensor path costs about ten per tensor."""

    def __init__(self, layout: PackedLayout, samples: torch.Tensor, signature: list):
        self.layout, self.samples = layout, samples
        self.signature = signature  # per tensor (dtype, numel, on the CPU) when the layout was made

    @classmethod
    def of(cls, tensors: list, sample_idx: list) -> Optional["_Packed"]:
        if not tensors or any(t.device.type != "cpu" for t in tensors):
            return None  # on an accelerator the per-tensor path (its cumulative sum has not run on one here)
        lengths = [_flat_numel(t) for t in tensors]
        nbytes = [n * _flat_dtype(t).itemsize for n, t in zip(lengths, tensors)]
        if sum(nbytes) > PACK_MAX_BYTES:
            return None
        offsets = torch.cumsum(torch.tensor([0] + lengths[:-1], dtype=torch.long), 0)
        samples = torch.cat([idx + off for idx, off in zip(sample_idx, offsets.tolist())])
        return cls(packed_layout(nbytes), samples, _signature(tensors))

    def record(self, tensors: list, fps: list, samples: list) -> bool:
        """Append this record's fingerprints and samples; False (nothing appended) when a tensor changed
        size, dtype or device since the group was made (``p.data = ...``, ``model.half()`` or ``.to(device)``
        after the first step): the per-tensor path records it then."""
        if _signature(tensors) != self.signature:  # about 0.3 us a tensor: the layout must fit each one
            return False
        flat = torch.cat([_flat(t) for t in tensors])
        fps.append(word_sums_packed(flat.view(torch.uint8), self.layout))
        samples.append(flat.index_select(0, self.samples).to(torch.float64))
        return True


def _picked(t: torch.Tensor, idx: torch.Tensor, numel: int) -> torch.Tensor:
    """The samples of ``t`` at ``idx`` (spread over its flat size ``numel`` when the group was made), as
    many as the group expects even when ``t`` was resized since (``p.data = ...``): spread anew over
    its new size, zeros when it is now empty, instead of an index error inside the training."""
    flat = _flat(t)
    if flat.numel() == numel or idx.numel() == 0:
        return flat.index_select(0, idx)
    if flat.numel() == 0:
        return torch.zeros(idx.numel(), dtype=flat.dtype, device=flat.device)
    return flat.index_select(0, sample_indices(t))


def _signature(tensors: list) -> list:
    return [(t.dtype, t.numel(), t.is_cpu) for t in tensors]


def _flat_dtype(t: torch.Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _host_losses(losses: list) -> list:
    """Per-step losses as floats (or None): tensors kept on an accelerator come over in one copy."""
    on_device = [i for i, l in enumerate(losses) if isinstance(l, torch.Tensor)]
    out = list(losses)
    if not on_device:
        return out
    if len({losses[i].device for i in on_device}) == 1:
        values = torch.stack([losses[i].float() for i in on_device]).cpu().tolist()
    else:  # losses on several devices (model parallelism): one copy each
        values = [float(losses[i].float().cpu()) for i in on_device]
    for i, v in zip(on_device, values):
        out[i] = v
    return out


def _host_cat(parts: list, dtype: torch.dtype) -> torch.Tensor:
    """One host tensor from per-entry tensors (concatenated on their device first: one copy, not one per entry)."""
    if not parts:
        return torch.zeros(0, dtype=dtype)
    if len({p.device for p in parts}) == 1:
        return torch.cat(parts).cpu()
    return torch.cat([p.cpu() for p in parts])


__all__ = ["PARAM", "SAMPLES_PER_TENSOR", "StepRecorder", "sample_indices"]
