"""The rules that turn observed framework callbacks into findings, table-tested on typed records
(no framework, no training), plus the import patcher and the recorder's guard."""
import json
import math
import sys
import types

import pytest

from pytest_mlrepro import checks
from pytest_mlrepro.observe.hooks import ImportPatcher
from pytest_mlrepro.observe.records import CallbackObservation, Evaluation
from pytest_mlrepro.observe.recorder import Recorder, guarded
from pytest_mlrepro.observe.rules import best_rule, direction_rule, monitors_rule, observed_findings

NAN = math.nan


def obs(framework="lightning", callback="ModelCheckpoint", role="checkpoint", monitor="val_acc", mode="max",
        values=(0.5, 0.7, 0.6), improved=None, group=0, min_delta=0.0, start_from_epoch=0, stopped=None,
        first_epoch=0, kept="best_model_path"):
    """An observation; ``improved`` defaults to what a correct ``mode`` tracker would have flagged."""
    values = list(values)
    if improved is None:
        best, improved = None, []
        for v in values:
            better = not math.isnan(v) and (best is None or (v > best if mode == "max" else v < best))
            improved.append(better)
            best = v if better else best
    evs = [Evaluation(index=i, epoch=first_epoch + i, value=v, improved=f) for i, (v, f) in enumerate(zip(values, improved))]
    return CallbackObservation(framework=framework, callback=callback, role=role, monitor=monitor, mode=mode,
                               group=group, min_delta=min_delta, start_from_epoch=start_from_epoch, evaluations=evs,
                               stopped_index=stopped, kept=kept)


def verdicts(findings):
    return sorted((f.check, f.verdict) for f in findings)


# -- direction -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework, callback, monitor, mode, verdict, fix", [
    ("lightning", "ModelCheckpoint", "val_acc", "min", "fail", "ModelCheckpoint(monitor='val_acc', mode='max')"),
    ("lightning", "EarlyStopping", "val_acc", "max", "pass", None),
    ("transformers", "Trainer", "wer", "max", "fail",
     "TrainingArguments(metric_for_best_model='wer', greater_is_better=False)"),
    ("transformers", "Trainer", "eval_loss", "min", "pass", None),
    ("fastai", "SaveModelCallback", "mae", "max", "fail", "SaveModelCallback(monitor='mae', comp=np.less)"),
    ("keras", "EarlyStopping", "val_auc", "min", "fail", "EarlyStopping(monitor='val_auc', mode='max')"),
    ("keras", "ModelCheckpoint", "my_score", "max", "skip", None),  # not in the direction table: not guessed
    ("fastai", "SaveModelCallback", "mae", None, "skip", None),  # a comparator that is neither less nor greater
])
def test_direction_rule(framework, callback, monitor, mode, verdict, fix):
    f = direction_rule(obs(framework=framework, callback=callback, monitor=monitor, mode=mode))
    assert (f.check, f.verdict) == (checks.FRAMEWORK_DIRECTION, verdict)
    if fix:
        assert f"Fix: {fix}" in f.message
        assert monitor in f.message and "epoch" in f.message


def test_direction_message_names_framework_metric_and_epochs():
    f = direction_rule(obs(mode="min", values=(0.5, 0.7, 0.6)))
    assert f.message.startswith("Lightning ModelCheckpoint(monitor='val_acc') minimises it (Lightning's `mode` "
                                "defaults to 'min' for every metric), but 'val_acc' should be maximised")
    assert "it kept epoch 0 (val_acc=0.5) as best, the best logged was epoch 1 (val_acc=0.7)" in f.message
    assert f.details["expected_mode"] == "max" and f.details["observed_mode"] == "min"


def test_no_monitor_no_direction_finding():
    assert direction_rule(obs(monitor=None)) is None


