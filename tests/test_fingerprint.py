"""Fingerprints: the code matches the written definition, and the definition separates what must differ."""
from __future__ import annotations

import hashlib
import struct
import sys
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pytest_mlrepro import fingerprint as fp_mod
from pytest_mlrepro.fingerprint import fingerprint, fingerprint_many, word_sum_many

MASK = (1 << 64) - 1
ROW_WORDS = fp_mod.ROW_WORDS
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
]


# --- an independent, pure-Python statement of the definition in fingerprint.py's docstring ---------


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def reference_fingerprint(t: torch.Tensor) -> int:
    raw = bytes(t.detach().contiguous().flatten().view(torch.uint8).tolist())
    raw += b"\0" * (-len(raw) % 8)
    words = struct.unpack(f"<{len(raw) // 8}q", raw)
    h = 0
    for j, w in enumerate(words):
        col = _splitmix64((j % ROW_WORDS + fp_mod.COLUMN_SEED) & MASK) | 1
        row = _splitmix64((j // ROW_WORDS + fp_mod.ROW_SEED) & MASK) | 1
        high = _splitmix64((j % ROW_WORDS + fp_mod.HIGH_SEED) & MASK) | 1
        h += (w * col + (w >> 32) * high) * row  # Python's >> on a negative int is arithmetic, as in torch
    meta = int.from_bytes(hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}".encode(), digest_size=8).digest(), "little")
    x = ((h & MASK) ^ meta) * fp_mod.MIX_MULTIPLIER & MASK
    return _signed(x ^ (x >> 32))


def random_tensor(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities, subnormals and negative zeros included) of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n_bytes = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1  # other byte values are not valid bools for torch's own ops
    return raw.view(dtype).reshape(shape)


pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="the reference reads words little-endian")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (7, 3), (ROW_WORDS * 2 + 3,), (3, ROW_WORDS + 1)], ids=str)
def test_code_matches_written_definition(dtype, shape):
    t = random_tensor(dtype, shape, seed=zlib.crc32(f"{dtype}{shape}".encode()))
    got = fingerprint(t)
    assert got.dtype == torch.int64 and got.dim() == 0 and got.device == t.device
    assert got.item() == reference_fingerprint(t)


def test_definition_holds_for_views_that_start_mid_word():
    base = torch.randn(3 * ROW_WORDS + 7)
    view = base[1:]  # 4-byte offset: the bulk cannot be read as int64 in place
    assert view.storage_offset() * 4 % 8 != 0
    assert fingerprint(view).item() == reference_fingerprint(view)


def test_batched_equals_one_by_one():
    ts = [random_tensor(d, s, i) for i, (d, s) in enumerate(
        [(torch.float32, (5,)), (torch.float64, (3, ROW_WORDS)), (torch.bool, (3,)), (torch.float16, (0,)),
         (torch.bfloat16, (ROW_WORDS * 8 + 1,)), (torch.complex64, (2, 3)), (torch.int64, ())])]
    many = fingerprint_many(ts)
    assert many.shape == (len(ts),) and many.dtype == torch.int64
    assert many.tolist() == [fingerprint(t).item() for t in ts]
    assert fingerprint_many([]).shape == (0,)


@pytest.mark.parametrize("rows, chunk_words", [(1, None), (7, None), (7, 3 * ROW_WORDS), (300, 16 * ROW_WORDS)])
def test_accelerator_reduction_path_agrees_with_matmul_path(rows, chunk_words):
    """The multiply-and-sum path used on CUDA (no integer matmul there), exercised here on the CPU."""
    columns, high, _, _ = fp_mod._tables(torch.device("cpu"), 1)
    matrix = random_tensor(torch.int64, (rows, ROW_WORDS), seed=rows)
    by_mv = fp_mod._weighted_row_sums(matrix, columns, high, use_mv=True, chunk_words=chunk_words)
    by_sum = fp_mod._weighted_row_sums(matrix, columns, high, use_mv=False, chunk_words=chunk_words)
    assert torch.equal(by_mv, by_sum)
    expected = [sum((w * c + (w >> 32) * h) for w, c, h in zip(row, columns.tolist(), high.tolist())) for row in matrix[:2].tolist()]
    assert [v & MASK for v in by_mv[:2].tolist()] == [v & MASK for v in expected]


