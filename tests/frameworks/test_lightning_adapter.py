"""Lightning's real EarlyStopping / ModelCheckpoint, driven through a real Trainer."""
import math

import pytest

pytest.importorskip("pytorch_lightning")

from pytest_mlrepro.checkpoint.adapters.lightning import (  # noqa: E402
    LightningDriver, checkpoint_factory, early_stopping_factory, supported_specs)
from pytest_mlrepro.checkpoint.conformance import check_comparator, check_conformance  # noqa: E402
from pytest_mlrepro.checkpoint.oracle import simulate  # noqa: E402

pytestmark = pytest.mark.frameworks


def test_claimed_spec_reads_lightning_defaults():
    spec = LightningDriver("val_acc", early_stopping={}).spec
    assert (spec.mode, spec.patience, spec.min_delta, spec.nan_policy) == ("min", 3, 0.0, "stop_nonfinite")


def test_val_acc_without_mode_is_minimised():
    f = check_comparator(lambda: LightningDriver("val_acc", early_stopping={}), monitor="val_acc")
    assert f.verdict == "fail", f
    assert (f.details["observed_mode"], f.details["expected_mode"]) == ("min", "max")


def test_val_acc_with_mode_max_passes():
    f = check_comparator(lambda: LightningDriver("val_acc", early_stopping={"mode": "max"}), monitor="val_acc")
    assert f.verdict == "pass", f


def test_early_stopping_conforms():
    f = check_conformance(early_stopping_factory("val_loss"), monitor="val_loss", specs=supported_specs(),
                          max_examples=12)
    assert f.verdict == "pass", f.message


def test_model_checkpoint_saves_a_first_nan_as_best():
    """ModelCheckpoint keeps fewer than save_top_k unconditionally: a NaN first score is saved (as inf)."""
    f = check_conformance(checkpoint_factory("val_loss"), monitor="val_loss",
                          specs=supported_specs(checkpoint=True), max_examples=12)
    assert f.verdict == "fail", f
    assert f.details["counterexample"] == [math.nan] or math.isnan(f.details["counterexample"][0])
    assert f.details["observed"]["saved_epochs"] == [0] and f.details["expected"]["saved_epochs"] == []


def test_best_checkpoint_holds_the_oracle_best_epoch(tmp_path):
    values = [1.0, 0.5, 0.75, 0.25, 0.5, 0.5, 0.5]
    d = LightningDriver("val_loss", early_stopping={"patience": 2}, checkpoint={}, dirpath=tmp_path)
    got, want = d.run(values), simulate(values, d.spec)
    assert got == want
    assert d.last_run["best_weights_epoch"] == want.best_epoch == 3
    assert d.last_run["files"] == ["epoch=3.ckpt"]
