"""Keras 3 (torch backend) and fastai step their own optimizers, not torch.optim: their trainings,
unmodified, are traced step by step (patched from outside while a replica runs), deterministic when
seeded, and a one-step perturbation planted in one replica is found at its step."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

from pytest_mlrepro import audit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = "fixtures/frameworks_trace"
PLANTED_STEP = 3


def _pair(tmp_path_factory, target: str) -> tuple:
    """One clean and one planted audit, in this process (the framework is imported once)."""
    kw = dict(rootdir=ROOT, isolation="inprocess", timeout=240, diagnose=False)
    clean = audit(target, workdir=tmp_path_factory.mktemp("clean"), **kw)
    planted = audit(target, kwargs={"perturb_step": PLANTED_STEP}, workdir=tmp_path_factory.mktemp("planted"), **kw)
    return clean, planted


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory):
    pytest.importorskip("keras")
    return _pair(tmp_path_factory, f"{FIXTURES}/keras_fit.py:train")


@pytest.fixture(scope="module")
def fastai_runs(tmp_path_factory):
    pytest.importorskip("fastai")
    return _pair(tmp_path_factory, f"{FIXTURES}/fastai_fit.py:train")


@pytest.mark.parametrize("runs", ["keras_runs", "fastai_runs"])
def test_seeded_training_is_traced_every_step_and_deterministic(runs, request):
    clean, _ = request.getfixturevalue(runs)
    assert clean.error is None, clean.explain()
    assert clean.deterministic, clean.explain()
    assert [r.steps for r in clean.replicas] == [8, 8]  # 2 epochs of 4 batches
    t = clean.trajectory
    assert [e[0] for e in t["entries"]] == ["init"] + ["step"] * 8
    assert not any(n.startswith("<") for n in t["param_names"]), t["param_names"]


@pytest.mark.parametrize("runs, tensor", [("keras_runs", "sequential/dense_1/kernel"), ("fastai_runs", "3.weight")])
def test_planted_one_step_perturbation_is_found_at_its_step(runs, tensor, request):
    _, planted = request.getfixturevalue(runs)
    assert planted.error is None, planted.explain()
    assert not planted.deterministic
    div = planted.first_divergence
    assert div.step == PLANTED_STEP, planted.explain()
    assert tensor in div.tensors, planted.explain()  # the nudged tensor (the update spread it to the others)


def test_keras_buffers_are_traced_with_their_variables(keras_runs):
    """BatchNormalization's moving statistics are Keras non-trainable variables: traced by their Keras path."""
    names = keras_runs[0].trajectory["param_names"]
    assert "sequential/batch_normalization/moving_mean" in names
    assert "sequential/dense/kernel" in names


def test_keras_divergence_names_its_layer(keras_runs):
    """Keras layers are named by their Keras path (their model holds their variables, not them)."""
    div = keras_runs[1].first_divergence
    assert div.module is not None and div.module.startswith("sequential/"), div.message
    assert "<unnamed" not in div.message


def test_fastai_names_and_buffers(fastai_runs):
    names = fastai_runs[0].trajectory["param_names"]
    assert {"0.weight", "1.weight", "1.running_mean", "1.running_var", "3.bias"} <= set(names)


def test_frameworks_are_neither_imported_nor_left_patched():
    """A training that imports neither framework does not get it imported; after a replica, the
    framework's optimizer method is the original again."""
    import torch

    from pytest_mlrepro.trace import Tracer

    pytest.importorskip("fastai")
    from fastai.optimizer import Optimizer

    original = Optimizer.__dict__["step"]
    tracer = Tracer().install()
    try:
        assert Optimizer.__dict__["step"] is not original  # imported before: patched at install
        m = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.ones(1, 2)).sum().backward()
        opt.step()
    finally:
        tracer.uninstall()
    assert Optimizer.__dict__["step"] is original
    assert tracer.steps == 1