# -- the kept best ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, check, verdict", [
    ({}, checks.FRAMEWORK_BEST, "pass"),  # a correct tracker keeps the arg-best
    ({"improved": [True, True, True]}, checks.FRAMEWORK_BEST, "fail"),  # kept epoch 2 (0.6), best was epoch 1 (0.7)
    ({"mode": "min"}, checks.FRAMEWORK_BEST, "fail"),  # the wrong direction keeps the worst
    ({"values": (0.5, 0.7, 0.7)}, checks.FRAMEWORK_BEST, "pass"),  # a tie does not improve: first occurrence
    ({"mode": "max", "values": (0.5, 0.55), "min_delta": 0.1, "improved": [True, False]},
     checks.FRAMEWORK_BEST, "pass"),  # the callback's own min_delta is respected
    ({"values": (0.9, 0.5, 0.7), "start_from_epoch": 1, "improved": [False, True, True]},
     checks.FRAMEWORK_BEST, "pass"),  # Keras's start_from_epoch: earlier epochs are not candidates
    ({"values": (NAN, 0.5, 0.7), "improved": [True, False, False]}, checks.FRAMEWORK_NAN, "fail"),  # Keras: NaN first is best
    ({"monitor": "val_loss", "mode": "min", "values": (NAN, 0.9, 1.2), "improved": [True, False, False]},
     checks.FRAMEWORK_NAN, "fail"),  # Lightning ModelCheckpoint keeps a first NaN (scored as inf)
    ({"values": (0.5, NAN, 0.7)}, checks.FRAMEWORK_BEST, "pass"),  # a NaN that never became best is no problem
    ({"monitor": "val_loss", "mode": None, "values": (NAN, 0.5), "improved": [True, False]},
     checks.FRAMEWORK_NAN, "fail"),  # an unnamed comparator that let a NaN in
    ({"values": (0.5, NAN, 0.7), "improved": [True, False, False]}, checks.FRAMEWORK_BEST, "fail"),  # not the NaN's fault
    ({"values": (NAN, NAN), "improved": [False, False]}, checks.FRAMEWORK_BEST, "pass"),  # nothing to keep, nothing kept
])
def test_best_rule(kw, check, verdict):
    f = best_rule(obs(**kw))
    assert (f.check, f.verdict) == (check, verdict), f.message


def test_best_rule_messages():
    f = best_rule(obs(improved=[True, True, True]))
    assert ("Lightning ModelCheckpoint(monitor='val_acc') keeps epoch 2 (val_acc=0.6; best_model_path), but the best "
            "'val_acc' logged was epoch 1 (val_acc=0.7)") in f.message
    assert (f.details["kept_epoch"], f.details["argbest_epoch"]) == (2, 1)
    f = best_rule(obs(values=(NAN, 0.5, 0.7), improved=[True, False, False], framework="keras"))
    assert "because of a NaN: 'val_acc' was NaN at epoch 0" in f.message and "TerminateOnNaN" in f.message
    f = best_rule(obs(framework="transformers", callback="Trainer", monitor="wer", mode="max", values=(0.9, 0.8, 0.85),
                      first_epoch=1, kept="state.best_model_checkpoint"))
    assert "Trainer(metric_for_best_model='wer') keeps epoch 1 (wer=0.9; state.best_model_checkpoint)" in f.message
    assert "the best 'wer' logged was epoch 2 (wer=0.8) because it maximises 'wer'" in f.message


def test_best_rule_leaves_other_trackers_and_unknown_directions_alone():
    assert best_rule(obs(role="tracker")) is None
    assert best_rule(obs(monitor="my_score", mode=None)) is None
    # an unknown name: the framework's own direction is taken as meant
    assert best_rule(obs(monitor="my_score", mode="max")).verdict == "pass"


# -- checkpointing and early stopping watch the same metric ------------------------------------------------
def test_monitors_rule():
    ck = obs(callback="ModelCheckpoint", monitor="val_acc")
    es = obs(callback="EarlyStopping", role="early_stopping", monitor="val_loss", mode="min", values=(1.0, 0.8, 0.9),
             stopped=2)
    [f] = monitors_rule([ck, es])
    assert (f.check, f.verdict) == (checks.FRAMEWORK_MONITORS, "fail")
    assert "ModelCheckpoint keeps the best 'val_acc' (epoch 1 (val_acc=0.7)) but EarlyStopping watches 'val_loss' " \
           "(training ran until epoch 2)" in f.message
    assert "Fix: EarlyStopping(monitor='val_acc', ...)" in f.message and f.details["stopped_epoch"] == 2
    same = obs(callback="EarlyStopping", role="early_stopping", monitor="val_acc")
    assert verdicts(monitors_rule([ck, same])) == [(checks.FRAMEWORK_MONITORS, "pass")]
    other_run = obs(callback="EarlyStopping", role="early_stopping", monitor="val_loss", mode="min", group=1)
    assert monitors_rule([ck, other_run]) == []  # two trainings: nothing to compare
    assert monitors_rule([ck, obs(role="tracker", monitor="val_loss", mode="min")]) == []
    # a best checkpoint per metric, one of them the stopping metric: correct, nothing fails
    ck_loss = obs(callback="ModelCheckpoint", monitor="val_loss", mode="min", values=(1.0, 0.8, 0.9))
    assert verdicts(monitors_rule([ck, ck_loss, es])) == [(checks.FRAMEWORK_MONITORS, "pass")]


