"""``pytest --mlrepro --mlrepro-target=prog.py``: one item per check of each target, one audit per target,
pass and fail right both ways; the item verdicts as a rule table over typed records."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_mlrepro.config import BY_NAME
from pytest_mlrepro.result import AuditError, AuditResult, Finding
from pytest_mlrepro.target_items import OTHER_ITEM, REPRODUCIBLE_ITEM, item_checks, judge

pytest_plugins = ["pytester"]
TINY = Path(__file__).resolve().parent / "targets" / "cli_tiny_train.py"
UNSEEDED = """import torch
model = torch.nn.Linear(2, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    opt.zero_grad()
"""


def test_targets_may_be_repeated_and_comma_separated():
    assert BY_NAME["target"].check(["a.py", "b.py:train, pkg.mod:fit", "a.py"]) == (
        "a.py", "b.py:train", "pkg.mod:fit", "a.py")
    assert BY_NAME["target"].from_text("a.py,b.py") == ("a.py", "b.py")
    with pytest.raises(ValueError, match="at least one target"):
        BY_NAME["target"].check([" , "])


def _result(**kw) -> AuditResult:
    base = dict(target="t.py", seed=0, runs=2, device="cpu", isolation="process", seeding="program",
                comparison={"mode": "bitwise"}, deterministic=True)
    return AuditResult(**{**base, **kw})


def test_every_check_an_audit_reports_has_an_item_and_the_fixture_only_ones_none():
    names = item_checks()
    assert "training.metrics" in names and "weights.finite" in names
    assert not {"baseline.regression", "commits.compare", "comparator.direction"} & set(names)


CHECK = "weights.finite"
JUDGE_TABLE = [  # (item, result, outcome, words in the message)
    (REPRODUCIBLE_ITEM, _result(), "pass", "deterministic"),
    (REPRODUCIBLE_ITEM, _result(deterministic=False), "fail", "NOT deterministic"),
    (REPRODUCIBLE_ITEM, _result(error=AuditError("ExitStatus", "status 3")), "fail", "status 3"),
    (CHECK, _result(error=AuditError("ExitStatus", "status 3")), "skip", "did not run"),
    (CHECK, _result(), "pass", "no finding"),
    (CHECK, _result(findings=[Finding(CHECK, "pass", "all finite")]), "pass", "all finite"),
    (CHECK, _result(findings=[Finding(CHECK, "skip", "no float tensors")]), "skip", "no float tensors"),
    (CHECK, _result(deterministic=False, findings=[Finding(CHECK, "fail", "NaN in w")]), "fail", "[weights.finite] fail: NaN in w"),
    (CHECK, _result(findings=[Finding("training.metrics", "fail", "a string")]), "pass", "no finding"),
    (OTHER_ITEM, _result(findings=[Finding("someone.new", "error", "it broke")]), "fail", "[someone.new] error: it broke"),
    (OTHER_ITEM, _result(findings=[Finding(CHECK, "fail", "NaN in w")]), "pass", "no finding"),  # its own item fails
]


@pytest.mark.parametrize("name, result, outcome, words", JUDGE_TABLE)
def test_each_item_judges_only_its_own_check(name, result, outcome, words):
    got, message = judge(name, result)
    assert got == outcome and words in message


def test_a_missing_target_is_a_usage_error_and_without_mlrepro_the_items_skip(pytester):
    result = pytester.runpytest_inprocess("--mlrepro", "--mlrepro-target=nowhere.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "nowhere.py does not exist" in result.stderr.str()
    shutil.copy(TINY, pytester.path / "good.py")
    result = pytester.runpytest_inprocess("--mlrepro-target=good.py", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2 + len(item_checks()))


def test_targets_become_items_that_pass_and_fail_right_both_ways(pytester):
    shutil.copy(TINY, pytester.path / "good.py")
    pytester.makepyfile(bad=UNSEEDED)
    result = pytester.runpytest_subprocess(
        "--mlrepro", "--mlrepro-target=good.py,bad.py", "--mlrepro-target=good.py", "--mlrepro-isolation=inprocess",
        "--mlrepro-deterministic=false", "--mlrepro-wandb=disabled", "-p", "no:cacheprovider", "-v")
    per_target = 2 + len(item_checks())
    result.assert_outcomes(passed=2 * per_target - 1, failed=1)
    result.stdout.fnmatch_lines_random([
        "mlrepro::good.py::reproducible PASSED*", "mlrepro::good.py::weights.finite PASSED*",
        "mlrepro::good.py::other-checks PASSED*", "mlrepro::bad.py::reproducible FAILED*",
        "mlrepro::bad.py::training.metrics PASSED*"])
    out = result.stdout.str()
    assert "bad.py: NOT deterministic" in out and "unseeded" in out
    assert out.count("2 audit(s)") == 1  # one audit per target, shared by its items (good.py given twice)


def test_an_audit_that_raises_is_run_once_not_once_per_item(pytester):
    shutil.copy(TINY, pytester.path / "good.py")
    pytester.makeconftest("""
import pytest_mlrepro.auditing as auditing
calls = []

def broken(*args, **kwargs):
    calls.append(1)
    raise RuntimeError("an internal error")

real, auditing.audit = auditing.audit, broken

def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"audits run: {len(calls)}")

def pytest_unconfigure(config):
    auditing.audit = real
""")
    result = pytester.runpytest_inprocess("--mlrepro", "--mlrepro-target=good.py", "--mlrepro-wandb=disabled",
                                          "-p", "no:cacheprovider", "-rf", "--tb=line")
    result.assert_outcomes(failed=2 + len(item_checks()))
    result.stdout.fnmatch_lines(["audits run: 1"])
    assert result.stdout.str().count("- RuntimeError: an internal error") == 2 + len(item_checks())  # each item says why
