"""Shared test configuration: paths to the example trainings and a CUDA skip."""
from __future__ import annotations

import os

import pytest

# Replicas inherit this: one intra-op thread keeps the 2-core CI machine from oversubscribing
# when xdist runs two audits side by side (both replicas of an audit still use the same count).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = None
    for item in items:
        if item.get_closest_marker("cuda"):
            if skip is None:
                skip = pytest.mark.skip(reason="needs a CUDA device (none visible to torch)") if not cuda_available() else False
            if skip:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _lean_pytester_sessions(request, monkeypatch):
    """A pytester session loads every installed pytest plugin; hypothesis's imports hypothesis (~1.5 s of
    each session here) and anyio's anyio, neither used by the sessions these tests start."""
    if "pytester" in request.fixturenames:
        extra = "-p no:hypothesispytest -p no:anyio"
        monkeypatch.setenv("PYTEST_ADDOPTS", f"{os.environ.get('PYTEST_ADDOPTS', '')} {extra}".strip())
