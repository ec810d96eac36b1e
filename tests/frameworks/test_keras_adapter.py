"""Keras 3 (torch backend): real EarlyStopping / ModelCheckpoint in a real model.fit."""
import math

import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
    pytest.skip("the Keras adapter runs on the torch backend", allow_module_level=True)

from pytest_mlrepro.checkpoint.adapters.keras import (  # noqa: E402
    KerasDriver, checkpoint_factory, early_stopping_factory, supported_specs)
from pytest_mlrepro.checkpoint.conformance import check_comparator, check_conformance  # noqa: E402
from pytest_mlrepro.checkpoint.oracle import StopSpec, simulate  # noqa: E402

pytestmark = pytest.mark.frameworks


def test_val_auc_auto_fails_closed_without_a_compiled_metric():
    """Keras 3 does not guess: mode='auto' on a name it cannot find among compiled metrics raises."""
    f = check_comparator(lambda: KerasDriver("val_auc", early_stopping={"mode": "auto"}), monitor="val_auc")
    assert f.verdict == "error", f
    assert "isn't able to automatically determine" in f.message


def test_val_auc_auto_infers_max_from_compiled_auc():
    f = check_comparator(lambda: KerasDriver("val_auc", early_stopping={"mode": "auto"},
                                             compiled_metrics=lambda: [keras.metrics.AUC(name="auc")]),
                         monitor="val_auc")
    assert f.verdict == "pass" and f.details["observed_mode"] == "max", f


def test_auto_mode_misses_a_renamed_metric():
    """A second AUC() in the process is named 'auc_1', so 'val_auc' is not found: fail closed again."""
    keras.metrics.AUC()  # make sure the next default name is taken
    with pytest.raises(ValueError, match="automatically determine"):
        KerasDriver("val_auc", early_stopping={}, compiled_metrics=lambda: [keras.metrics.AUC()]).spec


def test_early_stopping_baseline_differs_from_the_reference():
    """The first value always becomes best, baseline or not, and it never stops at epoch 0."""
    f = check_conformance(early_stopping_factory("val_loss"), monitor="val_loss", specs=supported_specs(),
                          max_examples=12)
    assert f.verdict == "fail", f
    assert f.details["spec"]["baseline"] is not None


def test_early_stopping_conforms_without_baseline_and_nan():
    from pytest_mlrepro.strategies import stop_specs

    f = check_conformance(early_stopping_factory("val_loss"), monitor="val_loss",
                          specs=stop_specs(nan_policies=("ignore",), baseline=False), allow_nan=False,
                          allow_inf=False, max_examples=12)
    assert f.verdict == "pass", f.message


def test_model_checkpoint_keeps_a_first_nan_as_best_forever(tmp_path):
    values = [math.nan, 1.0, 0.5]
    d = checkpoint_factory("val_loss", dirpath=tmp_path)(StopSpec(mode="min", patience=5, nan_policy="ignore"))
    got, want = d.run(values), simulate(values, d.spec)
    assert want.best_epoch == 2 and want.saved_epochs == (1, 2)
    assert got.saved_epochs == (0,) and d.last_run["best_weights_epoch"] == 0
    assert math.isnan(got.best_value)


def test_best_checkpoint_holds_the_oracle_best_epoch():
    values = [1.0, 0.5, 0.75, 0.25, 0.5, 0.5, 0.5]
    d = checkpoint_factory("val_loss")(StopSpec(mode="min", patience=2, nan_policy="ignore"))
    got, want = d.run(values), simulate(values, d.spec)
    assert got == want, (got, want)
    assert d.last_run["best_weights_epoch"] == 3
