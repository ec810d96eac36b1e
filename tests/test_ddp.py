"""DDP audits (``nproc=2``, gloo on the CPU): real torch.distributed programs, one audit per scenario
shared by the tests that read it, and the cross-rank rules on typed records without running anything."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_mlrepro import checks
from pytest_mlrepro.config import AuditConfig, BY_NAME, marker_signature
from pytest_mlrepro.distributed import data_shards, hang_detail, origin_rank, params_in_sync, rng_per_rank
from pytest_mlrepro.distributed_rank import LoaderShard, RankEvidence
from pytest_mlrepro.errors import ConfigError
from pytest_mlrepro.publish.json_report import build_report, validate_report
from pytest_mlrepro.result import AuditResult
from pytest_mlrepro.tracing.record import TraceRecord

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = str(ROOT / "fixtures" / "ddp" / "ddp_train.py")


def _audit(tmp_path_factory, name, args, **kw):
    from pytest_mlrepro import audit

    workdir = tmp_path_factory.mktemp(name)
    # forkserver: the launcher of each DDP replica is forked from a warm interpreter (no torch import per
    # replica); what follows (the ranks, their environment, the checks) is the same as with "process"
    result = audit(PROGRAM, nproc=2, args=args, workdir=workdir, diagnose=False, timeout=300, isolation="forkserver", **kw)
    return result, workdir


@pytest.fixture(scope="module")
def correct(tmp_path_factory):
    return _audit(tmp_path_factory, "ddp-correct", ["--steps", "3"])


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Rank 1 alone adds unseeded noise at step 2; no DistributedSampler; one seed on every rank."""
    return _audit(tmp_path_factory, "ddp-broken", ["--steps", "4", "--leak-rank", "1", "--leak-step", "2", "--no-sampler"])


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    return _audit(tmp_path_factory, "ddp-crash", ["--crash-rank", "1"], runs=2)


# -- real DDP programs -------------------------------------------------------------------------------------

def test_correct_ddp_program_is_deterministic_with_no_finding(correct):
    result, workdir = correct
    assert result.error is None, result.explain()
    assert result.verdict == "deterministic", result.explain()
    assert result.first_divergence is None and result.findings == []
    for replica in (0, 1):  # every rank wrote its own outputs
        for rank in (0, 1):
            assert (workdir / f"replica-{replica}" / "out" / f"rank-{rank}" / "trace.pt").is_file()
    assert [r.steps for r in result.replicas] == [3, 3]


def test_rank_only_leak_is_found_on_its_rank_and_step(broken):
    result, _ = broken
    assert result.error is None, result.explain()
    assert not result.deterministic
    div = result.first_divergence
    assert (div.step, div.rank, div.phase) == (2, 1, "input"), div
    assert div.evidence["rank_rule"] == "loss" and div.evidence["ranks_diverged"] == [0, 1]
    assert div.message.startswith("rank 1: step 2")
    again = AuditResult.from_dict(result.to_dict())  # the rank travels in the report
    assert again.first_divergence.rank == 1
    assert validate_report(build_report([result])) == []


def test_identical_shards_and_shared_dropout_rng_are_flagged(broken):
    result, _ = broken
    by_check = {f.check: f for f in result.findings}
    shards = by_check[checks.DDP_SHARDS]
    assert shards.verdict == "fail" and shards.details["evidence"] == "dataloader"
    assert shards.details["sampler"] == "RandomSampler" and "DistributedSampler" in shards.message
    rng = by_check[checks.DDP_RNG]
    assert rng.verdict == "warn" and rng.details["generators"] == ["torch"]
    assert checks.DDP_PARAMS not in by_check  # DDP kept the ranks in sync: no false alarm


def test_crashing_rank_is_named_and_every_tree_killed(crashed):
    result, workdir = crashed
    assert result.error is not None and result.error.type == "RankFailed"
    assert "rank 1 failed first: RuntimeError: rank 1 crashed on purpose" in result.error.message
    assert "crashed on purpose" in result.error.traceback
    pids = [int(p.read_text()) for p in workdir.glob("replica-*/work/child.pid")]
    assert pids, "the crashing rank started its child"
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "the crashing rank's child outlived the audit"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- the option --------------------------------------------------------------------------------------------

