"""Comparison semantics: bitwise / tolerance / ULP, NaN and signed-zero rules, structure mismatches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from pytest_mlrepro.compare import ULP_INFINITE, compare_states, compare_tensors, flatten_state, ulp_distance
from pytest_mlrepro.result import AuditResult, TensorDiff

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
MODES = ["bitwise", "tolerance", "ulp"]


def from_bits(bits: list, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(bits, dtype=INT_VIEW[dtype]).view(dtype)


def bit_range(dtype):
    info = torch.iinfo(INT_VIEW[dtype])
    return info.min, info.max


@st.composite
def float_pairs(draw, dtypes=FLOATS):
    """Two same-shape tensors of arbitrary bit patterns (NaN payloads, infs, subnormals, signed zeros);
    ``b`` is ``a`` with some positions replaced by arbitrary patterns, nudged by a few ULPs, or sign-flipped."""
    dtype = draw(st.sampled_from(dtypes))
    lo, hi = bit_range(dtype)
    n = draw(st.integers(1, 12))
    a_bits = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    b_bits = list(a_bits)
    for i in range(n):
        kind = draw(st.sampled_from(["same", "same", "random", "nudge", "sign"]))
        if kind == "random":
            b_bits[i] = draw(st.integers(lo, hi))
        elif kind == "nudge":
            b_bits[i] = min(hi, max(lo, a_bits[i] + draw(st.integers(-3, 3))))
        elif kind == "sign":
            width = torch.iinfo(INT_VIEW[dtype]).bits
            flipped = (a_bits[i] & ((1 << width) - 1)) ^ (1 << (width - 1))  # unsigned pattern, sign bit flipped
            b_bits[i] = flipped - (1 << width) if flipped > hi else flipped
    return from_bits(a_bits, dtype), from_bits(b_bits, dtype)


def ordered(bits: int, width: int) -> int:
    """The textbook monotone map of a float's bit pattern (as a signed int) to an ordered integer."""
    magnitude = bits & ((1 << (width - 1)) - 1)
    return -magnitude if bits < 0 else magnitude


def reference_ulp(a: torch.Tensor, b: torch.Tensor) -> list:
    width = torch.iinfo(INT_VIEW[a.dtype]).bits
    out = []
    for x, y, ia, ib in zip(a.float().tolist(), b.float().tolist(), a.view(INT_VIEW[a.dtype]).tolist(), b.view(INT_VIEW[b.dtype]).tolist()):
        if math.isnan(x) and math.isnan(y):
            out.append(0)
        elif math.isnan(x) or math.isnan(y):
            out.append(ULP_INFINITE)
        else:
            out.append(min(ULP_INFINITE, abs(ordered(ia, width) - ordered(ib, width))))
    return out


# --- bitwise ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pair=float_pairs())
def test_bitwise_equal_iff_int_views_equal(pair):
    a, b = pair
    d = compare_tensors("w", a, b)
    ia, ib = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    assert (d.status == "equal") == torch.equal(ia, ib)
    assert d.fraction_differing == pytest.approx((ia != ib).sum().item() / a.numel())
    assert d.numel == a.numel() and d.shape == list(a.shape) and d.dtype == str(a.dtype)


@settings(max_examples=80, deadline=None)
@given(pair=float_pairs(), atol=st.floats(0, 10), rtol=st.floats(0, 1), max_ulp=st.integers(0, 2**40))
def test_bitwise_equal_implies_equal_in_every_mode(pair, atol, rtol, max_ulp):
    a, b = pair
    if compare_tensors("w", a, b).status == "equal":
        for mode in MODES:
            assert compare_tensors("w", a, b, mode=mode, atol=atol, rtol=rtol, max_ulp=max_ulp).equal


