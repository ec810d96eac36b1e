"""Causes confirmed by controlled reruns: each leak fixture audited for real (in-process: tiny and
cheap; the hash-seed control, which needs processes, is checked on fixtures/hash_order.py by
tests/test_audit_fixtures.py), a deterministic program runs no reruns, the controls undo themselves."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from pytest_mlrepro import audit, controls

ROOT = Path(__file__).resolve().parent.parent
LEAKS = ROOT / "fixtures" / "leaks"

# script -> (cause, confirming control, text the detail must hold, text it must not)
EXPECTED = {
    "numpy_default_rng.py": ("unseeded_rng", "numpy_unseeded", "numpy Generator created without a seed at", "time_seed"),
    "numpy_random_state.py": ("unseeded_rng", "numpy_unseeded", "numpy RandomState created without a seed at", None),
    "random_in_loss.py": ("unseeded_rng", "python_rng", "random.Random() instance created without a seed at", None),
    "sampler_random.py": ("data_order", "python_rng", "random.Random(seed)", "pass generator="),
    "time_seeded.py": ("time_seed", "clock", "datetime.now()", None),
    "uuid_weight.py": ("os_entropy", "entropy", "uuid.uuid4()", None),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    return {name: (audit(str(LEAKS / name), isolation="inprocess", workdir=root / name, rootdir=ROOT), root / name)
            for name in [*EXPECTED, "clean.py"]}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_leak_is_named_and_confirmed_by_rerun(results, name):
    result, workdir = results[name]
    kind, control, says, never = EXPECTED[name]
    cause = result.cause
    assert not result.deterministic and cause is not None, result.explain()
    assert (cause.kind, cause.confirmed, cause.control) == (kind, True, control), result.explain()
    assert "confirmed by rerun" in cause.detail and says in cause.detail, cause.detail
    assert never is None or never not in cause.detail
    if "created without a seed at" in says:  # the call sites: where it was made, where first drawn from
        assert f"created without a seed at {LEAKS / name}:" in cause.detail
        assert "first drawn at " in cause.detail and cause.detail.count(f"{LEAKS / name}:") == 2, cause.detail
    assert cause.reruns[-1]["agreed"] and (workdir / f"{controls.rerun_label(frozenset({control}))}-0").is_dir()
    assert f"likely cause: {kind}" in result.summary_line()
    if name == "uuid_weight.py":  # the program's read of uuid.uuid4 put the entropy control first
        assert len(cause.reruns) == 1 and f"uuid.uuid4() at {LEAKS / name}:" in cause.detail, cause.reruns


def test_a_generator_passed_through_default_rng_is_not_a_seed_value(results):
    result, _ = results["numpy_default_rng.py"]
    cause = result.cause
    assert cause.evidence["rule"] == "unseeded_generator_made"  # not seed_values_differ on two object reprs
    assert "0x" not in cause.detail
    assert f"first drawn at {LEAKS / 'numpy_default_rng.py'}:10" in cause.detail  # not the pass-through on line 9


def test_a_deterministic_program_runs_no_reruns(results):
    result, workdir = results["clean.py"]
    assert result.deterministic and result.cause is None, result.explain()
    assert not list(workdir.glob("control-*")) and not list(workdir.glob("replay-*"))


def test_diagnose_false_opts_out_of_the_reruns(tmp_path):
    result = audit(str(LEAKS / "random_in_loss.py"), isolation="inprocess", workdir=tmp_path, rootdir=ROOT,
                   diagnose=False)
    assert not result.deterministic and result.cause is None
    assert not list(tmp_path.glob("control-*"))


def test_the_controls_leave_nothing_behind(results):
    import numpy as np
    import torch

    originals = (random.Random.seed, random.seed, np.random.default_rng, np.random.RandomState, os.urandom, os.listdir,
                 os.scandir, time.time, time.time_ns, torch.seed, torch.set_num_threads)
    undo = controls.apply(frozenset(controls.BY_NAME) - {"deterministic_kernels"}, seed=0)
    assert os.urandom is not originals[4]
    undo()
    assert (random.Random.seed, random.seed, np.random.default_rng, np.random.RandomState, os.urandom, os.listdir,
            os.scandir, time.time, time.time_ns, torch.seed, torch.set_num_threads) == originals


def test_the_stand_in_random_state_still_accepts_numpys_own(tmp_path):
    """The seed probe (every replica) and the numpy control replace np.random.RandomState: a RandomState
    made before them (numpy's global one, an unpickled one) must still be one, or scipy's and sklearn's
    check_random_state raise in a correct program."""
    import pickle

    import numpy as np

    from pytest_mlrepro.probes import SeedProbe

    made_before, blob = np.random.RandomState(3), pickle.dumps(np.random.RandomState(4))
    for use_probe, use_control in ((True, False), (False, True), (True, True)):
        undo, probe = controls.apply(frozenset({"numpy_unseeded"} if use_control else ()), seed=0), SeedProbe()
        if use_probe:
            probe.install()
        try:
            assert np.random.RandomState is not type(made_before)
            for rs in (made_before, pickle.loads(blob), np.random.mtrand._rand, np.random.RandomState()):
                assert isinstance(rs, np.random.RandomState)
            assert issubclass(type(made_before), np.random.RandomState)
        finally:
            probe.uninstall()
            undo()
        assert np.random.RandomState is type(made_before)


def test_the_deterministic_kernels_control_leaves_no_environment_behind(monkeypatch):
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    undo = controls.apply(frozenset({"deterministic_kernels"}), seed=0)
    assert torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" in os.environ
    undo()
    assert torch.are_deterministic_algorithms_enabled() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_controls_make_their_source_identical_and_only_theirs(tmp_path):
    import datetime
    import uuid

    import numpy as np

    for name in "cab":
        (tmp_path / name).write_text(name)

    def sample():
        return (random.random(), random.Random().random(), np.random.default_rng().random(), np.random.RandomState().rand(),
                time.time(), datetime.datetime.now(), uuid.uuid4(), os.listdir(tmp_path),
                [e.name for e in os.scandir(tmp_path)], random.SystemRandom().random())

    def under(names):
        undo = controls.apply(frozenset(names), seed=3)
        try:
            return sample()
        finally:
            undo()

    everything = ["python_rng", "numpy_unseeded", "clock", "entropy", "listing_order"]
    a, b = under(everything), under(everything)
    assert a[:9] == b[:9] and a[7] == ["a", "b", "c"] == a[8]
    assert a[9] != b[9]  # random.SystemRandom is OS entropy that no control reaches (a kernel stand-in)
    x, y = under(["clock"]), under(["clock"])
    assert x[4:6] == y[4:6] and x[1] != y[1] and x[6] != y[6]  # the clock alone: the rest still varies
    with pytest.raises(ValueError, match="unknown control"):
        controls.validate({"python_rng", "moon_phase"})


def test_a_rerun_is_bounded_even_when_the_audit_has_no_timeout():
    """A control may slow a program down (the fixed clock in a loop waiting for time to pass): without a
    timeout of its own, a rerun gets 4 x the slowest replica plus a minute; the audit's own one wins."""
    from types import SimpleNamespace

    from pytest_mlrepro.auditing import _Audit

    run = _Audit.__new__(_Audit)
    run.result = SimpleNamespace(replicas=[SimpleNamespace(wall_time_s=2.0), SimpleNamespace(wall_time_s=5.0)])
    run.config = SimpleNamespace(timeout=None)
    assert run._rerun_timeout() == 80.0
    run.config = SimpleNamespace(timeout=30.0)
    assert run._rerun_timeout() == 30.0
