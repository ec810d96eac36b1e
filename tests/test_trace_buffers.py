"""Floating-point buffers are traced with the parameters: a BatchNorm-only divergence is found at its
step and named as a buffer (before, the audit said only "the final ... differs")."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pytest_mlrepro import audit
from pytest_mlrepro.localize import first_divergence
from pytest_mlrepro.trace import TraceRecord, Tracer

ROOT = Path(__file__).resolve().parent.parent
TARGET = "fixtures/frameworks_trace/batchnorm_buffer.py:train"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return audit(TARGET, kwargs={"perturb_step": 3}, rootdir=ROOT, isolation="inprocess", timeout=120, diagnose=False,
                 workdir=tmp_path_factory.mktemp("bn"))


def test_buffer_only_divergence_is_found_at_its_step(planted):
    assert planted.error is None, planted.explain()
    assert not planted.deterministic
    div = planted.first_divergence
    assert (div.step, div.tensor, div.phase) == (3, "net.1.running_mean", "buffer"), planted.explain()
    assert (div.module, div.module_type) == ("net.1", "BatchNorm1d")
    assert "buffer `net.1.running_mean`" in div.message


def test_buffers_are_named_from_the_user_model_and_integer_buffers_left_out(planted):
    names = planted.trajectory["param_names"]
    assert names == ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias",
                     "net.1.running_mean", "net.1.running_var"]


def test_full_path_from_a_model_that_is_never_called():
    """A LightningModule-like holder whose step calls `self.model.net(x)`: names start at the holder."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))

    tracer = Tracer().install()
    try:
        h = Holder()
        opt = torch.optim.SGD(h.parameters(), lr=0.1)
        h.model.net(torch.randn(4, 2)).sum().backward()
        opt.step()
    finally:
        tracer.uninstall()
    record = TraceRecord.from_plain(tracer.to_record())
    assert record.param_names[:2] == ["model.net.0.weight", "model.net.0.bias"]
    assert record.param_owner["model.net.1.running_mean"] == ("model.net.1", "BatchNorm1d")


def test_a_differing_buffer_is_listed_after_the_parameters_that_differ_with_it():
    kinds = ["param", "buffer", "param"]
    a = TraceRecord(param_names=["w", "bn.running_mean", "v"], opt_indices=[[0, 1, 2]], entries=[("step", 0, 0)],
                    fp=torch.tensor([1, 2, 3]), steps=1, every=1, tensor_kinds=kinds)
    b = TraceRecord(**{**vars(a), "fp": torch.tensor([1, 9, 8])})
    assert first_divergence(a, b).tensors == ["v", "bn.running_mean"]


def test_params_only_leaves_buffers_out():
    """DDP ranks share parameters, not BatchNorm statistics: a cross-rank check compares parameters only."""
    a = TraceRecord(param_names=["w", "bn.running_mean"], opt_indices=[[0, 1]], entries=[("step", 0, 0)],
                    fp=torch.tensor([1, 2]), steps=1, every=1, tensor_kinds=["param", "buffer"])
    b = TraceRecord(**{**vars(a), "fp": torch.tensor([1, 5])})
    assert first_divergence(a, b).tensors == ["bn.running_mean"]
    assert first_divergence(a, b, params_only=True) is None
