"""The reload contract on the good and the deliberately broken training fixture, and on bad input."""
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pytest_mlrepro.checkpoint.reload import check_reload
from pytest_mlrepro.checkpoint.storage import load_checkpoint, save_checkpoint

FIXTURE_FILE = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoint_training.py"
EVALUATE = f"{FIXTURE_FILE}:evaluate"  # "path.py:fn" references, resolved again in the fresh process
MODEL_FACTORY = f"{FIXTURE_FILE}:make_model"


def by_check(findings):
    out = {f.check: f for f in findings}
    assert len(out) == len(findings)
    return out


def test_good_checkpoint_passes_in_a_fresh_process(good_run):
    assert good_run["best_epoch"] not in (None, good_run["history"][-1]["epoch"])  # best is not the last epoch
    f = by_check(check_reload(good_run["checkpoint"], evaluate=EVALUATE, model_factory=MODEL_FACTORY))
    hist, rel = f["best_checkpoint.history"], f["best_checkpoint.reload"]
    assert hist.verdict == "pass", hist.message
    assert rel.verdict == "pass", rel.message
    assert rel.details["fresh_process"] and rel.details["tolerance"] == 0.0
    assert rel.details["best_epoch"] == hist.details["argbest_epoch"] == good_run["best_epoch"]
    assert set(rel.details) >= {"checkpoint_path", "monitor", "mode", "best_epoch", "recorded_metrics",
                                "reevaluated_metrics", "tolerance"}
    assert rel.details["reevaluated_metrics"]["val_loss"] == rel.details["recorded_metrics"]["val_loss"]


def test_broken_checkpoint_with_last_epoch_metrics_fails_in_a_fresh_process(broken_run):
    f = by_check(check_reload(broken_run["checkpoint"], evaluate=EVALUATE, model_factory=MODEL_FACTORY))
    last = broken_run["history"][-1]["epoch"]
    hist, rel = f["best_checkpoint.history"], f["best_checkpoint.reload"]
    assert hist.verdict == "fail" and f"those of epoch {last} (the last epoch)" in hist.message
    assert hist.details["co_metrics_epoch"] == last
    assert rel.verdict == "fail" and "val_loss: recorded" in rel.message and f"epoch {broken_run['best_epoch']}" in rel.message


def test_in_process_callables(good_run, training):
    f = by_check(check_reload(good_run["checkpoint"], evaluate=training.evaluate, model_factory=training.make_model,
                              fresh_process=False))
    assert f["best_checkpoint.reload"].verdict == "pass" and not f["best_checkpoint.reload"].details["fresh_process"]


def test_fresh_process_refuses_a_lambda_clearly(good_run, training):
    f = by_check(check_reload(good_run["checkpoint"], evaluate=lambda m: {}, model_factory=training.make_model))
    rel = f["best_checkpoint.reload"]
    assert rel.verdict == "error" and "fresh_process=True needs evaluate" in rel.message


def test_tolerance_when_not_deterministic(good_run, training):
    def off_by_a_bit(model):
        m = training.evaluate(model)
        return {k: v + 1e-4 for k, v in m.items()}

    strict = by_check(check_reload(good_run["checkpoint"], evaluate=off_by_a_bit, model_factory=training.make_model,
                                   fresh_process=False))["best_checkpoint.reload"]
    assert strict.verdict == "fail" and "exact comparison" in strict.message
    loose = by_check(check_reload(good_run["checkpoint"], evaluate=off_by_a_bit, model_factory=training.make_model,
                                  fresh_process=False, deterministic=False, tolerance=1e-3))["best_checkpoint.reload"]
    assert loose.verdict == "pass" and loose.details["tolerance"] == 1e-3


def _copy(run, tmp_path, name="best.pt"):
    dst = tmp_path / name
    shutil.copy(run["checkpoint"], dst)
    shutil.copy(run["history_path"], tmp_path / f"{name}.history.json")
    return dst


def _reload(path, training, **kw):
    return by_check(check_reload(path, evaluate=training.evaluate, model_factory=training.make_model,
                                 fresh_process=False, **kw))


def test_absent_checkpoint(tmp_path, training):
    f = _reload(tmp_path / "missing.pt", training)["best_checkpoint.reload"]
    assert f.verdict == "error" and "missing.pt" in f.message and "does not exist" in f.message


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_checkpoint(good_run, tmp_path, training, damage):
    path = _copy(good_run, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else bytes(reversed(data)))
    f = _reload(path, training)["best_checkpoint.reload"]
    assert f.verdict == "fail" and str(path) in f.message and "truncated or corrupt" in f.message


def test_metadata_missing(tmp_path, training):
    path = tmp_path / "plain.pt"
    torch.save(training.make_model().state_dict(), path)
    f = _reload(path, training)["best_checkpoint.reload"]
    assert f.verdict == "fail" and "metadata missing" in f.message and "plain.pt" in f.message


def test_metadata_from_another_epoch(good_run, tmp_path, training):
    """Best weights, but the metadata (epoch + metrics) of the last epoch."""
    path = _copy(good_run, tmp_path)
    state, meta = load_checkpoint(path)
    last = good_run["history"][-1]
    meta["epoch"] = last["epoch"]
    meta["metrics"] = {k: v for k, v in last.items() if k not in ("epoch", "step")}
    save_checkpoint(path, state, meta)
    f = _reload(path, training)
    assert f["best_checkpoint.history"].verdict == "fail"
    assert f"says best epoch {last['epoch']}" in f["best_checkpoint.history"].message
    assert f"makes epoch {good_run['best_epoch']}" in f["best_checkpoint.history"].message
    assert f["best_checkpoint.reload"].verdict == "fail"


