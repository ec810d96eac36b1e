"""Shapes of real training code: compiled models, numpy in returned dicts, scripts importing their
siblings, module-level state, a second model first called late, an optimizer created mid-run,
sys.exit(0), global state an in-process replica changes, seeds from the clock through a Generator."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pytest_mlrepro import audit

TARGETS = Path(__file__).resolve().parent / "targets"
CASES = str(TARGETS / "cases.py")
FAST = {"isolation": "forkserver"}  # replicas forked from a warm interpreter: torch imported once per worker


def test_a_compiled_model_is_audited(tmp_path):
    result = audit(f"{CASES}:compiled", workdir=tmp_path, **FAST)
    assert result.deterministic, result.explain()
    assert [t.name for t in result.tensors] == ["_orig_mod.0.weight", "_orig_mod.0.bias", "_orig_mod.2.weight", "_orig_mod.2.bias"]


def test_numpy_and_path_leaves_are_compared_not_crashed(tmp_path):
    result = audit(f"{CASES}:numpy_leaves", workdir=tmp_path, **FAST)
    assert result.error is None, result.explain()
    statuses = {t.name: t.status for t in result.tensors}
    assert statuses["val_acc"] == "equal" and statuses["confusion"] == "equal" and statuses["model.weight"] == "equal"
    assert statuses["path"] == "value_mismatch"  # each replica's workdir differs: reported, not a crash
    assert (result.first_divergence.phase, result.first_divergence.tensor) == ("final", "path")
    assert result.cause.kind == "unknown", result.explain()  # no optimizer step: nothing to blame on the hash seed


def test_a_script_imports_the_modules_beside_it(tmp_path):
    result = audit(str(TARGETS / "scriptdir" / "train_with_helper.py"), args=["--steps", "3"], workdir=tmp_path, **FAST)
    assert result.error is None, result.explain()
    assert result.deterministic and result.replicas[0].steps == 3


@pytest.mark.parametrize("isolation", ["process", "forkserver", "inprocess"])
def test_module_level_state_runs_afresh_in_every_replica(tmp_path, isolation):
    result = audit(f"{CASES}:module_level_data", workdir=tmp_path, isolation=isolation)
    assert result.deterministic, result.explain()


def test_two_files_with_one_name_stay_two_targets_in_process(tmp_path):
    a = audit(f"{TARGETS}/a/train.py:train", workdir=tmp_path / "a", isolation="inprocess")
    b = audit(f"{TARGETS}/b/train.py:train", workdir=tmp_path / "b", isolation="inprocess")
    assert a.tensors[0].shape == [1, 4] and b.tensors[0].shape == [2, 4]


def test_a_model_first_called_after_step_0_is_compared_and_named(tmp_path):
    for mode in ("bitwise", "tolerance"):  # the cause (by reruns) once, in the last mode
        result = audit(f"{CASES}:late_discriminator", workdir=tmp_path / mode, mode=mode, diagnose=mode == "tolerance",
                       **FAST)
        statuses = {t.name: t.status for t in result.tensors}
        assert statuses == {"weight": "equal", "bias": "equal", "Linear[1].weight": "different",
                            "Linear[1].bias": "different"}, statuses
        assert not result.deterministic, result.explain()
    assert result.first_divergence.tensor == "Linear[1].weight" and result.first_divergence.step == 1
    assert result.cause.kind == "time_seed", result.explain()
    assert "torch.Generator.manual_seed" in result.cause.detail


def test_an_optimizer_created_mid_run_reports_its_own_first_step(tmp_path):
    result = audit(f"{CASES}:two_phase", workdir=tmp_path, **FAST)
    div = result.first_divergence
    assert (div.step, div.phase) == (3, "init"), result.explain()
    assert div.tensor == "Sequential[1].1.weight" and "after 3 steps" in div.message  # names fixed at first sight
    assert result.cause.kind == "time_seed"


def test_sys_exit_zero_in_a_function_is_success(tmp_path):
    result = audit(f"{CASES}:exits_zero", workdir=tmp_path, **FAST)
    assert result.error is None and result.deterministic, result.explain()


def test_inprocess_replicas_leave_no_global_state_behind(tmp_path):
    import torch

    before = (torch.get_default_dtype(), torch.get_num_threads(), dict(os.environ), list(sys.path))
    result = audit(f"{CASES}:leaks_global_state", workdir=tmp_path, isolation="inprocess")
    assert result.deterministic
    assert (torch.get_default_dtype(), torch.get_num_threads(), dict(os.environ), list(sys.path)) == before


def test_a_library_generator_does_not_hide_the_unseeded_numpy(tmp_path):
    result = audit(str(TARGETS / "numpy_workers.py"), workdir=tmp_path, **FAST)
    assert not result.deterministic
    assert result.cause.kind == "unseeded_rng", result.explain()
    assert "numpy" in result.cause.detail and "tempfile" not in result.cause.detail


def test_the_cli_passes_the_args_after_double_dash_to_scripts_only(tmp_path, capsys):
    # a bad target is a usage error before any audit (exit 2): tests/test_cli.py
    from pytest_mlrepro.cli import main

    code = main(["audit", "fixtures/mlp_dropout.py:train", str(TARGETS / "scriptdir" / "train_with_helper.py"),
                 "--isolation", "inprocess", "--wandb", "disabled", "--out", str(tmp_path), "--", "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "fixtures/mlp_dropout.py:train: deterministic" in out
    assert "train_with_helper.py: deterministic" in out
    assert (tmp_path / "report.json").is_file()


def test_mlrepro_publish_names_a_bad_spec_and_fails(tmp_path, capsys):
    from pytest_mlrepro.cli import main

    assert main(["publish", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["publish", str(tmp_path / "bad.json")]) == 1
    assert "not JSON" in capsys.readouterr().err


def test_mlrepro_audit_usage_errors(capsys):
    from pytest_mlrepro.cli import main

    assert main(["audit"]) == 2
    assert "nothing to audit" in capsys.readouterr().err
    assert main(["audit", "x.py", "--expect"]) == 2
    assert "--expect needs --catalog" in capsys.readouterr().err
