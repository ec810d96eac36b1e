"""fastai WandbCallback(log_model=True) + SaveModelCallback in real offline W&B runs: whose metrics ride
on the best model artifact? fastai 2.8 attaches the last epoch's (fastai/callback/wandb.py:157)."""
import math

import pytest

pytest.importorskip("fastai.callback.tracker")
pytest.importorskip("wandb")
pytest.importorskip("fastai.callback.wandb")

from pytest_mlrepro.checkpoint.adapters.fastai_wandb import (
    CHECK,
    check_fastai_wandb_best_metadata,
    metadata_differences,
)
from pytest_mlrepro.wandb_offline import read_run

pytestmark = pytest.mark.frameworks


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service():
    """The first check started W&B's service in this process; stop it when the module is done."""
    yield
    import wandb

    wandb.teardown()


def test_real_callback_attaches_the_last_epochs_metrics_to_the_best_model(tmp_path):
    f = check_fastai_wandb_best_metadata(values=[1.0, 0.25, 0.5, 0.9], monitor="valid_loss", tmpdir=tmp_path)
    assert (f.check, f.verdict) == (CHECK, "fail"), f.message
    d = f.details
    assert (d["best_epoch"], d["last_epoch"], d["metadata_epochs"]) == (1, 3, [3])
    assert d["saved_epochs"] == [0, 1]
    assert d["artifact_file_epoch"] == 1  # the file is the best epoch's: only the metadata is wrong
    history = d["history"]
    assert history[1]["valid_loss"] == 0.25 and history[3]["valid_loss"] == pytest.approx(0.9)
    assert d["differences"]["valid_loss"] == {"metadata": str(history[3]["valid_loss"]), "recorded": 0.25}
    assert d["differences"]["mae"] == {"metadata": str(history[3]["mae"]), "recorded": history[1]["mae"]}
    assert history[1]["mae"] != history[3]["mae"]
    assert "kept epoch 1" in f.message and "epoch 3's metrics (the last epoch)" in f.message
    assert "valid_loss: metadata '0.8999999761581421', recorded at epoch 1 0.25" in f.message

    # The evidence, read independently from the run file: W&B's own history has the right numbers
    # per epoch, the artifact's metadata the last epoch's.
    run = read_run(d["run_file"])
    [art] = [a for a in run.artifacts if a["type"] == "model"]
    assert art["metadata"] == {"valid_loss": str(history[3]["valid_loss"]), "mae": str(history[3]["mae"])}
    per_epoch = {r["epoch"]: r["valid_loss"] for r in run.history if "valid_loss" in r and "epoch" in r}
    assert per_epoch[2] == 0.25  # WandbCallback counts epochs from 1


def test_metric_monitor_maximised_shows_it_too(tmp_path):
    f = check_fastai_wandb_best_metadata(values=[0.1, 0.7, 0.3], monitor="accuracy", tmpdir=tmp_path)
    assert f.verdict == "fail", f.message
    d = f.details
    assert (d["mode"], d["best_epoch"], d["last_epoch"], d["metadata_epochs"]) == ("max", 1, 2, [2])
    assert d["differences"]["accuracy"] == {"metadata": "0.3", "recorded": 0.7}
    assert set(d["differences"]) == {"valid_loss", "accuracy", "mae"}


def test_passes_when_the_best_epoch_is_the_last(tmp_path):
    f = check_fastai_wandb_best_metadata(values=[1.0, 0.5, 0.25], tmpdir=tmp_path)
    assert f.verdict == "pass", f.message
    d = f.details
    assert (d["best_epoch"], d["last_epoch"], d["artifact_file_epoch"], d["differences"]) == (2, 2, 2, {})
    assert d["metadata"]["valid_loss"] == "0.25"


def _fixed_wandb_callback():
    """WandbCallback whose artifact carries the metrics of the epoch SaveModelCallback kept."""
    import wandb
    from fastai.callback.wandb import WandbCallback, log_model

    class BestMetadataWandbCallback(WandbCallback):
        def after_fit(self):
            sm, rec = self.save_model, self.recorder
            names = [n for n in rec.metric_names[1:] if n != "time"]
            best = max(e for e, row in enumerate(rec.values) if row[sm.idx] == sm.best)
            metadata = {n: v for n, v in zip(names, rec.values[best]) if n != "train_loss"}
            log_model(sm.last_saved_path, name=sm.fname, metadata=metadata)
            wandb.log({})

    return BestMetadataWandbCallback