# -- the whole table over records from meta.json ------------------------------------------------------------
def test_observed_findings_from_json_records():
    records = [obs(mode="min").to_dict(), obs(role="early_stopping", callback="EarlyStopping",
                                              values=(0.5, NAN, 0.7)).to_dict()]
    text = json.dumps(records, allow_nan=False)  # NaN travels as a string: strict JSON
    findings = observed_findings(json.loads(text))
    assert verdicts(findings) == sorted([(checks.FRAMEWORK_DIRECTION, "fail"), (checks.FRAMEWORK_BEST, "fail"),
                                         (checks.FRAMEWORK_DIRECTION, "pass"), (checks.FRAMEWORK_BEST, "pass"),
                                         (checks.FRAMEWORK_MONITORS, "pass")])
    json.dumps([f.details for f in findings], allow_nan=False)
    assert CallbackObservation.from_dict(json.loads(text)[1]).evaluations[1].value != CallbackObservation.from_dict(
        json.loads(text)[1]).evaluations[1].value  # NaN came back as NaN
    assert all(c in checks.ALL for c in (checks.FRAMEWORK_DIRECTION, checks.FRAMEWORK_BEST, checks.FRAMEWORK_NAN,
                                         checks.FRAMEWORK_MONITORS))


def test_correct_callbacks_give_no_failing_finding():
    records = [obs(), obs(callback="EarlyStopping", role="early_stopping", stopped=2),
               obs(framework="transformers", callback="Trainer", monitor="eval_wer", mode="min", values=(0.9, 0.8, 0.85),
                   first_epoch=1)]
    findings = observed_findings(records)
    assert findings and all(f.verdict == "pass" for f in findings)


# -- the import patcher and the recorder ------------------------------------------------------------------
def test_import_patcher_patches_at_import_never_imports_and_restores(tmp_path, monkeypatch):
    (tmp_path / "mlrepro_fake_fw.py").write_text("class Callback:\n    def step(self):\n        return 'real'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def patch(module, patches):
        patches.wrap(module.Callback, "step", lambda original: lambda self: ("patched", original(self)))
        seen.append(module.__name__)

    patcher = ImportPatcher({"mlrepro_fake_fw": patch, "mlrepro_never_imported": patch})
    patcher.install()
    try:
        assert "mlrepro_fake_fw" not in sys.modules and "mlrepro_never_imported" not in sys.modules
        import mlrepro_fake_fw

        assert mlrepro_fake_fw.Callback().step() == ("patched", "real") and seen == ["mlrepro_fake_fw"]
    finally:
        patcher.uninstall()
    assert mlrepro_fake_fw.Callback().step() == "real"
    assert "mlrepro_never_imported" not in sys.modules
    patcher.install()  # already imported: patched at install time
    try:
        assert mlrepro_fake_fw.Callback().step() == ("patched", "real")
    finally:
        patcher.uninstall()
        del sys.modules["mlrepro_fake_fw"]


def test_a_patch_or_a_record_that_fails_never_reaches_the_program():
    module = types.ModuleType("mlrepro_fake_broken")
    sys.modules[module.__name__] = module
    try:
        patcher = ImportPatcher({module.__name__: lambda m, p: m.NoSuchClass})
        patcher.install()
        patcher.uninstall()
        assert patcher.problems and "AttributeError" in patcher.problems[0]
    finally:
        del sys.modules[module.__name__]
    rec = Recorder()

    @guarded(rec)
    def record():
        raise KeyError("best_score")

    assert record() is None and "KeyError" in rec.problems[0]


def test_stopped_epoch_is_an_int_or_absent():
    """Publishers read details["stopped_epoch"] as an int epoch: a fractional HF epoch is left out."""
    whole = obs(role="early_stopping", callback="EarlyStopping", stopped=1)
    assert best_rule(whole).details["stopped_epoch"] == 1
    fractional = obs(role="early_stopping", callback="EarlyStopping", stopped=1)
    fractional.evaluations[1].epoch = 1.5
    assert best_rule(fractional).details["stopped_epoch"] is None


def test_two_training_runs_never_share_a_group_even_when_an_id_is_reused():
    class Run:  # a Trainer / model / Learner stand-in, freed after its run
        pass

    recorder = Recorder()
    groups = set()
    for _ in range(20):  # CPython hands a freed object's address to the next one of its size
        run = Run()
        groups.add(recorder.group(run))
        assert recorder.group(run) == recorder.group(run)
        del run
    assert len(groups) == 20  # one group per run


def test_a_keras_initial_value_threshold_no_epoch_beat_is_no_failure():
    # ModelCheckpoint(save_best_only=True, initial_value_threshold=0.3): nothing beat 0.3, nothing was saved
    o = obs(framework="keras", monitor="val_loss", mode="min", values=(0.5, 0.4), improved=[False, False],
            kept="saved file")
    o.baseline = 0.3
    assert best_rule(o).verdict == "pass"
    back = CallbackObservation.from_dict(json.loads(json.dumps(o.to_dict())))
    assert back.baseline == 0.3 and best_rule(back).verdict == "pass"
    o.baseline = 0.45  # 0.4 beat it and was not kept: still found
    assert best_rule(o).verdict == "fail"
