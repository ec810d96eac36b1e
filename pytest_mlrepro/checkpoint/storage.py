"""Writing and reading best checkpoints: crash-safe saves, loads that never run pickled code, a
weights hash that identifies exactly which weights a checkpoint holds, and the history sidecar.

File formats (chosen by suffix):
- ``*.safetensors``: tensors + ``{"pytest_mlrepro": <metadata JSON>}`` in the safetensors header;
- anything else: ``torch.save({"format", "version", "metadata": <JSON str>, "state_dict"})``,
  read back with ``torch.load(weights_only=True)``, which refuses arbitrary objects.

Every write goes to a temp file beside the target named ``.<name>.mlrepro-<host>-<pid>-<hex>.tmp``
(a pattern nothing else creates), is fsynced, ``os.replace``d over the target, and the folder is
fsynced. A writer killed mid-save leaves its temp file; the next write of the same target removes
the temp files of writers that no longer run (never a live writer's, never a file of another name).

The checkpoint and its history sidecar (``<checkpoint>.history.json``) form a pair that a crash at
any moment leaves consistent (``write_history`` / ``reconcile_history``): before a checkpoint is
replaced, the sidecar is written with the new epoch and a ``pending`` record naming the save
(``save_id``, also stored in the checkpoint's metadata); after it, the sidecar is rewritten with
``saved`` = that save. On reading, a pending save the checkpoint does not carry never landed, so
the history is cut before that epoch; a checkpoint the sidecar does not name is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import re
import secrets
import socket
import zipfile
from pathlib import Path

from pytest_mlrepro.atomic import atomic_write
from pytest_mlrepro.errors import MlreproError

__all__ = [
    "FORMAT",
    "HISTORY_FORMAT",
    "CheckpointError",
    "CheckpointMissing",
    "CheckpointCorrupt",
    "CheckpointRefused",
    "MetadataMissing",
    "SidecarError",
    "weights_sha256",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "atomic_write_bytes",
    "atomic_write_json",
    "environment_info",
    "history_path",
    "save_id",
    "write_history",
    "reconcile_history",
    "stale_temp_files",
    "remove_stale_temp_files",
]

FORMAT = "pytest-mlrepro/best-checkpoint"
VERSION = 1
_SAFETENSORS_KEY = "pytest_mlrepro"


class CheckpointError(MlreproError):
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


class SidecarError(CheckpointError, ValueError):
    """The history sidecar is malformed or describes another checkpoint (a ValueError too, so a
    reader that reports bad history input reports this)."""


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


# ---------------------------------------------------------------------------------------------
# crash-safe writes with temp names only we create

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.mlrepro-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[0-9a-f]{16}\.tmp\Z")


def _temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path`` that says who writes it (host, pid), so leftovers can be judged."""
    return path.parent / f".{path.name}.mlrepro-{_HOST}-{os.getpid()}-{secrets.token_hex(8)}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # maybe another thread of ours, mid-write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknowable: keep its file
    return True


