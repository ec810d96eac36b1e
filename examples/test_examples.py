"""`pytest --mlrepro examples/`: every example training audited. The deterministic ones pass; the
deliberately broken ones FAIL, each with a message naming the step, tensor, module and likely cause
(the point of the tool: this is what a user sees in CI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CATALOG = json.loads((ROOT / "fixtures" / "catalog.json").read_text())


def _cases():
    for e in CATALOG:
        marks = [pytest.mark.mlrepro(e["target"], args=tuple(e["args"]))]
        if e.get("requires") == "cuda":
            marks.append(pytest.mark.cuda)
        yield pytest.param(e, id=e["name"], marks=marks)


@pytest.mark.parametrize("entry", list(_cases()))
def test_training_is_deterministic(entry, mlrepro):
    if entry.get("requires") == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        mlrepro.audit(device="cuda").assert_deterministic()
        return
    mlrepro.audit().assert_deterministic()


@pytest.mark.mlrepro("fixtures/checkpoint_training.py:train_target", checkpoint={
    "path": "best.pt", "evaluate": "fixtures/checkpoint_training.py:evaluate",
    "model_factory": "fixtures/checkpoint_training.py:make_model"})
def test_best_checkpoint_reloads_to_its_recorded_metrics():
    """Audited by the marker alone: deterministic, and the best checkpoint passes the reload contract."""


@pytest.mark.mlrepro("fixtures/checkpoint_training.py:train_target_broken", checkpoint={
    "path": "best.pt", "evaluate": "fixtures/checkpoint_training.py:evaluate",
    "model_factory": "fixtures/checkpoint_training.py:make_model"})
def test_broken_best_checkpoint_carries_the_last_epochs_metrics():
    """Deliberately broken: fails the reload contract (metrics of the last epoch stored with the best)."""
