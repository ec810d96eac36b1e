"""The reference callbacks agree with the oracle and record what they promise."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint, EarlyStopping, MetricMissingError
from pytest_mlrepro.checkpoint.conformance import ReferenceBestCheckpointDriver, ReferenceEarlyStoppingDriver
from pytest_mlrepro.checkpoint.oracle import simulate
from pytest_mlrepro.checkpoint.storage import load_checkpoint, weights_sha256
from pytest_mlrepro.strategies import specs_and_sequences


@settings(max_examples=200, deadline=None)
@given(specs_and_sequences())
def test_early_stopping_equals_oracle(spec_values):
    spec, values = spec_values
    assert ReferenceEarlyStoppingDriver(spec).run(values) == simulate(values, spec)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec_values=specs_and_sequences(max_size=8))
def test_best_checkpoint_with_early_stopping_equals_oracle(tmp_path, spec_values):
    spec, values = spec_values
    driver = ReferenceBestCheckpointDriver(spec, tmp_path)
    out = driver.run(values)
    assert out == simulate(values, spec)
    if out.best_epoch is not None:  # the file on disk holds the best epoch's weights
        state, meta = load_checkpoint(driver._ckpt.path)
        assert meta["epoch"] == out.best_epoch and float(state["weight"].flatten()[0]) == float(out.best_epoch)
    else:
        assert not driver._ckpt.path.exists()


def _model(value):
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(-value)
    return m


def test_best_checkpoint_records_all_metrics_of_the_saved_epoch(tmp_path):
    ckpt = BestCheckpoint("val_acc", dirpath=tmp_path, seed=123, fsync=False)
    assert ckpt.mode == "max"
    rows = [{"val_acc": 0.5, "val_loss": 2.0, "train_loss": torch.tensor(3.0)},
            {"val_acc": 0.75, "val_loss": 1.5, "train_loss": 2.5},
            {"val_acc": 0.75, "val_loss": 1.0, "train_loss": 2.0},  # tie: no save
            {"val_acc": 0.625, "val_loss": 0.5, "train_loss": 1.0}]
    saved = [ckpt.on_epoch_end(e, m, _model(float(e)), step=10 * (e + 1)) for e, m in enumerate(rows)]
    assert saved == [True, True, False, False] and ckpt.saved_epochs == [0, 1]
    state, meta = load_checkpoint(ckpt.path)
    assert meta["epoch"] == 1 and meta["step"] == 20 and meta["seed"] == 123
    assert meta["metrics"] == {"val_acc": 0.75, "val_loss": 1.5, "train_loss": 2.5}
    assert meta["monitor"] == "val_acc" and meta["mode"] == "max"
    assert meta["weights_sha256"] == weights_sha256(_model(1.0).state_dict()) == weights_sha256(state)
    assert meta["environment"]["torch"] == torch.__version__
    assert [h["epoch"] for h in ckpt.history] == [0, 1, 2, 3]
    assert ckpt.history_path.exists() and ckpt.n_saves == 2 and ckpt.bytes_written > 0


def test_nan_never_becomes_best(tmp_path):
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    assert not ckpt.on_epoch_end(0, {"val_loss": float("nan")}, _model(0.0))
    assert not ckpt.path.exists() and ckpt.best_epoch is None
    assert ckpt.on_epoch_end(1, {"val_loss": 1.0}, _model(1.0))
    assert not ckpt.on_epoch_end(2, {"val_loss": torch.tensor(float("nan"))}, _model(2.0))
    assert load_checkpoint(ckpt.path)[1]["epoch"] == 1 and not math.isnan(ckpt.best_value)


@pytest.mark.parametrize("cls,args", [(EarlyStopping, ()), (BestCheckpoint, (torch.nn.Linear(1, 1),))])
def test_missing_monitored_metric_names_metric_and_epoch(cls, args, tmp_path):
    cb = cls("val_loss") if cls is EarlyStopping else cls("val_loss", dirpath=tmp_path)
    with pytest.raises(MetricMissingError, match=r"'val_loss' is missing from the metrics of epoch 7 \(logged: train_loss, val_los\)"):
        cb.on_epoch_end(7, {"train_loss": 1.0, "val_los": 2.0}, *args)


@pytest.mark.parametrize("cls", [EarlyStopping, BestCheckpoint])
def test_unknown_monitor_without_mode_raises(cls):
    with pytest.raises(ValueError, match="Pass mode='min' or mode='max'"):
        cls("my_score")


@pytest.mark.parametrize("cls", [EarlyStopping, BestCheckpoint])
def test_negative_min_delta_rejected(cls):
    with pytest.raises(ValueError, match="min_delta"):
        cls("val_loss", min_delta=-0.01)


def test_early_stopping_attributes_on_the_worked_example():
    es = EarlyStopping("val_loss", patience=3)
    stops = [es.on_epoch_end(e, {"val_loss": v}) for e, v in enumerate([5, 4, 3, 3.5, 3.2, 3.1])]
    assert stops == [False] * 5 + [True]
    assert es.stopped_epoch == 5 and es.best_epoch == 2 and es.best_value == 3.0
