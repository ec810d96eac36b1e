"""Framework callbacks observed in real tiny trainings (fixtures/frameworks_callbacks/), unmodified:
a planted misconfiguration is found from the run, the correct configuration gets no failing finding.

Each framework trains in this process under the replica's own probe (``CallbackProbe``), all its variants
in one test, so a framework is imported once per suite, with or without xdist; Lightning's test also
runs ``mlrepro audit`` end to end.
"""
import json
import os
import runpy
import sys
from pathlib import Path

import pytest

from pytest_mlrepro import checks
from pytest_mlrepro.observe.probe import CallbackProbe
from pytest_mlrepro.observe.rules import observed_findings

pytestmark = pytest.mark.frameworks

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "frameworks_callbacks"
FRAMEWORKS = {  # fixture -> module the fixture needs
    "lightning": "pytorch_lightning", "keras": "keras", "transformers": "transformers", "fastai": "fastai",
}


def observe(script: Path, argv: list, cwd: Path) -> tuple:
    """Run ``script`` as ``__main__`` with the probe installed, as a replica does; (observations, findings)."""
    probe, saved = CallbackProbe(), (list(sys.argv), os.getcwd())
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    sys.argv = [str(script), *argv]
    probe.install()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        probe.uninstall()
        sys.argv, _ = saved[0], os.chdir(saved[1])
    data = probe.to_dict()
    assert data["problems"] == []
    return data["observations"], observed_findings(data["observations"])


def observe_variants(name: str, tmp: Path, variants: tuple) -> dict:
    pytest.importorskip(FRAMEWORKS[name])
    script = FIXTURES / f"{name}_best.py"
    return {variant: observe(script, argv, tmp / variant) for variant, argv in variants}


CORRECT_AND_PLANTED = (("correct", []), ("planted", ["--planted"]))


def _failing(findings):
    return {(f.check, f.details.get("callback")) for f in findings if f.verdict in ("fail", "error")}


def check_correct(name, runs):
    """The correct configuration gets pass findings only."""
    observations, findings = runs["correct"]
    assert observations, f"{name}: no callback observed"
    assert all(len(o["evaluations"]) >= 3 for o in observations)
    assert _failing(findings) == set(), [f.message for f in findings]
    assert {f.check for f in findings} >= {checks.FRAMEWORK_DIRECTION, checks.FRAMEWORK_BEST}
    assert all(f.verdict == "pass" for f in findings)


PLANTED = {  # what each planted fixture gets wrong
    "lightning": {(checks.FRAMEWORK_DIRECTION, "ModelCheckpoint"), (checks.FRAMEWORK_BEST, "ModelCheckpoint"),
                  (checks.FRAMEWORK_MONITORS, None)},
    "keras": {(checks.FRAMEWORK_DIRECTION, "ModelCheckpoint"), (checks.FRAMEWORK_BEST, "ModelCheckpoint"),
              (checks.FRAMEWORK_DIRECTION, "EarlyStopping"), (checks.FRAMEWORK_BEST, "EarlyStopping")},
    "transformers": {(checks.FRAMEWORK_DIRECTION, "Trainer"), (checks.FRAMEWORK_BEST, "Trainer")},
    "fastai": {(checks.FRAMEWORK_DIRECTION, "SaveModelCallback"), (checks.FRAMEWORK_BEST, "SaveModelCallback"),
               (checks.FRAMEWORK_DIRECTION, "EarlyStoppingCallback"), (checks.FRAMEWORK_BEST, "EarlyStoppingCallback")},
}
FIX = {
    "lightning": "Fix: ModelCheckpoint(monitor='val_acc', mode='max')",
    "keras": "Fix: ModelCheckpoint(monitor='val_mae', mode='min')",
    "transformers": "Fix: TrainingArguments(metric_for_best_model='wer', greater_is_better=False)",
    "fastai": "Fix: SaveModelCallback(monitor='mae', comp=np.less)",
}


