"""Per-tensor comparison of two replicas' states: bitwise, within a tolerance, or within N ULPs.

Everything is computed on the tensors' device; only a few scalars per tensor come to the host.
Mismatched keys, shapes, dtypes and non-tensor leaves are reported as ``TensorDiff`` statuses, never
raised, so one odd entry cannot hide the rest of the comparison.

Modes (an element "differs" when):
- ``bitwise``: its bits differ. ``-0.0`` vs ``0.0`` and two NaNs with different payloads differ.
- ``tolerance``: not ``|a - b| <= atol + rtol * |b|``. NaN matches NaN at the same position (payload
  ignored), an infinity matches the same-signed infinity; any other NaN/inf pairing differs.
- ``ulp``: ``ulp_distance(a, b) > max_ulp``; ``+0.0`` and ``-0.0`` are 0 ULP apart, NaN vs NaN is 0,
  NaN vs anything else is infinitely far.
Integer and bool tensors compare exactly in ``bitwise`` and ``ulp`` modes; ``tolerance`` applies to
them as ``|a - b| <= atol + rtol * |b|``. Complex tensors compare component-wise (real and imaginary
parts as two floats); an element differs when either part does.
Bitwise equality implies equality in every mode, so bitwise-identical tensors take a fast path.

``compare_state_files`` compares two ``torch.save``'d states one tensor at a time from memory-mapped
files (an audit's replicas may each hold gigabytes of weights), releasing each tensor's pages once
compared, and counts NaN/inf in the same pass over memory as the equality check.
"""
from __future__ import annotations

import math
import os
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .config import COMPARE_MODES as MODES  # the shared choices
from .result import Finding, TensorDiff

CHUNK_ELEMENTS = 1 << 18  # elements per pass when tensors differ: cache-sized float64/int64 temporaries
SCAN_ELEMENTS = 1 << 16  # elements per step of the equality + NaN/inf scan: the count reads what the check just cached
ULP_INFINITE = (1 << 63) - 1  # ulp_distance of NaN vs non-NaN (and of float64 pairs too far apart to count)

# Same-width signed integer dtype used to read each float dtype's bits.
_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _INT_VIEW[getattr(torch, _name)] = torch.int8


def check_options(mode: str, atol: float, rtol: float, max_ulp: int) -> None:
    """Raise ValueError for an unknown mode or a negative/NaN tolerance."""
    if mode not in MODES:
        raise ValueError(f"unknown comparison mode {mode!r}; expected one of {', '.join(MODES)}")
    for label, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{label} must be a non-negative number, got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"{label} must be a non-negative number, got {value!r}")
    if isinstance(max_ulp, bool) or not isinstance(max_ulp, int) or max_ulp < 0:
        raise ValueError(f"max_ulp must be a non-negative integer, got {max_ulp!r}")


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place, as int64, for same-dtype float tensors.

    Floats are mapped to integers that are ordered like the floats (sign-magnitude bits to two's
    complement), so adjacent floats are 1 apart, +0.0 and -0.0 are 0 apart and the smallest positive
    and negative subnormals are 2 apart. NaN vs NaN is 0; NaN vs anything else is ``ULP_INFINITE``,
    as are float64 pairs whose distance does not fit in int64. Complex tensors give the larger of the
    real- and imaginary-part distances.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("ulp_distance expects two tensors")
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_distance needs tensors of one dtype, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"ulp_distance needs tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    a, b = _plain(a), _plain(b.to(a.device))
    if a.is_complex():
        return torch.maximum(*_ulp_parts(torch.view_as_real(a), torch.view_as_real(b)).unbind(-1))
    if a.dtype not in _INT_VIEW:
        raise TypeError(f"ulp_distance is defined for floating-point tensors, not {a.dtype}")
    return _ulp_parts(a, b)


def _ulp_parts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Elementwise integer arithmetic only: torch.where with scalars is ~10x slower on CPU.
    int_dtype = _INT_VIEW[a.dtype]
    magnitude_mask = (1 << (torch.iinfo(int_dtype).bits - 1)) - 1
    oa, ob = _ordered(a.view(int_dtype).to(torch.int64), magnitude_mask), _ordered(b.view(int_dtype).to(torch.int64), magnitude_mask)
    d = oa - ob  # wraps only for float64 pairs of opposite signs
    overflow = ((oa ^ ob) & (oa ^ d)) < 0
    dist = d.abs_()
    dist.masked_fill_(overflow | (dist < 0), ULP_INFINITE)  # |INT64_MIN| stays negative: saturate it too
    nan_a, nan_b = _isnan(a), _isnan(b)
    return dist.masked_fill_(nan_a | nan_b, ULP_INFINITE).masked_fill_(nan_a & nan_b, 0)


