"""The PNG plots: what each figure shows (read from the figure itself) and the files written."""
from __future__ import annotations

import pytest

from pytest_mlrepro.publish import PublishError
from pytest_mlrepro.publish.findings import best_checkpoint, early_stop_epoch
from pytest_mlrepro.publish.plots import (
    metrics_figure,
    plot_metrics,
    plot_step_divergence,
    step_divergence_figure,
)
from pytest_mlrepro.result import AuditResult, Finding

PNG = b"\x89PNG\r\n\x1a\n"


def _legend(ax) -> list:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _vlines(ax) -> dict:
    """x position of each vertical marker line, by its label."""
    out = {}
    for line in ax.get_lines():
        xs = list(line.get_xdata())
        if len(xs) == 2 and xs[0] == xs[1] and not line.get_label().startswith("_"):
            out[line.get_label()] = xs[0]
    return out


def test_metric_curves_mark_best_and_early_stop_epochs(sample_results):
    fig = metrics_figure(sample_results["checkpoint"])
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["val_loss", "val_acc", "train_loss"]
    assert axes[-1].get_xlabel() == "epoch"
    ax = axes[0]
    assert _legend(ax) == ["replica 0", "replica 1", "best epoch 2 (val_loss, min)", "recorded val_loss at best epoch",
                           "early stop at epoch 4"]
    assert _vlines(ax) == {"best epoch 2 (val_loss, min)": 2, "early stop at epoch 4": 4}
    star = next(line for line in ax.get_lines() if line.get_label() == "recorded val_loss at best epoch")
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([2], [0.4], "*")
    r0, r1 = (next(line for line in ax.get_lines() if line.get_label() == f"replica {i}") for i in (0, 1))
    assert list(r0.get_xdata()) == [0, 1, 2, 3, 4] and list(r0.get_ydata()) == [0.9, 0.5, 0.4, 0.45, 0.47]
    assert r0.get_marker() != r1.get_marker() and r0.get_linestyle() != r1.get_linestyle()  # both visible when equal
    assert "failed-checks" in fig._suptitle.get_text()


def test_metric_curves_by_step_without_epochs(sample_results):
    fig = metrics_figure(sample_results["nondeterministic"])
    (ax,) = fig.get_axes()
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "loss"
    assert _legend(ax) == ["replica 0", "replica 1"]  # no best/early-stop marks without the checks


def test_step_divergence_is_log_scale_with_zeros_and_first_divergence(sample_results):
    fig = step_divergence_figure(sample_results["nondeterministic"])
    ax, counts = fig.get_axes()
    assert ax.get_yscale() == "log"
    assert "max_abs_diff_sampled" in ax.get_ylabel() and "log" in ax.get_ylabel()
    assert counts.get_xlabel() == "optimizer step" and "tensors" in counts.get_ylabel()
    labels = _legend(ax)
    assert labels[0] == "replicas differ" and labels[1].startswith("bitwise equal (0")
    assert labels[2] == "first divergence: step 3, net.0.weight"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["replicas differ"].get_xdata()) == [3, 4, 5]
    zeros = lines[labels[1]]
    assert list(zeros.get_xdata()) == [0, 1, 2] and 0 < min(zeros.get_ydata()) < 3e-7
    assert _vlines(ax)["first divergence: step 3, net.0.weight"] == 3
    assert [p.get_height() for p in counts.patches] == [0, 0, 0, 1, 2, 2]


def test_pngs_are_written_and_nothing_for_empty_results(tmp_path, sample_results):
    import matplotlib.image

    p = plot_metrics(sample_results["checkpoint"], tmp_path / "plots")
    q = plot_step_divergence(sample_results["nondeterministic"], tmp_path / "plots")
    for path in (p, q):
        assert path.read_bytes()[:8] == PNG
        h, w = matplotlib.image.imread(path).shape[:2]
        assert w == 800 and h >= 500
    assert p.name.startswith("tests-test_ckpt.py-test_best_checkpoint-lightning-") and p.name.endswith("-metrics.png")
    assert plot_metrics(sample_results["error"], tmp_path / "plots") is None
    assert plot_step_divergence(sample_results["deterministic"], tmp_path / "plots") is None
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted([p.name, q.name])  # no temp files


def test_a_missing_parent_folder_is_refused(tmp_path, sample_results):
    with pytest.raises(PublishError, match="does not exist"):
        plot_metrics(sample_results["checkpoint"], tmp_path / "no" / "plots")
    assert not (tmp_path / "no").exists()


