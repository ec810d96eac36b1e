"""`pytest --mlrepro examples/`: every example training audited. The deterministic ones pass; the
deliberately broken ones FAIL, each with a message naming the step, tensor, module and likely cause,
or the best-checkpoint check that failed (the point of the tool: this is what a user sees in CI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CATALOG = json.loads((ROOT / "fixtures" / "catalog.json").read_text())


def _cases():
    for e in CATALOG:
        marks = [pytest.mark.mlrepro(e["target"], args=tuple(e["args"]), checkpoint=e.get("checkpoint"))]
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