def _ordered(bits: torch.Tensor, magnitude_mask: int) -> torch.Tensor:
    """Sign-magnitude float bits (sign-extended to int64) -> integers ordered like the floats: +-magnitude."""
    sign = bits >> 63  # 0 or -1
    return ((bits & magnitude_mask) ^ sign) - sign


def compare_tensors(
    name: str, a: Any, b: Any, *, mode: str = "bitwise", atol: float = 0.0, rtol: float = 0.0, max_ulp: int = 0
) -> TensorDiff:
    """Compare reference ``a`` with ``b`` under ``mode``; never raises for mismatched inputs."""
    check_options(mode, atol, rtol, max_ulp)
    return _compare(name, a, b, mode, float(atol), float(rtol), max_ulp)


def compare_states(
    a: Mapping[str, Any], b: Mapping[str, Any], *, mode: str = "bitwise", atol: float = 0.0, rtol: float = 0.0, max_ulp: int = 0
) -> list:
    """Compare two (possibly nested) states key by key: keys of ``a`` in order, then keys only in ``b``.

    ``a`` and ``b`` may be state dicts, nested dicts/lists, or modules; they are flattened with
    ``flatten_state`` first.
    """
    check_options(mode, atol, rtol, max_ulp)
    return _compare_flat(flatten_state(a), flatten_state(b), (mode, float(atol), float(rtol), max_ulp)).diffs


@dataclass
class StateComparison:
    """``compare_state_files``' answer: the per-tensor diffs, and per side the tensors holding NaN/inf."""

    diffs: list  # list[TensorDiff], as compare_states returns them
    nonfinite: tuple = field(default_factory=lambda: ({}, {}))  # (reference, other): {name: {"nan", "inf", "numel"}}
    fingerprints: dict = field(default_factory=dict)  # the reference side's tensors: name -> strong fingerprint (hex)

    @property
    def equal(self) -> bool:
        return all(d.equal for d in self.diffs)


def compare_state_files(
    path_a: "str | os.PathLike", path_b: "str | os.PathLike", *, mode: str = "bitwise", atol: float = 0.0,
    rtol: float = 0.0, max_ulp: int = 0, fingerprint: bool = False,
) -> StateComparison:
    """``compare_states`` of two files written by ``torch.save``, streamed: both are memory-mapped
    (``weights_only=True``) and compared one tensor at a time, each tensor's pages released once
    compared, so the memory held is about one pair of tensors, never two whole states. Also counts NaN
    and inf of every floating tensor on both sides, in the same pass over memory. With ``fingerprint``,
    also the strong fingerprint of every tensor of the reference side (what a baseline keeps), taken
    while its pages are in memory."""
    check_options(mode, atol, rtol, max_ulp)
    (state_a, mapped_a), (state_b, mapped_b) = _load_mapped(path_a), _load_mapped(path_b)
    flat_a, flat_b = flatten_state(state_a), flatten_state(state_b)
    del state_a, state_b  # only the flat dicts hold the tensors now: popping them lets each go
    release = (_release_pages if mapped_a else None, _release_pages if mapped_b else None)
    return _compare_flat(flat_a, flat_b, (mode, float(atol), float(rtol), max_ulp), count=True, release=release,
                         fingerprint=fingerprint)


def _hex_fingerprint(t: torch.Tensor) -> str:
    from .fingerprint import fingerprint_many

    return format(int(fingerprint_many([t.detach()])[0]) & (2**64 - 1), "016x")