def test_inference_mode_and_inference_tensors():
    x = torch.randn(3, ROW_WORDS + 5)
    expected = fingerprint_many([x, x[0]])
    with torch.inference_mode():
        inside = fingerprint_many([x, x[0]])
        made_inside = x.clone()
    assert torch.equal(inside, expected)
    assert fingerprint(made_inside) == expected[0]


# --- layout: fingerprints are of logical values -------------------------------------------------------


@pytest.mark.parametrize(
    "make_view",
    [
        lambda x: x.t(),
        lambda x: x[:, ::2],
        lambda x: x[1:, 3:],
        lambda x: x.unsqueeze(0).expand(3, -1, -1),
        lambda x: x.reshape(4, 5, 3, -1).to(memory_format=torch.channels_last),
    ],
    ids=["transpose", "strided", "offset", "expand", "channels_last"],
)
def test_views_agree_with_their_contiguous_copy(make_view):
    x = torch.randn(60, 130)
    view = make_view(x)
    assert fingerprint(view) == fingerprint(view.contiguous())
    assert fingerprint(view) == fingerprint(view.clone(memory_format=torch.contiguous_format))


def test_conj_and_neg_views_fingerprint_their_values():
    z = torch.randn(40, dtype=torch.complex64)
    assert fingerprint(z.conj()) == fingerprint(z.conj().resolve_conj())
    assert fingerprint(z.conj()) != fingerprint(z)
    neg = torch._neg_view(torch.randn(40))
    assert neg.is_neg()
    assert fingerprint(neg) == fingerprint(neg.resolve_neg())


def test_requires_grad_tensors_and_parameters():
    p = torch.nn.Parameter(torch.randn(20, 20))
    out = fingerprint(p)
    assert not out.requires_grad
    assert out == fingerprint(p.detach().clone())
    assert p.grad is None


# --- what must differ -------------------------------------------------------------------------------


def test_signed_zero_and_nan_payloads_differ():
    assert fingerprint(torch.tensor([0.0, 1.0])) != fingerprint(torch.tensor([-0.0, 1.0]))
    nan_a = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
    nan_b = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(nan_a).all() and torch.isnan(nan_b).all()
    assert fingerprint(nan_a) != fingerprint(nan_b)


def test_same_bytes_in_another_dtype_or_shape_differ():
    x = torch.randn(6, 4)
    variants = [x, x.view(torch.int32), x.view(torch.uint8), x.view(24), x.view(4, 6), x.view(2, 3, 4)]
    assert len({fingerprint(v).item() for v in variants}) == len(variants)
    assert fingerprint(torch.zeros(0)) != fingerprint(torch.zeros(0, 3))
    assert fingerprint(torch.zeros(3, dtype=torch.uint8)) != fingerprint(torch.zeros(4, dtype=torch.uint8))


def test_swaps_and_compensating_ulp_changes_differ():
    """A plain sum of words misses these; position-dependent weights must not."""
    x = torch.randn(3 * ROW_WORDS)
    swapped = x.clone()
    swapped[[0, 5]] = x[[5, 0]]
    assert fingerprint(swapped) != fingerprint(x)
    far_swap = x.clone()
    far_swap[[1, 2 * ROW_WORDS + 1]] = x[[2 * ROW_WORDS + 1, 1]]
    assert fingerprint(far_swap) != fingerprint(x)
    bits = x.clone().view(torch.int32)
    for i, j in [(0, 2), (3, 2 * ROW_WORDS + 3), (10, 12)]:  # both low or both high halves of int64 words
        nudged = bits.clone()
        nudged[i] += 1  # one ULP up here ...
        nudged[j] -= 1  # ... one ULP down there: the word sum is unchanged
        assert nudged.to(torch.int64).sum() == bits.to(torch.int64).sum()
        assert fingerprint(nudged.view(torch.float32)) != fingerprint(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64])