@settings(max_examples=80, deadline=None)
@given(pair=float_pairs())
def test_zero_tolerance_modes_relax_bitwise_only_for_signed_zero_and_nan_payload(pair):
    """With atol=rtol=0 / max_ulp=0, the only pairs tolerance and ULP modes forgive are +-0 and NaN/NaN."""
    a, b = pair
    forgiven = (a == b) | (torch.isnan(a.float()) & torch.isnan(b.float()))
    expected = bool(forgiven.all())
    assert compare_tensors("w", a, b, mode="tolerance").equal == expected
    assert compare_tensors("w", a, b, mode="ulp").equal == expected


def test_signed_zero_and_nan_payload_per_mode():
    zero, negzero = torch.tensor([0.0]), torch.tensor([-0.0])
    nan1 = from_bits([0x7FC00000], torch.float32)
    nan2 = from_bits([0x7FC00001], torch.float32)
    assert compare_tensors("z", zero, negzero).status == "different"
    assert compare_tensors("n", nan1, nan2).status == "different"
    for mode in ("tolerance", "ulp"):
        assert compare_tensors("z", zero, negzero, mode=mode).equal
        assert compare_tensors("n", nan1, nan2, mode=mode).equal
        assert compare_tensors("n", nan1, torch.tensor([1.0]), mode=mode, atol=1e30, max_ulp=2**40).status == "different"
    # the bitwise difference is reported with zero magnitude: it is only in the bits
    d = compare_tensors("z", zero, negzero)
    assert d.max_abs_diff == 0.0 and d.max_ulp == 0 and d.fraction_differing == 1.0


# --- tolerance ------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(pair=float_pairs(), atol1=st.floats(0, 1e3), extra=st.floats(0, 1e3), rtol=st.floats(0, 1))
def test_tolerance_is_monotone_in_atol(pair, atol1, extra, rtol):
    a, b = pair
    loose = compare_tensors("w", a, b, mode="tolerance", atol=atol1 + extra, rtol=rtol)
    tight = compare_tensors("w", a, b, mode="tolerance", atol=atol1, rtol=rtol)
    assert loose.fraction_differing <= tight.fraction_differing
    if tight.equal:
        assert loose.equal


@settings(max_examples=80, deadline=None)
@given(
    a=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=64), min_size=1, max_size=10),
    noise=st.lists(st.floats(-1.0, 1.0, width=64), min_size=10, max_size=10),
    atol=st.floats(0, 1),
    rtol=st.floats(0, 0.1),
)
def test_tolerance_matches_the_formula_on_finite_values(a, noise, atol, rtol):
    ta = torch.tensor(a, dtype=torch.float64)
    tb = ta + torch.tensor(noise[: len(a)], dtype=torch.float64)
    expected = ((ta - tb).abs() <= atol + rtol * tb.abs())
    d = compare_tensors("w", ta, tb, mode="tolerance", atol=atol, rtol=rtol)
    assert d.equal == bool(expected.all())
    assert d.fraction_differing == pytest.approx(1 - expected.double().mean().item())
    assert d.max_abs_diff == pytest.approx((ta - tb).abs().max().item())


def test_tolerance_nan_and_inf_rules():
    inf, nan = math.inf, math.nan
    a = torch.tensor([inf, -inf, nan, 1.0, inf, nan, 2.0])
    b = torch.tensor([inf, -inf, nan, 1.0, -inf, 1.0, inf])
    d = compare_tensors("w", a, b, mode="tolerance", atol=1e30, rtol=1.0)
    # matches: same infinities and NaN/NaN; differences: inf vs -inf, NaN vs 1, finite vs inf (even with rtol*|inf|)
    assert d.status == "different"
    assert d.fraction_differing == pytest.approx(3 / 7)
    assert d.max_abs_diff == math.inf
    same = compare_tensors("w", a[:4], b[:4], mode="tolerance")
    assert same.equal


def test_tolerance_upcasts_half_precision():
    a = torch.tensor([60000.0], dtype=torch.float16)
    b = torch.tensor([-60000.0], dtype=torch.float16)  # a - b overflows in float16
    d = compare_tensors("w", a, b, mode="tolerance", atol=1.0)
    assert d.status == "different" and d.max_abs_diff == 120000.0