def check_planted(name, runs):
    """The planted misconfiguration is found from the run."""
    observations, findings = runs["planted"]
    assert _failing(findings) == PLANTED[name], [f.message for f in findings]
    [direction] = [f for f in findings if f.check == checks.FRAMEWORK_DIRECTION and f.verdict == "fail"
                   and f.details["callback"] in ("ModelCheckpoint", "Trainer", "SaveModelCallback")]
    assert FIX[name] in direction.message and "should be" in direction.message
    # the kept epoch is the one the framework really kept: the first evaluation (the worst under the right direction)
    [best] = [f for f in findings if f.check == checks.FRAMEWORK_BEST and f.details["callback"] == direction.details["callback"]]
    assert best.details["kept_epoch"] == best.details["epochs"][0] != best.details["argbest_epoch"]


def check_kept(name, runs):
    """The record says which file/checkpoint the framework kept, and it is the kept evaluation's."""
    by_callback = {o["callback"]: o for o in runs["planted"][0]}
    if name == "lightning":
        assert by_callback["ModelCheckpoint"]["config"]["best_model_path"].startswith("epoch=0-")
        assert by_callback["EarlyStopping"]["monitor"] == "val_loss"
    elif name == "transformers":
        trainer = by_callback["Trainer"]
        first = trainer["evaluations"][0]
        assert trainer["config"]["best_model_checkpoint"] == f"checkpoint-{first['step']}"
        assert trainer["config"]["greater_is_better"] is True
    elif name == "keras":
        assert by_callback["EarlyStopping"]["stopped_index"] is not None  # it stopped early on the wrong best
    else:
        assert by_callback["EarlyStoppingCallback"]["stopped_index"] is not None


def check_lightning_nan(runs):
    """val_loss NaN at epoch 0: EarlyStopping (check_finite) stops there, and ModelCheckpoint's
    best_model_path is that NaN epoch's file."""
    observations, findings = runs["nan"]
    checkpoint = next(o for o in observations if o["callback"] == "ModelCheckpoint")
    assert checkpoint["evaluations"][0]["value"] == "nan" and checkpoint["config"]["best_model_path"].startswith("epoch=0-")
    assert _failing(findings) == {(checks.FRAMEWORK_NAN, "ModelCheckpoint")}, [f.message for f in findings]
    [nan] = [f for f in findings if f.check == checks.FRAMEWORK_NAN]
    assert "keeps epoch 0 (val_loss=nan; best_model_path) because of a NaN" in nan.message
    assert nan.details["stopped_epoch"] == 0 or any(f.details.get("stopped_epoch") == 0 for f in findings)


def check_cli(tmp_path, monkeypatch, capsys):
    """End to end through `mlrepro audit prog.py -- --planted`: the CLI's own main(), in this process
    (in-process replicas; Lightning is imported here already, a subprocess would import it again)."""
    from pytest_mlrepro.cli import main

    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    report = tmp_path / "audit.json"
    rc = main(["audit", str(FIXTURES / "lightning_best.py"), "--isolation", "inprocess", "--wandb", "disabled",
               "--out", str(tmp_path / "out"), "--json", str(report), "--", "--planted"])
    out = capsys.readouterr()
    assert rc == 1, out.out[-3000:] + out.err[-3000:]
    result = json.loads(report.read_text())
    assert result["deterministic"] is True  # the exit status comes from the findings alone
    failing = [f for f in result["findings"] if f["verdict"] == "fail"]
    assert {f["check"] for f in failing} == {checks.FRAMEWORK_DIRECTION, checks.FRAMEWORK_BEST, checks.FRAMEWORK_MONITORS}
    assert any("ModelCheckpoint(monitor='val_acc') minimises it" in f["message"] for f in failing)
    assert "framework.direction" in out.out + out.err


@pytest.mark.parametrize("name", ["keras", "transformers", "fastai"])
def test_observed_in_the_real_run(name, tmp_path):
    runs = observe_variants(name, tmp_path, CORRECT_AND_PLANTED)
    check_correct(name, runs)
    check_planted(name, runs)
    check_kept(name, runs)


def test_lightning_observed_in_the_real_run_and_through_the_cli(tmp_path, monkeypatch, capsys):
    runs = observe_variants("lightning", tmp_path, CORRECT_AND_PLANTED + (("nan", ["--nan"]),))
    check_correct("lightning", runs)
    check_planted("lightning", runs)
    check_kept("lightning", runs)
    check_lightning_nan(runs)
    check_cli(tmp_path / "cli", monkeypatch, capsys)
