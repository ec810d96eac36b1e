"""Properties of the reference semantics (oracle.simulate)."""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_mlrepro.checkpoint.oracle import Outcome, StopSpec, is_improvement, simulate
from pytest_mlrepro.strategies import metric_sequences, specs_and_sequences, stop_specs

settings.register_profile("mlrepro-checkpoint", max_examples=150, deadline=None)
PROFILE = settings.get_profile("mlrepro-checkpoint")


def test_worked_example_from_the_docs():
    # patience 3, best at epoch 2 -> stops after epoch 5, 6 epochs run
    out = simulate([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0], StopSpec("min", patience=3))
    assert out == Outcome(epochs_run=6, stop_epoch=5, best_epoch=2, best_value=3.0, saved_epochs=(0, 1, 2))


def test_ties_and_the_min_delta_boundary_never_improve():
    assert not is_improvement(1.0, 1.0, "min")
    assert not is_improvement(1.0, 1.0, "max")
    assert not is_improvement(0.5, 1.0, "min", 0.5)  # exactly min_delta better: not an improvement
    assert is_improvement(0.25, 1.0, "min", 0.5)
    assert not is_improvement(1.5, 1.0, "max", 0.5)
    assert is_improvement(1.75, 1.0, "max", 0.5)


def test_infinities_and_nan():
    assert is_improvement(-math.inf, 0.0, "min") and not is_improvement(math.inf, None, "min")
    assert is_improvement(math.inf, 0.0, "max") and not is_improvement(-math.inf, None, "max")
    assert not is_improvement(math.nan, None, "min") and not is_improvement(math.nan, 1.0, "max")
    assert simulate([1.0, math.nan, 0.0], StopSpec("min", patience=5)) == Outcome(2, 1, 0, 1.0, (0,))
    assert simulate([1.0, math.nan, 0.0], StopSpec("min", patience=5, nan_policy="ignore")) == Outcome(3, None, 2, 0.0, (0, 2))
    assert simulate([math.nan, math.nan], StopSpec("min", patience=1, nan_policy="ignore")) == Outcome(1, 0, None, None, ())
    assert simulate([1.0, math.inf], StopSpec("min", patience=5, nan_policy="stop_nonfinite")).stop_epoch == 1


def test_baseline_must_be_beaten_and_start_from_epoch_ignores_early_epochs():
    assert simulate([2.0, 1.0, 1.0], StopSpec("min", patience=2, baseline=1.0)) == Outcome(2, 1, None, None, ())
    assert simulate([0.0, 5.0, 4.0, 4.0], StopSpec("min", patience=1, start_from_epoch=1)) == Outcome(4, 3, 2, 4.0, (1, 2))


@pytest.mark.parametrize("kwargs", [dict(min_delta=-0.1), dict(mode="minimum"), dict(patience=-1), dict(nan_policy="skip"),
                                    dict(start_from_epoch=-1), dict(min_delta=math.nan), dict(baseline=math.nan)])
def test_invalid_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        StopSpec(**{"mode": "min", **kwargs})


@PROFILE
@given(specs_and_sequences())
def test_mode_duality(spec_values):
    spec, values = spec_values
    dual = StopSpec("max" if spec.mode == "min" else "min", spec.patience, spec.min_delta,
                    None if spec.baseline is None else -spec.baseline, spec.start_from_epoch, spec.nan_policy)
    a, b = simulate(values, spec), simulate([-v for v in values], dual)
    assert (a.epochs_run, a.stop_epoch, a.best_epoch, a.saved_epochs) == (b.epochs_run, b.stop_epoch, b.best_epoch, b.saved_epochs)
    assert (a.best_value is None and b.best_value is None) or a.best_value == -b.best_value


