"""The history check accepts exactly the epoch a best-only saver holds at the end of the whole
logged history: curves that get worse before they get better, ties, NaN, +-inf, min_delta."""
import math
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint
from pytest_mlrepro.checkpoint.oracle import StopSpec
from pytest_mlrepro.checkpoint.reload import _check_history, check_reload
from pytest_mlrepro.checkpoint.strategies import metric_sequences, specs_and_sequences
from pytest_mlrepro.checks import HISTORY


def saver_holds(values, mode, min_delta=0.0, baseline=None, start=0, first_epoch=0):
    """The docs' rule restated independently: a value becomes best only by beating the current best
    by more than min_delta (ties keep the earlier epoch, NaN never, the worst infinity never first)."""
    worst = math.inf if mode == "min" else -math.inf
    best, held = baseline, None
    for i, v in enumerate(values):
        epoch = first_epoch + i
        if epoch < start or math.isnan(v):
            continue
        if best is None:
            better = v != worst
        else:
            better = v + min_delta < best if mode == "min" else v - min_delta > best
        if better:
            best, held = v, epoch
    return held


def _history(values, first_epoch=0):
    return [{"epoch": first_epoch + i, "step": 10 * i, "val_loss": v, "train_loss": float(i)}
            for i, v in enumerate(values)]


def _meta(history, epoch, spec):
    entry = next((h for h in history if h["epoch"] == epoch), {"val_loss": 0.0, "train_loss": -1.0})
    return {"epoch": epoch, "metrics": {k: v for k, v in entry.items() if k not in ("epoch", "step")},
            "mode": spec.mode, "min_delta": spec.min_delta, "baseline": spec.baseline,
            "start_from_epoch": spec.start_from_epoch}


def test_worse_before_better_is_accepted_end_to_end(tmp_path):
    """The reported case: val_loss 1.0, 1.2, 0.5 - the best is epoch 2, not epoch 0."""
    import torch

    ckpt = BestCheckpoint("val_loss", dirpath=tmp_path, fsync=False)
    model = torch.nn.Linear(2, 1)
    for epoch, v in enumerate([1.0, 1.2, 0.5]):
        ckpt.on_epoch_end(epoch, {"val_loss": v}, model)
    assert ckpt.best_epoch == 2
    f = {x.check: x for x in check_reload(ckpt.path, evaluate=lambda m: {"val_loss": 0.5},
                                          model_factory=lambda: torch.nn.Linear(2, 1), fresh_process=False)}
    assert f[HISTORY].verdict == "pass", f[HISTORY].message
    assert f[HISTORY].details["argbest_epoch"] == 2


def test_min_delta_chains_from_the_held_best_not_from_the_previous_epoch():
    spec = StopSpec("min", min_delta=0.25)
    history = _history([1.0, 0.875, 0.75, 0.5])  # 0.875, 0.75: not more than 0.25 below 1.0; 0.5 is
    assert saver_holds([1.0, 0.875, 0.75, 0.5], "min", 0.25) == 3
    for named, verdict in ((3, "pass"), (0, "fail"), (2, "fail")):
        f = _check_history(Path("best.pt"), _meta(history, named, spec), "val_loss", "min", history, "test")
        assert f.verdict == verdict and f.details["argbest_epoch"] == 3, f.message


@settings(max_examples=200, deadline=None)
@given(specs_and_sequences(min_size=1, max_size=12), st.sampled_from([0, 1]))
@example((StopSpec("min"), [1.0, 1.2, 0.5]), 0)
@example((StopSpec("max"), [0.5, 0.25, 0.75, 0.75]), 1)
@example((StopSpec("min"), [math.nan, math.inf, 2.0, 2.0, -math.inf, 1.0]), 0)
@example((StopSpec("min", min_delta=0.5), [2.0, 1.5, 1.0]), 0)
def test_history_check_accepts_exactly_the_true_argbest(spec_values, first_epoch):
    """Pass iff the checkpoint names the epoch a best-only saver holds; every other epoch fails."""
    spec, values = spec_values
    history = _history(values, first_epoch)
    truth = saver_holds(values, spec.mode, spec.min_delta, spec.baseline, spec.start_from_epoch, first_epoch)
    if spec.min_delta == 0 and spec.baseline is None and spec.start_from_epoch == 0:  # the plain arg-best
        worst = math.inf if spec.mode == "min" else -math.inf
        ok = [(v if spec.mode == "min" else -v, i) for i, v in enumerate(values) if not math.isnan(v) and v != worst]
        assert truth == (first_epoch + min(ok)[1] if ok else None)
    for named in [h["epoch"] for h in history] + [first_epoch + len(values)]:  # ... and one never logged
        f = _check_history(Path("best.pt"), _meta(history, named, spec), "val_loss", spec.mode, history, "test")
        assert f.details["argbest_epoch"] == truth, f.message
        assert f.verdict == ("pass" if named == truth else "fail"), f.message


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["min", "max"]), st.sampled_from([0.0, 0.25, 1.0]), st.data())
def test_what_best_checkpoint_saves_passes_the_check(mode, min_delta, data):
    """End to end: the reference saver's file and sidecar pass check_reload's history check."""
    import torch

    values = data.draw(metric_sequences(min_delta=min_delta, min_size=1, max_size=10))
    with tempfile.TemporaryDirectory() as d:
        ckpt = BestCheckpoint("score", mode=mode, min_delta=min_delta, dirpath=d, fsync=False)
        model = torch.nn.Linear(1, 1)
        for epoch, v in enumerate(values):
            ckpt.on_epoch_end(epoch, {"score": v}, model)
        assert ckpt.best_epoch == saver_holds(values, mode, min_delta)
        if ckpt.best_epoch is None:
            return
        findings = check_reload(ckpt.path, evaluate=lambda m: {}, model_factory=lambda: torch.nn.Linear(1, 1),
                                fresh_process=False)
        hist = next(f for f in findings if f.check == HISTORY)
        assert hist.verdict == "pass", hist.message


def test_an_epoch_logged_twice_is_an_error_not_a_verdict():
    spec = StopSpec("min")
    history = _history([2.0, 1.0, 3.0])
    history[2]["epoch"] = 1  # a resumed run that logged epoch 1 again
    f = _check_history(Path("best.pt"), _meta(history, 1, spec), "val_loss", "min", history, "test")
    assert f.verdict == "error" and "epoch 1 is logged more than once" in f.message