def test_nproc_option_is_validated_and_defaults_to_one():
    assert AuditConfig().nproc == 1 and "nproc=1" in marker_signature()
    assert BY_NAME["nproc"].from_text("4") == 4
    for bad in (0, -1, 1.5, True, "2", 65):
        with pytest.raises(ConfigError, match="nproc"):
            AuditConfig(nproc=bad).validate()
    with pytest.raises(ConfigError, match="isolation='process' .or 'forkserver'"):
        AuditConfig(nproc=2, isolation="inprocess").validate()


# -- the rules, on records ---------------------------------------------------------------------------------

def _trace(losses=(), rng="s0", fp=(1, 2)):
    import torch

    return TraceRecord(param_names=["w"], opt_indices=[[0]], entries=[("init", 0, 0), ("step", 0, 0)],
                       fp=torch.tensor(fp, dtype=torch.int64), steps=1, every=1, losses=list(losses),
                       rng_at_first_step={"torch": rng})


def test_origin_rank_rules_in_order():
    same = [_trace([1.0, 2.0, 3.0]), _trace([1.0, 2.0, 3.0])]
    leak = [_trace([1.0, 2.0, 3.0]), _trace([1.0, 2.0, 9.0])]
    # the loss before the all-reduce differs on rank 1 only: rank 1, although both ranks diverge
    assert origin_rank(2, "step", [0, 1], same, leak, {}, True).rank == 1
    # rank 0's loss differs: rank 0
    assert origin_rank(2, "step", [0, 1], same, [leak[1], same[0]], {}, True).rank == 0
    # every loss matches: the replayed forward decides, else no rank is claimed
    assert origin_rank(2, "step", [0, 1], same, same, {0: "backward", 1: "forward"}, True).rank == 1
    unknown = origin_rank(2, "step", [0, 1], same, same, {0: "backward", 1: "backward"}, True)
    assert unknown.rank is None and unknown.rule == "none"
    # every loss differs: no rank is singled out by the loss
    assert origin_rank(2, "step", [0, 1], same, [_trace([1.0, 2.0, 8.0]), _trace([1.0, 2.0, 9.0])], {}, True).rank is None
    # one rank alone diverged (nothing synced it), and the initial weights (DDP broadcasts rank 0's)
    assert origin_rank(1, "step", [1], same, same, {}, False).rank == 1
    assert origin_rank(0, "init", [0, 1], same, same, {}, True).rank == 0


def _loader(index_hash="i", first="b", training=True, batches=4, sampler="RandomSampler"):
    return LoaderShard(index_hash=index_hash, first_batch=first, training=training, batches=batches, sampler=sampler)


def _ranks(*loaders, rng_at_end=None):
    return [RankEvidence(rank=k, ddp_modules=1, loaders=list(x), rng_at_end=rng_at_end or {}) for k, x in enumerate(loaders)]


def test_data_shards_both_ways():
    traces = [_trace([1.0, 2.0]), _trace([1.5, 2.5])]
    assert data_shards(traces, _ranks([_loader()], [_loader()])).details["evidence"] == "dataloader"
    # shards differ, or the same indices over per-rank data, or an evaluation loop: no finding
    assert data_shards(traces, _ranks([_loader()], [_loader("j", "c")])) is None
    assert data_shards(traces, _ranks([_loader()], [_loader(first="c")])) is None
    assert data_shards(traces, _ranks([_loader(training=False)], [_loader(training=False)])) is None
    # no DataLoader: every rank's loss equal at every step says the same
    assert data_shards([_trace([1.0, 2.0])] * 2, _ranks([], [])).details["evidence"] == "loss"
    assert data_shards(traces, _ranks([], [])) is None


def test_rng_per_rank_both_ways():
    drew = _ranks([], [], rng_at_end={"torch": "s1"})
    assert rng_per_rank([_trace([], "s0"), _trace([], "s0")], drew).verdict == "warn"
    assert rng_per_rank([_trace([], "s0"), _trace([], "t0")], drew) is None  # seeded per rank
    assert rng_per_rank([_trace([], "s0"), _trace([], "s0")], _ranks([], [], rng_at_end={"torch": "s0"})) is None  # no draw


def test_params_in_sync_needs_ddp_and_names_the_rank():
    assert params_in_sync([_trace(fp=(1, 2)), _trace(fp=(1, 2))], True) is None
    bad = params_in_sync([_trace(fp=(1, 2)), _trace(fp=(1, 3))], True)
    assert bad.verdict == "fail" and (bad.details["rank"], bad.details["step"]) == (1, 0)
    assert params_in_sync([_trace(fp=(1, 2)), _trace(fp=(1, 3))], False) is None  # without DDP nobody promised equal ranks
    buffers = [_trace(fp=(1, 2)), _trace(fp=(1, 3))]
    for t in buffers:
        t.tensor_kinds = ["buffer"]
    # per-rank BatchNorm statistics: each rank's forward updates rank 0's broadcast buffers from its own batch
    assert params_in_sync(buffers, True) is None