# --- ULP -----------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(pair=float_pairs())
def test_ulp_distance_matches_reference_and_is_symmetric(pair):
    a, b = pair
    got = ulp_distance(a, b)
    assert got.dtype == torch.int64
    assert got.tolist() == reference_ulp(a, b)
    assert torch.equal(got, ulp_distance(b, a))
    assert (ulp_distance(a, a) == 0).all()


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(FLOATS), bits=st.lists(st.integers(-(2**62), 2**62), min_size=3, max_size=3))
def test_ulp_distance_is_additive_along_the_number_line(dtype, bits):
    lo, hi = bit_range(dtype)
    x, y, z = sorted(from_bits([max(lo, min(hi, v)) for v in bits], dtype).double().tolist())
    assume(not any(map(math.isnan, (x, y, z))))
    t = lambda v: torch.tensor([v], dtype=torch.float64).to(dtype)  # exact: values came from dtype
    assert ulp_distance(t(x), t(z)) == ulp_distance(t(x), t(y)) + ulp_distance(t(y), t(z))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_ulp_distance_landmarks(dtype):
    one = torch.ones(1, dtype=dtype)
    up = one.view(INT_VIEW[dtype]).add(1).view(dtype)  # the next float above 1
    assert ulp_distance(one, up).item() == 1
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(torch.nextafter(one, torch.full_like(one, 2)), up)
    tiny = from_bits([1], dtype)  # smallest positive subnormal
    assert tiny.item() > 0
    assert ulp_distance(tiny, -tiny).item() == 2
    assert ulp_distance(torch.zeros(1, dtype=dtype), -torch.zeros(1, dtype=dtype)).item() == 0
    finfo = torch.finfo(dtype)
    big, inf = torch.tensor([finfo.max], dtype=dtype), torch.tensor([math.inf], dtype=dtype)
    assert ulp_distance(big, inf).item() == 1
    nan = torch.tensor([math.nan], dtype=dtype)
    assert ulp_distance(nan, nan).item() == 0
    assert ulp_distance(nan, one).item() == ULP_INFINITE


def test_ulp_distance_saturates_for_float64_extremes():
    a = torch.tensor([math.inf, -1e308], dtype=torch.float64)
    b = torch.tensor([-math.inf, 1e308], dtype=torch.float64)
    assert ulp_distance(a, b).tolist() == [ULP_INFINITE, ULP_INFINITE]


def test_ulp_mode_threshold():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = a.view(torch.int32).add(torch.tensor([0, 2, 5], dtype=torch.int32)).view(torch.float32)
    assert compare_tensors("w", a, b, mode="ulp", max_ulp=5).equal
    d = compare_tensors("w", a, b, mode="ulp", max_ulp=4)
    assert d.status == "different" and d.max_ulp == 5 and d.fraction_differing == pytest.approx(1 / 3)
    assert compare_tensors("w", a, b, mode="ulp", max_ulp=1).fraction_differing == pytest.approx(2 / 3)


def test_ulp_distance_rejects_non_floats_and_mismatches():
    with pytest.raises(TypeError, match="floating-point"):
        ulp_distance(torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(TypeError, match="one dtype"):
        ulp_distance(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="one shape"):
        ulp_distance(torch.ones(2), torch.ones(3))


# --- integers, bools, complex, layouts, sizes ------------------------------------------------------


def test_integer_and_bool_tensors():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 5])
    assert compare_tensors("i", a, b).status == "different"
    assert compare_tensors("i", a, b, mode="ulp", max_ulp=10).status == "different"  # ints compare exactly
    assert compare_tensors("i", a, b, mode="tolerance", atol=2).equal
    d = compare_tensors("i", a, b, mode="tolerance", atol=1)
    assert d.status == "different" and d.max_abs_diff == 2.0 and d.max_ulp is None
    assert compare_tensors("i", a, b, mode="tolerance", rtol=0.4).equal  # |3-5| <= 0.4*5
    eq = compare_tensors("i", a, a.clone())
    assert eq.equal and eq.max_ulp is None and eq.max_abs_diff == 0.0
    t, f = torch.tensor([True, False]), torch.tensor([True, True])
    db = compare_tensors("b", t, f)
    assert db.status == "different" and db.fraction_differing == 0.5 and db.max_abs_diff == 1.0
    big = torch.tensor([2**62 + 1], dtype=torch.int64)
    assert compare_tensors("i", big, big - 1).status == "different"  # differs below float64 resolution


