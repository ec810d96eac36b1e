"""Hand-built AuditResults covering every verdict, for the publishing tests.

What the engine would produce (the same dataclasses), built by hand so the tests pin the
publishers and not the audit. The checkpoint file itself is written by the tests (torch.save).
"""
from __future__ import annotations

from pathlib import Path

from pytest_mlrepro.result import (
    AuditError,
    AuditResult,
    Cause,
    Divergence,
    Finding,
    NondeterministicOp,
    ReplicaSummary,
    TensorDiff,
)

ENV = {"torch": "2.13.0", "python": "3.11.7", "device": "cpu", "threads": 1, "deterministic_algorithms": True}


def make_deterministic() -> AuditResult:
    metrics = [{"step": 4 * (e + 1), "epoch": e, "loss": 1.0 / (e + 1), "acc": 0.5 + 0.1 * e} for e in range(3)]
    return AuditResult(
        target="tests/test_train.py::test_mlp",
        seed=1234,
        runs=2,
        device="cpu",
        isolation="subprocess",
        seeding="harness",
        comparison={"mode": "bitwise"},
        deterministic=True,
        tensors=[
            TensorDiff("fc.weight", "equal", [4, 3], [4, 3], "torch.float32", "torch.float32", 0.0, 0, 0.0, 12),
            TensorDiff("fc.bias", "equal", [4], [4], "torch.float32", "torch.float32", 0.0, 0, 0.0, 4),
        ],
        environment=ENV,
        replicas=[ReplicaSummary(i, 0.5 + i, 12, {"mode": "harness", "seed": 1234}, [dict(m) for m in metrics],
                                 [0.9, 0.8], ENV) for i in range(2)],
        wall_time_s=1.25,
    )


def make_nondeterministic() -> AuditResult:
    m0 = [{"step": s, "epoch": None, "loss": 2.0 - 0.1 * s} for s in range(6)]
    m1 = [{"step": s, "epoch": None, "loss": 2.0 - 0.1 * s + (0.0 if s < 3 else 0.01 * (s - 2))} for s in range(6)]
    return AuditResult(
        target="examples/unseeded.py:train",
        seed=7,
        runs=2,
        device="cpu",
        isolation="subprocess",
        seeding="program",
        comparison={"mode": "bitwise"},
        deterministic=False,
        first_divergence=Divergence(
            step=3, tensor="net.0.weight", tensors=["net.0.weight", "net.0.bias"], phase="forward",
            module="net.1", module_type="Dropout", inputs_matched=True,
            message="first divergence at step 3 in net.1 (Dropout), forward",
        ),
        cause=Cause("unseeded_rng", "torch's global RNG is used by Dropout but never seeded",
                    {"rng": "torch", "module": "net.1"}),
        tensors=[
            TensorDiff("net.0.weight", "different", [8, 4], [8, 4], "torch.float32", "torch.float32", 0.0123, 98765, 0.75, 32),
            TensorDiff("net.0.bias", "different", [8], [8], "torch.float32", "torch.float32", 1.5e-5, 120, 0.25, 8),
            TensorDiff("net.2.weight", "equal", [1, 8], [1, 8], "torch.float32", "torch.float32", 0.0, 0, 0.0, 8),
        ],
        nondeterministic_ops=[NondeterministicOp("aten::index_add_", "examples/unseeded.py:41", 6)],
        environment=ENV,
        replicas=[ReplicaSummary(0, 0.7, 6, None, m0, [], ENV), ReplicaSummary(1, 0.7, 6, None, m1, [], ENV)],
        step_divergence=[
            {"step": s, "max_abs_diff_sampled": (0.0 if s < 3 else 3e-7 * 10 ** (s - 3)), "tensors_differing": (0 if s < 3 else min(2, s - 2))}
            for s in range(6)
        ],
        wall_time_s=2.5,
    )


HISTORY = [
    {"epoch": 0, "val_loss": 0.9, "val_acc": 0.60, "train_loss": 1.00},
    {"epoch": 1, "val_loss": 0.5, "val_acc": 0.75, "train_loss": 0.70},
    {"epoch": 2, "val_loss": 0.4, "val_acc": 0.80, "train_loss": 0.50},
    {"epoch": 3, "val_loss": 0.45, "val_acc": 0.79, "train_loss": 0.40},
    {"epoch": 4, "val_loss": 0.47, "val_acc": 0.78, "train_loss": 0.35},
]