def test_pairs_of_sign_flips_differ(dtype):
    """Modulo 2**64 two flips of bit 63 cancel under any odd weights; the high-half term must catch them."""
    x = torch.randn(3 * ROW_WORDS, dtype=dtype)
    for positions in ([1, 3], [1, 2 * ROW_WORDS + 1], [5, 7, 9, 11]):
        flipped = x.clone()
        flipped[positions] = -flipped[positions]
        assert fingerprint(flipped) != fingerprint(x), positions
    zeros = torch.zeros(8, dtype=dtype)
    signed = zeros.clone()
    signed[[1, 3]] = -0.0
    assert fingerprint(signed) != fingerprint(zeros)


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    numel=st.one_of(st.integers(1, 40), st.integers(ROW_WORDS, 3 * ROW_WORDS + 5)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_any_single_bit_flip_changes_the_fingerprint(dtype, numel, seed, data):
    t = random_tensor(dtype, (numel,), seed)
    raw = t.clone().view(torch.uint8)
    byte = data.draw(st.integers(0, raw.numel() - 1), label="byte")
    bit = data.draw(st.integers(0, 0 if dtype == torch.bool else 7), label="bit")
    raw[byte] ^= 1 << bit
    assert fingerprint(raw.view(dtype)) != fingerprint(t)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), numel=st.integers(0, 3 * ROW_WORDS), seed=st.integers(0, 2**16))
def test_equal_tensors_give_equal_fingerprints(dtype, numel, seed):
    t = random_tensor(dtype, (numel,), seed)
    assert fingerprint(t) == fingerprint(t.clone())
    assert fingerprint(t) == fingerprint(t.clone())  # repeated calls agree


# --- determinism and environment ----------------------------------------------------------------------


def test_same_result_with_one_or_two_threads():
    x = torch.randn(1 << 20)  # 4 MiB: big enough for the kernels to split work across threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint_many([x, x[3:], x.view(512, -1).t()])
        torch.set_num_threads(2)
        two = fingerprint_many([x, x[3:], x.view(512, -1).t()])
    finally:
        torch.set_num_threads(before)
    assert one.tolist() == two.tolist()


def test_works_under_deterministic_algorithms():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = fingerprint_many([torch.randn(5), torch.randn(3, ROW_WORDS + 1)])
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
    assert got.shape == (2,)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="item 1 is a list"):
        fingerprint_many([torch.ones(1), [1.0]])
    with pytest.raises(ValueError, match="one device.*meta"):
        fingerprint_many([torch.ones(1), torch.ones(1, device="meta")])
    with pytest.raises(ValueError, match="meta tensors"):
        fingerprint(torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="item 0 has layout torch.sparse_coo"):
        fingerprint(torch.ones(2, 2).to_sparse())


# --- CUDA: same value as on the CPU, and no synchronisation ------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_synchronising():
    cpu = [random_tensor(d, s, i) for i, (d, s) in enumerate(
        [(torch.float32, (300, 70)), (torch.bfloat16, (5,)), (torch.float64, (3 * ROW_WORDS + 1,)), (torch.bool, (9,))])]
    gpu = [t.cuda() for t in cpu]
    expected = fingerprint_many(cpu).tolist()
    fingerprint_many(gpu)  # warm the per-device tables and the meta cache (the first call per list copies once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fingerprint_many(gpu)
        single = fingerprint(gpu[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and single.device.type == "cuda"
    assert got.tolist() == expected
    assert single.item() == expected[0]


# -- word_sum_many: the per-step trace fingerprint ----------------------------------------------------


def _reference_word_sum(t: torch.Tensor) -> int:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    data = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())
    data += b"\0" * (-len(data) % 8)
    total = sum(int.from_bytes(data[i:i + 8], "little", signed=False) for i in range(0, len(data), 8))
    total %= 2**64
    return total - 2**64 if total >= 2**63 else total


@pytest.mark.parametrize("t", [
    torch.randn(5, 3), torch.randn(7, dtype=torch.float64), torch.randn(3, dtype=torch.bfloat16),
    torch.randn(5, dtype=torch.float16), torch.arange(11, dtype=torch.int32), torch.tensor([True, False, True]),
    torch.randn(4, 6).t(), torch.randn(3, dtype=torch.complex64), torch.zeros(0), torch.tensor(2.5),
    torch.randn(10)[3:],
], ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_word_sum_matches_its_definition(t):
    assert int(word_sum_many([t])[0]) == _reference_word_sum(t)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_word_sum_changes_on_any_single_bit_flip(n, data):
    t = torch.randn(n)
    flipped = t.clone()
    words = flipped.view(torch.int32)
    i = data.draw(st.integers(0, n - 1))
    bit = data.draw(st.integers(0, 31))
    words[i] ^= (1 << bit) if bit < 31 else -(1 << 31)
    assert int(word_sum_many([t])[0]) != int(word_sum_many([flipped])[0])


def test_word_sum_is_blind_to_an_exact_swap_as_documented():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    swapped = torch.tensor([3.0, 4.0, 1.0, 2.0])  # whole 8-byte words trade places
    assert torch.equal(word_sum_many([t]), word_sum_many([swapped]))
    assert not torch.equal(fingerprint_many([t]), fingerprint_many([swapped]))  # the strong one sees it


def test_word_sum_is_the_same_with_one_or_two_threads():
    t = torch.randn(3_000_000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = word_sum_many([t])
        torch.set_num_threads(2)
        two = word_sum_many([t])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


_PACK_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.int64, torch.bool]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(_PACK_DTYPES), sizes=st.lists(st.integers(0, 37), min_size=1, max_size=7),
       seed=st.integers(0, 2**31 - 1))
def test_packed_word_sums_equal_the_per_tensor_ones(dtype, sizes, seed):
    """The packed path (small CPU groups: one pass for the whole group) must give word_sum_many's exact
    values (baselines store them), whatever the dtype, odd byte counts and empty tensors included."""
    from pytest_mlrepro.fingerprint import packed_layout, word_sums_packed

    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(n, generator=g, dtype=torch.float64) * 1e3).to(dtype) if dtype != torch.complex64
               else torch.randn(n, generator=g, dtype=torch.complex64) for n in sizes]
    flat = [torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1) for t in tensors]
    layout = packed_layout([f.numel() * f.element_size() for f in flat])
    assert torch.equal(word_sums_packed(torch.cat(flat).view(torch.uint8), layout), word_sum_many(tensors))