def test_weights_not_those_hashed_at_the_best_epoch(good_run, tmp_path, training):
    path = _copy(good_run, tmp_path)
    state, meta = load_checkpoint(path)
    state = {k: v.clone() for k, v in state.items()}
    next(iter(state.values())).view(-1)[0] += 1.0
    save_checkpoint(path, state, meta)
    f = _reload(path, training)["best_checkpoint.reload"]
    assert f.verdict == "fail" and f"not the weights hashed at epoch {good_run['best_epoch']}" in f.message


def test_evaluate_raising(good_run, training):
    def evaluate(model):
        raise RuntimeError("validation loader exploded")

    f = by_check(check_reload(good_run["checkpoint"], evaluate=evaluate, model_factory=training.make_model,
                              fresh_process=False))["best_checkpoint.reload"]
    assert f.verdict == "error"
    assert "at evaluate: RuntimeError: validation loader exploded" in f.message
    assert str(good_run["checkpoint"]) in f.message and f"epoch {good_run['best_epoch']}" in f.message
    assert "validation loader exploded" in f.details["traceback"]


def test_monitored_metric_missing_from_the_logs(good_run, training):
    history = [dict(h) for h in good_run["history"]]
    del history[2]["val_loss"]
    f = _reload(good_run["checkpoint"], training, history=history)["best_checkpoint.history"]
    assert f.verdict == "fail" and "'val_loss' is missing from the logged metrics of epoch 2" in f.message


def test_nan_recorded_as_best(good_run, tmp_path, training):
    path = _copy(good_run, tmp_path)
    state, meta = load_checkpoint(path)
    history = [dict(h) for h in good_run["history"]]
    history[1]["val_loss"] = math.nan
    meta["epoch"] = 1
    meta["metrics"] = {k: v for k, v in history[1].items() if k not in ("epoch", "step")}
    save_checkpoint(path, state, meta)
    f = _reload(path, training, history=history)
    assert f["best_checkpoint.reload"].verdict == "fail" and "NaN" in f["best_checkpoint.reload"].message
    assert f["best_checkpoint.history"].verdict == "fail"


def test_no_history_is_a_skip_not_a_pass(good_run, tmp_path, training):
    path = tmp_path / "alone.pt"
    shutil.copy(good_run["checkpoint"], path)
    f = _reload(path, training)
    assert f["best_checkpoint.history"].verdict == "skip" and f["best_checkpoint.reload"].verdict == "pass"


class CreatesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_by_the_reload_check(tmp_path, training):
    marker = tmp_path / "PWNED"
    path = tmp_path / "best.pt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "metadata": CreatesMarker(marker)}))
    for fresh in (False, True):
        f = by_check(check_reload(path, evaluate=EVALUATE, model_factory=MODEL_FACTORY, fresh_process=fresh))
        rel = f["best_checkpoint.reload"]
        assert rel.verdict == "fail" and "refused" in rel.message and rel.details["refused"] and str(path) in rel.message
    assert not marker.exists()


@pytest.mark.parametrize("field, value, message", [
    ("metrics", None, "'metrics' must be a dict"),
    ("metrics", [1.0], "'metrics' must be a dict"),
    ("epoch", None, "no integer best epoch"),
    ("epoch", "5", "no integer best epoch"),
    ("mode", "minimize", "mode must be 'min' or 'max'"),
])
def test_malformed_metadata_is_a_finding_not_a_crash(good_run, tmp_path, training, field, value, message):
    path = _copy(good_run, tmp_path)
    state, meta = load_checkpoint(path)
    meta[field] = value
    save_checkpoint(path, state, meta)
    f = _reload(path, training)["best_checkpoint.reload"]
    assert f.verdict == "fail" and message in f.message and str(path) in f.message


def test_bad_tolerance_is_a_finding(good_run, training):
    f = by_check(check_reload(good_run["checkpoint"], evaluate=training.evaluate, model_factory=training.make_model,
                              fresh_process=False, deterministic=False, tolerance=-1.0))["best_checkpoint.reload"]
    assert f.verdict == "fail" and "tolerance must be" in f.message


def test_epochs_numbered_from_one_with_start_from_epoch(tmp_path, training):
    """Keras/HF/fastai users log epochs from 1: start_from_epoch counts logged epochs, not list positions."""
    from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint

    model = training.make_model()
    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, start_from_epoch=2, fsync=False)
    for epoch, v in zip((1, 2, 3, 4), (0.1, 0.5, 0.7, 0.9)):
        ckpt.on_epoch_end(epoch, {"val_loss": v}, model)
    assert ckpt.best_epoch == 2
    f = by_check(check_reload(ckpt.path, evaluate=lambda m: {"val_loss": 0.5}, model_factory=training.make_model,
                              fresh_process=False))
    assert f["best_checkpoint.history"].verdict == "pass", f["best_checkpoint.history"].message
    assert f["best_checkpoint.history"].details["argbest_epoch"] == 2
