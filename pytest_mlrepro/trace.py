"""Per-step fingerprints of every trained parameter, from global optimizer hooks.

Works on training loops nobody edited (plain loops, Lightning, Transformers, Keras on torch,
fastai): torch's global ``register_optimizer_step_{pre,post}_hook`` fire for every optimizer. The
per-step fingerprint is a wrapping int64 sum over the raw bits (``word_sum_many``: deterministic, one
memory pass), plus 16 sampled values per tensor for the divergence curve; both are computed where
the tensor lives and kept on that device until the replica ends (no host copy per step). In *replay* mode the tracer also records,
for one chosen step, every module call's input/output fingerprints and every gradient, so the
localizer can name the phase and module where two replicas part.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from .fingerprint import fingerprint_many, word_sum_many

SAMPLES_PER_TENSOR = 16  # elements per parameter recorded each step, for the per-step divergence curve


class ReplayDone(BaseException):
    """Raised from the optimizer hook once the replayed step is recorded, to end the program early.

    A BaseException so that training code catching ``Exception`` does not swallow it.
    """


def _leaves(obj: Any) -> list:
    try:
        from torch.utils._pytree import tree_leaves

        leaves = tree_leaves(obj)
    except Exception:  # exotic containers: fall back to a flat look
        leaves = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _fp_of(obj: Any) -> Optional[torch.Tensor]:
    tensors = [t.detach() for t in _leaves(obj)]
    if not tensors:
        return None
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        tensors = [t.cpu() for t in tensors]
    return fingerprint_many(tensors)


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


def _flat_numel(t: torch.Tensor) -> int:
    """Length of ``_flat(t)``: complex elements count twice (real and imaginary parts)."""
    return t.numel() * 2 if t.is_complex() else t.numel()


def _compiling() -> bool:
    """True while torch.compile traces a module: our Python hooks must stay out of its graph."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


NAMING_STEPS = 8  # keep naming modules for at most this many steps while some parameter has no name