def test_a_small_group_is_recorded_packed_with_the_per_tensor_path_s_values(monkeypatch):
    """Fingerprints and samples of a small group are the same packed or not; a tensor that changed size
    since (p.data = ...) falls back to the per-tensor path instead of failing the training."""
    from pytest_mlrepro.tracing import steps

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(24, 10, generator=g), torch.randn(24, generator=g), torch.randn(2, 24, generator=g),
              torch.randn(3, generator=g)]

    def recorded(max_bytes):
        monkeypatch.setattr(steps, "PACK_MAX_BYTES", max_bytes)
        rec = steps.StepRecorder()
        grp = rec.add_group(params, ["a", "b", "c", "d"], ["param"] * 4, "torch.optim")
        rec.record("step", grp)
        return rec, rec.parts()

    packed, a = recorded(steps.PACK_MAX_BYTES)
    unpacked, b = recorded(0)
    assert packed._group_packed[0] is not None and unpacked._group_packed[0] is None
    assert torch.equal(a["fp"], b["fp"]) and torch.equal(a["samples"], b["samples"])
    original = params[3]
    params[3].data = torch.randn(5, generator=g)  # the group's layout no longer fits
    packed.record("step", 0)
    assert packed.parts()["fp"][-1] == word_sum_many([params[3]])[0]
    params[3].data = original


def test_a_packed_group_whose_dtype_changed_is_recorded_per_tensor():
    """``model.half()`` after the first step keeps the same Parameter objects (``p.data = ...``) and
    element counts: the packed layout's byte weights no longer fit, so the record falls back to the
    per-tensor path (word_sum_many's values) instead of failing the training."""
    from pytest_mlrepro.tracing import steps

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    rec = steps.StepRecorder()
    grp = rec.add_group(params, ["a", "b"], ["param"] * 2, "torch.optim")
    assert rec._group_packed[grp] is not None
    rec.record("step", grp)
    for p in params:
        p.data = p.data.half()
    rec.record("step", grp)
    assert torch.equal(rec.parts()["fp"][-2:], word_sum_many(params))


@pytest.mark.parametrize("change", ["one_tensor_half", "sizes_swapped"])
def test_a_packed_group_changed_without_changing_its_total_falls_back(change):
    """One tensor of the group made half (torch.cat would promote it back to float32) or two tensors'
    sizes exchanged (same total): the layout no longer fits each tensor, so the per-tensor path records."""
    from pytest_mlrepro.tracing import steps

    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(6, generator=g)), torch.nn.Parameter(torch.randn(10, generator=g))]
    rec = steps.StepRecorder()
    grp = rec.add_group(params, ["a", "b"], ["param"] * 2, "torch.optim")
    if change == "one_tensor_half":
        params[1].data = params[1].data.half()
    else:
        params[0].data, params[1].data = torch.randn(10, generator=g), torch.randn(6, generator=g)
    rec.record("step", grp)
    assert torch.equal(rec.parts()["fp"], word_sum_many(params))