def count_nonfinite(t: Any) -> Optional[tuple]:
    """(NaN count, inf count) of a floating or complex tensor (a complex element counts once if either
    part is); None for anything else."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
        return None
    t = _plain(t)
    flat = _scan_view(t)
    nan = inf = 0
    for start in range(0, flat.shape[0], SCAN_ELEMENTS):
        n, i = _nonfinite_counts(flat[start : start + SCAN_ELEMENTS])
        nan, inf = nan + n, inf + i
    return nan, inf


def _compare_flat(flat_a: dict, flat_b: dict, opts: tuple, *, count: bool = False,
                  release: tuple = (None, None), fingerprint: bool = False) -> StateComparison:
    """Keys of ``a`` in order, then keys only in ``b``. Entries are popped as they are compared so the
    caller's last references go with them (and ``release``, one callable or None per side, drops
    their pages)."""
    out = StateComparison(diffs=[])
    release_a, release_b = release
    for key in list(flat_a):
        a = flat_a.pop(key)
        if fingerprint and isinstance(a, torch.Tensor):
            out.fingerprints[key] = _hex_fingerprint(a)
        if key in flat_b:
            b = flat_b.pop(key)
            diff, counts = _compare_counting(key, a, b, *opts) if count else (_compare(key, a, b, *opts), (None, None))
            for side, c in zip(out.nonfinite, counts):
                _note_nonfinite(side, key, c, a)
            _release(release_a, a)
            _release(release_b, b)
        else:
            diff = _missing(key, a, "missing_in_other", reference_side=True)
            if count:
                _note_nonfinite(out.nonfinite[0], key, count_nonfinite(a), a)
            _release(release_a, a)
        out.diffs.append(diff)
        del a
    for key in list(flat_b):
        b = flat_b.pop(key)
        out.diffs.append(_missing(key, b, "missing_in_reference", reference_side=False))
        if count:
            _note_nonfinite(out.nonfinite[1], key, count_nonfinite(b), b)
        _release(release_b, b)
        del b
    return out


def _note_nonfinite(side: dict, key: str, counts: Optional[tuple], value: Any) -> None:
    if counts is not None and (counts[0] or counts[1]):
        side[key] = {"nan": int(counts[0]), "inf": int(counts[1]), "numel": int(value.numel())}


def _release(release: Optional[Callable[[Any], None]], value: Any) -> None:
    if release is not None and isinstance(value, torch.Tensor):
        release(value)


def nonfinite_finding(nonfinite: Mapping[int, Mapping[str, dict]]) -> Optional[Finding]:
    """The ``weights.finite`` finding from NaN/inf counts per replica (``{replica: {tensor: counts}}``,
    as ``StateComparison.nonfinite`` gives them), or None when every final weight is finite.

    Identical NaNs are bitwise equal, so a training that blows up the same way every time is
    reproducible; this says so instead of letting it pass in silence."""
    from .checks import FINAL_WEIGHTS

    rows = [{"name": name, "replica": replica, **counts}
            for replica, tensors in sorted(nonfinite.items()) for name, counts in tensors.items()]
    if not rows:
        return None
    names = list(dict.fromkeys(row["name"] for row in rows))
    replicas = sorted({row["replica"] for row in rows})
    first = rows[0]
    more = f" and {len(names) - 1} more tensor{'s' if len(names) > 2 else ''}" if len(names) > 1 else ""
    checked = ", ".join(map(str, sorted(nonfinite)))
    where = (f"in every replica checked ({checked})" if replicas == sorted(nonfinite) else
             f"in replica{'s' if len(replicas) > 1 else ''} {', '.join(map(str, replicas))} (checked: {checked})")
    message = (f"the final weights hold NaN or inf: `{first['name']}` ({first['nan']} NaN, {first['inf']} inf of "
               f"{first['numel']} elements){more}, {where}")
    details = {"tensors": rows, "names": names, "replicas": replicas, "replicas_checked": sorted(nonfinite)}
    return Finding(FINAL_WEIGHTS, "fail", message, details)


# --- streaming from files ---------------------------------------------------------------------


def _load_mapped(path: "str | os.PathLike") -> tuple:
    """(the state, whether it is memory-mapped): ``torch.load`` maps a zip-format file (the data stays
    in the file until read). A legacy file cannot be mapped, and one of the other byte order would be
    byte-swapped in memory: both are read whole (and their pages must not be released)."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path) and _native_byte_order(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    return torch.load(path, map_location="cpu", weights_only=True), False


def _native_byte_order(path: str) -> bool:
    """True when the torch.save archive at ``path`` was written in this machine's byte order (an
    archive without the record is little-endian, as torch reads it)."""
    with zipfile.ZipFile(path) as archive:
        record = next((n for n in archive.namelist() if n.endswith("/byteorder") or n == "byteorder"), None)
        order = archive.read(record).decode().strip() if record else "little"
    return order == sys.byteorder


