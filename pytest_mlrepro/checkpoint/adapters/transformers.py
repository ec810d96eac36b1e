"""Drive Hugging Face ``Trainer``'s real best-model tracking and ``EarlyStoppingCallback``.

Chosen way: the real loop. ``run(values)`` trains a one-weight torch model with ``Trainer`` for
``len(values)`` epochs (one step each, CPU, ``report_to="none"``), ``eval_strategy="epoch"``,
``load_best_model_at_end=True``, ``metric_for_best_model`` as configured and ``compute_metrics``
returning ``values[epoch]``. ``save_strategy="best"`` makes the Trainer write a checkpoint only
when *it* finds a new best, so the checkpoint folders on disk are its save epochs; a buffer in the
model tags the epoch of the weights, so after ``load_best_model_at_end`` we read which epoch's
weights the Trainer loaded. ~0.3 s a run.

What Transformers claims: ``greater_is_better`` unset becomes ``not metric_for_best_model.endswith("loss")``
(``eval_wer`` is maximised); the Trainer's best is strictly better (no threshold); the callback
counts an evaluation as "no improvement" unless strictly better than the Trainer's best by more
than ``early_stopping_threshold`` and stops when the count reaches ``early_stopping_patience``.
NaN never compares better ("ignore"). Known differences (docs/frameworks.md): the Trainer's best
moves on any strict improvement even when the callback counted it as none (threshold > 0); the
first evaluation never counts, NaN or not; patience 0 stops after the first evaluation (rejected
here as ``UnsupportedSpec``); no baseline / start_from_epoch.
"""
from __future__ import annotations

import os
import tempfile

from pytest_mlrepro.checkpoint.adapters import NO_STOP_PATIENCE, as_float, empty_outcome, quiet, require

__all__ = ["TransformersDriver", "early_stopping_factory", "supported_specs"]


def _hf():
    require("accelerate", "transformers")
    return require("transformers", "transformers")


