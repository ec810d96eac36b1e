"""Deterministic fingerprints of tensors, computed where the tensors live.

The trace records a fingerprint of every parameter after every optimizer step, so two replicas can be
compared step by step without copying weights to the host. A float sum would not do: its rounding
depends on the reduction order, which differs between kernels, thread counts and GPUs. This module
reduces the *raw bits* with wrapping int64 arithmetic instead, which is exact in any order.

The fingerprint of a tensor ``t`` (defined here; ``tests/test_fingerprint.py`` checks the code
against a pure-Python version of this definition):

1. Take the bytes of ``t``'s logical values in row-major order (``t.contiguous()``), zero-pad them to
   a multiple of 8 and read them as native-endian int64 words ``w[0], ..., w[m-1]``.
2. With ``c = j % ROW_WORDS`` and ``r = j // ROW_WORDS``:
   ``H = sum_j (w[j] * K[c] + (w[j] >> 32) * G[c]) * R[r]  (mod 2**64)`` (``>>`` arithmetic), where
   ``K``, ``G`` and ``R`` are fixed odd pseudo-random constants (splitmix64 of index + seed). Odd weights
   make any change of one word (in particular any single bit flip) change ``H``; position-dependent
   weights make swapped or +1/-1 ULP-compensating changes in different places show up, which a plain
   sum of words would miss; the ``>> 32`` term keeps pairs of sign flips from cancelling (modulo
   2**64, bit 63 times any odd weight is 2**63).
3. ``fingerprint = mix(H ^ META)``, where ``META`` is a stable 64-bit hash of the dtype and shape (so the
   same bytes in another dtype or shape do not collide) and ``mix`` is a bijective multiply/xor-shift.

The bulk of a tensor is reduced as an ``[rows, ROW_WORDS]`` int64 matrix times ``K`` plus its shifted
copy times ``G``, chunk by chunk so the shifted copy stays in cache (one pass over memory; on the CPU
it runs at a fraction of a plain sum's speed because int64 multiplies are emulated in SIMD, see
benchmarks/bench_fingerprint.py). The last partial row of every tensor goes through one zero-padded
batch matrix, so many small parameters cost a handful of kernel launches, not a handful each. Nothing is copied to the host
and nothing synchronises. Fingerprints depend on the machine's byte order, so compare them only
between runs on machines of the same kind (replicas of one audit always are).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence, Union

import torch

ROW_WORDS = 1024  # int64 words per row of the bulk matrix (8 KiB)
ROW_BYTES = ROW_WORDS * 8
COLUMN_SEED = 0x6D6C726570726F31  # "mlrepro1"
ROW_SEED = 0x6D6C726570726F32  # "mlrepro2"
HIGH_SEED = 0x6D6C726570726F33  # "mlrepro3"
MIX_MULTIPLIER = 0xFF51AFD7ED558CCD  # from MurmurHash3's fmix64; any odd constant keeps mix bijective

_MASK64 = (1 << 64) - 1
_CHUNK_WORDS = 1 << 17  # words per pass of the row reduction: 1 MiB on CPU (cache-sized temporaries)
_CHUNK_WORDS_DEVICE = 1 << 24  # 128 MiB temporaries on accelerators, which have bandwidth to spare


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Fingerprint of one tensor: a 0-dim int64 tensor on ``t.device`` (no host copy, no sync)."""
    return fingerprint_many([t])[0]


