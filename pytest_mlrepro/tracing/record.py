"""The trace of one replica as a typed record: what the localizer and the baseline read.

``trace.pt`` holds ``TraceRecord.to_plain()`` (lists, numbers, strings and CPU tensors only, so the
parent loads it with ``torch.load(weights_only=True)``); ``TraceRecord.from_plain`` builds the record
back on read. No torch import here: a baseline or a report reads records without a training stack.

A *group* is one set of tensors stepped together: a torch optimizer, a Keras or fastai optimizer, or
a root module whose parameters changed between two of its forwards (the fallback). Its tensors are
the parameters it updates, then the floating-point buffers of the modules holding them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

PARAM, BUFFER = "param", "buffer"  # TraceRecord.tensor_kinds


class _ReadByKey:
    """Transitional: call sites written against the old dict trace (``trace["replay"]``,
    ``trace.get("losses")``) keep working until they move to attributes; new code uses attributes."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class ModuleCall:
    """One module call of the replayed step, with fingerprints of what went in and came out."""

    name: str
    type: str
    inputs: Optional[list]  # fingerprints of the input tensors (None: no tensor input)
    outputs: Optional[list]
    rng_in: int  # fingerprint of torch's RNG state when the call began
    rng_changed: bool  # the call drew random numbers

    def to_plain(self) -> dict:
        return {"name": self.name, "type": self.type, "in": self.inputs, "out": self.outputs,
                "rng_in": self.rng_in, "rng_changed": self.rng_changed}

    @classmethod
    def from_plain(cls, d: dict) -> "ModuleCall":
        return cls(name=d["name"], type=d["type"], inputs=d["in"], outputs=d["out"], rng_in=d["rng_in"],
                   rng_changed=d["rng_changed"])


@dataclass
class GradRecord:
    """The gradients the replayed step's optimizer saw: which of its group's tensors had one, and their fingerprints."""

    group: int
    present: list  # per tensor of the group: a gradient was there
    fp: Optional[list]  # fingerprints of the present gradients, in group order

    def to_plain(self) -> dict:
        return {"opt": self.group, "present": list(self.present), "fp": self.fp}

    @classmethod
    def from_plain(cls, d: Optional[dict]) -> Optional["GradRecord"]:
        return None if d is None else cls(group=d["opt"], present=list(d["present"]), fp=d["fp"])


@dataclass
class ReplayRecord(_ReadByKey):
    """Every module call and the gradients of one replayed step."""

    step: int
    completed: bool
    calls: list = field(default_factory=list)  # [ModuleCall]
    grads: Optional[GradRecord] = None

    def to_plain(self) -> dict:
        return {"step": self.step, "completed": self.completed, "calls": [c.to_plain() for c in self.calls],
                "grads": None if self.grads is None else self.grads.to_plain()}

    @classmethod
    def from_plain(cls, d: Optional[dict]) -> Optional["ReplayRecord"]:
        if d is None:
            return None
        return cls(step=d["step"], completed=d["completed"], calls=[ModuleCall.from_plain(c) for c in d["calls"]],
                   grads=GradRecord.from_plain(d.get("grads")))


@dataclass
class TraceRecord(_ReadByKey):
    """Per-step fingerprints of one replica (``entries`` says which group each block of ``fp`` belongs to)."""

    param_names: list  # every traced tensor's name (parameters and buffers), by tensor index
    opt_indices: list  # per group: the tensor indices it holds, in record order
    entries: list  # [(kind "init" | "step", step, group)], one per recorded block of fingerprints
    fp: Any  # int64 tensor: the fingerprints of every entry, concatenated
    steps: int  # steps observed (recorded or not)
    every: int  # recording interval (from step dense_until on, when the tracer chose it itself)
    samples: Any = None  # float64 tensor: sampled values per entry (the divergence curve)
    opt_sample_lens: list = field(default_factory=list)  # per group: samples per tensor
    losses: list = field(default_factory=list)  # per step: the loss backward() was called on (or None)
    param_owner: dict = field(default_factory=dict)  # tensor name -> (module name, module type)
    tensor_kinds: list = field(default_factory=list)  # per tensor: PARAM | BUFFER (empty: all parameters)
    group_kinds: list = field(default_factory=list)  # per group: torch.optim | keras | fastai | forward
    rng_at_first_step: Optional[dict] = None
    replay: Optional[ReplayRecord] = None
    dense_until: int = 0  # steps before this one were all recorded (the self-budgeting trace's measuring steps)
    budget: Optional[dict] = None  # what trace_every="auto" decided (budget.BudgetChoice.to_plain), None if it did not thin

    def kind_of(self, name: str) -> str:
        """PARAM or BUFFER for a traced tensor's name."""
        if self.tensor_kinds and name in self.param_names:
            return self.tensor_kinds[self.param_names.index(name)]
        return PARAM

    def group_names(self, group: int) -> list:
        return [self.param_names[i] for i in self.opt_indices[group]]

    def to_plain(self) -> dict:
        return {"param_names": list(self.param_names), "param_owner": dict(self.param_owner),
                "opt_indices": [list(i) for i in self.opt_indices], "entries": [tuple(e) for e in self.entries],
                "fp": self.fp, "samples": self.samples, "opt_sample_lens": [list(n) for n in self.opt_sample_lens],
                "losses": list(self.losses), "steps": self.steps, "every": self.every, "dense_until": self.dense_until,
                "tensor_kinds": list(self.tensor_kinds), "group_kinds": list(self.group_kinds),
                "rng_at_first_step": self.rng_at_first_step, "budget": self.budget,
                "replay": None if self.replay is None else self.replay.to_plain()}

    @classmethod
    def from_plain(cls, d: dict) -> "TraceRecord":
        return cls(param_names=list(d["param_names"]), opt_indices=[list(i) for i in d["opt_indices"]],
                   entries=[tuple(e) for e in d["entries"]], fp=d["fp"], steps=int(d["steps"]), every=int(d["every"]),
                   samples=d.get("samples"), opt_sample_lens=[list(n) for n in d.get("opt_sample_lens", [])],
                   losses=list(d.get("losses", [])), param_owner=dict(d.get("param_owner") or {}),
                   tensor_kinds=list(d.get("tensor_kinds", [])), group_kinds=list(d.get("group_kinds", [])),
                   rng_at_first_step=d.get("rng_at_first_step"), replay=ReplayRecord.from_plain(d.get("replay")),
                   dense_until=int(d.get("dense_until", 0)), budget=d.get("budget"))

    def trajectory(self) -> dict:
        """The part a baseline keeps, as plain JSON data (``from_trajectory`` reads it back)."""
        return {"param_names": list(self.param_names), "opt_indices": [list(i) for i in self.opt_indices],
                "entries": [list(e) for e in self.entries], "fp": [int(v) for v in self.fp.tolist()],
                "steps": int(self.steps), "every": int(self.every), "dense_until": int(self.dense_until)}

    @classmethod
    def from_trajectory(cls, t: dict, *, steps: Optional[int] = None) -> "TraceRecord":
        import torch

        return cls(param_names=list(t["param_names"]), opt_indices=[list(i) for i in t["opt_indices"]],
                   entries=[tuple(e) for e in t["entries"]], fp=torch.tensor(t["fp"], dtype=torch.int64),
                   steps=int(t.get("steps", steps if steps is not None else 0)), every=int(t.get("every", 1)),
                   dense_until=int(t.get("dense_until", 0)))
