"""The offline-run reader: LevelDB-style framing, on hand-made logs and on real wandb 0.31 files."""
from __future__ import annotations

import struct
import zlib

import pytest

from pytest_mlrepro.wandb_offline import (
    BLOCK_SIZE,
    CHUNK_HEADER,
    FILE_HEADER,
    WandbLogError,
    find_run_file,
    iter_chunks_payloads,
    iter_records,
)


def write_log(payloads: list) -> bytes:
    """An independent writer of the framing (LevelDB log writer rules), to feed the reader."""
    out = bytearray(FILE_HEADER)
    for payload in payloads:
        rest = memoryview(payload)
        first = True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < CHUNK_HEADER:
                out += b"\0" * left
                left = BLOCK_SIZE
            n = min(len(rest), left - CHUNK_HEADER)
            last = n == len(rest)
            ctype = (1 if last else 2) if first else (4 if last else 3)
            chunk = bytes(rest[:n])
            out += struct.pack("<IHB", zlib.crc32(bytes([ctype]) + chunk) & 0xFFFFFFFF, n, ctype) + chunk
            rest = rest[n:]
            first = False
            if last:
                break
    return bytes(out)


def test_header_layout_is_wandb_magic():
    assert FILE_HEADER == b":W&B\xe1\xbe\x00" and len(FILE_HEADER) == 7


def test_records_spanning_blocks_and_block_tails_are_reassembled():
    # 1: small; 2: spans two blocks (FIRST+LAST); 3: sized so that <7 bytes remain in its block
    # (the writer pads, the reader must skip); 4: spans four blocks (FIRST, MIDDLE, MIDDLE, LAST).
    small = b"a" * 10
    spanning = bytes(range(256)) * 160  # 40960 bytes
    used = len(FILE_HEADER) + (CHUNK_HEADER + len(small)) + (2 * CHUNK_HEADER + len(spanning))
    pad_to = BLOCK_SIZE - (used % BLOCK_SIZE) - CHUNK_HEADER - 3  # leaves 3 bytes in the block
    tail = b"t" * pad_to
    huge = b"h" * 100_000
    payloads = [small, spanning, tail, huge, b""]
    data = write_log(payloads)
    assert (len(FILE_HEADER) + 4 * CHUNK_HEADER + len(small) + len(spanning) + len(tail)) % BLOCK_SIZE == BLOCK_SIZE - 3
    types = []
    pos = len(FILE_HEADER)
    while pos < len(data):
        if BLOCK_SIZE - pos % BLOCK_SIZE < CHUNK_HEADER:
            pos += BLOCK_SIZE - pos % BLOCK_SIZE
            continue
        _, n, t = struct.unpack_from("<IHB", data, pos)
        types.append(t)
        pos += CHUNK_HEADER + n
    assert types == [1, 2, 4, 1, 2, 3, 3, 4, 1]  # the log really uses every chunk type
    assert list(iter_chunks_payloads(data)) == payloads


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[:20] + bytes([d[20] ^ 0xFF]) + d[21:], "CRC mismatch in chunk at offset 7"),
        (lambda d: b"LEVELDB" + d[7:], "not a W&B log"),
        (lambda d: d[:-5], "runs past its block or the file"),
        (lambda d: d[:7] + struct.pack("<IHB", zlib.crc32(b"\x04x") & 0xFFFFFFFF, 1, 4) + b"x", "LAST chunk at offset 7 without FIRST"),
        (lambda d: d[:7] + struct.pack("<IHB", zlib.crc32(b"\x09x") & 0xFFFFFFFF, 1, 9) + b"x", "unknown chunk type 9"),
    ],
)
def test_damaged_logs_fail_naming_the_offset(damage, message):
    data = damage(write_log([b"x" * 50, b"y" * 50]))
    with pytest.raises(WandbLogError, match=message):
        list(iter_chunks_payloads(data, "run-test.wandb"))


def test_log_ending_inside_a_record_is_an_error():
    data = write_log([b"z" * 40_000])
    cut = data[: BLOCK_SIZE]  # keeps the FIRST chunk only
    with pytest.raises(WandbLogError, match="ends inside a record"):
        list(iter_chunks_payloads(cut, "cut.wandb"))


def test_reads_a_real_multi_block_wandb_run(published):
    """A real wandb 0.31 run file of several blocks parses completely: header first, exit last."""
    long_run = next(r for r in published.outcome.wandb_runs if r.target == "tests/test_long.py::test_many_steps")
    path = find_run_file(long_run.run_dir)
    assert path.stat().st_size > 2 * BLOCK_SIZE
    records = list(iter_records(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds and kinds[-1] == "exit"
    assert kinds.count("history") >= 400
