"""Which CUDA devices replicas may use side by side, and the pool they lease them from.

The inventory is taken by a probe subprocess (``python -c``, torch's device properties), never in the
auditing process: CUDA initialised here would make every later fork of this process unusable for CUDA
(the fork server, a program's DataLoader workers), and would hold a context on the device. The probe
inherits this process's environment (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``), costs one torch
import, and its answer is kept for the life of this process per ``CUDA_VISIBLE_DEVICES`` value (a
failed probe too: a loaded machine would pay the timeout once, not per audit). A torch built without
CUDA lists no device without a probe.

Each device is named as a replica must name it in its own ``CUDA_VISIBLE_DEVICES``: this process's
entry at that position when the variable is set (an integer, a ``GPU-`` or ``MIG-`` UUID), else its
position 0..n-1. Only devices identical to device 0 (same name, memory and compute capability) are
used side by side: a replica on another model would not be comparable bitwise.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

VISIBLE = "CUDA_VISIBLE_DEVICES"
PROBE_TIMEOUT_S = 300.0  # importing torch on a loaded 2-core machine can take a minute
_MARK = "MLREPRO_DEVICES "  # the probe's answer line (the rest of its stdout is not ours: a warning, a banner)
PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "out = []\n"
    "for i in range(n):\n"
    "    p = torch.cuda.get_device_properties(i)\n"
    "    out.append({'name': p.name, 'total_memory': int(p.total_memory), 'capability': [p.major, p.minor],\n"
    "                'uuid': str(getattr(p, 'uuid', '') or '') or None})\n"
    f"print({_MARK!r} + json.dumps(out), flush=True)\n"
)


@dataclass(frozen=True)
class DeviceInfo:
    """One visible CUDA device."""

    index: str  # how a replica's CUDA_VISIBLE_DEVICES names it
    name: str
    total_memory: int  # bytes
    capability: tuple  # (major, minor)
    uuid: Optional[str] = None

    @property
    def model(self) -> tuple:
        """What must match for two devices to give bitwise comparable replicas."""
        return (self.name, self.total_memory, tuple(self.capability))

    def describe(self) -> str:
        return f"{self.name} ({self.total_memory / 2**30:.0f} GiB, sm_{self.capability[0]}{self.capability[1]})"


@dataclass(frozen=True)
class Inventory:
    """The visible devices in CUDA's order, or why they could not be listed."""

    devices: tuple = ()  # tuple[DeviceInfo, ...]
    error: Optional[str] = None


@dataclass(frozen=True)
class DevicePlan:
    """How replicas run at once: ``groups`` are the ``CUDA_VISIBLE_DEVICES`` entries each replica may
    get (nproc devices for a DDP replica; empty: the variable is left as this process has it, as on
    the CPU), ``capacity`` replicas at once over all groups, at most ``per_group`` on one group,
    ``concurrent`` of them for this many runs; ``reason`` says why, for the result."""

    concurrent: int
    reason: str
    groups: tuple = ()  # tuple[tuple[str, ...], ...]
    capacity: int = 1
    per_group: int = 1


# -- the inventory -----------------------------------------------------------------------------

def visible_entries(value: Optional[str]) -> Optional[list]:
    """This process's CUDA_VISIBLE_DEVICES as a list of entries, or None when it is not set."""
    if value is None:
        return None
    return [e.strip() for e in value.split(",") if e.strip()]


def parse_probe(stdout: str, visible: Optional[str]) -> Inventory:
    """The probe's answer line as an inventory, devices named after ``visible`` (this process's
    CUDA_VISIBLE_DEVICES, None when unset). CUDA stops at an invalid entry, so the probe may list
    fewer devices than there are entries; positions past the entries (cannot happen) keep their number."""
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(_MARK)), None)
    if line is None:
        return Inventory(error="the device probe printed no answer")
    try:
        rows = json.loads(line[len(_MARK):])
        entries = visible_entries(visible)
        return Inventory(devices=tuple(
            DeviceInfo(index=entries[i] if entries is not None and i < len(entries) else str(i), name=str(r["name"]),
                       total_memory=int(r["total_memory"]), capability=tuple(int(c) for c in r["capability"]),
                       uuid=r.get("uuid"))
            for i, r in enumerate(rows)))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return Inventory(error=f"the device probe's answer could not be read ({type(exc).__name__}: {exc})")


def probe(env: Optional[dict] = None, *, timeout: float = PROBE_TIMEOUT_S) -> Inventory:
    """Run the probe subprocess (CUDA starts there, not here) and read its answer."""
    env = dict(os.environ if env is None else env)
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Inventory(error=f"the device probe did not answer within {timeout:g}s")
    except OSError as exc:
        return Inventory(error=f"the device probe could not start ({exc})")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Inventory(error=f"the device probe failed (status {done.returncode}: {tail})")
    return parse_probe(done.stdout, env.get(VISIBLE))


_cache: dict = {}
_cache_lock = threading.Lock()


