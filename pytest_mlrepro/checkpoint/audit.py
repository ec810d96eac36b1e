"""Best-checkpoint checks attached to an audit: after the replicas ran, reload replica 0's best
checkpoint in a fresh process and re-evaluate it, and check that every replica saved the same best."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..checks import REPRODUCIBLE
from ..result import Finding


@dataclass(frozen=True)
class CheckpointSpec:
    """Where a training's best checkpoint lands (relative to the replica's work dir) and how to re-evaluate it.

    ``evaluate`` and ``model_factory`` are ``"module:fn"`` / ``"file.py:fn"`` references (relative
    paths resolve against the audit's rootdir) so the reload runs in a fresh process.
    """

    path: str
    evaluate: str
    model_factory: str
    tolerance: float = 0.0
    monitor: Optional[str] = None
    mode: Optional[str] = None

    @classmethod
    def coerce(cls, value: Union["CheckpointSpec", dict]) -> "CheckpointSpec":
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"checkpoint: unknown key(s) {', '.join(sorted(unknown))}")
            missing = [k for k in ("path", "evaluate", "model_factory") if k not in value]
            if missing:
                raise ValueError(f"checkpoint: missing {', '.join(missing)}")
            return cls(**value)
        raise TypeError(f"checkpoint must be a CheckpointSpec or a dict, got {type(value).__name__}")


def _absolute_reference(ref: str, rootdir: Path) -> str:
    left, sep, right = ref.rpartition(":")
    if sep and (left.endswith(".py") or "/" in left):
        return f"{(rootdir / left).resolve()}:{right}"
    return ref


def check_audit_checkpoint(spec: CheckpointSpec, replica_workdirs: list[Path], *, rootdir: Path,
                           deterministic: bool, timeout: Optional[float]) -> list[Finding]:
    from .reload import check_reload
    from .storage import CheckpointError, load_checkpoint, weights_sha256

    paths = [Path(w) / spec.path for w in replica_workdirs]
    findings = list(check_reload(
        paths[0], evaluate=_absolute_reference(spec.evaluate, rootdir),
        model_factory=_absolute_reference(spec.model_factory, rootdir), tolerance=spec.tolerance,
        deterministic=deterministic and spec.tolerance == 0.0, monitor=spec.monitor, mode=spec.mode,
        timeout=timeout or 300.0))
    for f in findings:  # where training stopped: the last epoch of the logged history
        history = f.details.get("history")
        if history:
            f.details.setdefault("stopped_epoch", history[-1].get("epoch", len(history) - 1))
    metas = []
    for i, p in enumerate(paths):
        try:
            state, meta = load_checkpoint(p)
        except CheckpointError as exc:
            findings.append(Finding(REPRODUCIBLE, "error", f"best checkpoint of replica {i} unusable: {exc}",
                                    {"checkpoint_path": str(p), "replica": i}))
            return findings
        if not meta:
            findings.append(Finding(REPRODUCIBLE, "fail", f"{p}: the best checkpoint of replica {i} has no metadata "
                                    "(epoch, metrics, weights hash) to compare", {"checkpoint_path": str(p), "replica": i}))
            return findings
        meta = dict(meta, weights_sha256=weights_sha256(state))  # what the file holds, not what it claims
        metas.append(meta)
    keys = ("epoch", "weights_sha256", "metrics")
    first = {k: metas[0].get(k) for k in keys}
    for i, meta in enumerate(metas[1:], start=1):
        other = {k: meta.get(k) for k in keys}
        if other != first:
            differing = [k for k in keys if other[k] != first[k]]
            findings.append(Finding(REPRODUCIBLE, "fail",
                                    f"replicas 0 and {i} saved different best checkpoints ({', '.join(differing)} differ: "
                                    f"epoch {first['epoch']} vs {other['epoch']})",
                                    {"checkpoint_paths": [str(p) for p in paths], "replica": i, "differing": differing}))
            return findings
    findings.append(Finding(REPRODUCIBLE, "pass",
                            f"all {len(paths)} replicas saved the same best checkpoint (epoch {first['epoch']}, "
                            f"weights sha256 {str(first['weights_sha256'])[:12]}…)", {"checkpoint_paths": [str(p) for p in paths]}))
    return findings
