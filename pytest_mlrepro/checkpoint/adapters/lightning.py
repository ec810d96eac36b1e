"""Drive PyTorch Lightning's real ``EarlyStopping`` and ``ModelCheckpoint`` through a real ``Trainer``.

Chosen way: the real loop. Each ``run(values)`` builds a ``Trainer(max_epochs=len(values),
accelerator="cpu", logger=False)`` around a one-weight LightningModule whose ``validation_step``
logs ``values[current_epoch]`` under the monitored name (a float64 tensor, so the comparison the
callback makes is the exact one on the scripted number). A run takes ~0.05 s after import.

What Lightning claims (read from the configured callback): ``mode`` defaults to "min" for every
name (there is no auto mode); improvement is ``current -/+ min_delta`` strictly better than the
best; it stops when ``wait_count >= patience`` (so patience 0 behaves as 1); ``check_finite=True``
stops at NaN *and* at +-inf (our ``nan_policy="stop_nonfinite"``), ``check_finite=False`` lets NaN
count as a non-improvement ("ignore"). No ``baseline`` and no ``start_from_epoch``: a spec with
either raises ``UnsupportedSpec``.

``ModelCheckpoint(save_top_k=1)`` has no ``min_delta`` and replaces a NaN score by the worst
infinity, but *saves it* when it is the first score it sees (fewer than ``save_top_k`` kept).
"""
from __future__ import annotations

import os
import tempfile

from pytest_mlrepro.checkpoint.adapters import NO_STOP_PATIENCE, as_float, empty_outcome, quiet, require

__all__ = ["LightningDriver", "early_stopping_factory", "checkpoint_factory", "supported_specs"]

_LOGGERS = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")


def _pl():
    return require("pytorch_lightning", "lightning")