def fingerprint_many(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fingerprints of several tensors on one device, as an int64 ``[n]`` tensor on that device.

    ``fingerprint_many(ts)[i] == fingerprint(ts[i])``; batching only saves kernel launches.
    An empty sequence gives an empty CPU tensor.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.empty(0, dtype=torch.int64)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fingerprint: item {i} is a {type(t).__name__}, not a torch.Tensor")
    device = tensors[0].device
    others = sorted({str(t.device) for t in tensors if t.device != device})
    if others:
        raise ValueError(
            f"fingerprint_many: all tensors must be on one device; item 0 is on {device}, others on {', '.join(others)}"
        )
    if device.type == "meta":
        raise ValueError("fingerprint: meta tensors have no data to fingerprint")

    with torch.no_grad():
        tails, tail_rows, bulks = [], [], []
        for i, t in enumerate(tensors):
            data = _row_major_bytes(t, i)
            full_rows = data.numel() // ROW_BYTES
            if full_rows:
                body = data[: full_rows * ROW_BYTES]
                if body.storage_offset() % 8:  # a view starting mid-word cannot be read as int64 in place
                    body = body.clone()
                bulks.append((i, body.view(torch.int64).view(full_rows, ROW_WORDS)))
                data = data[full_rows * ROW_BYTES :]
            tails.append(data)
            tail_rows.append(full_rows)

        column_keys, high_keys, row_keys, zeros = _tables(device, max(tail_rows) + 1)

        # Every tensor's last partial row (possibly empty), zero-padded to a common width, as one
        # [n, width] int64 matrix built by a single cat (pad_sequence costs ~15x more per call).
        width = max(8, -(-max(x.numel() for x in tails) // 8) * 8)
        pieces = []
        for x in tails:
            pieces.append(x)
            if x.numel() != width:
                pieces.append(zeros[: width - x.numel()])
        words = torch.cat(pieces).view(len(tails), width).view(torch.int64)
        tail_sums = _weighted_row_sums(words, column_keys[: words.shape[1]], high_keys[: words.shape[1]])
        if bulks:
            h = tail_sums * torch.stack([row_keys[r] for r in tail_rows])
            for i, matrix in bulks:
                per_row = _weighted_row_sums(matrix, column_keys, high_keys)
                h[i] += _weighted_sum(per_row, row_keys[: matrix.shape[0]])
        else:
            h = tail_sums * row_keys[0]
        if len(tensors) == 1:  # a Python scalar operand needs no host-to-device copy at all
            return _mix(h ^ meta_key(tensors[0].dtype, tensors[0].shape))
        return _mix(h ^ _meta_tensor(tensors, device))


def _row_major_bytes(t: torch.Tensor, index: int) -> torch.Tensor:
    """The logical values of ``t`` as a flat uint8 tensor in row-major order (a view when possible)."""
    if t.layout != torch.strided:
        raise TypeError(f"fingerprint: item {index} has layout {t.layout}; only dense (strided) tensors are supported")
    if t.is_quantized:
        raise TypeError(f"fingerprint: item {index} is quantized ({t.dtype}); fingerprint t.int_repr() instead")
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.flatten().view(torch.uint8)


def _weighted_row_sums(
    matrix: torch.Tensor, keys: torch.Tensor, high_keys: torch.Tensor, *, use_mv: bool = None, chunk_words: int = None
) -> torch.Tensor:
    """Per row: ``sum_c w[c] * keys[c] + (w[c] >> 32) * high_keys[c]`` in wrapping int64 arithmetic.

    Integer arithmetic is exact in any order, so the result does not depend on threads or kernels. The
    second term exists because modulo 2**64 a change of bit 63 contributes ``2**63`` whatever its odd
    weight, so two sign flips of float64 values (or of odd-index float32 values) would cancel; the
    arithmetic shift moves those bits down to where the weights mix them.
    """
    on_cpu = matrix.device.type == "cpu"
    use_mv = on_cpu if use_mv is None else use_mv  # CUDA has no integer matmul (the tests run both paths on CPU)
    chunk_words = chunk_words or (_CHUNK_WORDS if on_cpu else _CHUNK_WORDS_DEVICE)
    rows = matrix.shape[0]
    chunk_rows = max(1, chunk_words // max(1, matrix.shape[1]))
    shifted = torch.empty((min(rows, chunk_rows), matrix.shape[1]), dtype=torch.int64, device=matrix.device)
    if use_mv:
        out = torch.empty(rows, dtype=torch.int64, device=matrix.device)
        high = torch.empty(min(rows, chunk_rows), dtype=torch.int64, device=matrix.device)
        for start in range(0, rows, chunk_rows):  # chunks keep the shifted copy in cache
            part = matrix[start : start + chunk_rows]
            buf = shifted[: part.shape[0]]
            torch.bitwise_right_shift(part, 32, out=buf)
            torch.mv(part, keys, out=out[start : start + part.shape[0]])
            out[start : start + part.shape[0]] += torch.mv(buf, high_keys, out=high[: part.shape[0]])
        return out
    # Multiply and sum, in chunks to bound the temporaries.
    parts = []
    for part in matrix.split(chunk_rows):
        buf = shifted[: part.shape[0]]
        torch.bitwise_right_shift(part, 32, out=buf)
        parts.append((part * keys).sum(dim=1) + (buf.mul_(high_keys)).sum(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _weighted_sum(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu":
        return torch.dot(values, keys)
    return (values * keys).sum()


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >>> bits`` for int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function, elementwise on int64 (wrapping)."""
    z = x + _signed(0x9E3779B97F4A7C15)
    z = (z ^ _logical_shift_right(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _logical_shift_right(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _logical_shift_right(z, 31)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x * _signed(MIX_MULTIPLIER)
    return x ^ _logical_shift_right(x, 32)


_table_lock = threading.Lock()
_table_cache: dict = {}  # device -> (column keys, high-half keys [ROW_WORDS], row keys [2**k], zeros [ROW_BYTES] uint8)


def _tables(device: torch.device, rows_needed: int) -> tuple:
    """Odd weight tables and a zero pad on ``device``, computed there once (row keys grow by doubling)."""
    with _table_lock:
        cached = _table_cache.get(device)
        if cached is not None and cached[2].numel() >= rows_needed:
            return cached
        n_rows = 1 << max(10, (rows_needed - 1).bit_length())
        index = torch.arange(max(ROW_WORDS, n_rows), dtype=torch.int64, device=device)
        columns = _splitmix64(index[:ROW_WORDS] + _signed(COLUMN_SEED)) | 1
        high = _splitmix64(index[:ROW_WORDS] + _signed(HIGH_SEED)) | 1
        rows = _splitmix64(index[:n_rows] + _signed(ROW_SEED)) | 1
        zeros = torch.zeros(ROW_BYTES, dtype=torch.uint8, device=device)
        _table_cache[device] = (columns, high, rows, zeros)
        return _table_cache[device]


def meta_key(dtype: torch.dtype, shape: tuple) -> int:
    """Stable (process-independent) signed 64-bit hash of a dtype and shape."""
    text = f"{dtype}|{tuple(shape)}".encode()
    return _signed(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little"))


_meta_lock = threading.Lock()
_meta_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_META_CACHE_SIZE = 64


def _meta_tensor(tensors: list, device: torch.device) -> torch.Tensor:
    """The tensors' meta keys as a device tensor, cached: a trace asks for the same parameter list every
    step, and a fresh host-to-device copy each time would synchronise with the device (so only the
    first call for a given list of dtypes and shapes copies)."""
    key = (device, tuple((t.dtype, t.shape) for t in tensors))
    with _meta_lock:
        hit = _meta_cache.get(key)
        if hit is not None:
            _meta_cache.move_to_end(key)
            return hit
    value = torch.tensor([meta_key(d, s) for d, s in key[1]], dtype=torch.int64, device=device)
    with _meta_lock:
        _meta_cache[key] = value
        while len(_meta_cache) > _META_CACHE_SIZE:
            _meta_cache.popitem(last=False)
    return value


# -- the per-step trace's fingerprint ---------------------------------------------------------------
_POW256: dict = {}


def _pow256(device: torch.device) -> torch.Tensor:
    if device not in _POW256:
        _POW256[device] = torch.tensor([256 ** i for i in range(7)], dtype=torch.int64, device=device)
    return _POW256[device]


def word_sum_many(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-step trace fingerprint: per tensor, the wrapping int64 sum of its bytes read as
    little-endian 8-byte words (a short last word zero-padded). int64 ``[n]`` on the tensors' device.

    Deterministic in any reduction order, one memory pass (~40 GB/s on one core here, about 15x
    ``fingerprint_many``), so tracing every optimizer step stays cheap. Weaker by design: any single
    changed word changes it, but changes that cancel exactly (two elements swapped, +1/-1 ULP at
    matching word positions, two flips of a word's top bit) do not. A divergence missed that way
    shows up one step later, and the final weights are compared element by element regardless.
    """
    sums = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"word_sum_many: item {i} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.is_complex():
            t = torch.view_as_real(t)
        if not t.is_contiguous():
            t = t.contiguous()
        data = t.reshape(-1).view(torch.uint8)
        whole = data.numel() // 8 * 8
        if whole:
            body = data[:whole]
            if body.storage_offset() % 8:
                body = body.clone()
            s = body.view(torch.int64).sum()
        else:
            s = torch.zeros((), dtype=torch.int64, device=t.device)
        if whole != data.numel():
            tail = data[whole:].to(torch.int64)
            s = s + (tail * _pow256(t.device)[: tail.numel()]).sum()
        sums.append(s)
    if not sums:
        return torch.empty(0, dtype=torch.int64)
    return torch.stack(sums)


# -- the per-step fingerprint of many small tensors at once --------------------------------------------
@dataclass(frozen=True)
class PackedLayout:
    """Where each tensor's bytes lie once a group's flat views are packed end to end (one ``torch.cat``).

    ``word_sums_packed`` over that buffer equals ``word_sum_many`` over the tensors, in a fixed number
    of operations instead of about eight per tensor: on a small model the per-tensor operations, not
    the bytes, are the trace's cost (a 4-tensor MLP: ~90 us against ~35 us here)."""

    nbytes: int
    weights: torch.Tensor  # int64 [nbytes]: 256 ** (the byte's position within its tensor mod 8)
    starts: torch.Tensor  # int64 [n]: each tensor's first byte, as an index into the zero-prefixed cumulative sum
    ends: torch.Tensor  # int64 [n]: one past its last byte, likewise


def packed_layout(byte_lengths: Sequence[int], device: Union[str, torch.device] = "cpu") -> PackedLayout:
    lengths = torch.tensor(list(byte_lengths), dtype=torch.int64)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    total = int(ends[-1]) if len(lengths) else 0
    position = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, lengths)
    weights = torch.tensor([256 ** i for i in range(8)], dtype=torch.int64)[position % 8]
    return PackedLayout(total, weights.to(device), starts.to(device), ends.to(device))


def word_sums_packed(data: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``word_sum_many`` of the packed tensors, from their bytes ``data`` (uint8, ``layout.nbytes`` long):
    each byte times 256 ** (its position in its 8-byte word), summed per tensor. Every sum wraps modulo
    2 ** 64 as ``word_sum_many``'s do, so a difference of two running sums is each tensor's sum."""
    running = torch.cumsum(data.to(torch.int64) * layout.weights, 0)
    running = torch.cat([torch.zeros(1, dtype=torch.int64, device=data.device), running])
    return running.index_select(0, layout.ends) - running.index_select(0, layout.starts)
