"""Writing and reading best checkpoints: atomic saves, loads that never run pickled code, a
weights hash that identifies exactly which weights a checkpoint holds.

File formats (chosen by suffix):
- ``*.safetensors``: tensors + ``{"pytest_mlrepro": <metadata JSON>}`` in the safetensors header;
- anything else: ``torch.save({"format", "version", "metadata": <JSON str>, "state_dict"})``,
  read back with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import platform
import zipfile
from pathlib import Path

from pytest_mlrepro.atomic import atomic_write, atomic_write_bytes as _atomic_write_bytes

__all__ = [
    "FORMAT",
    "CheckpointError",
    "CheckpointMissing",
    "CheckpointCorrupt",
    "CheckpointRefused",
    "MetadataMissing",
    "weights_sha256",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "atomic_write_bytes",
    "atomic_write_json",
    "environment_info",
]

FORMAT = "pytest-mlrepro/best-checkpoint"
VERSION = 1
_SAFETENSORS_KEY = "pytest_mlrepro"


class CheckpointError(Exception):
    """A checkpoint could not be used; the message names the file."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class CheckpointMissing(CheckpointError):
    pass


class CheckpointCorrupt(CheckpointError):
    """Truncated, not a checkpoint, or unreadable."""


class CheckpointRefused(CheckpointError):
    """The file asks the unpickler for objects other than tensors and plain containers."""


class MetadataMissing(CheckpointError):
    pass


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_sha256(state_dict) -> str:
    """sha256 over the state dict's tensors, keys in sorted order.

    For each tensor entry: the key (UTF-8), NUL, dtype, shape, NUL, then the raw bytes of the
    contiguous CPU tensor. Non-tensor entries are skipped. Sorted keys make the hash independent
    of insertion order, so a safetensors file (stored sorted) and a torch file hash alike.
    """
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            continue
        h.update(str(key).encode("utf-8") + b"\0")
        h.update(f"{value.dtype}{tuple(value.shape)}".encode("ascii") + b"\0")
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes, *, fsync: bool = True) -> int:
    return _atomic_write_bytes(path, data, fsync=fsync, make_parents=True)


def _atomic_write(path: Path, write, *, fsync: bool = True) -> int:
    return atomic_write(path, write, fsync=fsync, make_parents=True)


def atomic_write_json(path, obj, *, fsync: bool = True) -> int:
    return atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"), fsync=fsync)


def environment_info() -> dict:
    """A small record of where a checkpoint was written (for humans reading metadata)."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _is_safetensors(path: Path) -> bool:
    return Path(path).suffix == ".safetensors"


def save_checkpoint(path, state_dict, metadata: dict, *, fsync: bool = True) -> int:
    """Atomically write ``state_dict`` + ``metadata`` to ``path``; returns the bytes written.

    A crash (even SIGKILL) at any moment leaves either the previous file or the new one at
    ``path``, never a partial file (the partial temp file is a dot-file beside it).
    """
    import torch

    path = Path(path)
    tensors = {k: v.detach().to("cpu") for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    meta_json = json.dumps(metadata, sort_keys=True)
    if _is_safetensors(path):
        from safetensors.torch import save_file

        def write(tmp):
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={_SAFETENSORS_KEY: meta_json})
    else:
        payload = {"format": FORMAT, "version": VERSION, "metadata": meta_json, "state_dict": tensors}

        def write(tmp):
            torch.save(payload, tmp)

    return _atomic_write(path, write, fsync=fsync)


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set",
                         "builtins.frozenset", "builtins.bytearray", "numpy.")


def _pickle_globals(path: Path):
    """The ``module.name`` globals a pickle asks for, read with ``pickletools`` (which runs nothing).

    Returns ``(globals, parsed_to_end)``; for torch zip files the ``data.pkl`` member is read.
    """
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return [], False
                data = zf.read(member)
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return [], False
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and ("UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING")):
                strings.append(arg)
    except Exception:  # garbage or truncated: whatever was read so far still counts
        return found, False
    return found, True


def _classify_torch_error(path: Path, exc: BaseException) -> CheckpointError:
    text = f"{type(exc).__name__}: {exc}".split(". ")[0]
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        wanted, complete = _pickle_globals(path)
        unsafe = sorted({g for g in wanted if not g.startswith(_SAFE_GLOBAL_PREFIXES)})
        if unsafe:
            return CheckpointRefused(path, "refused to load: the pickle asks for " + ", ".join(unsafe[:5])
                                     + " (not tensors; weights_only=True blocked it and nothing was executed)")
        if complete:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), lines[0] if lines else "")
            return CheckpointRefused(path, "refused to load: the pickle needs more than tensors and plain containers "
                                           f"(weights_only=True blocked it; nothing was executed): {reason}")
        return CheckpointCorrupt(path, "truncated or corrupt checkpoint (neither a complete torch archive nor a "
                                       "readable pickle)")
    return CheckpointCorrupt(path, f"truncated or corrupt checkpoint ({text.splitlines()[0]})")


def load_checkpoint(path) -> tuple[dict, dict | None]:
    """Return ``(state_dict, metadata or None)`` without ever unpickling arbitrary objects.

    Raises ``CheckpointMissing``, ``CheckpointCorrupt`` (truncated / not a checkpoint) or
    ``CheckpointRefused`` (a pickle asking for code). Accepts our own files, plain
    ``torch.save(model.state_dict())`` files and Lightning-style ``{"state_dict": ...}`` dicts.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointMissing(path, "checkpoint file does not exist")
    if not path.is_file():
        raise CheckpointCorrupt(path, "not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointCorrupt(path, "checkpoint file is empty (truncated)")
    if _is_safetensors(path):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointCorrupt(path, f"truncated or corrupt safetensors file ({type(exc).__name__}: {exc})") from None
        meta = header.get(_SAFETENSORS_KEY)
        return state, (_parse_meta(path, meta) if meta is not None else None)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the restricted unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, KeyError, TypeError, UnicodeDecodeError, IndexError) as exc:
        raise _classify_torch_error(path, exc) from None
    return _split_payload(path, obj)


def _parse_meta(path: Path, meta) -> dict:
    if isinstance(meta, dict):
        return meta
    try:
        out = json.loads(meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointCorrupt(path, f"metadata is not valid JSON ({exc})") from None
    if not isinstance(out, dict):
        raise CheckpointCorrupt(path, "metadata is not a JSON object")
    return out


def _split_payload(path: Path, obj) -> tuple[dict, dict | None]:
    import torch

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        sd = obj.get("state_dict")
        if not isinstance(sd, dict):
            raise CheckpointCorrupt(path, "checkpoint has no state_dict")
        meta = obj.get("metadata")
        return sd, (_parse_meta(path, meta) if meta is not None else None)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointCorrupt(path, f"not a state dict checkpoint (found {type(obj).__name__})")


def read_metadata(path) -> dict:
    """Metadata of a checkpoint, or ``MetadataMissing`` naming the file."""
    _, meta = load_checkpoint(path)
    if meta is None:
        raise MetadataMissing(path, "checkpoint carries no pytest-mlrepro metadata (epoch, metrics, weights hash)")
    return meta