_MADVISE: list = []  # [madvise function or None], looked up once


def _madvise():
    if not _MADVISE:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                import mmap

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                fn = (fn, mmap.PAGESIZE, mmap.MADV_DONTNEED)
            except (OSError, AttributeError, ImportError):
                fn = None
        _MADVISE.append(fn)
    return _MADVISE[0]


def _release_pages(t: torch.Tensor) -> None:
    """Drop the pages of a memory-mapped tensor's storage from this process (Linux; elsewhere a no-op).

    The mapping of ``torch.load(mmap=True)`` covers the whole file and stays until its last tensor
    goes, so the pages read while comparing would add up to both whole states. The mapping is private
    and never written, so a dropped page is read again from the file if it is touched again (a storage
    two keys share). Only for tensors of a state ``_load_mapped`` mapped: on anonymous memory it
    would zero them.
    """
    found = _madvise()
    if found is None or t.device.type != "cpu" or t.layout != torch.strided:
        return
    madvise, page, flag = found
    storage = t.untyped_storage()
    begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-begin // page) * page, end // page * page  # whole pages inside the storage only
    if last > first:
        madvise(first, last - first, flag)


def flatten_state(obj: Any, prefix: str = "") -> dict:
    """Flatten a state to ``{dotted.key: leaf}``.

    Modules, optimizers and anything else with a ``state_dict()`` method are replaced by their state
    dict; mappings and lists/tuples are walked (list items keyed by index); tensors and other values are
    leaves. Empty containers are kept as leaves so a structural difference still shows.
    """
    out: dict = {}
    _flatten_into(obj, prefix, out, set())
    return out


def _flatten_into(obj: Any, prefix: str, out: dict, active: set) -> None:
    if isinstance(obj, torch.Tensor):
        _put(out, prefix, obj)
        return
    if not isinstance(obj, (Mapping, list, tuple)) and callable(getattr(obj, "state_dict", None)):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        _put(out, prefix, obj)
        return
    if not items:
        _put(out, prefix, obj)
        return
    if id(obj) in active:
        raise ValueError(f"flatten_state: the state contains itself at {prefix or '<root>'!r}")
    active.add(id(obj))
    for key, value in items:
        _flatten_into(value, f"{prefix}.{key}" if prefix else key, out, active)
    active.discard(id(obj))


def _put(out: dict, key: str, value: Any) -> None:
    if key in out:
        raise ValueError(f"flatten_state: two entries flatten to the same key {key!r}")
    out[key] = value


# --- one pair ---------------------------------------------------------------------------------


