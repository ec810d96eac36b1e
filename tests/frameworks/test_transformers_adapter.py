"""Hugging Face Trainer: real best-model tracking, EarlyStoppingCallback and load_best_model_at_end."""
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from pytest_mlrepro.checkpoint.adapters.transformers import (  # noqa: E402
    TransformersDriver, early_stopping_factory)
from pytest_mlrepro.checkpoint.conformance import check_comparator, check_conformance  # noqa: E402
from pytest_mlrepro.checkpoint.oracle import StopSpec, simulate  # noqa: E402
from pytest_mlrepro.strategies import stop_specs  # noqa: E402

pytestmark = pytest.mark.frameworks


def test_eval_wer_with_greater_is_better_unset_is_maximised():
    f = check_comparator(lambda: TransformersDriver("eval_wer", early_stopping={}), monitor="eval_wer")
    assert f.verdict == "fail", f
    assert (f.details["observed_mode"], f.details["expected_mode"]) == ("max", "min")


def test_eval_wer_with_greater_is_better_false_passes():
    f = check_comparator(lambda: TransformersDriver("eval_wer", greater_is_better=False, early_stopping={}),
                         monitor="eval_wer")
    assert f.verdict == "pass", f


def test_early_stopping_conforms_without_threshold_and_non_finite_values():
    specs = stop_specs(baseline=False, start_from_epoch=False, nan_policies=("ignore",), min_deltas=(0.0,),
                       max_patience=2).filter(lambda s: s.patience >= 1)
    f = check_conformance(early_stopping_factory("eval_loss"), monitor="eval_loss", specs=specs,
                          allow_nan=False, allow_inf=False, max_examples=6, max_size=6)
    assert f.verdict == "pass", f.message


def test_threshold_is_ignored_by_the_trainers_best():
    """The callback calls 0.0 -> 0.25 (max, threshold 0.25) no improvement, but the Trainer saves it as best."""
    spec = StopSpec(mode="max", patience=1, min_delta=0.25, nan_policy="ignore")
    d = early_stopping_factory("eval_score")(spec)
    got, want = d.run([0.0, 0.25]), simulate([0.0, 0.25], spec)
    assert want.best_epoch == 0 and want.saved_epochs == (0,) and want.stop_epoch == 1
    assert got.stop_epoch == 1  # the callback agrees: no improvement
    assert got.best_epoch == 1 and got.saved_epochs == (0, 1)  # ... but the Trainer's best moved


def test_a_first_nan_never_counts_toward_patience():
    spec = StopSpec(mode="min", patience=1, nan_policy="ignore")
    d = early_stopping_factory("eval_loss")(spec)
    got, want = d.run([math.nan, 1.0]), simulate([math.nan, 1.0], spec)
    assert want.stop_epoch == 0
    assert got.stop_epoch is None and got.best_epoch == 1


def test_load_best_model_at_end_restores_the_oracle_best_epoch():
    values = [1.0, 0.5, 0.75, 0.25, 0.5, 0.5, 0.5]
    d = TransformersDriver("eval_wer", greater_is_better=False, early_stopping={"early_stopping_patience": 2})
    got, want = d.run(values), simulate(values, d.spec)
    assert got == want, (got, want)
    assert d.last_run["best_weights_epoch"] == 3 and d.last_run["files"] == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