def _rng_fp() -> torch.Tensor:
    """Fingerprint of torch's CPU generator, and of the current CUDA generator once CUDA is in use
    (dropout on a GPU draws from the latter). Replay only: the cost does not matter there."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return fingerprint_many([torch.cat(states)]) if len(states) > 1 else fingerprint_many(states)


class Tracer:
    def __init__(self, *, replay_step: Optional[int] = None, every: int = 1, stop_after: Optional[int] = None):
        if every < 1:
            raise ValueError(f"trace every must be >= 1, got {every}")
        self.replay_step = replay_step
        self.every = every  # record after steps 0, every, 2*every, ... (the same schedule in every replica)
        self.stop_after = stop_after  # end the program after this step (a dense re-trace needs no more)
        self.steps = 0
        self.param_names: list[str] = []
        self._param_index: dict[int, int] = {}
        self._params: list[torch.Tensor] = []
        self._optimizers: dict[int, tuple] = {}  # id(optimizer) -> (weakref, index)
        self._opt_indices: list[list[int]] = []
        self._opt_samples: list[list[torch.Tensor]] = []  # per optimizer: sample indices per parameter
        self._opt_uniform: list[bool] = []  # per optimizer: all parameters of one dtype (one cast per step)
        self._entries: list[tuple[str, int, int]] = []  # (kind, step, optimizer index)
        self._fps: list[torch.Tensor] = []
        self._samples: list[torch.Tensor] = []
        self._losses: list[Optional[torch.Tensor]] = []
        self._pending_loss: Optional[torch.Tensor] = None
        self._seen_modules: dict[int, torch.nn.Module] = {}
        self.roots: list[torch.nn.Module] = []
        self._prefixes: dict[int, str] = {}
        self.module_names: dict[int, str] = {}
        self.rng_at_first_step: Optional[dict] = None
        self._handles: list = []
        self._naming_handle = None
        self._orig_backward = None
        # replay state
        self._replay_active = replay_step == 0
        self._call_stack: list[tuple] = []
        self._calls: list[dict] = []
        self._grads: Optional[dict] = None
        self.replay_completed = False

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> "Tracer":
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module

        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._pre_step))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._post_step))
        self._naming_handle = nn_module.register_module_forward_pre_hook(self._note_module)
        if self.replay_step is not None:
            self._handles.append(nn_module.register_module_forward_pre_hook(self._replay_pre_forward))
            self._handles.append(nn_module.register_module_forward_hook(self._replay_post_forward))
        tracer = self
        self._orig_backward = original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            if tensor.numel() == 1:
                tracer._pending_loss = tensor.detach().reshape(()).clone()
            return original(tensor, *args, **kwargs)

        torch.Tensor.backward = backward  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._naming_handle is not None:
            self._naming_handle.remove()
            self._naming_handle = None
        if self._orig_backward is not None:
            torch.Tensor.backward = self._orig_backward  # type: ignore[method-assign]
            self._orig_backward = None

    # -- naming ---------------------------------------------------------------------------------
    def _note_module(self, module, args):
        if not _compiling():
            self._seen_modules.setdefault(id(module), module)

    def _name_modules(self) -> None:
        """Find root modules among those called so far and name every module and parameter from them."""
        seen = list(self._seen_modules.values())
        children: set[int] = set()
        for m in seen:
            for sub in m.modules():
                if sub is not m:
                    children.add(id(sub))
        new_roots = [m for m in seen if id(m) not in children and all(m is not r for r in self.roots)]
        self.roots.extend(new_roots)
        for i, root in enumerate(self.roots):
            prefix = self._root_prefix(i)
            for name, sub in root.named_modules():
                self.module_names.setdefault(id(sub), (prefix + name).rstrip(".") or "")
            for name, p in root.named_parameters(remove_duplicate=False):
                idx = self._param_index.get(id(p))
                if idx is not None and self.param_names[idx].startswith("<"):
                    self.param_names[idx] = prefix + name
        self._param_owner = {}
        for i, root in enumerate(self.roots):
            prefix = self._root_prefix(i)
            for mname, sub in root.named_modules():
                for pname, p in sub.named_parameters(recurse=False):
                    self._param_owner.setdefault(id(p), ((prefix + mname).rstrip("."), type(sub).__name__))

    def _root_prefix(self, i: int) -> str:
        """Name prefix for root i, fixed when the root is first seen so names never change: none for
        the first root holding parameters, ``Type[k].`` for later ones, ``Type.`` for parameter-free
        roots (a loss module called on its own is a root too, but must not rename the model)."""
        root = self.roots[i]
        prefix = self._prefixes.get(id(root))
        if prefix is None:
            if next(root.parameters(), None) is None:
                prefix = f"{type(root).__name__}."
            else:
                k = sum(1 for r in self.roots[:i] if next(r.parameters(), None) is not None)
                prefix = "" if k == 0 else f"{type(root).__name__}[{k}]."
            self._prefixes[id(root)] = prefix
        return prefix

    def _register_optimizer(self, optimizer) -> int:
        known = self._optimizers.get(id(optimizer))
        if known is not None and known[0]() is optimizer:
            return known[1]
        opt_idx = len(self._opt_indices)
        self._optimizers[id(optimizer)] = (weakref.ref(optimizer), opt_idx)
        indices = []
        for g, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) not in self._param_index:
                    self._param_index[id(p)] = len(self._params)
                    self._params.append(p)
                    self.param_names.append(f"<optimizer{opt_idx}.group{g}.param{j}>")
                indices.append(self._param_index[id(p)])
        self._opt_indices.append(indices)
        self._opt_samples.append([sample_indices(self._params[i]) for i in indices])
        self._opt_uniform.append(len({self._params[i].dtype for i in indices}) <= 1)
        self._name_modules()
        self._record("init", opt_idx)
        return opt_idx

    # -- hooks ----------------------------------------------------------------------------------
    def _record(self, kind: str, opt_idx: int) -> None:
        params = [self._params[i].detach() for i in self._opt_indices[opt_idx]]
        with torch.no_grad():
            self._fps.append(word_sum_many(params))
            picked = [_flat(p).index_select(0, idx) for p, idx in zip(params, self._opt_samples[opt_idx])]
            if self._opt_uniform[opt_idx]:
                self._samples.append(torch.cat(picked).to(torch.float64))
            else:
                self._samples.append(torch.cat([x.to(torch.float64) for x in picked]))
        self._entries.append((kind, self.steps, opt_idx))

    def _pre_step(self, optimizer, args, kwargs):
        if self.rng_at_first_step is None:
            from .probes import rng_fingerprints

            self.rng_at_first_step = rng_fingerprints()
        opt_idx = self._register_optimizer(optimizer)
        if self._naming_handle is not None and self.replay_step is None:
            # naming needs the modules called before a parameter's first step: keep watching for a
            # few steps (a second model or a new head may come late), then stop paying for the hook
            if any(n.startswith("<") for n in self.param_names):
                self._name_modules()
            if self.steps >= NAMING_STEPS:
                self._naming_handle.remove()
                self._naming_handle = None
        if self.replay_step == self.steps:
            with torch.no_grad():
                grads = [p.grad for p in (self._params[i] for i in self._opt_indices[opt_idx])]
                self._grads = {
                    "opt": opt_idx,
                    "present": [g is not None for g in grads],
                    "fp": fingerprint_many([g.detach() for g in grads if g is not None]) if any(g is not None for g in grads) else None,
                }

    def _post_step(self, optimizer, args, kwargs):
        opt_idx = self._register_optimizer(optimizer)
        self._losses.append(self._pending_loss)
        self._pending_loss = None
        if self.steps % self.every == 0 or self.replay_step is not None:
            self._record("step", opt_idx)
        self.steps += 1
        if self.stop_after is not None and self.steps > self.stop_after:
            raise ReplayDone()
        if self.replay_step is not None:
            if self.steps == self.replay_step:
                self._replay_active = True
            elif self.steps == self.replay_step + 1:
                self._replay_active = False
                self.replay_completed = True
                raise ReplayDone()

    def _replay_pre_forward(self, module, args):
        if self._replay_active and not _compiling():
            self._seen_modules.setdefault(id(module), module)
            self._call_stack.append((module, _fp_of(args), _rng_fp()))

    def _replay_post_forward(self, module, args, output):
        if self._replay_active and not _compiling() and self._call_stack and self._call_stack[-1][0] is module:
            _, in_fp, rng_in = self._call_stack.pop()
            rng_out = _rng_fp()
            self._calls.append({"module": module, "in": in_fp, "out": _fp_of(output), "rng_in": rng_in, "rng_out": rng_out})

    # -- results --------------------------------------------------------------------------------
    def final_state(self) -> dict:
        """Weights to compare when the target returned nothing: the root modules' state (buffers
        included), plus every trained parameter no root holds (a module first called late)."""
        out: dict = {}
        held: set[int] = set()
        for i, root in enumerate(self.roots):
            prefix = self._root_prefix(i)
            for k, v in root.state_dict(keep_vars=True).items():
                out[prefix + k] = v.detach()
                held.add(id(v))
        for name, p in zip(self.param_names, self._params):
            if id(p) not in held:
                out.setdefault(name, p.detach())
        return out

    def to_record(self) -> dict:
        """Everything on the host, as plain Python and CPU tensors, for the parent to compare."""
        if self._seen_modules and (not self.module_names or self.replay_step is not None):
            self._name_modules()
        owner = getattr(self, "_param_owner", {})
        fps = torch.cat(self._fps).cpu() if self._fps else torch.zeros(0, dtype=torch.int64)
        samples = torch.cat(self._samples).cpu() if self._samples else torch.zeros(0, dtype=torch.float64)
        losses = [None if l is None else float(l.float().cpu()) for l in self._losses]
        record = {
            "param_names": list(self.param_names),
            "param_owner": {self.param_names[i]: owner.get(id(p)) for i, p in enumerate(self._params)},
            "opt_indices": self._opt_indices,
            "entries": self._entries,
            "fp": fps,
            "samples": samples,
            "opt_sample_lens": [[int(idx.numel()) for idx in per_opt] for per_opt in self._opt_samples],
            "losses": losses,
            "steps": self.steps,
            "every": self.every,
            "rng_at_first_step": self.rng_at_first_step,
            "replay": None,
        }
        if self.replay_step is not None:
            calls = []
            for c in self._calls:
                m = c["module"]
                calls.append({
                    "name": self.module_names.get(id(m), f"<unnamed {type(m).__name__}>"),
                    "type": type(m).__name__,
                    "in": None if c["in"] is None else c["in"].cpu().tolist(),
                    "out": None if c["out"] is None else c["out"].cpu().tolist(),
                    "rng_in": int(c["rng_in"].cpu()[0]),
                    "rng_changed": bool((c["rng_in"] != c["rng_out"]).any()),
                })
            grads = None
            if self._grads is not None:
                grads = {"opt": self._grads["opt"], "present": self._grads["present"],
                         "fp": None if self._grads["fp"] is None else self._grads["fp"].cpu().tolist()}
            record["replay"] = {"step": self.replay_step, "completed": self.replay_completed, "calls": calls, "grads": grads}
        return record