def _compare(name: str, a: Any, b: Any, mode: str, atol: float, rtol: float, max_ulp: int) -> TensorDiff:
    a, b = _as_tensor_if_array(a), _as_tensor_if_array(b)
    a_is_t, b_is_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if not a_is_t and not b_is_t:
        return TensorDiff(name=name, status="equal" if _leaf_equal(a, b) else "value_mismatch",
                          dtype=type(a).__name__, other_dtype=type(b).__name__)
    if not (a_is_t and b_is_t):
        return TensorDiff(
            name=name, status="dtype_mismatch",
            shape=list(a.shape) if a_is_t else None, other_shape=list(b.shape) if b_is_t else None,
            dtype=str(a.dtype) if a_is_t else type(a).__name__, other_dtype=str(b.dtype) if b_is_t else type(b).__name__,
        )
    diff = TensorDiff(name=name, status="equal", shape=list(a.shape), other_shape=list(b.shape),
                      dtype=str(a.dtype), other_dtype=str(b.dtype))
    if a.shape != b.shape:
        diff.status = "shape_mismatch"
        return diff
    if a.dtype != b.dtype:
        diff.status = "dtype_mismatch"
        return diff
    a, b = _plain(a), _plain(b)
    if b.device != a.device:
        b = b.to(a.device)
    diff.numel = a.numel()
    is_float = a.is_floating_point() or a.is_complex()
    if torch.equal(_bits(a), _bits(b)):  # bitwise equal => equal in every mode
        diff.max_abs_diff, diff.fraction_differing = 0.0, 0.0
        diff.max_ulp = 0 if is_float else None
        return diff
    complex_input = a.is_complex()
    if complex_input:  # compared as (real, imag) float pairs; an element differs if either part does
        flat_a, flat_b = torch.view_as_real(a).reshape(-1, 2), torch.view_as_real(b).reshape(-1, 2)
    else:
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    # Running totals updated in place: a list of per-chunk results would leave a small allocation
    # after every chunk's temporaries, and the heap could then not reuse them (the resident set grew
    # by about a fifth of the tensor's size on CPU).
    n_diff = torch.zeros((), dtype=torch.int64, device=a.device)
    max_abs = torch.zeros((), dtype=torch.float64, device=a.device)
    ulp_max = torch.zeros((), dtype=torch.int64, device=a.device) if is_float else None
    for start in range(0, diff.numel, CHUNK_ELEMENTS):  # chunks bound the float64/int64 temporaries
        chunk_a, chunk_b = flat_a[start : start + CHUNK_ELEMENTS], flat_b[start : start + CHUNK_ELEMENTS]
        differs, abs_diff, ulps = _element_differences(chunk_a, chunk_b, mode, atol, rtol, max_ulp)
        if complex_input:
            differs = differs.any(dim=-1)
        n_diff += differs.sum()
        torch.maximum(max_abs, abs_diff.max().to(torch.float64), out=max_abs)
        if ulps is not None:
            torch.maximum(ulp_max, ulps.max(), out=ulp_max)
        del differs, abs_diff, ulps  # before the next chunk allocates its own
    scalars = [n_diff, max_abs.view(torch.int64)]
    if ulp_max is not None:
        scalars.append(ulp_max)
    host = torch.stack(scalars).tolist()  # the one device->host transfer
    n_diff = host[0]
    diff.max_abs_diff = struct.unpack("<d", struct.pack("<q", host[1]))[0]
    diff.max_ulp = host[2] if ulp_max is not None else None
    diff.fraction_differing = n_diff / diff.numel if diff.numel else 0.0
    diff.status = "different" if n_diff else "equal"
    return diff


def _compare_counting(name: str, a: Any, b: Any, mode: str, atol: float, rtol: float, max_ulp: int) -> tuple:
    """``_compare`` plus (NaN, inf) counts of both sides, or None for a side that is no float tensor.

    Same-shape, same-dtype float tensors are scanned once, chunk by chunk, for bitwise equality and
    non-finite values together; the counts of ``b`` are those of ``a`` wherever a chunk is bitwise
    equal. Anything else is compared as usual and counted on its own.
    """
    a, b = _as_tensor_if_array(a), _as_tensor_if_array(b)
    if not _same_float_pair(a, b):
        return _compare(name, a, b, mode, atol, rtol, max_ulp), (count_nonfinite(a), count_nonfinite(b))
    pa, pb = _plain(a), _plain(b).to(a.device)
    equal, counts_a, counts_b = _scan_equal_counting(pa, pb)
    if not equal:
        return _compare(name, a, b, mode, atol, rtol, max_ulp), (counts_a, counts_b)
    diff = TensorDiff(name=name, status="equal", shape=list(a.shape), other_shape=list(b.shape), dtype=str(a.dtype),
                      other_dtype=str(b.dtype), numel=a.numel(), max_abs_diff=0.0, fraction_differing=0.0, max_ulp=0)
    return diff, (counts_a, counts_b)


def _same_float_pair(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and (a.is_floating_point() or a.is_complex()))


def _scan_view(t: torch.Tensor) -> torch.Tensor:
    """Flat view to scan: complex as [n, 2] (real, imag) rows, everything else 1-D."""
    return torch.view_as_real(t).reshape(-1, 2) if t.is_complex() else t.reshape(-1)


