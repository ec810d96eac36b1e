"""Shared helpers for the checkpoint tests: the training fixture loaded by path, trained once."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_FILE = ROOT / "fixtures" / "checkpoint_training.py"
EVALUATE = f"{FIXTURE_FILE}:evaluate"
MODEL_FACTORY = f"{FIXTURE_FILE}:make_model"

os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_training_module():
    name = "mlrepro_checkpoint_training_fixture"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FIXTURE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def training():
    return load_training_module()


@pytest.fixture(scope="session")
def good_run(training, tmp_path_factory):
    return training.train(tmp_path_factory.mktemp("good"), fsync=False)


@pytest.fixture(scope="session")
def broken_run(training, tmp_path_factory):
    return training.train(tmp_path_factory.mktemp("broken"), broken=True, fsync=False)