def test_best_checkpoint_details_are_read_leniently_but_checked():
    def result(*findings):
        return AuditResult("t", 0, 0, "cpu", "-", "-", {}, True, findings=list(findings), kind="checks")

    absent = Finding("best_checkpoint.reload", "error", "best checkpoint absent", {
        "checkpoint_path": "x.pt", "monitor": "val_loss", "mode": "min", "best_epoch": None, "recorded_metrics": None})
    assert best_checkpoint(result(absent)) is None
    hist = Finding("best_checkpoint.history", "pass", "", {"best_epoch": 1, "monitor": "m", "mode": "max",
                                                           "history": [{"m": 0.1}, {"m": 0.3, "acc": 0.5}]})
    b = best_checkpoint(result(absent, hist))
    assert (b.best_epoch, b.recorded_metrics, b.checkpoint_path, b.source) == (1, {"m": 0.3, "acc": 0.5}, None, "best_checkpoint.history")
    bad = Finding("best_checkpoint.reload", "pass", "", {"best_epoch": "two", "recorded_metrics": {}})
    with pytest.raises(PublishError, match=r"'best_checkpoint.reload': details\['best_epoch'\] must be an integer epoch, got 'two'"):
        best_checkpoint(result(bad))
    stop = Finding("best_checkpoint.history", "pass", "", {"stopped_epoch": 3.5})
    with pytest.raises(PublishError, match="stopped_epoch"):
        early_stop_epoch(result(stop))


def _disputed(sample_results, *, claimed_epoch: int, claimed: dict, failing: str):
    """The checkpoint sample with a best checkpoint whose ``failing`` check failed on ``claimed``."""
    r = AuditResult.from_dict(sample_results["checkpoint"].to_dict())
    reload, history = r.findings[0], r.findings[1]
    reload.details.update(best_epoch=claimed_epoch, recorded_metrics=dict(claimed))
    history.details.update(best_epoch=claimed_epoch)
    {"reload": reload, "history": history}[failing].verdict = "fail"
    return r


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_a_checkpoint_claiming_the_wrong_epoch_is_drawn_beside_the_history(sample_results, tmp_path):
    """The file says epoch 4 (val_loss 0.47) is best; the history's best is epoch 2 (0.4). Both are drawn,
    distinguishable, so the picture shows the failure instead of the history alone."""
    r = _disputed(sample_results, claimed_epoch=4, claimed={"val_loss": 0.47, "val_acc": 0.78, "train_loss": 0.35},
                  failing="history")
    ax = metrics_figure(r).get_axes()[0]
    assert _legend(ax) == [
        "replica 0", "replica 1", "logged history: best epoch 2 (val_loss, min)", "logged history: val_loss at best epoch 2",
        "claimed by checkpoint: best epoch 4", "claimed by checkpoint: val_loss=0.47 at epoch 4", "early stop at epoch 4"]
    assert _vlines(ax)["logged history: best epoch 2 (val_loss, min)"] == 2
    assert _vlines(ax)["claimed by checkpoint: best epoch 4"] == 4
    logged = _line(ax, "logged history: val_loss at best epoch 2")
    claim = _line(ax, "claimed by checkpoint: val_loss=0.47 at epoch 4")
    assert (list(logged.get_xdata()), list(logged.get_ydata())) == ([2], [0.4])
    assert (list(claim.get_xdata()), list(claim.get_ydata())) == ([4], [0.47])
    assert claim.get_marker() != logged.get_marker() and claim.get_color() != logged.get_color()
    replica_colors = {_line(ax, f"replica {i}").get_color() for i in (0, 1)}
    assert claim.get_color() not in replica_colors | {_line(ax, "early stop at epoch 4").get_color()}
    assert plot_metrics(r, tmp_path).read_bytes()[:8] == PNG


def test_a_checkpoint_recording_other_values_is_drawn_at_its_epoch(sample_results):
    """Right epoch, wrong numbers (the last epoch's metrics saved with the best weights): the claim is drawn
    at epoch 2 with the values the file holds, not the history's, in every metric's panel."""
    r = _disputed(sample_results, claimed_epoch=2, claimed={"val_loss": 0.47, "val_acc": 0.78, "train_loss": 0.35},
                  failing="reload")
    axes = metrics_figure(r).get_axes()
    for ax, name, logged_y, claimed_y in zip(axes, ("val_loss", "val_acc", "train_loss"), (0.4, 0.8, 0.5), (0.47, 0.78, 0.35)):
        logged = _line(ax, f"logged history: {name} at best epoch 2")
        claim = _line(ax, f"claimed by checkpoint: {name}={claimed_y:.4g} at epoch 2")
        assert (list(logged.get_xdata()), list(logged.get_ydata())) == ([2], [logged_y])
        assert (list(claim.get_xdata()), list(claim.get_ydata())) == ([2], [claimed_y])
        assert "claimed by checkpoint: best epoch 2" not in _legend(ax)  # same epoch: no second line


def test_a_passing_checkpoint_draws_no_claim(sample_results):
    best = best_checkpoint(sample_results["checkpoint"])
    assert (best.failed, best.disputed, best.claimed_metrics) == (False, False, {"val_loss": 0.4, "val_acc": 0.8, "train_loss": 0.5})
    for ax in metrics_figure(sample_results["checkpoint"]).get_axes():
        assert not [t for t in _legend(ax) if "claimed" in t or "logged history" in t]
