"""The conformance and comparator checks pass the reference callbacks and catch broken ones."""
import math
import pytest

from pytest_mlrepro.checkpoint.conformance import (
    ReferenceEarlyStoppingDriver,
    UnsupportedSpec,
    check_comparator,
    check_conformance,
    probe_direction,
)
from pytest_mlrepro.checkpoint.oracle import Outcome, StopSpec, simulate
from pytest_mlrepro.strategies import stop_specs


class TiesImproveDriver:
    """A callback comparing with <= (a tie resets patience): a classic off-by-epsilon bug."""

    name = "toy.TiesImprove"

    def __init__(self, spec):
        self.spec = spec

    def run(self, values):
        best, best_epoch, wait, saved = None, None, 0, []
        for e, v in enumerate(values):
            if math.isnan(v):
                return Outcome(e + 1, e, best_epoch, best, tuple(saved))
            better = best is None or (v + self.spec.min_delta <= best if self.spec.mode == "min" else v - self.spec.min_delta >= best)
            if better:
                best, best_epoch, wait = v, e, 0
                saved.append(e)
            else:
                wait += 1
                if wait >= max(self.spec.patience, 1):
                    return Outcome(e + 1, e, best_epoch, best, tuple(saved))
        return Outcome(len(values), None, best_epoch, best, tuple(saved))


class CrashesOnNaN(ReferenceEarlyStoppingDriver):
    def run(self, values):
        if any(math.isnan(v) for v in values):
            raise FloatingPointError("nan in monitored metric")
        return super().run(values)


PLAIN = stop_specs(baseline=False, start_from_epoch=False)


def test_reference_callback_conforms():
    f = check_conformance(ReferenceEarlyStoppingDriver, monitor="val_loss", max_examples=100)
    assert f.check == "early_stopping.conformance" and f.verdict == "pass", f.message
    assert f.details["callback"] == "pytest_mlrepro.EarlyStopping" and f.details["counterexample"] is None


def test_ties_bug_is_found_and_shrunk():
    f = check_conformance(TiesImproveDriver, monitor="val_loss", specs=PLAIN, allow_nan=False, allow_inf=False)
    assert f.verdict == "fail", f.message
    d = f.details
    assert set(d) >= {"callback", "spec", "counterexample", "expected", "observed"}
    values, spec = d["counterexample"], StopSpec(**d["spec"])
    # the counterexample reproduces the disagreement and is minimal: two equal values
    assert TiesImproveDriver(spec).run(values) != simulate(values, spec)
    assert len(values) == 2 and values[0] == values[1]
    assert d["expected"] == simulate(values, spec).to_dict()


def test_driver_crash_is_an_error_with_the_input():
    f = check_conformance(CrashesOnNaN, monitor="val_loss", max_examples=100)
    assert f.verdict == "error" and "FloatingPointError" in f.message
    assert any(math.isnan(v) for v in f.details["counterexample"])


def test_unsupported_specs_are_skipped_not_failed():
    def factory(spec):
        if spec.baseline is not None:
            raise UnsupportedSpec("no baseline here")
        return ReferenceEarlyStoppingDriver(spec)

    assert check_conformance(factory, monitor="val_loss", max_examples=30).verdict == "pass"

    def nothing(spec):
        raise UnsupportedSpec("nothing")

    f = check_conformance(nothing, monitor="val_loss", max_examples=2)
    assert f.verdict == "error" and "rejected (UnsupportedSpec) every generated spec" in f.message


def test_only_requested_fields_are_compared():
    class NoSaves(ReferenceEarlyStoppingDriver):
        def run(self, values):
            o = super().run(values)
            return Outcome(o.epochs_run, o.stop_epoch, o.best_epoch, o.best_value, ())

    assert check_conformance(NoSaves, monitor="val_loss", max_examples=30).verdict == "fail"
    assert check_conformance(NoSaves, monitor="val_loss", max_examples=30,
                             fields=("epochs_run", "stop_epoch", "best_epoch")).verdict == "pass"


def _fastai_like(monitor, patience=2):
    """fastai's rule: 'loss'/'error' in the name -> min, anything else -> max (fastai#2469)."""
    mode = "min" if ("loss" in monitor or "error" in monitor) else "max"
    return lambda: ReferenceEarlyStoppingDriver(StopSpec(mode, patience), monitor)


def test_probe_direction():
    assert probe_direction(lambda: ReferenceEarlyStoppingDriver(StopSpec("min", 2))) == "min"
    assert probe_direction(lambda: ReferenceEarlyStoppingDriver(StopSpec("max", 10, min_delta=3.0, baseline=5.0,
                                                                         start_from_epoch=2))) == "max"


def test_comparator_finds_substring_inference_bug():
    f = check_comparator(_fastai_like("mae"), monitor="mae", callback="toy.fastai_rule")
    assert f.check == "comparator.direction" and f.verdict == "fail"
    assert f.details == {"callback": "toy.fastai_rule", "monitor": "mae", "expected_mode": "min", "observed_mode": "max"}
    assert check_comparator(_fastai_like("val_loss"), monitor="val_loss").verdict == "pass"


def test_comparator_uses_declared_mode_over_table():
    always_min = lambda: ReferenceEarlyStoppingDriver(StopSpec("min", 1), "val_acc")  # Lightning's default
    assert check_comparator(always_min, monitor="val_acc").verdict == "fail"
    assert check_comparator(always_min, monitor="val_acc", declared_mode="min").verdict == "pass"
    unknown = check_comparator(always_min, monitor="my_score")
    assert unknown.verdict == "error" and "mode='min' or mode='max'" in unknown.message


class _CheckpointOnlyDriver:
    """Our BestCheckpoint with no early stopping: it never stops, so only its best epoch tells the direction."""

    def __init__(self, mode, dirpath, n):
        import torch

        from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint

        self.name, self.spec = "checkpoint-only", StopSpec(mode, 0)
        self._model = torch.nn.Linear(1, 1)
        self._ckpt = BestCheckpoint("score", mode=mode, dirpath=dirpath, filename=f"best-{n}.pt", write_history=False,
                                    fsync=False)

    def run(self, values) -> Outcome:
        for epoch, v in enumerate(values):
            self._ckpt.on_epoch_end(epoch, {"score": v}, self._model)
        return Outcome(len(values), None, self._ckpt.best_epoch, None, ())


@pytest.mark.parametrize("mode", ["min", "max"])
def test_probe_direction_of_a_callback_that_never_stops(mode, tmp_path):
    counter = iter(range(100))
    assert probe_direction(lambda: _CheckpointOnlyDriver(mode, tmp_path, next(counter))) == mode