def make_with_checkpoint(checkpoint_path: Path) -> AuditResult:
    recorded = {"val_loss": 0.4, "val_acc": 0.8, "train_loss": 0.5}
    metrics = [dict(h, step=10 * (h["epoch"] + 1)) for h in HISTORY]
    return AuditResult(
        target="tests/test_ckpt.py::test_best_checkpoint[lightning]",
        seed=0,
        runs=2,
        device="cpu",
        isolation="subprocess",
        seeding="harness",
        comparison={"mode": "bitwise"},
        deterministic=True,
        tensors=[TensorDiff("layer.weight", "equal", [2, 2], [2, 2], "torch.float32", "torch.float32", 0.0, 0, 0.0, 4)],
        environment=ENV,
        replicas=[ReplicaSummary(i, 1.0, 50, None, [dict(m) for m in metrics], [], ENV) for i in range(2)],
        findings=[
            Finding("best_checkpoint.reload", "pass", "the saved best checkpoint reproduces val_loss=0.4 at epoch 2", {
                "checkpoint_path": str(checkpoint_path), "monitor": "val_loss", "mode": "min", "best_epoch": 2,
                "recorded_metrics": recorded, "reevaluated_metrics": dict(recorded), "tolerance": 1e-6,
            }),
            Finding("best_checkpoint.history", "pass", "epoch 2 is the argmin of val_loss", {
                "monitor": "val_loss", "mode": "min", "best_epoch": 2, "argbest_epoch": 2, "history": HISTORY,
                "stopped_epoch": 4,
            }),
            Finding("early_stopping.conformance", "fail",
                    "EarlyStopping (monitor 'val_loss') disagrees with the reference semantics on stop_epoch", {
                "callback": "EarlyStopping", "monitor": "val_loss",
                "spec": {"mode": "min", "patience": 1, "min_delta": 0.0},
                "counterexample": [1.0, 1.0, 0.5], "differing": ["stop_epoch"],
                "expected": {"epochs_run": 2, "stop_epoch": 1}, "observed": {"epochs_run": 3, "stop_epoch": 2},
            }),
            Finding("comparator.direction", "pass", "val_loss is minimised", {
                "callback": "ModelCheckpoint", "monitor": "val_loss", "expected_mode": "min", "observed_mode": "min",
            }),
        ],
        wall_time_s=3.0,
        test="tests/test_ckpt.py::test_best_checkpoint[lightning]",
    )


def make_checks_only(checkpoint_path: Path) -> AuditResult:
    """What ``mlrepro.check_reload`` records: findings only, no replicas compared."""
    recorded = {"val_loss": 0.25, "val_acc": 0.9}
    return AuditResult(
        target=f"reload:{checkpoint_path.name}", seed=0, runs=0, device="cpu", isolation="-", seeding="-",
        comparison={}, deterministic=True, compared="none", kind="checks", test="tests/test_reload.py::test_reload",
        findings=[Finding("best_checkpoint.reload", "pass", f"{checkpoint_path}: epoch 7 reloaded, reproduces val_loss", {
            "checkpoint_path": str(checkpoint_path), "monitor": "val_loss", "mode": "min", "best_epoch": 7,
            "recorded_metrics": recorded, "reevaluated_metrics": dict(recorded), "tolerance": 0.0,
        })],
    )


def make_error() -> AuditResult:
    return AuditResult(
        target="pkg.train:broken",
        seed=1,
        runs=2,
        device="cpu",
        isolation="subprocess",
        seeding="harness",
        comparison={"mode": "bitwise"},
        deterministic=False,
        error=AuditError("ZeroDivisionError", "division by zero", 1, "Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero\n"),
        environment=ENV,
    )


def make_long(steps: int = 400) -> AuditResult:
    """Many logged rows, so the offline run file spans several 32 KiB blocks."""
    metrics = [{"step": s, "epoch": None, "loss": 1.0 / (s + 1), "lr": 0.1 * 0.99 ** s} for s in range(steps)]
    r = make_deterministic()
    r.target = "tests/test_long.py::test_many_steps"
    r.replicas = [ReplicaSummary(i, 1.0, steps, None, [dict(m) for m in metrics], [], ENV) for i in range(2)]
    return r


def make_missing_checkpoint(tmp_dir: Path) -> AuditResult:
    r = make_with_checkpoint(tmp_dir / "does-not-exist" / "best.pt")
    r.target = "tests/test_ckpt.py::test_checkpoint_deleted"
    return r
