"""`pytest --mlrepro examples/`: the deterministic examples pass and the broken ones fail with a
message naming step, tensor, module and cause (a subset, to keep the suite fast; tests/
test_audit_fixtures.py audits every fixture through the API)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_examples_pass_the_deterministic_and_fail_the_broken(pytester: pytest.Pytester):
    shutil.copytree(ROOT / "fixtures", pytester.path / "fixtures")
    shutil.copytree(ROOT / "examples", pytester.path / "examples")
    result = pytester.runpytest_subprocess(
        "--mlrepro", "--mlrepro-wandb=disabled", "--mlrepro-isolation=forkserver", "-p", "no:cacheprovider",
        "examples/test_examples.py",
        "-k", "mlp_dropout or time_seed or nondeterministic_cpu_kernel or best_checkpoint")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines([
        "*fixtures/time_seed.py: NOT deterministic; step 0: the initial weights already differ*`0.weight`*of `0` (Linear)*"
        "likely cause: time_seed*",
        "*forward of `mix` (ChunkedMix) differs; its inputs matched*nondeterministic_kernel*",
        "*best_checkpoint.history] fail: *the metrics stored with the best checkpoint (epoch 5) are those of epoch 8*",
    ])