def _scan_equal_counting(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(bitwise equal, (NaN, inf) of a, (NaN, inf) of b) in one pass over memory."""
    fa, fb = _scan_view(a), _scan_view(b)
    equal, nan_a, inf_a, nan_b, inf_b = True, 0, 0, 0, 0
    for start in range(0, fa.shape[0], SCAN_ELEMENTS):
        ca, cb = fa[start : start + SCAN_ELEMENTS], fb[start : start + SCAN_ELEMENTS]
        same = torch.equal(_bits(ca), _bits(cb))
        n, i = _nonfinite_counts(ca)
        nan_a, inf_a = nan_a + n, inf_a + i
        if not same:
            equal = False
            n, i = _nonfinite_counts(cb)
        nan_b, inf_b = nan_b + n, inf_b + i
    return equal, (nan_a, inf_a), (nan_b, inf_b)


def _nonfinite_counts(chunk: torch.Tensor) -> tuple:
    """(NaN, inf) counts of one chunk (rows of a complex view count once): one kernel in the usual
    all-finite case, the split only when something is not finite."""
    if chunk.element_size() == 1:  # float8: isfinite/isnan may lack a kernel
        chunk = chunk.to(torch.float32)
    bad = torch.isfinite(chunk).logical_not_()
    if chunk.dim() == 2:
        bad = bad.any(dim=1)
    n_bad = int(bad.sum())
    if not n_bad:
        return 0, 0
    nan = torch.isnan(chunk)
    n_nan = int((nan.any(dim=1) if chunk.dim() == 2 else nan).sum())
    return n_nan, n_bad - n_nan


def _element_differences(a: torch.Tensor, b: torch.Tensor, mode: str, atol: float, rtol: float, max_ulp: int):
    """(differs mask under ``mode``, |a-b| per element with NaN/inf rules, ULP distances or None)."""
    if not a.is_floating_point():
        wide = torch.float64 if a.device.type != "mps" else torch.float32
        if a.dtype == torch.bool:
            a, b = a.to(torch.uint8), b.to(torch.uint8)
        abs_diff = (a.to(wide) - b.to(wide)).abs()
        exact = a != b
        if mode == "tolerance":
            differs = exact & ~(abs_diff <= atol + rtol * b.to(wide).abs())
        else:
            differs = exact
        return differs, abs_diff, None

    wide = torch.float64 if a.device.type != "mps" else torch.float32
    fa, fb = a.to(wide), b.to(wide)
    nan_a, nan_b = _isnan(a), _isnan(b)
    finite = torch.isfinite(fa) & torch.isfinite(fb)
    # NaN at both positions, or the same infinity, count as a match in the tolerance sense.
    special_match = (nan_a & nan_b) | (~finite & (fa == fb))
    raw = (fa - fb).abs_()
    abs_diff = raw.masked_fill(~finite, math.inf).masked_fill_(special_match, 0.0)
    ulps = _ulp_parts(a, b)
    if mode == "bitwise":
        differs = _bits(a) != _bits(b)
    elif mode == "tolerance":
        # finite pairs within atol + rtol*|b|, or matching NaN/inf (rtol*|inf| must not excuse a finite value)
        differs = ~(((raw <= atol + rtol * fb.abs()) & finite) | special_match)
    else:
        differs = ulps > max_ulp
    return differs, abs_diff, ulps


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A same-size integer view of ``t`` (bit patterns compare exactly with ``==``)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype in _INT_VIEW:
        return t.view(_INT_VIEW[t.dtype])
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


def _isnan(t: torch.Tensor) -> torch.Tensor:
    if t.element_size() == 1 and t.is_floating_point():  # float8: isnan may lack a kernel
        return torch.isnan(t.to(torch.float32))
    return torch.isnan(t)


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t


def _as_tensor_if_array(x: Any) -> Any:
    """numpy arrays (e.g. inside RNG states) compare as tensors when torch can hold their dtype."""
    if type(x).__module__ == "numpy" and hasattr(x, "dtype") and hasattr(x, "shape") and x.dtype.kind in "biufc":
        try:
            return torch.from_numpy(x.copy() if not x.flags.writeable else x).reshape(x.shape)
        except (TypeError, ValueError):
            return x
    return x


def _leaf_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # an == that returns something without a truth value
        return repr(a) == repr(b)


def _missing(key: str, value: Any, status: str, *, reference_side: bool) -> TensorDiff:
    value = _as_tensor_if_array(value)
    is_t = isinstance(value, torch.Tensor)
    shape = list(value.shape) if is_t else None
    dtype = str(value.dtype) if is_t else type(value).__name__
    if reference_side:
        return TensorDiff(name=key, status=status, shape=shape, dtype=dtype, numel=value.numel() if is_t else None)
    return TensorDiff(name=key, status=status, other_shape=shape, other_dtype=dtype, numel=value.numel() if is_t else None)