def test_hang_detail_names_the_rank_behind(tmp_path):
    from pytest_mlrepro.distributed_rank import PROGRESS, PROGRESS_FILE

    def progress(*ranks):
        (tmp_path / PROGRESS_FILE).write_bytes(b"".join(PROGRESS.pack(*r) for r in ranks))
        return hang_detail(tmp_path, len(ranks))

    # rank 0 began step 2's forward and waits in its all-reduce; rank 1 never began it
    text = progress((2, 3), (2, 2))
    assert "rank 0 after 2 steps, inside step 2" in text and "rank 1 is behind" in text
    assert "equally far" in progress((2, 3), (2, 3))
    (tmp_path / "rank-1").mkdir()
    (tmp_path / "rank-1" / "meta.json").write_text("{}")
    text = progress((2, 3), (4, 4))
    assert "rank 1 had finished" in text and "rank 0 is behind" in text
    (tmp_path / PROGRESS_FILE).unlink()
    assert "had not started" in hang_detail(tmp_path, 2)


# -- cross-rank findings from every replica ---------------------------------------------------------------

def _write_replica(root: Path, index: int, loaders: list) -> "DistributedOutput":
    """A DDP replica's folder as a launcher leaves it: per rank trace.pt, weights.pt, ddp.json."""
    import json

    import torch

    from pytest_mlrepro.distributed import DistributedOutput

    out = root / f"replica-{index}"
    for k, shard in enumerate(loaders):
        d = out / f"rank-{k}"
        d.mkdir(parents=True)
        torch.save(_trace([1.0 + k, 2.0 + k]).to_plain(), d / "trace.pt")
        torch.save({"w": torch.ones(2)}, d / "weights.pt")
        (d / "ddp.json").write_text(json.dumps(RankEvidence(rank=k, ddp_modules=1, loaders=[shard]).to_plain()))
    return DistributedOutput.of(index, out, len(loaders))


def test_review_takes_cross_rank_findings_from_every_replica(tmp_path):
    """Replica 0's ranks read their own shards, replica 1's the same batches: the finding comes from
    replica 1 alone, reported once, and says that the replicas disagree."""
    from types import SimpleNamespace

    from pytest_mlrepro.distributed import review

    outputs = [_write_replica(tmp_path, 0, [_loader("i", "b"), _loader("j", "c")]),
               _write_replica(tmp_path, 1, [_loader(), _loader()])]
    result = AuditResult(target="t", seed=0, runs=2, device="cpu", isolation="process", seeding="program",
                         comparison={"mode": "bitwise", "atol": 0.0, "rtol": 0.0, "max_ulp": 0}, deterministic=True)
    review(SimpleNamespace(result=result, outputs=outputs))
    assert result.deterministic
    (shards,) = result.findings
    assert shards.check == checks.DDP_SHARDS and shards.details["replicas"] == [1]
    assert shards.details["per_replica"]["0"] is None and shards.details["per_replica"]["1"]["evidence"] == "dataloader"
    assert "in replica 1 of 0, 1" in shards.message and "differs between replicas" in shards.message


def test_merged_findings_count_once_and_name_their_replicas():
    from pytest_mlrepro.distributed import merge_findings

    same = data_shards([_trace([1.0]), _trace([2.0])], _ranks([_loader()], [_loader()]))
    merged = merge_findings([(0, [same]), (1, [same]), (2, [same])])
    assert len(merged) == 1 and merged[0].details["replicas"] == [0, 1, 2]
    assert "per_replica" not in merged[0].details and merged[0].message == same.message  # unanimous: no noise
    assert merged[0].verdict == "fail"
    # the same check with other details in another replica: still one finding, each replica's details kept
    other = data_shards([_trace([1.0]), _trace([2.0])], _ranks([_loader(batches=5)], [_loader(batches=5)]))
    split = merge_findings([(0, [same]), (1, [other])])
    assert len(split) == 1 and split[0].details["replicas"] == [0, 1]
    assert split[0].details["per_replica"]["1"]["batches"] == 5 and "differs between replicas" in split[0].message
    assert merge_findings([(0, []), (1, [])]) == []