def test_a_callback_that_records_the_best_epoch_passes_although_best_is_not_last(tmp_path):
    f = check_fastai_wandb_best_metadata(values=[1.0, 0.25, 0.5, 0.9], tmpdir=tmp_path,
                                         wandb_callback_cls=_fixed_wandb_callback())
    assert f.verdict == "pass", f.message
    d = f.details
    assert (d["best_epoch"], d["last_epoch"], d["metadata_epochs"]) == (1, 3, [1])
    assert d["callback"].endswith("BestMetadataWandbCallback")


def _overshooting_learner(cbs, path):
    """A real (unscripted) curve: Adam with a big step overshoots y = 2x, so valid_loss falls then rises."""
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner

    train = [(torch.tensor([x]), torch.tensor([2.0 * x])) for x in (1.0, 2.0)]
    valid = [(torch.tensor([x]), torch.tensor([2.0 * x])) for x in (1.5, 3.0)]
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    dls = DataLoaders(DataLoader(train, bs=2), DataLoader(valid, bs=2), device="cpu")
    return Learner(dls, model, loss_func=torch.nn.MSELoss(), path=path, cbs=cbs)


def test_learner_factory_with_a_real_overshooting_curve(tmp_path):
    f = check_fastai_wandb_best_metadata(_overshooting_learner, n_epochs=8, fit_kwargs={"lr": 0.6}, tmpdir=tmp_path)
    d = f.details
    losses = [row["valid_loss"] for row in d["history"]]
    assert d["best_epoch"] == losses.index(min(losses)) < d["last_epoch"] == 7, losses
    assert f.verdict == "fail", f.message
    assert d["metadata_epochs"] == [7] and d["artifact_file_epoch"] == d["best_epoch"]
    assert float(d["metadata"]["valid_loss"]) == losses[7] != losses[d["best_epoch"]]


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pass values"):
        check_fastai_wandb_best_metadata(values=[], tmpdir=tmp_path)
    with pytest.raises(ValueError, match="n_epochs"):
        check_fastai_wandb_best_metadata(_overshooting_learner, tmpdir=tmp_path)
    with pytest.raises(ValueError, match="cannot be scripted"):
        check_fastai_wandb_best_metadata(values=[1.0], monitor="train_loss", tmpdir=tmp_path)

    def forgets_cbs(cbs, path):
        return _overshooting_learner([], path)

    with pytest.raises(ValueError, match="did not pass cbs"):
        check_fastai_wandb_best_metadata(forgets_cbs, n_epochs=1, tmpdir=tmp_path)


def test_no_improvement_is_an_error_naming_the_monitor(tmp_path):
    """[nan]: SaveModelCallback never saves, then its after_fit fails to load model.pth: an error, not a pass."""
    f = check_fastai_wandb_best_metadata(values=[math.nan], tmpdir=tmp_path)
    assert f.verdict == "error", f.message
    assert f.details["monitor"] == "valid_loss" and "FileNotFoundError" in f.message
    assert "saved no model" in f.message and f.details["saved_epochs"] == []


def test_metadata_differences():
    rec = {"train_loss": 3.0, "valid_loss": 0.25, "mae": 0.8999999761581421, "acc": math.nan}
    same = {"valid_loss": "0.25", "mae": "0.9", "acc": "nan"}  # str(np.float32(0.9)) == '0.9'
    assert metadata_differences(same, rec) == {}
    assert metadata_differences({"valid_loss": "0.5", "acc": "nan", "extra": "1"}, rec) == {
        "valid_loss": {"metadata": "0.5", "recorded": 0.25},
        "mae": {"metadata": None, "recorded": 0.8999999761581421},
        "extra": {"metadata": "1", "recorded": None},
    }
    [(name, diff)] = metadata_differences({"valid_loss": "0.25", "mae": "0.9", "acc": "0.1"}, rec).items()
    assert (name, diff["metadata"], math.isnan(diff["recorded"])) == ("acc", "0.1", True)
    assert metadata_differences({"valid_loss": "0.2500001"}, {"valid_loss": 0.25}) == {}  # 4e-7 relative
    assert metadata_differences({"valid_loss": "0.2501"}, {"valid_loss": 0.25}) == {
        "valid_loss": {"metadata": "0.2501", "recorded": 0.25}}
