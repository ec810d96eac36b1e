"""Fixtures of the publishing tests: sample results (tests/helpers/audit_samples.py), a real
checkpoint file written by torch.save, and one real offline W&B session shared by the W&B tests.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run from anywhere without an install: `pytest tests/publish`
    sys.path.insert(0, str(_ROOT))

from tests.helpers.audit_samples import (  # noqa: E402
    make_checks_only,
    make_deterministic,
    make_error,
    make_long,
    make_missing_checkpoint,
    make_nondeterministic,
    make_with_checkpoint,
)


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "best-epoch=2.pt"
    torch.save({"epoch": 2, "state_dict": {"layer.weight": torch.arange(4, dtype=torch.float32).reshape(2, 2)}}, path)
    return path


@pytest.fixture(scope="session")
def sample_results(checkpoint_file) -> dict:
    """One result of each kind, by name: deterministic, nondeterministic, checkpoint, error."""
    return {
        "deterministic": make_deterministic(),
        "nondeterministic": make_nondeterministic(),
        "checkpoint": make_with_checkpoint(checkpoint_file),
        "error": make_error(),
        "checks": make_checks_only(checkpoint_file),
    }


_WANDB_ENV_CLEARED = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY",
                      "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_JOB_TYPE", "WANDB_NAME", "WANDB_RUN_ID")


@pytest.fixture(scope="session")
def wandb_home(tmp_path_factory):
    """Keep W&B's config, cache and artifact staging in a temp folder, and the user's W&B env out."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for k in _WANDB_ENV_CLEARED:
            mp.delenv(k, raising=False)
        for k, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                       ("WANDB_ARTIFACT_DIR", "artifacts")):
            mp.setenv(k, str(home / sub))
        yield home


class FdCapture:
    """Capture what is written to file descriptors 1 and 2 (by us, wandb or its service process)."""

    def __enter__(self):
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


@pytest.fixture(scope="session")
def published(tmp_path_factory, sample_results, wandb_home, checkpoint_file):
    """One real offline publishing session over every kind of result, shared by the W&B tests."""
    import json
    import time
    from types import SimpleNamespace

    from pytest_mlrepro.publish import PublishConfig, publish_session
    from pytest_mlrepro.wandb_offline import read_run

    root = tmp_path_factory.mktemp("published")
    results = [sample_results[k] for k in ("deterministic", "nondeterministic", "checkpoint", "error", "checks")]
    results += [make_missing_checkpoint(root), make_long()]
    config = PublishConfig(report_path=root / "report.json", wandb_dir=root / "wb", project="mlrepro-tests",
                           group="session-42", tags=("ci", "unit"), job_type="audit")
    session_info = {"command": "pytest --mlrepro tests/", "rootdir": str(_ROOT), "seed": 1234, "exitstatus": 1,
                    "options": {"runs": 2, "device": "cpu", "wandb": "offline"}}
    verdicts_before = [r.verdict for r in results]
    with FdCapture() as cap:
        t0 = time.monotonic()
        outcome = publish_session(results, config, session_info=session_info)
        elapsed = time.monotonic() - t0
    runs = {r.target: read_run(r.run_dir) for r in outcome.wandb_runs}
    return SimpleNamespace(
        root=root, config=config, results=results, outcome=outcome, runs=runs, elapsed=elapsed,
        output=cap.text, verdicts_before=verdicts_before, session_info=session_info,
        report=json.loads((root / "report.json").read_text()), checkpoint=checkpoint_file,
    )
