"""Regression gates: each audit against its stored baseline (pytest --mlrepro-baseline).

End to end through pytest (a subprocess: torch is involved), then the comparison semantics alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pytest_mlrepro.baseline import store
from pytest_mlrepro.baseline.compare import EXACT, INCOMPARABLE, TOLERANCE, compare
from pytest_mlrepro.baseline.record import SCHEMA, AuditBaseline, Baseline, BaselineError

TRAIN = (Path(__file__).parent / "targets" / "baseline_train.py").read_text()
GATE = ("-p", "no:cacheprovider", "--mlrepro", "--mlrepro-baseline")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(baseline_train=TRAIN)
    # deterministic settings off: they cost a torch._inductor import per run and the gate does not need them
    pytester.makeini("[pytest]\nmlrepro_wandb = disabled\nmlrepro_isolation = inprocess\nmlrepro_deterministic = false\n")
    pytester.makepyfile(test_gate="""
        import pytest

        @pytest.mark.mlrepro("baseline_train.py:train")
        def test_training():
            pass
    """)
    return pytester


def _baseline(pytester) -> Path:
    return pytester.path / "__mlrepro__" / "test_gate" / "test_training.json"


def test_missing_written_then_pass_then_a_change_is_located_then_accepted(project, monkeypatch):
    path = _baseline(project)
    first = project.runpytest_subprocess(*GATE)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines([f"*no baseline yet for test_gate.py::test_training: wrote {path}*"])
    stored = json.loads(path.read_text())
    assert stored["schema"] == SCHEMA and len(stored["audits"]) == 1
    assert stored["audits"][0]["trajectory"]["steps"] == 8 and stored["audits"][0]["final"]

    project.runpytest_subprocess(*GATE).assert_outcomes(passed=1)

    monkeypatch.setenv("MLREPRO_TEST_CHANGE_AT", "3")
    changed = project.runpytest_subprocess(*GATE)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*differs from the baseline from step 3 on: `2.bias` first; metrics moved (loss at step 4: *",
                                  "*audit*metric*at*baseline*obtained*", "*0*val_loss*epoch 2*"])
    obtained = store.obtained_path(path)
    assert obtained.exists() and json.loads(path.read_text()) == stored  # the baseline itself untouched
    assert f"this run written to {obtained}" in changed.stdout.str()

    updated = project.runpytest_subprocess(*GATE, "--mlrepro-update")
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines([f"*mlrepro baseline updated: {path}*"])
    assert not obtained.exists() and json.loads(path.read_text()) != stored
    project.runpytest_subprocess(*GATE).assert_outcomes(passed=1)  # the changed training is the baseline now


def test_another_environment_is_never_compared_exactly(project, monkeypatch):
    path = _baseline(project)
    project.runpytest_subprocess(*GATE, "--mlrepro-update").assert_outcomes(passed=1)
    data = json.loads(path.read_text())
    data["audits"][0]["environment"]["torch"] = "0.0.1-elsewhere"
    path.write_text(json.dumps(data))
    # same numbers, other machine: no tolerance declared -> refused, never a silent exact comparison
    none = project.runpytest_subprocess(*GATE)
    none.assert_outcomes(failed=1)
    none.stdout.fnmatch_lines(["*the environment differs from the baseline's (torch '0.0.1-elsewhere' -> *"
                               "cannot be compared exactly, and no tolerances are declared*"])
    tol = ('--mlrepro-tolerances={"val_loss": {"rtol": 1e-2}, "loss": {"rtol": 1e-2}}')
    project.runpytest_subprocess(*GATE, tol).assert_outcomes(passed=1)
    monkeypatch.setenv("MLREPRO_TEST_CHANGE_AT", "1")
    monkeypatch.setenv("MLREPRO_TEST_SCALE", "40")
    far = project.runpytest_subprocess(*GATE, tol)
    far.assert_outcomes(failed=1)
    far.stdout.fnmatch_lines(["*outside the declared tolerances of its baseline*; loss at step 2: * (atol=0 rtol=0.01)*"])


def test_an_unusable_baseline_is_a_clear_error_and_update_replaces_it(project):
    """End to end for a truncated file; the other unusable kinds are read by the same path (below)."""
    content, message = '{"schema": "pytest-mlrepro/baseline", "version": 1, "audits": [', "is not valid JSON (corrupt or truncated"
    path = _baseline(project)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    bad = project.runpytest_subprocess(*GATE)
    bad.assert_outcomes(failed=1)
    assert message in bad.stdout.str() and str(path) in bad.stdout.str()
    assert "Traceback" not in bad.stdout.str()
    assert path.read_text() == content  # nothing lost without --mlrepro-update
    project.runpytest_subprocess(*GATE, "--mlrepro-update").assert_outcomes(passed=1)
    assert json.loads(path.read_text())["version"] == 1


def test_unused_baselines_are_listed_and_pruned(project):
    project.runpytest_subprocess(*GATE, "--mlrepro-update").assert_outcomes(passed=1)
    stale = _baseline(project).with_name("test_removed_long_ago.json")
    stale.write_text("{}")
    gone_module = project.path / "__mlrepro__" / "test_deleted_module" / "test_x.json"
    gone_module.parent.mkdir()
    gone_module.write_text("{}")
    listed = project.runpytest_subprocess(*GATE)
    listed.assert_outcomes(passed=1)
    listed.stdout.fnmatch_lines(["*2 unused baseline(s) (no test uses them; remove with --mlrepro-prune):*"])
    assert str(stale) in listed.stdout.str() and str(gone_module) in listed.stdout.str()
    assert str(_baseline(project)) not in listed.stdout.str().split("unused baseline(s)")[1]
    # a run of one test by node id says nothing about the module's other baselines
    one = project.runpytest_subprocess(*GATE, "test_gate.py::test_training")
    assert "test_removed_long_ago" not in one.stdout.str()
    project.runpytest_subprocess(*GATE, "--mlrepro-prune").assert_outcomes(passed=1)
    assert not stale.exists() and not gone_module.exists() and _baseline(project).exists()


def test_xdist_workers_updating_at_once_lose_nothing(project):
    project.makepyfile(test_many="""
        import pytest

        @pytest.mark.parametrize("seed", range(4))
        def test_seeded(mlrepro, seed):
            mlrepro.audit("baseline_train.py:train", seed=seed)
    """)
    result = project.runpytest_subprocess(*GATE, "--mlrepro-update", "-n", "4", "test_many.py")
    result.assert_outcomes(passed=4)
    files = sorted((project.path / "__mlrepro__" / "test_many").glob("*.json"))
    assert [f.name for f in files] == [f"test_seeded[{i}].json" for i in range(4)]
    seeds = [json.loads(f.read_text())["audits"][0]["seed"] for f in files]
    assert seeds == list(range(4))
    assert not list((project.path / "__mlrepro__").rglob("*.tmp"))
    for f in files:  # every file whole and readable as a baseline
        assert len(store.read(f).audits) == 1


# -- the comparison alone ---------------------------------------------------------------------------
def _record(fps, *, losses=None, metrics=None, env=None, final=None, best=None) -> AuditBaseline:
    """A baseline of one optimizer over two tensors, ``fps`` = [(fp_a, fp_b) per step]."""
    entries = [["init", 0, 0]] + [["step", i, 0] for i in range(len(fps) - 1)]
    return AuditBaseline(target="t", seed=0, environment=env or {"torch": "x"},
                         trajectory={"param_names": ["a", "b"], "opt_indices": [[0, 1]], "entries": entries,
                                     "fp": [v for pair in fps for v in pair], "steps": len(fps) - 1, "every": 1},
                         losses=list(losses if losses is not None else [1.0] * (len(fps) - 1)),
                         metrics=list(metrics or []), final=dict(final or {"a": "00", "b": "11"}), best_epoch=best)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)), min_size=2, max_size=12),
       st.data())
def test_an_exact_comparison_names_the_first_changed_step_and_tensor(fps, data):
    base = _record(fps)
    assert compare(base, _record(fps)).matched
    step = data.draw(st.integers(1, len(fps) - 1))
    which = data.draw(st.sampled_from([0, 1]))
    changed = [list(p) for p in fps]
    changed[step][which] ^= 1
    changed = [tuple(p) for p in changed]
    c = compare(base, _record(changed))
    assert (c.comparison, c.matched, c.first_step, c.first_tensor) == (EXACT, False, step - 1, "ab"[which])
    assert f"from step {step - 1} on: `{'ab'[which]}` first" in c.message


def test_an_exact_comparison_reports_moved_metrics_final_tensors_and_epochs():
    fps = [(1, 2), (3, 4)]
    base = _record(fps, metrics=[{"step": 0, "epoch": 0, "acc": 0.5}], best=0)
    c = compare(base, _record(fps, metrics=[{"step": 0, "epoch": 0, "acc": 0.6}], final={"a": "00", "b": "12"}, best=1))
    assert not c.matched and c.tensors == ["b"]
    assert "acc at epoch 0: 0.5 -> 0.6" in c.message and "best epoch 0 -> 1" in c.message
    nan = _record(fps, losses=[math.nan])
    assert compare(nan, _record(fps, losses=[math.nan])).matched  # NaN where NaN was is no change


curves = st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(curves, st.data(), st.floats(0, 1), st.integers(0, 3))
def test_a_tolerance_comparison_allows_exactly_allow_failing_points(values, data, rtol, allow):
    obtained = [data.draw(st.floats(-100, 100, allow_nan=False)) for _ in values]
    fps = [(1, 2), (3, 4)]
    base = _record(fps, metrics=[{"epoch": i, "m": v} for i, v in enumerate(values)])
    other = _record(fps, env={"torch": "y"}, metrics=[{"epoch": i, "m": v} for i, v in enumerate(obtained)])
    c = compare(base, other, {"m": {"rtol": rtol, "atol": 0.0, "allow_failing": allow}})
    outside = sum(1 for a, b in zip(values, obtained) if not abs(a - b) <= rtol * abs(a))
    assert c.comparison == TOLERANCE and c.matched == (outside <= allow)
    assert "environment differs" in c.reason and "not compared (no tolerance declared): loss" in c.message


def test_no_tolerances_across_environments_is_incomparable_and_unknown_metrics_are_named():
    fps = [(1, 2), (3, 4)]
    c = compare(_record(fps), _record(fps, env={"torch": "y"}))
    assert (c.comparison, c.matched) == (INCOMPARABLE, False)
    c = compare(_record(fps), _record(fps, env={"torch": "y"}), {"val_acc": {"rtol": 0.1}})
    assert not c.matched and "never logged: val_acc" in c.message


def test_baseline_files_are_validated_and_named_safely(tmp_path):
    assert store.file_name("TestX::test_y[a/b c]") == "TestX.test_y[a_b_c].json"
    assert len(store.file_name("t" * 500)) <= 125
    path = tmp_path / "b.json"
    path.write_text('{"schema": "pytest-mlrepro/baseline", "version": 1, "audits": [{"target": "t"}]}')
    with pytest.raises(BaselineError, match="lacks seed, environment, trajectory, losses, metrics, final"):
        store.read(path)
    for content, message in [('{"schema": "pytest-mlrepro/baseline", "version": 0, "audits": []}',
                              "baseline schema version 0, this pytest-mlrepro reads version 1: rewrite it with --mlrepro-update"),
                             ('{"schema": "something-else"}', "not a pytest-mlrepro baseline (schema 'something-else')"),
                             ('[1, 2]', "not a pytest-mlrepro baseline (schema None)")]:
        path.write_text(content)
        with pytest.raises(BaselineError) as info:
            store.read(path)
        assert str(info.value) == f"{path}: {message}"
    good = Baseline(test="t", audits=[_record([(1, 2), (3, 4)], losses=[math.inf])])
    store.write(path, good)
    assert store.read(path).audits[0].losses == [math.inf]
    truncated = json.loads(path.read_text())
    truncated["audits"][0]["trajectory"]["fp"].pop()
    path.write_text(json.dumps(truncated))
    with pytest.raises(BaselineError, match="the trajectory is truncated"):
        store.read(path)


# -- calibration: tolerances measured from replicas ---------------------------------------------------
def _result_with_replicas(curves):
    """An audit result whose replicas logged ``curves`` (one list of val_loss values per replica)."""
    from pytest_mlrepro.result import AuditResult, ReplicaSummary

    replicas = [ReplicaSummary(index=i, wall_time_s=0.0, steps=2, seeding={}, environment={},
                               metrics=[{"step": None, "epoch": e, "val_loss": v} for e, v in enumerate(c)],
                               losses=list(c)) for i, c in enumerate(curves)]
    r = AuditResult(target="t", seed=0, runs=len(curves), device="cpu", isolation="process", seeding="harness",
                    comparison={}, deterministic=False, replicas=replicas, environment={"torch": "x"})
    r.trajectory = {"param_names": ["a", "b"], "opt_indices": [[0, 1]], "entries": [["init", 0, 0]], "fp": [1, 2],
                    "steps": 0, "every": 1}
    r.final_fingerprints = {"a": "00", "b": "11"}
    return r


def test_calibration_measures_the_spread_and_gates_a_nondeterministic_training_with_it(tmp_path):
    from pytest_mlrepro.baseline.calibrate import calibrate, spread

    result = _result_with_replicas([[1.0, 0.5], [1.0 + 1e-4, 0.5 - 2e-4], [1.0 - 3e-4, 0.5]])
    s = spread(result)
    assert s["val_loss"]["max_abs"] == pytest.approx(3e-4) and s["loss"]["points"] == 2
    path = tmp_path / "b.json"
    entry = calibrate(result, path, test="t::x")
    assert entry.calibration["tolerances"]["val_loss"] == {"atol": pytest.approx(6e-4), "rtol": 0.0, "allow_failing": 0}
    stored = store.read(path).audits[0]
    # same environment, not bitwise equal, but inside the calibrated envelope: passes, saying why
    near = _record([(1, 3)], metrics=[{"epoch": 0, "val_loss": 1.0 + 5e-4}, {"epoch": 1, "val_loss": 0.5}],
                   losses=[1.0 + 5e-4, 0.5])
    near = AuditBaseline(**{**vars(near), "environment": stored.environment, "trajectory": stored.trajectory | {"fp": [1, 3]}})
    c = compare(stored, near)
    assert c.matched and c.comparison == TOLERANCE and "calibrated for a nondeterministic training (3 replicas)" in c.reason
    far = AuditBaseline(**{**vars(near), "losses": [1.1, 0.5]})
    c = compare(stored, far)
    assert not c.matched and "loss at step 0: 1.0 -> 1.1" in c.message
    # a deterministic training calibrates to exact tolerances
    exact = calibrate(_result_with_replicas([[1.0, 0.5]] * 3), tmp_path / "e.json")
    assert all(t["atol"] == 0.0 for t in exact.calibration["tolerances"].values())
    with pytest.raises(BaselineError, match="factor must be a number >= 1"):
        calibrate(result, path, factor=0.5)
    with pytest.raises(BaselineError, match="cannot calibrate audit 5"):
        calibrate(result, path, audit_index=5)


def test_the_calibrate_command_writes_a_baseline_a_gate_reads(tmp_path, capsys):
    """`mlrepro calibrate` on a real training (deterministic: a zero spread calibrates to exact)."""
    from pytest_mlrepro import cli

    target = str(Path(__file__).parent / "targets" / "baseline_train.py") + ":train"
    path = tmp_path / "__mlrepro__" / "test_m" / "test_t.json"
    assert cli.main(["calibrate", target, "--runs", "3", "--isolation", "inprocess", "--deterministic", "false",
                     "--baseline", str(path),
                     "--test", "test_m.py::test_t"]) == 0
    out = capsys.readouterr().out
    assert "calibration of 3 replicas written to" in out and "val_loss: largest spread 0" in out
    entry = store.read(path).audits[0]
    assert entry.calibration["replicas"] == 3 and entry.calibration["tolerances"]["loss"]["atol"] == 0.0
    with pytest.raises(SystemExit) as usage:
        cli.main(["calibrate", target, "--runs", "1", "--baseline", str(path)])
    assert usage.value.code == 2
    assert "runs must be a whole number >= 2, got 1" in capsys.readouterr().err