def inventory() -> Inventory:
    """The visible devices, probed once per process and CUDA_VISIBLE_DEVICES value."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return Inventory()  # a CPU-only torch: nothing to probe
    key = (os.getpid(), os.environ.get(VISIBLE))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = probe()
        return _cache[key]


# -- the plan ----------------------------------------------------------------------------------

def _difference(a: DeviceInfo, b: DeviceInfo) -> str:
    if a.name != b.name:
        return f"{a.name} vs {b.name}"
    if a.total_memory != b.total_memory:
        return f"{a.name} with {a.total_memory / 2**30:.0f} GiB vs {b.total_memory / 2**30:.0f} GiB"
    return f"{a.name} sm_{a.capability[0]}{a.capability[1]} vs sm_{b.capability[0]}{b.capability[1]}"


def plan(inv: Inventory, runs: int, nproc: int, parallel: Union[str, int]) -> DevicePlan:
    """How ``runs`` replicas of ``nproc`` ranks use the devices of ``inv``: with ``parallel="auto"``
    one replica per group of identical devices (one at a time when there is one group), with
    ``parallel=N`` N at once spread over the groups (the user's call: several share a device when its
    memory allows). Pure: no device is touched."""
    devices: Sequence[DeviceInfo] = inv.devices
    if not devices:
        return DevicePlan(1, f"{inv.error or 'no CUDA device listed'}: one at a time, {VISIBLE} left as it is")
    if len(devices) < nproc:
        return DevicePlan(1, f"nproc={nproc} needs {nproc} devices, {len(devices)} visible: one at a time, "
                             f"{VISIBLE} left as it is")
    first = devices[0]
    same = [d for d in devices if d.model == first.model]
    differs = next((d for d in devices if d.model != first.model), None)
    unit = "device" if nproc == 1 else "group"
    note = ""
    if len(same) < nproc:  # too few identical devices for a DDP replica: every replica gets the same mixed group
        groups = (tuple(d.index for d in devices[:nproc]),)
        what = f"devices differ ({_difference(first, differs)}), nproc={nproc}: every replica on the first {nproc}"
    else:
        groups = tuple(tuple(d.index for d in same[i:i + nproc]) for i in range(0, len(same) - nproc + 1, nproc))
        if len(groups) > 1:
            what = f"{len(same)} identical {first.name}" + (f" in {len(groups)} groups of {nproc}" if nproc > 1 else "")
            if differs is not None:
                left = sorted({d.name if d.name != first.name else d.describe() for d in devices if d.model != first.model})
                what += f" ({', '.join(left)} left out: a replica on another model would not be comparable bitwise)"
        elif differs is not None:
            what = f"devices differ ({_difference(first, differs)})"
            note = ", a replica on another model would not be comparable bitwise"
        else:
            what = f"{len(devices)} device{'s' if len(devices) > 1 else ''} ({first.name})"
    where = f"device {groups[0][0]}" if nproc == 1 else f"devices {','.join(groups[0])}"
    if parallel == "auto":
        if len(groups) == 1:
            return DevicePlan(1, f"{what}: one at a time on {where}{note}", groups)
        return DevicePlan(min(runs, len(groups)), f"{what}: one replica per {unit}", groups, len(groups), 1)
    n = int(parallel)
    per_group = math.ceil(n / len(groups))
    if n == 1:
        how = f"one at a time on {where}"
    elif len(groups) == 1:
        how = f"{n} at once on {where} (the user's call: they share its memory)"
    else:
        how = f"{n} at once, " + ("one" if per_group == 1 else f"up to {per_group}") + f" per {unit}"
    return DevicePlan(max(1, min(runs, n)), f"{what}, parallel={n}: {how}{note}", groups, n, per_group)


# -- the pool ----------------------------------------------------------------------------------

class DevicePool:
    """The plan's device groups, leased by concurrent runs (replicas, replays, dense re-traces,
    diagnosis reruns): a run waits until a group has room, takes the least loaded one (the first on
    a tie, so runs one at a time all use group 0), and gives it back when it ends."""

    def __init__(self, plan: DevicePlan):
        self.groups = plan.groups
        self.capacity, self.per_group = max(1, plan.capacity), max(1, plan.per_group)
        self._load = [0] * len(self.groups)
        self._cond = threading.Condition()

    @contextmanager
    def lease(self) -> Iterator[tuple]:
        """A device group's entries for the run's CUDA_VISIBLE_DEVICES (empty: leave it as it is)."""
        if not self.groups:
            yield ()
            return
        with self._cond:
            self._cond.wait_for(lambda: sum(self._load) < self.capacity and min(self._load) < self.per_group)
            taken = self._load.index(min(self._load))
            self._load[taken] += 1
        try:
            yield self.groups[taken]
        finally:
            with self._cond:
                self._load[taken] -= 1
                self._cond.notify_all()


def replica_environment(env: dict, group: Sequence[str]) -> dict:
    """``env`` with the replica's device group as its CUDA_VISIBLE_DEVICES (``env`` itself when none)."""
    if not group:
        return env
    return {**env, VISIBLE: ",".join(group)}