@PROFILE
@given(specs_and_sequences(), st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]), st.integers(-8, 8))
def test_affine_invariance(spec_values, a, b):
    spec, values = spec_values
    moved = StopSpec(spec.mode, spec.patience, spec.min_delta * a, None if spec.baseline is None else a * spec.baseline + b,
                     spec.start_from_epoch, spec.nan_policy)
    x, y = simulate(values, spec), simulate([a * v + b for v in values], moved)
    assert (x.epochs_run, x.stop_epoch, x.best_epoch, x.saved_epochs) == (y.epochs_run, y.stop_epoch, y.best_epoch, y.saved_epochs)


@PROFILE
@given(st.sampled_from(["min", "max"]), metric_sequences(min_size=1, allow_inf=True))
def test_argbest_with_zero_min_delta(mode, values):
    spec = StopSpec(mode, patience=len(values) + 1, nan_policy="ignore")
    out = simulate(values, spec)
    worst = math.inf if mode == "min" else -math.inf
    candidates = [(v, i) for i, v in enumerate(values) if not math.isnan(v) and v != worst]
    if not candidates:
        assert out.best_epoch is None
        return
    best = min(v for v, _ in candidates) if mode == "min" else max(v for v, _ in candidates)
    assert out.best_epoch == next(i for v, i in candidates if v == best)  # first occurrence: ties never improve
    assert out.stop_epoch is None


@PROFILE
@given(st.sampled_from(["min", "max"]), st.integers(0, 6), st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 8),
       st.sampled_from([0.0, 0.5, 3.0]))
def test_constant_sequence_stops_at_exactly_max_patience_1(mode, patience, c, extra, min_delta):
    limit = max(patience, 1)
    out = simulate([c] * (limit + 1 + extra), StopSpec(mode, patience, min_delta))
    assert out.stop_epoch == limit and out.epochs_run == limit + 1 and out.best_epoch == 0 and out.saved_epochs == (0,)


@PROFILE
@given(st.sampled_from(["min", "max"]), st.integers(0, 4), st.sampled_from([0.0, 0.25, 1.0]),
       st.lists(st.integers(1, 8), min_size=1, max_size=15), st.integers(-50, 50))
def test_strictly_improving_never_stops(mode, patience, min_delta, steps, start):
    sign = -1 if mode == "min" else 1
    values, v = [], float(start)
    for s in steps:
        v += sign * (min_delta + s / 4.0)  # each step beats the last by more than min_delta
        values.append(v)
    out = simulate(values, StopSpec(mode, patience, min_delta))
    assert out.stop_epoch is None and out.best_epoch == len(values) - 1
    assert out.saved_epochs == tuple(range(len(values)))


@PROFILE
@given(specs_and_sequences())
def test_stop_lies_within_patience_of_best(spec_values):
    spec, values = spec_values
    out = simulate(values, spec)
    limit = max(spec.patience, 1)
    assert out.epochs_run == (out.stop_epoch + 1 if out.stop_epoch is not None else len(values))
    if out.stop_epoch is not None:
        if out.best_epoch is not None:
            assert out.best_epoch <= out.stop_epoch <= out.best_epoch + limit
        else:
            assert spec.start_from_epoch <= out.stop_epoch <= spec.start_from_epoch + limit - 1
    # the saves are exactly the improvements, in order, each beating the last by more than min_delta
    assert list(out.saved_epochs) == sorted(set(out.saved_epochs))
    if out.saved_epochs:
        assert out.saved_epochs[-1] == out.best_epoch and out.best_value == values[out.best_epoch]
        assert all(e >= spec.start_from_epoch for e in out.saved_epochs)
        for prev, cur in zip(out.saved_epochs, out.saved_epochs[1:]):
            assert is_improvement(values[cur], values[prev], spec.mode, spec.min_delta)
        assert not math.isnan(out.best_value)


@PROFILE
@given(specs_and_sequences(stop_specs(baseline=False, start_from_epoch=False)))
def test_prefix_consistency(spec_values):
    """Feeding more epochs never changes what happened before the stop."""
    spec, values = spec_values
    out = simulate(values, spec)
    assume(out.stop_epoch is not None)
    assert simulate(values[: out.stop_epoch + 1], spec) == out
