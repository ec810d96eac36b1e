"""Replicas on GPUs: the device inventory (read from a probe's answer), the plan over fake inventories
(identical, mixed, one device, MIG/UUID entries, DDP groups, explicit ``parallel``), the pool the runs
lease their devices from, an audit on the CPU that believes it has two GPUs (each replica its own
CUDA_VISIBLE_DEVICES, the plan in the result), and on a real GPU machine replicas on distinct devices."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pytest_mlrepro import devices
from pytest_mlrepro.devices import DeviceInfo, DevicePlan, DevicePool, Inventory, parse_probe, plan

TINY = str(Path(__file__).resolve().parent / "targets" / "tiny.py")
GIB = 2**30


def _h200(index: str) -> DeviceInfo:
    return DeviceInfo(index, "NVIDIA H200", 141 * GIB, (9, 0))


def _inv(*devs: DeviceInfo) -> Inventory:
    return Inventory(devices=tuple(devs))


A100 = DeviceInfo("0", "NVIDIA A100-SXM4-80GB", 80 * GIB, (8, 0))
H100 = DeviceInfo("1", "NVIDIA H100 80GB HBM3", 80 * GIB, (9, 0))


# -- the plan ------------------------------------------------------------------------------------

def test_identical_devices_run_one_replica_each():
    p = plan(_inv(_h200("0"), _h200("1")), runs=2, nproc=1, parallel="auto")
    assert (p.concurrent, p.groups, p.capacity, p.per_group) == (2, (("0",), ("1",)), 2, 1)
    assert p.reason == "2 identical NVIDIA H200: one replica per device"
    eight = plan(_inv(*(_h200(str(i)) for i in range(8))), runs=3, nproc=1, parallel="auto")
    assert (eight.concurrent, eight.capacity, len(eight.groups)) == (3, 8, 8)  # runs cap the replicas, not the pool


def test_different_models_are_never_side_by_side():
    p = plan(_inv(A100, H100), runs=2, nproc=1, parallel="auto")
    assert (p.concurrent, p.groups) == (1, (("0",),))
    assert p.reason == ("devices differ (NVIDIA A100-SXM4-80GB vs NVIDIA H100 80GB HBM3): one at a time on device 0, "
                        "a replica on another model would not be comparable bitwise")
    # the models identical to device 0 still run side by side; the other one is left out
    mixed = plan(_inv(A100, DeviceInfo("1", H100.name, H100.total_memory, H100.capability),
                      DeviceInfo("2", A100.name, A100.total_memory, A100.capability)), runs=2, nproc=1, parallel="auto")
    assert (mixed.concurrent, mixed.groups) == (2, (("0",), ("2",)))
    assert "NVIDIA H100 80GB HBM3 left out" in mixed.reason
    # same name, other memory or capability: another device as far as bits go
    small = DeviceInfo("1", A100.name, 40 * GIB, A100.capability)
    assert plan(_inv(A100, small), 2, 1, "auto").groups == (("0",),)
    assert "80 GiB vs 40 GiB" in plan(_inv(A100, small), 2, 1, "auto").reason
    assert plan(_inv(A100, DeviceInfo("1", A100.name, A100.total_memory, (8, 6))), 2, 1, "auto").concurrent == 1


def test_one_device_runs_one_at_a_time_unless_the_user_says_n():
    one = _inv(_h200("0"))
    auto = plan(one, runs=2, nproc=1, parallel="auto")
    assert (auto.concurrent, auto.groups, auto.reason) == (1, (("0",),), "1 device (NVIDIA H200): one at a time on device 0")
    three = plan(one, runs=4, nproc=1, parallel=3)
    assert (three.concurrent, three.capacity, three.per_group) == (3, 3, 3)
    assert three.reason == ("1 device (NVIDIA H200), parallel=3: 3 at once on device 0 (the user's call: "
                            "they share its memory)")
    assert plan(one, runs=2, nproc=1, parallel=3).concurrent == 2  # never more than the runs


def test_explicit_parallel_spreads_over_the_devices():
    two = _inv(_h200("0"), _h200("1"))
    four = plan(two, runs=4, nproc=1, parallel=4)
    assert (four.concurrent, four.capacity, four.per_group) == (4, 4, 2)
    assert four.reason.endswith("parallel=4: 4 at once, up to 2 per device")
    single = plan(two, runs=2, nproc=1, parallel=1)
    assert (single.concurrent, single.capacity) == (1, 1) and single.reason.endswith("one at a time on device 0")


def test_mig_and_uuid_entries_name_the_devices_as_the_parent_does():
    out = ("some banner\nMLREPRO_DEVICES "
           + json.dumps([{"name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "total_memory": 40 * GIB, "capability": [8, 0],
                          "uuid": None}] * 2) + "\n")
    inv = parse_probe(out, "MIG-1b2c, MIG-3d4e")
    assert [d.index for d in inv.devices] == ["MIG-1b2c", "MIG-3d4e"] and inv.error is None
    p = plan(inv, runs=2, nproc=1, parallel="auto")
    assert p.groups == (("MIG-1b2c",), ("MIG-3d4e",)) and p.concurrent == 2
    gpus = parse_probe(out, "GPU-aa11,GPU-bb22")
    assert [d.index for d in gpus.devices] == ["GPU-aa11", "GPU-bb22"]


def test_ddp_replicas_get_disjoint_groups_of_nproc_devices():
    four = _inv(*(_h200(str(i)) for i in range(4)))
    p = plan(four, runs=2, nproc=2, parallel="auto")
    assert (p.concurrent, p.groups) == (2, (("0", "1"), ("2", "3")))
    assert p.reason == "4 identical NVIDIA H200 in 2 groups of 2: one replica per group"
    three = plan(_inv(*(_h200(str(i)) for i in range(3))), runs=2, nproc=2, parallel="auto")
    assert (three.concurrent, three.groups) == (1, (("0", "1"),))
    too_few = plan(_inv(_h200("0"), _h200("1")), runs=2, nproc=4, parallel="auto")
    assert (too_few.concurrent, too_few.groups) == (1, ()) and "nproc=4 needs 4 devices, 2 visible" in too_few.reason
    mixed = plan(_inv(A100, H100), runs=2, nproc=2, parallel="auto")  # every replica the same mixed pair
    assert (mixed.concurrent, mixed.groups) == (1, (("0", "1"),))


def test_no_inventory_leaves_the_devices_alone():
    failed = plan(Inventory(error="the device probe failed (status 1: boom)"), runs=2, nproc=1, parallel=4)
    assert (failed.concurrent, failed.groups) == (1, ())
    assert failed.reason == "the device probe failed (status 1: boom): one at a time, CUDA_VISIBLE_DEVICES left as it is"
    assert plan(Inventory(), 2, 1, "auto").reason.startswith("no CUDA device listed")


# -- the inventory -------------------------------------------------------------------------------

def test_the_probe_answer_is_read_and_named_after_cuda_visible_devices():
    rows = [{"name": "NVIDIA H200", "total_memory": 150_000_000_000, "capability": [9, 0], "uuid": "5a1f"},
            {"name": "NVIDIA H200", "total_memory": 150_000_000_000, "capability": [9, 0], "uuid": "77e0"}]
    out = "UserWarning: something\nMLREPRO_DEVICES " + json.dumps(rows) + "\n"
    unset = parse_probe(out, None)
    assert [d.index for d in unset.devices] == ["0", "1"]
    assert unset.devices[0] == DeviceInfo("0", "NVIDIA H200", 150_000_000_000, (9, 0), "5a1f")
    assert [d.index for d in parse_probe(out, "2,5").devices] == ["2", "5"]
    # CUDA stops at an invalid entry: the devices it lists are the first entries
    assert [d.index for d in parse_probe("MLREPRO_DEVICES " + json.dumps(rows[:1]), "3,bogus,4").devices] == ["3"]
    assert parse_probe("no answer here", None).error == "the device probe printed no answer"
    assert "could not be read" in parse_probe("MLREPRO_DEVICES [{\"name\": 1}]", None).error


def test_the_probe_runs_in_a_subprocess_and_its_answer_is_kept(monkeypatch):
    # the real probe, on this machine's torch (a CPU build lists nothing, a GPU machine its devices)
    real = devices.probe()
    assert real.error is None, real.error
    import torch

    assert len(real.devices) == (torch.cuda.device_count() if torch.version.cuda else 0)
    # kept per process and CUDA_VISIBLE_DEVICES value; a CPU-only torch is not probed at all
    calls = []
    monkeypatch.setattr(devices, "probe", lambda: calls.append(1) or _inv(_h200("0")))
    monkeypatch.setattr(devices, "_cache", {})
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert devices.inventory() == devices.inventory() == _inv(_h200("0")) and len(calls) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    devices.inventory()
    assert len(calls) == 2
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert devices.inventory() == Inventory() and len(calls) == 2


# -- the pool ------------------------------------------------------------------------------------

def test_the_pool_gives_each_concurrent_run_its_own_group_and_waits_when_full():
    pool = DevicePool(plan(_inv(_h200("0"), _h200("1")), runs=2, nproc=1, parallel="auto"))
    got, third = [], threading.Event()
    with pool.lease() as a, pool.lease() as b:
        assert {a, b} == {("0",), ("1",)}

        def late():
            with pool.lease() as c:
                got.append(c)
                third.set()

        t = threading.Thread(target=late)
        t.start()
        assert not third.wait(0.2)  # both devices taken: the third run waits
    assert third.wait(10) and got == [("0",)]
    t.join()
    with pool.lease() as again:  # one at a time: always the first group
        assert again == ("0",)
    with DevicePool(DevicePlan(1, "cpu")).lease() as none:
        assert none == ()


def test_a_replica_environment_carries_its_group():
    assert devices.replica_environment({"A": "1"}, ("GPU-aa", "GPU-bb")) == {"A": "1", "CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert devices.replica_environment(env, ()) is env


def test_parallel_plan_on_cuda_follows_the_inventory(monkeypatch):
    from pytest_mlrepro.auditing import diagnosis_width, parallel_plan, replica_slots
    from pytest_mlrepro.config import AuditConfig

    monkeypatch.setattr(devices, "inventory", lambda: _inv(*(_h200(str(i)) for i in range(8))))
    cuda = AuditConfig(device="cuda").validate()
    assert replica_slots(cuda, 2) == 2 and diagnosis_width(cuda) == 4  # four rerun pairs on eight devices
    assert parallel_plan(AuditConfig(device="cuda", isolation="inprocess"), 2).reason.startswith("isolation='inprocess'")
    monkeypatch.setattr(devices, "inventory", lambda: _inv(_h200("0")))
    assert replica_slots(cuda, 2) == 1 and replica_slots(AuditConfig(device="cuda", parallel=2), 2) == 2


# -- environment comparison ----------------------------------------------------------------------

def test_the_device_group_is_no_environment_difference_but_the_model_is():
    from pytest_mlrepro import environment

    a = {"device": "cuda", "device_name": "NVIDIA H200", "cuda_visible_devices": "0", "num_threads": 4}
    assert environment.differences(a, {**a, "cuda_visible_devices": "1"}) == {}
    other = {**a, "device_name": "NVIDIA H100 80GB HBM3", "cuda_visible_devices": "1"}
    assert environment.differences(a, other) == {"device_name": ("NVIDIA H200", "NVIDIA H100 80GB HBM3")}


# -- audits --------------------------------------------------------------------------------------

def _run_folders(root: Path) -> dict:
    """label-index folder -> the CUDA_VISIBLE_DEVICES its run saw."""
    return {meta.parent.parent.name: json.loads(meta.read_text())["environment"]["cuda_visible_devices"]
            for meta in root.glob("*/out/meta.json")}


def test_an_audit_on_two_fake_gpus_gives_each_replica_its_own_device(tmp_path, monkeypatch):
    """The CPU training ignores the device; the plan, the leases and the replicas' environment are the
    GPU path's. Patched in this process, where the plan is made (the replicas only get the variable)."""
    from pytest_mlrepro import auditing, forkserver
    from pytest_mlrepro.publish.json_report import build_report, validate_report

    monkeypatch.setattr(auditing, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(devices, "inventory", lambda: _inv(_h200("GPU-aa11"), _h200("GPU-bb22")))
    server_envs = []
    real_server_for = forkserver.server_for
    monkeypatch.setattr(forkserver, "server_for", lambda env: server_envs.append(env) or real_server_for(env))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # diagnose=False keeps it cheap: the diagnosis reruns lease their devices in the same _run as the replays
    result = auditing.audit(f"{TINY}:noisy_input", workdir=tmp_path, isolation="forkserver", deterministic=False,
                            diagnose=False)
    assert result.error is None, result.error
    assert (result.device, result.parallel) == ("cuda", 2)
    assert result.parallel_reason == "2 identical NVIDIA H200: one replica per device"
    assert sorted(r.environment["cuda_visible_devices"] for r in result.replicas) == ["GPU-aa11", "GPU-bb22"]
    assert not result.deterministic and result.first_divergence.step == 1
    runs = _run_folders(tmp_path)
    assert {"replica-0", "replica-1", "replay-0", "replay-1"} == set(runs)
    assert set(runs.values()) <= {"GPU-aa11", "GPU-bb22"}  # every run on a leased device, never the default
    for label in {name.rsplit("-", 1)[0] for name in runs} - {"replica"}:  # each pair ran side by side
        assert {runs[f"{label}-0"], runs[f"{label}-1"]} == {"GPU-aa11", "GPU-bb22"}, (label, runs)
    assert all("CUDA_VISIBLE_DEVICES" not in env for env in server_envs)  # one server serves every device
    doc = build_report([result])
    assert validate_report(doc) == [] and doc["audits"][0]["parallel_reason"] == result.parallel_reason


def cuda_train(ctx):
    """A tiny CUDA training that notes which physical device it ran on (its working folder is the replica's)."""
    import torch

    model = torch.nn.Linear(8, 4).to("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, 4, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    Path("device.txt").write_text(str(torch.cuda.get_device_properties(0).uuid))
    return model


@pytest.mark.cuda
def test_replicas_run_on_distinct_gpus(tmp_path):
    """On a machine with two identical GPUs each replica trains on its own; on one, both on it."""
    from pytest_mlrepro import audit

    expected = plan(devices.inventory(), runs=2, nproc=1, parallel="auto")
    result = audit(f"{__file__}:cuda_train", workdir=tmp_path, device="cuda", isolation="forkserver", diagnose=False)
    assert result.error is None, result.error
    assert result.deterministic, result.explain()
    assert (result.parallel, result.parallel_reason) == (expected.concurrent, expected.reason)
    seen = [r.environment["cuda_visible_devices"] for r in result.replicas]
    uuids = [(tmp_path / f"replica-{i}" / "work" / "device.txt").read_text() for i in range(2)]
    if expected.concurrent < 2:  # one device (or models that differ): both on device 0
        assert seen == [expected.groups[0][0]] * 2 and uuids[0] == uuids[1], (seen, uuids)
        return
    assert len(set(seen)) == 2 and set(seen) <= {g[0] for g in expected.groups}, seen
    assert uuids[0] != uuids[1], uuids  # two physical devices, not two names for one


def test_the_audit_s_device_is_resolved_from_the_probe_not_by_starting_cuda_here(monkeypatch):
    """device="auto"/"cuda" are answered by the probe subprocess: torch.cuda.is_available() in the
    auditing process would start the CUDA driver there (cudaGetDeviceCount), breaking CUDA in its forks."""
    import torch

    from pytest_mlrepro import auditing
    from pytest_mlrepro.errors import MlreproError

    def cuda_started_here():
        raise AssertionError("torch.cuda.is_available() called in the auditing process")

    monkeypatch.setattr(torch.cuda, "is_available", cuda_started_here)
    monkeypatch.setattr(devices, "inventory", lambda: _inv(_h200("0")))
    assert (auditing.resolve_device("auto"), auditing.resolve_device("cuda")) == ("cuda", "cuda")
    assert auditing.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(devices, "inventory", lambda: Inventory(error="the device probe failed (status 1: boom)"))
    assert auditing.resolve_device("auto") == "cpu"
    with pytest.raises(MlreproError, match="boom"):
        auditing.resolve_device("cuda")


def test_scrambling_a_replica_s_generators_before_cuda_starts_does_not_index_its_generators(monkeypatch):
    """In a fresh replica CUDA has not started: torch.cuda.default_generators is still empty, so seeding
    must be queued (torch.cuda.manual_seed_all), not done by indexing it (an IndexError on every GPU)."""
    import torch

    from pytest_mlrepro.seeding import scramble_globals

    seeded = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "default_generators", ())
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    scramble_globals(1)
    scramble_globals(2)
    assert len(seeded) == 2 and seeded[0] != seeded[1]  # replica-specific, queued for when CUDA starts