def test_complex_tensors_compare_componentwise():
    a = torch.tensor([1 + 2j, 3 + 4j], dtype=torch.complex64)
    b = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    d = compare_tensors("c", a, b)
    assert d.status == "different" and d.fraction_differing == 0.5 and d.max_abs_diff == 8.0
    assert compare_tensors("c", a, a.conj().conj()).equal
    conj_values = torch.tensor([1 - 2j, 3 - 4j], dtype=torch.complex64)
    assert compare_tensors("c", a.conj(), conj_values).equal  # a conj view is compared by its values
    assert compare_tensors("c", a.conj(), a).status == "different"


def test_non_contiguous_and_chunked_tensors():
    x = torch.randn(64, 32)
    assert compare_tensors("t", x.t(), x.t().contiguous()).equal
    n = (1 << 21) * 2 + 7  # spans several comparison chunks
    a = torch.zeros(n)
    b = a.clone()
    b[[3, n // 2, n - 1]] = torch.tensor([1.0, -2.0, 0.5])
    d = compare_tensors("big", a, b)
    assert d.status == "different" and d.numel == n
    assert d.fraction_differing == pytest.approx(3 / n) and d.max_abs_diff == 2.0
    assert d.max_ulp == ulp_distance(torch.zeros(1), torch.tensor([-2.0])).item()


def test_empty_and_scalar_tensors():
    assert compare_tensors("e", torch.empty(0, 3), torch.empty(0, 3)).equal
    assert compare_tensors("s", torch.tensor(1.0), torch.tensor(1.0)).equal
    d = compare_tensors("s", torch.tensor(1.0), torch.tensor(2.0))
    assert d.status == "different" and d.shape == [] and d.max_abs_diff == 1.0


def test_tensors_requiring_grad():
    p = torch.nn.Parameter(torch.ones(3))
    assert compare_tensors("p", p, p.detach().clone()).equal
    assert compare_tensors("p", p, p.detach() + 1, mode="tolerance", atol=0.5).status == "different"


# --- structure: keys, shapes, dtypes, leaves -------------------------------------------------------


def test_states_report_mismatches_in_stable_order():
    a = {"w": torch.ones(2), "shape": torch.ones(2, 3), "dtype": torch.ones(2), "only_a": torch.ones(1),
         "step": 3, "name": "adam", "same": torch.arange(4)}
    b = {"only_b": torch.zeros(5), "same": torch.arange(4), "name": "sgd", "step": 3, "dtype": torch.ones(2, dtype=torch.float64),
         "shape": torch.ones(3, 2), "w": torch.ones(2) * 2}
    diffs = compare_states(a, b)
    assert [d.name for d in diffs] == ["w", "shape", "dtype", "only_a", "step", "name", "same", "only_b"]
    status = {d.name: d.status for d in diffs}
    assert status == {
        "w": "different", "shape": "shape_mismatch", "dtype": "dtype_mismatch", "only_a": "missing_in_other",
        "step": "equal", "name": "value_mismatch", "same": "equal", "only_b": "missing_in_reference",
    }
    by = {d.name: d for d in diffs}
    assert by["shape"].shape == [2, 3] and by["shape"].other_shape == [3, 2]
    assert by["dtype"].dtype == "torch.float32" and by["dtype"].other_dtype == "torch.float64"
    assert by["only_a"].shape == [1] and by["only_b"].other_shape == [5]
    assert by["w"].max_abs_diff == 1.0


def test_tensor_against_non_tensor_is_reported():
    d = compare_tensors("x", torch.ones(2), 3)
    assert d.status == "dtype_mismatch" and d.dtype == "torch.float32" and d.other_dtype == "int"
    assert compare_tensors("x", 1, 1.0).status == "value_mismatch"  # types differ
    assert compare_tensors("x", math.nan, math.nan).equal
    assert compare_tensors("x", None, None).equal


def test_numpy_leaves_compare_as_tensors():
    rng_a = np.random.RandomState(0).get_state()
    rng_b = np.random.RandomState(1).get_state()
    diffs = compare_states({"rng": rng_a}, {"rng": rng_b})
    by = {d.name: d for d in diffs}
    assert by["rng.0"].equal  # 'MT19937'
    assert by["rng.1"].status == "different" and by["rng.1"].numel == 624
    assert all(d.equal for d in compare_states({"rng": rng_a}, {"rng": np.random.RandomState(0).get_state()}))


def test_results_fit_the_report_schema():
    diffs = compare_states({"a": torch.tensor([math.nan]), "b": 1}, {"a": torch.tensor([1.0]), "c": 2}, mode="tolerance")
    result = AuditResult(target="t", seed=0, runs=2, device="cpu", isolation="process", seeding="harness",
                         comparison={"mode": "tolerance"}, deterministic=False, tensors=diffs)
    back = AuditResult.from_dict(result.to_dict())
    assert [t.name for t in back.tensors] == ["a", "b", "c"]
    assert isinstance(back.tensors[0], TensorDiff) and back.tensors[0].max_ulp == ULP_INFINITE
    assert "a torch.float32[1]" in result.explain()


# --- flatten_state -------------------------------------------------------------------------------


def test_flatten_module_optimizer_and_nested():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    flat = flatten_state(model)
    assert list(flat) == list(model.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    nested = flatten_state({"model": model, "optim": opt, "epoch": 2, "hist": [1.5, {"x": torch.ones(1)}]})
    assert "model.0.weight" in nested and "optim.state.0.momentum_buffer" in nested
    assert nested["optim.param_groups.0.lr"] == 0.1 and nested["epoch"] == 2
    assert nested["hist.0"] == 1.5 and torch.equal(nested["hist.1.x"], torch.ones(1))
    assert flatten_state({"a": 1}, prefix="root") == {"root.a": 1}


def test_flatten_keeps_empty_containers_and_rejects_collisions_and_cycles():
    assert flatten_state({"a": [], "b": {}}) == {"a": [], "b": {}}
    diffs = {d.name: d.status for d in compare_states({"a": []}, {"a": [1]})}
    assert diffs == {"a": "missing_in_other", "a.0": "missing_in_reference"}
    with pytest.raises(ValueError, match="same key 'a.b'"):
        flatten_state({"a.b": 1, "a": {"b": 2}})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="contains itself"):
        flatten_state(loop)


def test_module_states_compare_directly():
    torch.manual_seed(0)
    m1 = torch.nn.Linear(4, 4)
    torch.manual_seed(0)
    m2 = torch.nn.Linear(4, 4)
    assert all(d.equal for d in compare_states(m1, m2))
    with torch.no_grad():
        m2.bias[0] = -m2.bias[0] if m2.bias[0] != 0 else 1.0
    assert [d.name for d in compare_states(m1, m2) if not d.equal] == ["bias"]


# --- bad arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "exact"}, "unknown comparison mode 'exact'"),
        ({"atol": -1e-3}, "atol must be a non-negative number"),
        ({"rtol": math.nan}, "rtol must be a non-negative number"),
        ({"atol": "0.1"}, "atol must be a non-negative number"),
        ({"max_ulp": -1}, "max_ulp must be a non-negative integer"),
        ({"max_ulp": 1.5}, "max_ulp must be a non-negative integer"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_tensors("w", torch.ones(1), torch.ones(1), **kwargs)
    with pytest.raises(ValueError, match=message):
        compare_states({}, {}, **kwargs)
