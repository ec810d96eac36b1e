"""Read an offline W&B run (``run-<id>.wandb``) back, so tests can check what was really logged.

wandb 0.31 keeps an offline run's records only in that file and ships no Python reader. The file
is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1 little-endian, version 0), then
32 KiB blocks of chunks, each with a 7-byte header: CRC-32 (IEEE, over the type byte and the data,
little-endian), data length (2 bytes, little-endian), chunk type (1 FULL, 2 FIRST, 3 MIDDLE,
4 LAST). A block tail shorter than a chunk header is zero padding. Each assembled record is a
``wandb.proto.wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import MlreproError

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(MlreproError, ValueError):
    """The file is not a well-formed W&B transaction log (names the file and byte offset)."""


def iter_chunks_payloads(data: bytes, name: str = "<bytes>") -> Iterator[bytes]:
    """The assembled record payloads of a log held in ``data``."""
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        raise WandbLogError(f"{name}: not a W&B log (header {data[:7]!r}, expected {FILE_HEADER!r})")
    pos = len(FILE_HEADER)
    pending: Optional[bytearray] = None
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + CHUNK_HEADER > len(data):
            raise WandbLogError(f"{name}: truncated chunk header at offset {pos}")
        crc, length, ctype = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and ctype == 0:
            # zeroed tail of the last block (pre-allocated space): the log ends here
            if any(data[pos:pos + left_in_block]):
                raise WandbLogError(f"{name}: zero chunk header followed by data at offset {pos}")
            pos += left_in_block
            continue
        start = pos + CHUNK_HEADER
        end = start + length
        if end > len(data) or length > left_in_block - CHUNK_HEADER:
            raise WandbLogError(f"{name}: chunk at offset {pos} (length {length}) runs past its block or the file")
        chunk = data[start:end]
        if zlib.crc32(bytes([ctype]) + chunk) & 0xFFFFFFFF != crc:
            raise WandbLogError(f"{name}: CRC mismatch in chunk at offset {pos}")
        if ctype == FULL:
            if pending is not None:
                raise WandbLogError(f"{name}: FULL chunk at offset {pos} inside an unfinished record")
            yield bytes(chunk)
        elif ctype == FIRST:
            if pending is not None:
                raise WandbLogError(f"{name}: FIRST chunk at offset {pos} inside an unfinished record")
            pending = bytearray(chunk)
        elif ctype in (MIDDLE, LAST):
            if pending is None:
                raise WandbLogError(f"{name}: {'MIDDLE' if ctype == MIDDLE else 'LAST'} chunk at offset {pos} without FIRST")
            pending += chunk
            if ctype == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbLogError(f"{name}: unknown chunk type {ctype} at offset {pos}")
        pos = end
    if pending is not None:
        raise WandbLogError(f"{name}: log ends inside a record")


def iter_records(path) -> Iterator:
    """The ``Record`` protobufs of a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    for payload in iter_chunks_payloads(path.read_bytes(), str(path)):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _set_nested(d: dict, keys: list, value) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _item_keys(item) -> list:
    return list(item.nested_key) if item.nested_key else [item.key]


def _history_value(item):
    kind = item.WhichOneof("value") if "value" in [o.name for o in item.DESCRIPTOR.oneofs] else None
    if item.value_json:
        return json.loads(item.value_json)
    if kind is not None:
        return None if kind == "none" else getattr(item, kind)
    return None


@dataclass
class OfflineRun:
    """What an offline run holds, as plain Python values."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    display_name: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # rows, each with "_step"
    summary: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)  # dicts: name, type, aliases, metadata, description, files
    exit_code: Optional[int] = None
    record_types: list = field(default_factory=list)


def find_run_file(run_dir) -> Path:
    """The ``run-<id>.wandb`` file inside an (offline-)run folder."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    files = sorted(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {[f.name for f in files]}")
    return files[0]


def read_run(run_dir) -> OfflineRun:
    """Replay the records of an offline run into config, history, summary and artifacts."""
    path = find_run_file(run_dir)
    run = OfflineRun(path=path)
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        run.record_types.append(kind)
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.group, run.job_type, run.display_name = r.run_group, r.job_type, r.display_name
            run.tags = list(r.tags)
            for item in r.config.update:
                _set_nested(run.config, _item_keys(item), json.loads(item.value_json))
            for item in r.summary.update:
                _set_nested(run.summary, _item_keys(item), json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(run.config, _item_keys(item), json.loads(item.value_json))
            for item in rec.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set_nested(row, _item_keys(item), _history_value(item))
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(run.summary, _item_keys(item), json.loads(item.value_json))
            for item in rec.summary.remove:
                run.summary.pop(item.key, None)
        elif kind == "artifact":
            a = rec.artifact
            run.artifacts.append({
                "name": a.name,
                "type": a.type,
                "aliases": list(a.aliases),
                "description": a.description,
                "metadata": json.loads(a.metadata) if a.metadata else {},
                "digest": a.digest,
                "files": {e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
                          for e in a.manifest.contents},
            })
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run