class TransformersDriver:
    """``Trainer`` + ``EarlyStoppingCallback`` configured as the user would.

    ``metric_for_best_model`` and ``greater_is_better`` (``None`` = unset: the Trainer's default) go to
    ``TrainingArguments``; ``early_stopping`` is the kwargs of ``EarlyStoppingCallback`` or ``None``
    (best-model tracking only). ``Outcome.best_epoch`` is the epoch whose weights
    ``load_best_model_at_end`` put back in the model; ``saved_epochs`` the checkpoints written.
    """

    def __init__(self, metric_for_best_model: str, *, greater_is_better: bool | None = None,
                 early_stopping: dict | None = None, output_dir=None):
        _hf()
        self.monitor = metric_for_best_model
        self.greater_is_better = greater_is_better
        self._es_kwargs = early_stopping
        self._output_dir = output_dir
        self.name = "transformers.Trainer" + ("+EarlyStoppingCallback" if early_stopping is not None else "")
        self.spec = self._claimed_spec()
        self.last_run: dict = {}

    def _args(self, out, epochs):
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=out, num_train_epochs=epochs, eval_strategy="epoch", save_strategy="best",
            load_best_model_at_end=True, metric_for_best_model=self.monitor,
            greater_is_better=self.greater_is_better, report_to="none", use_cpu=True, disable_tqdm=True,
            per_device_train_batch_size=1, per_device_eval_batch_size=1, save_only_model=True,
            logging_strategy="no", dataloader_num_workers=0, seed=0)

    def _claimed_spec(self):
        from transformers import EarlyStoppingCallback

        from pytest_mlrepro.checkpoint.oracle import StopSpec

        with tempfile.TemporaryDirectory(prefix="mlrepro-hf-") as tmp:
            args = self._args(tmp, 1)
        mode = "max" if args.greater_is_better else "min"
        if self._es_kwargs is None:
            return StopSpec(mode=mode, patience=NO_STOP_PATIENCE, nan_policy="ignore")
        cb = EarlyStoppingCallback(**self._es_kwargs)
        return StopSpec(mode=mode, patience=int(cb.early_stopping_patience),
                        min_delta=float(cb.early_stopping_threshold or 0.0), nan_policy="ignore")

    def run(self, values):
        import torch
        from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback

        from pytest_mlrepro.checkpoint.oracle import Outcome

        values = [float(v) for v in values]
        if not values:
            return empty_outcome()
        key = self.monitor.removeprefix("eval_")

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(1, 1)
                self.register_buffer("epoch_tag", torch.tensor(-1.0))

            def forward(self, x, labels=None):
                out = self.lin(x)
                return {"loss": ((out - labels) ** 2).mean(), "logits": out}

        class One(torch.utils.data.Dataset):
            def __len__(self):
                return 1

            def __getitem__(self, i):
                return {"x": torch.ones(1), "labels": torch.ones(1)}

        model = Tiny()
        evaluated = []

        def compute_metrics(_pred):
            epoch = len(evaluated)
            evaluated.append(epoch)
            with torch.no_grad():
                model.epoch_tag.fill_(float(epoch))
            return {key: values[epoch]}

        with tempfile.TemporaryDirectory(prefix="mlrepro-hf-") as tmp:
            out = os.path.join(self._output_dir or tmp, f"run-{os.getpid()}-{id(values)}")
            es = EarlyStoppingCallback(**self._es_kwargs) if self._es_kwargs is not None else None
            stops = []

            class Watch(TrainerCallback):
                """Runs after EarlyStoppingCallback.on_evaluate: did *it* ask to stop at this evaluation?"""

                def on_evaluate(self, args, state, control, **kwargs):
                    if es is not None and es.early_stopping_patience_counter >= es.early_stopping_patience:
                        stops.append(len(evaluated) - 1)

            cbs = [es, Watch()] if es is not None else []
            with quiet("transformers", "accelerate"):
                trainer = Trainer(model=model, args=self._args(out, len(values)), train_dataset=One(),
                                  eval_dataset=One(), compute_metrics=compute_metrics, callbacks=cbs)
                trainer.remove_callback(PrinterCallback)
                trainer.train()
            state = trainer.state
            steps_per_epoch = max(1, state.global_step // max(1, len(evaluated)))
            files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-")) if os.path.isdir(out) else []
            saved = tuple(sorted(int(f.split("-")[1]) // steps_per_epoch - 1 for f in files))
            best_epoch = None
            if state.best_model_checkpoint is not None:
                best_epoch = int(round(float(model.epoch_tag.item())))  # the weights load_best_model_at_end restored
            best_value = as_float(state.best_metric) if state.best_global_step else None
            stop_epoch = stops[0] if stops else None
            self.last_run = {"evaluated": list(evaluated), "files": files,
                             "best_model_checkpoint": state.best_model_checkpoint,
                             "best_global_step": state.best_global_step, "best_metric": state.best_metric,
                             "greater_is_better": trainer.args.greater_is_better, "best_weights_epoch": best_epoch}
        return Outcome(len(evaluated), stop_epoch, best_epoch, best_value, saved)


def early_stopping_factory(metric_for_best_model: str = "eval_loss", **fixed):
    """``spec -> TransformersDriver`` with ``greater_is_better`` and the callback set from the spec."""
    from pytest_mlrepro.checkpoint.conformance import UnsupportedSpec

    def make(spec):
        if spec.baseline is not None or spec.start_from_epoch:
            raise UnsupportedSpec("EarlyStoppingCallback has no baseline / start_from_epoch")
        if spec.patience < 1:
            raise UnsupportedSpec("EarlyStoppingCallback(early_stopping_patience=0) stops after the first evaluation")
        if spec.nan_policy != "ignore":
            raise UnsupportedSpec("the Trainer has no NaN stop; a NaN counts as a non-improvement")
        return TransformersDriver(metric_for_best_model, greater_is_better=spec.mode == "max",
                                  early_stopping={"early_stopping_patience": spec.patience,
                                                  "early_stopping_threshold": spec.min_delta, **fixed})

    return make


def supported_specs():
    """The ``StopSpec`` strategy restricted to what the Trainer's callback can express."""
    from pytest_mlrepro.checkpoint.strategies import stop_specs

    return stop_specs(baseline=False, start_from_epoch=False, nan_policies=("ignore",)).filter(
        lambda s: s.patience >= 1)