def stale_temp_files(path) -> list:
    """Our temp files for ``path`` whose writer (on this host) no longer runs: left by a killed save."""
    path = Path(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    stale = []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and m["name"] == path.name and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
            stale.append(path.parent / entry.name)
    return sorted(stale)


def remove_stale_temp_files(path) -> int:
    """Delete ``stale_temp_files(path)``; returns how many went (a file that vanished meanwhile is fine)."""
    n = 0
    for p in stale_temp_files(path):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def _atomic_write(path, write, *, fsync: bool = True) -> int:
    """The shared atomic write (``pytest_mlrepro.atomic``) under our own temp-file name, after removing
    this target's stale temp files: a crash at any moment leaves the old file or the new one, and
    what it leaves behind is recognisable and cleaned on the next save."""
    remove_stale_temp_files(path)
    return atomic_write(path, write, fsync=fsync, make_parents=True, temp_name=_temp_path)


def atomic_write_bytes(path, data: bytes, *, fsync: bool = True) -> int:
    """Crash-safe write of ``data`` to ``path`` (parents created); returns the bytes written."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic_write(path, write, fsync=fsync)


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
    ``path``, never a partial file (the partial temp file is a dot-file beside it, removed by the
    next save to ``path``). ``metadata`` must be JSON (``CheckpointError`` otherwise, nothing written).
    """
    import torch

    path = Path(path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(path, f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if not isinstance(metadata, dict):
        raise CheckpointError(path, f"metadata must be a dict, got {type(metadata).__name__}")
    tensors = {k: v.detach().to("cpu") for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    try:
        meta_json = json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"metadata is not JSON-serialisable ({exc}); nothing was written") from None
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


# ---------------------------------------------------------------------------------------------
# the checkpoint + history sidecar pair

HISTORY_FORMAT = "pytest-mlrepro/best-checkpoint-history"
HISTORY_VERSION = 2


def history_path(checkpoint_path) -> Path:
    """Where ``BestCheckpoint`` keeps the per-epoch history of ``checkpoint_path``."""
    return Path(f"{checkpoint_path}.history.json")


def save_id(epoch: int, weights_hash: str) -> str:
    """Names one save: the epoch and the weights it holds (deterministic, so replicas agree)."""
    return f"epoch-{epoch}-{weights_hash[:16]}"


def _save_record(record, origin, key: str):
    """A ``saved``/``pending`` record, checked: None or ``{"epoch": int, "save_id": str}``."""
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
            and isinstance(record.get("save_id"), str)):
        raise SidecarError(origin, f"{key!r} must be null or {{'epoch': int, 'save_id': str}}, got {record!r}")
    return {"epoch": record["epoch"], "save_id": record["save_id"]}


def write_history(checkpoint_path, *, monitor: str, mode: str, history: list, saved=None, pending=None,
                  fsync: bool = True) -> int:
    """Write the sidecar: the history, the save the checkpoint holds (``saved``) and, right before a
    checkpoint is replaced, the save about to land (``pending``, which must be the last epoch)."""
    where = history_path(checkpoint_path)
    saved, pending = _save_record(saved, where, "saved"), _save_record(pending, where, "pending")
    if pending is not None and (not history or history[-1].get("epoch") != pending["epoch"]):
        raise SidecarError(where, f"the pending save of epoch {pending['epoch']} must be the last epoch of the history")
    doc = {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "monitor": monitor, "mode": mode,
           "checkpoint": Path(checkpoint_path).name, "history": history, "saved": saved, "pending": pending}
    return atomic_write_json(history_path(checkpoint_path), doc, fsync=fsync)


def reconcile_history(doc, metadata, origin: str = "history sidecar"):
    """The history entries that belong with a checkpoint whose metadata is ``metadata``.

    Returns ``(entries, note)``; ``note`` says what was reconciled (None if nothing). A sidecar
    without save records (version 1, or not ours) is taken as is. Raises ``SidecarError`` when the
    sidecar describes another checkpoint than this one or its save records are malformed.
    """
    if not isinstance(doc, dict) or "history" not in doc:
        return doc, None
    entries = doc["history"]
    if "saved" not in doc and "pending" not in doc:
        return entries, None
    saved, pending = _save_record(doc.get("saved"), origin, "saved"), _save_record(doc.get("pending"), origin, "pending")
    have = (metadata or {}).get("save_id")
    if pending is not None and have == pending["save_id"]:
        return entries, None  # the save landed; only the sidecar's commit record was not written
    if saved is not None and have == saved["save_id"]:
        if pending is None:
            return entries, None
        if not isinstance(entries, list) or not entries or not isinstance(entries[-1], dict) \
                or entries[-1].get("epoch") != pending["epoch"]:
            raise SidecarError(origin, f"the pending save of epoch {pending['epoch']} is not the last logged epoch")
        return entries[:-1], (f"the save of epoch {pending['epoch']} never landed (the writer stopped while saving "
                              f"it), so the history is read up to the epoch before it")
    names = [f"{k} {r['save_id']}" for k, r in (("saved", saved), ("pending", pending)) if r is not None]
    raise SidecarError(origin, f"does not describe this checkpoint: it names {' and '.join(names) or 'no save'}, "
                               f"the checkpoint carries save_id {have!r} (a checkpoint from another run, or one "
                               f"copied without its history)")