def _module_class():
    import torch

    pl = _pl()

    class _ScriptedModule(pl.LightningModule):
        """One linear weight; validation logs the scripted value; a buffer tags the epoch of the weights."""

        def __init__(self, monitor, values):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.register_buffer("epoch_tag", torch.tensor(-1.0, dtype=torch.float64))
            self.monitor, self.values = monitor, list(values)
            self.validated, self.saved_at = [], []

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            epoch = self.current_epoch
            self.epoch_tag.fill_(float(epoch))
            self.validated.append(epoch)
            self.log(self.monitor, torch.tensor(self.values[epoch], dtype=torch.float64))

        def on_save_checkpoint(self, checkpoint):
            self.saved_at.append(self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def _loader(self):
            ds = torch.utils.data.TensorDataset(torch.ones(1, 1))
            return torch.utils.data.DataLoader(ds, batch_size=1)

        def train_dataloader(self):
            return self._loader()

        def val_dataloader(self):
            return self._loader()

    class _Recorder(pl.Callback):
        """Notes, per epoch, whether EarlyStopping took a new best and asked to stop.

        Lightning runs monitoring callbacks (EarlyStopping, ModelCheckpoint) *after* the others in
        ``on_train_epoch_end``, so an epoch is read back at the start of the next one / at train end.
        """

        def __init__(self, es):
            self.es, self.prev_best, self.improved, self.stop_epoch = es, es.best_score if es else None, [], None
            self.pending = None

        def _flush(self, trainer):
            epoch, self.pending = self.pending, None
            if epoch is None or self.es is None:
                return
            if self.es.best_score is not self.prev_best:
                self.improved.append(epoch)
                self.prev_best = self.es.best_score
            if trainer.should_stop and self.stop_epoch is None:
                self.stop_epoch = epoch

        def on_train_epoch_start(self, trainer, pl_module):
            self._flush(trainer)
            self.pending = trainer.current_epoch

        def on_train_end(self, trainer, pl_module):
            self._flush(trainer)

    return _ScriptedModule, _Recorder


class LightningDriver:
    """Lightning's ``EarlyStopping`` (and/or ``ModelCheckpoint(save_top_k=1)``) as the user configured it.

    ``early_stopping``: kwargs for ``EarlyStopping`` (``monitor`` is added), or ``None`` for none.
    ``checkpoint``: kwargs for ``ModelCheckpoint`` (``monitor``, ``save_top_k=1``, ``dirpath`` added),
    or ``None``. With a checkpoint, ``Outcome.best_epoch`` / ``best_value`` / ``saved_epochs`` are the
    checkpoint's (the epoch whose weights ``best_model_path`` holds, read from the file); without,
    they are EarlyStopping's.
    """

    def __init__(self, monitor: str, *, early_stopping: dict | None = None, checkpoint: dict | None = None,
                 dirpath=None):
        if early_stopping is None and checkpoint is None:
            raise ValueError("LightningDriver needs early_stopping and/or checkpoint kwargs")
        self.monitor = monitor
        self._es_kwargs = None if early_stopping is None else {**early_stopping, "monitor": monitor}
        self._ck_kwargs = None if checkpoint is None else {"save_top_k": 1, **checkpoint, "monitor": monitor}
        self._dirpath = dirpath
        parts = (["EarlyStopping"] if early_stopping is not None else []) + (["ModelCheckpoint"] if checkpoint is not None else [])
        self.name = "lightning." + "+".join(parts)
        self.spec = self._claimed_spec()
        self.last_run: dict = {}

    def _callbacks(self):
        from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

        es = EarlyStopping(**self._es_kwargs) if self._es_kwargs is not None else None
        ck = None
        if self._ck_kwargs is not None:
            ck = ModelCheckpoint(**{"filename": "{epoch}", **self._ck_kwargs, "dirpath": self._run_dir})
        return es, ck

    def _claimed_spec(self):
        from pytest_mlrepro.checkpoint.oracle import StopSpec

        _pl()
        self._run_dir = None
        es, ck = self._callbacks()
        if es is not None:
            return StopSpec(mode=es.mode, patience=int(es.patience), min_delta=abs(float(es.min_delta)),
                            nan_policy="stop_nonfinite" if es.check_finite else "ignore")
        return StopSpec(mode=ck.mode, patience=NO_STOP_PATIENCE, nan_policy="ignore")

    def run(self, values):
        from pytest_mlrepro.checkpoint.oracle import Outcome

        values = [float(v) for v in values]
        if not values:
            return empty_outcome()
        pl = _pl()
        module_cls, recorder_cls = _module_class()
        with tempfile.TemporaryDirectory(prefix="mlrepro-pl-") as tmp:
            self._run_dir = os.path.join(self._dirpath or tmp, f"run-{os.getpid()}-{id(values)}")
            es, ck = self._callbacks()
            rec = recorder_cls(es)
            model = module_cls(self.monitor, values)
            callbacks = [c for c in (es, rec, ck) if c is not None]
            with quiet(*_LOGGERS):
                trainer = pl.Trainer(max_epochs=len(values), accelerator="cpu", devices=1, logger=False,
                                     enable_progress_bar=False, enable_model_summary=False,
                                     enable_checkpointing=ck is not None, num_sanity_val_steps=0,
                                     default_root_dir=tmp, callbacks=callbacks)
                trainer.fit(model)
            epochs_run = len(model.validated)
            stop_epoch = rec.stop_epoch
            info = {"validated_epochs": list(model.validated)}
            if ck is not None:
                best_epoch, best_value = self._read_best(ck)
                saved = tuple(model.saved_at)
                info.update(best_model_path=ck.best_model_path, best_weights_epoch=best_epoch,
                            files=sorted(os.listdir(self._run_dir)) if os.path.isdir(self._run_dir) else [])
            else:
                saved = tuple(rec.improved)
                best_epoch = rec.improved[-1] if rec.improved else None
                best_value = as_float(es.best_score) if rec.improved else None
            if es is not None:
                info.update(es_stopped_epoch=es.stopped_epoch, es_wait_count=es.wait_count,
                            es_best_score=as_float(es.best_score))
            self.last_run = info
        return Outcome(epochs_run, stop_epoch, best_epoch, best_value, saved)

    @staticmethod
    def _read_best(ck):
        """The epoch tag stored in the file ``best_model_path`` names, read without unpickling code."""
        import torch

        if not ck.best_model_path:
            return None, None
        state = torch.load(ck.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        epoch = int(state["epoch_tag"].item())
        score = as_float(ck.best_model_score)
        return epoch, score


def early_stopping_factory(monitor: str = "val_loss", **fixed):
    """``spec -> LightningDriver`` configuring ``EarlyStopping`` from the spec (for ``check_conformance``)."""
    return _factory(monitor, checkpoint=False, **fixed)


def checkpoint_factory(monitor: str = "val_loss", dirpath=None, **fixed):
    """``spec -> LightningDriver`` with ``EarlyStopping`` + ``ModelCheckpoint(save_top_k=1)``."""
    return _factory(monitor, checkpoint=True, dirpath=dirpath, **fixed)


def _factory(monitor, *, checkpoint, dirpath=None, **fixed):
    from pytest_mlrepro.checkpoint.conformance import UnsupportedSpec

    def make(spec):
        if spec.baseline is not None or spec.start_from_epoch:
            raise UnsupportedSpec("Lightning EarlyStopping has no baseline / start_from_epoch")
        if spec.nan_policy == "stop":
            raise UnsupportedSpec("Lightning stops on NaN only together with +-inf (check_finite)")
        if checkpoint and spec.min_delta:
            raise UnsupportedSpec("Lightning ModelCheckpoint has no min_delta")
        es = {"mode": spec.mode, "patience": spec.patience, "min_delta": spec.min_delta,
              "check_finite": spec.nan_policy == "stop_nonfinite", **fixed}
        ck = {"mode": spec.mode} if checkpoint else None
        return LightningDriver(monitor, early_stopping=es, checkpoint=ck, dirpath=dirpath)

    return make


def supported_specs(*, checkpoint: bool = False):
    """The ``StopSpec`` strategy restricted to what Lightning can express."""
    from pytest_mlrepro.checkpoint.strategies import stop_specs

    return stop_specs(baseline=False, start_from_epoch=False, nan_policies=("stop_nonfinite", "ignore"),
                      min_deltas=(0.0,) if checkpoint else (0.0, 0.25, 0.5, 1.0, 2.0))


