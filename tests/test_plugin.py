"""The pytest plugin, driven through pytester: flag off and on, marker, fixture, skip reason,
header, summary, options precedence, xdist, and that loading it imports neither torch nor wandb."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = (Path(__file__).resolve().parent / "targets" / "tiny.py").read_text()

MARKED = """
import pytest

@pytest.mark.mlrepro("tiny.py:train", isolation="inprocess")
def test_deterministic():
    pass

@pytest.mark.mlrepro("tiny.py:noisy_input", isolation="inprocess")
def test_broken():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(tiny=TINY)
    pytester.makeini("[pytest]\nmlrepro_wandb = disabled\n")
    return pytester


def test_loading_the_plugin_imports_neither_torch_nor_wandb():
    code = ("import sys, pytest_mlrepro, pytest_mlrepro.plugin; "
            "heavy = [m for m in ('torch', 'wandb', 'numpy', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_collect_only_session_with_the_plugin_stays_light(pytester: pytest.Pytester):
    pytester.makepyfile(test_light="""
        import sys
        def test_nothing_heavy_loaded():
            assert "torch" not in sys.modules and "wandb" not in sys.modules
    """)
    result = pytester.runpytest_subprocess("-p", "mlrepro", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_marked_tests_are_skipped_without_the_flag_with_a_reason_naming_it(project):
    project.makepyfile(test_marked=MARKED)
    result = project.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*pass --mlrepro to run them*"])
    assert "mlrepro: seed=" not in result.stdout.str()


def test_fixture_skips_without_the_flag(project):
    project.makepyfile(test_fix="def test_a(mlrepro):\n    raise AssertionError('must not run')\n")
    project.runpytest().assert_outcomes(skipped=1)


def test_with_the_flag_marked_audits_pass_and_fail_with_step_tensor_and_module(project):
    project.makepyfile(test_marked=MARKED)
    result = project.runpytest_subprocess("--mlrepro", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "mlrepro: seed=0 device=auto isolation=process runs=2*",
        "*NOT deterministic; step 1: the batch entering the model differs: the inputs of `0` (Linear)*",
        "*= mlrepro =*",
    ])
    summary = out.split("= mlrepro =")[1]
    assert "tiny.py:train" in summary and "tiny.py:noisy_input" in summary
    assert "nondeterministic" in summary and "deterministic" in summary


def test_the_fixture_gives_the_audit_api_bound_to_the_options(project):
    project.makepyfile(test_fix="""
        def test_audit(mlrepro):
            result = mlrepro.audit("tiny.py:train", isolation="inprocess")
            assert result.deterministic and result.seed == 11
            assert [t.name for t in result.tensors][:2] == ["0.weight", "0.bias"]
            result.assert_deterministic()
    """)
    result = project.runpytest_subprocess("--mlrepro", "--mlrepro-seed", "11", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_options_precedence_marker_over_cli_over_env_over_ini(pytester: pytest.Pytester, monkeypatch):
    pytester.makeini("[pytest]\nmlrepro_seed = 5\nmlrepro_runs = 3\nmlrepro_wandb = disabled\nmlrepro_timeout = 30\n")
    pytester.makepyfile(test_opts="""
        import pytest

        def test_plain(mlrepro):
            o = mlrepro.options
            src = mlrepro.sources
            print("PLAIN", o.seed, o.runs, o.device, o.timeout, src["seed"], src["runs"], src["device"])

        @pytest.mark.mlrepro(seed=8)
        def test_marked(mlrepro):
            print("MARKED", mlrepro.options.seed, mlrepro.sources["seed"])
    """)
    monkeypatch.setenv("MLREPRO_SEED", "6")
    monkeypatch.setenv("MLREPRO_DEVICE", "cpu")
    result = pytester.runpytest("--mlrepro", "--mlrepro-seed", "7", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*PLAIN 7 3 cpu 30.0 command line ini mlrepro_runs MLREPRO_DEVICE", "*MARKED 8 marker"])
    monkeypatch.delenv("MLREPRO_SEED")
    result = pytester.runpytest("--mlrepro", "-s", "-k", "plain")
    result.stdout.fnmatch_lines(["*PLAIN 5 3 cpu 30.0 ini mlrepro_seed*"])


@pytest.mark.parametrize("args, message", [
    (["--mlrepro-device", "tpu"], "mlrepro option device from command line: device must be one of auto, cpu, cuda"),
    (["--mlrepro-seed", "-1"], "seed must be a whole number from 0 to 4294967295, got -1"),
    (["--mlrepro-timeout", "abc"], "mlrepro option timeout"),
    (["--mlrepro-wandb", "sometimes"], "wandb must be one of offline, online, disabled"),
])
def test_bad_option_values_are_usage_errors(pytester: pytest.Pytester, args, message):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_unknown_marker_keywords_are_rejected(project):
    project.makepyfile(test_bad="""
        import pytest

        @pytest.mark.mlrepro("tiny.py:train", sead=3)
        def test_typo():
            pass

        @pytest.mark.mlrepro("tiny.py:train", device="tpu")
        def test_bad_value():
            pass
    """)
    result = project.runpytest("--mlrepro")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*unknown keyword(s) sead*", "*device must be one of auto, cpu, cuda*"])


def test_the_marker_is_registered_with_its_signature(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.mlrepro(target=None, *, seed=0, device='auto'*"])
    pytester.makepyfile(test_m="import pytest\n@pytest.mark.mlrepro\ndef test_x():\n    pass\n")
    pytester.runpytest("--strict-markers").assert_outcomes(skipped=1)


def test_disabling_the_plugin_removes_its_options_and_skip(pytester: pytest.Pytester):
    pytester.makepyfile(test_m="import pytest\n@pytest.mark.mlrepro\ndef test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:mlrepro", "--mlrepro")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    pytester.runpytest("-p", "no:mlrepro").assert_outcomes(passed=1)


def test_no_summary_section_when_there_is_nothing_to_say(project):
    project.makepyfile(test_x="def test_x():\n    pass\n")
    result = project.runpytest("--mlrepro")
    result.assert_outcomes(passed=1)
    assert "= mlrepro =" not in result.stdout.str()


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["no-xdist", "xdist-2"])
def test_report_and_junit_carry_every_audit(project, xdist, tmp_path):
    if xdist:
        pytest.importorskip("xdist")
    project.makepyfile(test_marked=MARKED)
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    result = project.runpytest_subprocess("--mlrepro", f"--mlrepro-report={report}", f"--junitxml={junit}",
                                          "-p", "no:cacheprovider", *xdist)
    result.assert_outcomes(passed=1, failed=1)
    doc = json.loads(report.read_text())
    verdicts = sorted((a["target"], a["verdict"]) for a in doc["audits"])
    assert verdicts == [("tiny.py:noisy_input", "nondeterministic"), ("tiny.py:train", "deterministic")]
    broken = next(a for a in doc["audits"] if a["verdict"] == "nondeterministic")
    assert broken["first_divergence"]["step"] == 1 and broken["test"].endswith("test_broken")
    xml = junit.read_text()
    assert 'name="mlrepro.verdict" value="nondeterministic"' in xml
    assert 'name="mlrepro.verdict" value="deterministic"' in xml


def test_public_api_names_resolve_lazily():
    code = ("import sys, pytest_mlrepro as m; assert 'torch' not in sys.modules; "
            "names = [n for n in m.__all__ if n != '__version__']; [getattr(m, n) for n in names]; "
            "assert m.infer_direction('val_acc') == 'max'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert int(out) >= 14


def test_the_fixture_records_checkpoint_checks_for_the_summary(project):
    project.makepyfile(test_checks="""
        from pytest_mlrepro.checkpoint.conformance import ReferenceEarlyStoppingDriver
        from pytest_mlrepro.checkpoint.oracle import StopSpec

        def test_comparator(mlrepro):
            always_min = lambda: ReferenceEarlyStoppingDriver(StopSpec("min", 1), "val_acc")
            result = mlrepro.check_comparator(always_min, monitor="val_acc", callback="toy.always_min", strict=False)
            assert result.verdict == "failed-checks"
            result.assert_deterministic()
    """)
    result = project.runpytest_subprocess("--mlrepro", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*comparator.direction] fail*", "*= mlrepro =*", "*comparator:val_acc*comparator.direction*fail*"])


def test_a_failing_check_fails_its_test_and_a_passing_one_does_not(project):
    """A check red in the summary must not leave its test green (the test body asserts nothing)."""
    project.makepyfile(test_checks="""
        from pytest_mlrepro.checkpoint.conformance import ReferenceEarlyStoppingDriver
        from pytest_mlrepro.checkpoint.oracle import StopSpec

        def test_wrong_direction(mlrepro):
            mlrepro.check_comparator(lambda: ReferenceEarlyStoppingDriver(StopSpec("min", 1), "val_acc"),
                                     monitor="val_acc", callback="toy.always_min")

        def test_right_direction(mlrepro):
            mlrepro.check_comparator(lambda: ReferenceEarlyStoppingDriver(StopSpec("max", 1), "val_acc"),
                                     monitor="val_acc", callback="toy.max")
    """)
    result = project.runpytest_subprocess("--mlrepro", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*_ test_wrong_direction _*", "comparator:val_acc: [[]comparator.direction[]] fail: toy.always_min minimises*"])


def test_the_audit_function_is_not_shadowed_by_a_submodule():
    code = ("import importlib, pkgutil, pytest_mlrepro; "
            "[importlib.import_module(m.name) for m in pkgutil.iter_modules(pytest_mlrepro.__path__, 'pytest_mlrepro.')]; "
            "assert callable(pytest_mlrepro.audit) and pytest_mlrepro.audit.__name__ == 'audit', pytest_mlrepro.audit")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_audit_option_reaches_the_audit(project):
    project.makepyfile(test_opts="""
        def test_audit(mlrepro):
            result = mlrepro.audit("tiny.py:train")
            env = result.environment
            print("RESULT", result.runs, result.seed, result.isolation, result.device,
                  env["use_deterministic_algorithms"], len(result.replicas), result.step_divergence[-1]["step"])
    """)
    result = project.runpytest_subprocess(
        "--mlrepro", "-s", "-p", "no:cacheprovider", "--mlrepro-runs", "3", "--mlrepro-seed", "4",
        "--mlrepro-isolation", "inprocess", "--mlrepro-device", "cpu", "--mlrepro-deterministic", "false",
        "--mlrepro-trace-every", "2", "--mlrepro-timeout", "120")
    result.assert_outcomes(passed=1)
    # 3 optimizer steps traced every 2nd: the last recorded step is step 2
    result.stdout.fnmatch_lines(["*RESULT 3 4 inprocess cpu False 3 2*"])


def test_wandb_options_place_the_offline_run(project, tmp_path):
    project.makepyfile(test_w="""
        def test_audit(mlrepro):
            mlrepro.audit("tiny.py:train", isolation="inprocess")
    """)
    wdir = tmp_path / "wb"
    wdir.mkdir()
    result = project.runpytest_subprocess("--mlrepro", "-p", "no:cacheprovider", "--mlrepro-wandb", "offline",
                                          f"--mlrepro-wandb-dir={wdir}", "--mlrepro-wandb-project", "proj-x",
                                          "--mlrepro-wandb-tags", "ci,nightly")
    result.assert_outcomes(passed=1)
    from pytest_mlrepro.wandb_offline import read_run

    runs = sorted((wdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_run(runs[0])
    assert run.project == "proj-x" and list(run.tags) == ["ci", "nightly"]
    assert run.summary["verdict"] == "deterministic"


def test_pytest_help_lists_the_options(pytester: pytest.Pytester):
    """pytest --help formats every option's help with argparse (a "%" in one once crashed it)."""
    from pytest_mlrepro.config import TEXT_OPTIONS

    result = pytester.runpytest("--help")
    assert result.ret == 0, result.stderr.str()
    text = result.stdout.str()
    missing = [o.flag for o in TEXT_OPTIONS if f"--mlrepro-{o.flag}" not in text]
    assert not missing and "--mlrepro-trace-every" in text, missing
