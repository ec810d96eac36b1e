"""Drive a real early-stopping / checkpoint callback with generated metric sequences and compare it
with the oracle; probe which direction a configured callback really optimises.

A *driver* wraps one framework callback: ``driver.run(values)`` feeds the real callback one
monitored value per epoch and reports the ``Outcome`` it produced; ``driver.spec`` is the
``StopSpec`` the callback's configuration claims (mode as the framework resolved it). Adapters for
Lightning, Keras, Hugging Face and fastai implement drivers; this module only needs the protocol.
"""
from __future__ import annotations

import itertools
import math
import traceback
from typing import Callable, Protocol, runtime_checkable

from pytest_mlrepro.checks import CONFORMANCE, DIRECTION
from pytest_mlrepro.checkpoint.direction import infer_direction
from pytest_mlrepro.checkpoint.oracle import Outcome, StopSpec, simulate
from pytest_mlrepro.errors import MlreproError
from pytest_mlrepro.result import Finding

__all__ = [
    "CallbackDriver",
    "UnsupportedSpec",
    "OUTCOME_FIELDS",
    "check_conformance",
    "probe_direction",
    "check_comparator",
    "ReferenceEarlyStoppingDriver",
    "ReferenceBestCheckpointDriver",
]

OUTCOME_FIELDS = ("epochs_run", "stop_epoch", "best_epoch", "best_value", "saved_epochs")


@runtime_checkable
class CallbackDriver(Protocol):
    name: str
    spec: StopSpec

    def run(self, values) -> Outcome: ...


class UnsupportedSpec(MlreproError):
    """Raised by a driver factory for a spec its framework cannot express (e.g. no baseline).

    ``check_conformance`` then discards that generated example instead of failing.
    """


class _Mismatch(Exception):
    def __init__(self, record: dict):
        super().__init__(record.get("summary", "mismatch"))
        self.record = record


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _outcome_dict(o: Outcome, fields) -> dict:
    d = o.to_dict()
    return {k: d[k] for k in fields}


def check_conformance(
    driver_factory: Callable[[StopSpec], CallbackDriver],
    *,
    monitor: str,
    max_examples: int = 50,
    specs=None,
    fields=None,
    max_size: int = 12,
    allow_nan: bool = True,
    allow_inf: bool = True,
    derandomize: bool = True,
) -> Finding:
    """Compare ``driver.run(values)`` with ``simulate(values, driver.spec)`` on generated inputs.

    ``specs``: a hypothesis strategy of ``StopSpec`` (default ``strategies.stop_specs()``; narrow
    it to what the framework supports). ``fields``: which ``Outcome`` fields the callback exposes
    (default all). The first counterexample found is shrunk by hypothesis and reported as
    ``Finding(check="early_stopping.conformance", verdict="fail", details={callback, spec,
    counterexample, expected, observed, monitor})``; a driver that raises gives verdict ``error``.
    ``derandomize=True`` makes the search (and so the report) the same on every run.
    """
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from hypothesis.errors import Unsatisfiable

    from pytest_mlrepro.checkpoint.strategies import specs_and_sequences, stop_specs

    fields = tuple(fields) if fields is not None else OUTCOME_FIELDS
    unknown = set(fields) - set(OUTCOME_FIELDS)
    if unknown:
        raise ValueError(f"unknown Outcome fields {sorted(unknown)}; known: {OUTCOME_FIELDS}")
    strategy = specs_and_sequences(specs if specs is not None else stop_specs(), max_size=max_size,
                                   allow_nan=allow_nan, allow_inf=allow_inf)
    seen = {"name": None, "examples": 0}

    @settings(max_examples=max_examples, database=None, deadline=None, derandomize=derandomize,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False)
    @given(strategy)
    def _probe(spec_values):
        requested, values = spec_values
        try:
            driver = driver_factory(requested)
        except UnsupportedSpec:
            reject()
        seen["name"] = getattr(driver, "name", type(driver).__name__)
        spec = getattr(driver, "spec", requested)
        seen["examples"] += 1
        record = {"callback": seen["name"], "spec": spec.to_dict(), "requested_spec": requested.to_dict(),
                  "counterexample": list(values)}
        expected = simulate(values, spec)
        record["expected"] = _outcome_dict(expected, fields)
        try:
            observed = driver.run(list(values))
        except Exception as exc:  # the real callback crashed on this input: report it, shrunk
            record["observed"] = {"error": f"{type(exc).__name__}: {exc}"}
            record["traceback"] = traceback.format_exc(limit=8)
            record["verdict"] = "error"
            raise _Mismatch(record) from exc
        record["observed"] = _outcome_dict(observed, fields)
        differing = [k for k in fields if not _same(record["expected"][k], record["observed"][k])]
        if differing:
            record["differing"] = differing
            record["verdict"] = "fail"
            raise _Mismatch(record)

    name = None
    try:
        _probe()
    except _Mismatch as m:
        r = m.record
        name = r["callback"]
        if r["verdict"] == "error":
            msg = (f"{name} (monitor {monitor!r}) raised on the sequence {r['counterexample']} with spec "
                   f"{r['spec']}: {r['observed']['error']}")
        else:
            msg = (f"{name} (monitor {monitor!r}) disagrees with the reference semantics on "
                   f"{', '.join(r['differing'])}: values {r['counterexample']} with spec {r['spec']} -> "
                   f"expected {r['expected']}, observed {r['observed']}")
        details = {"monitor": monitor, **{k: v for k, v in r.items() if k != "verdict"}}
        return Finding(CONFORMANCE, r["verdict"], msg, details)
    except Unsatisfiable:
        return Finding(CONFORMANCE, "error",
                       f"the driver rejected (UnsupportedSpec) every generated spec for monitor {monitor!r}; "
                       f"pass specs= restricted to what the callback supports",
                       {"callback": seen["name"], "monitor": monitor, "spec": None, "counterexample": None,
                        "expected": None, "observed": None})
    name = seen["name"]
    return Finding(CONFORMANCE, "pass",
                   f"{name} (monitor {monitor!r}) matched the reference semantics on {seen['examples']} "
                   f"generated sequences", {"callback": name, "monitor": monitor, "spec": None,
                                            "counterexample": None, "expected": None, "observed": None,
                                            "examples": seen["examples"]})


def _probe_sequences(spec: StopSpec):
    step = 1.0 + 2.0 * float(spec.min_delta)
    b = float(spec.baseline) if spec.baseline is not None else 0.0
    n = max(6, spec.patience + 3)
    pad = [b] * spec.start_from_epoch
    inc = pad + [b + step * (k + 1) for k in range(n)]
    dec = pad + [b - step * (k + 1) for k in range(n)]
    return inc, dec, spec.start_from_epoch, len(inc) - 1


def probe_direction(make_driver: Callable[[], CallbackDriver]) -> str:
    """Return the direction (``"min"``/``"max"``) a configured callback actually optimises.

    Feeds a fresh driver a strictly increasing and another a strictly decreasing sequence (steps
    larger than ``2*min_delta``, starting beyond any baseline). The sequence whose every epoch is
    an improvement names the direction; the other one stops early / keeps its first epoch best.
    Raises ``RuntimeError`` if the callback's behaviour fits neither direction.
    """
    d_inc = make_driver()
    inc, dec, first, last = _probe_sequences(d_inc.spec)
    o_inc = d_inc.run(inc)
    o_dec = make_driver().run(dec)

    def improves_throughout(o: Outcome) -> bool:
        return o.best_epoch == last and o.stop_epoch is None

    def rejects(o: Outcome) -> bool:
        return o.best_epoch in (None, first) and o.stop_epoch is not None

    if improves_throughout(o_inc) and rejects(o_dec):
        return "max"
    if improves_throughout(o_dec) and rejects(o_inc):
        return "min"
    # checkpoint-only callbacks never stop: the run whose best moved to the last epoch names the direction
    if o_inc.stop_epoch is None and o_dec.stop_epoch is None:
        if o_inc.best_epoch == last and o_dec.best_epoch == first:
            return "max"
        if o_dec.best_epoch == last and o_inc.best_epoch == first:
            return "min"
    # drivers that expose only part of the outcome: fall back on who stopped early
    if o_inc.stop_epoch is None and o_dec.stop_epoch is not None:
        return "max"
    if o_dec.stop_epoch is None and o_inc.stop_epoch is not None:
        return "min"
    raise RuntimeError(
        f"cannot tell which direction {getattr(d_inc, 'name', d_inc)!r} optimises: increasing {inc} -> {o_inc}, "
        f"decreasing {dec} -> {o_dec}"
    )


def check_comparator(make_driver: Callable[[], CallbackDriver], *, monitor: str, declared_mode: str | None = None,
                     callback: str = "") -> Finding:
    """The direction the callback uses must equal the declared mode or the table's direction.

    ``make_driver()`` builds the callback exactly as the user configured it (no corrected mode).
    """
    details = {"callback": callback, "monitor": monitor, "expected_mode": None, "observed_mode": None}
    try:
        expected = declared_mode if declared_mode is not None else infer_direction(monitor)
        if expected not in ("min", "max"):
            raise ValueError(f"declared_mode must be 'min' or 'max', got {expected!r}")
    except ValueError as exc:
        return Finding(DIRECTION, "error", str(exc), details)
    details["expected_mode"] = expected
    try:
        probe = make_driver()
        details["callback"] = callback or getattr(probe, "name", type(probe).__name__)
        observed = probe_direction(make_driver)
    except Exception as exc:
        return Finding(DIRECTION, "error",
                       f"could not probe {details['callback'] or 'callback'} for monitor {monitor!r}: "
                       f"{type(exc).__name__}: {exc}", details)
    details["observed_mode"] = observed
    source = "declared" if declared_mode is not None else "direction table"
    if observed != expected:
        return Finding(DIRECTION, "fail",
                       f"{details['callback']} {('minimises' if observed == 'min' else 'maximises')} "
                       f"{monitor!r}, but it should be {'minimised' if expected == 'min' else 'maximised'} "
                       f"({source}: mode={expected!r})", details)
    return Finding(DIRECTION, "pass",
                   f"{details['callback']} optimises {monitor!r} as mode={observed!r} ({source})", details)


class ReferenceEarlyStoppingDriver:
    """Driver for our own ``EarlyStopping``: the worked example of the protocol."""

    def __init__(self, spec: StopSpec, monitor: str = "val_loss"):
        from pytest_mlrepro.checkpoint.callbacks import EarlyStopping

        self.spec = spec
        self.name = "pytest_mlrepro.EarlyStopping"
        self.monitor = monitor
        self._cb = EarlyStopping(monitor, mode=spec.mode, patience=spec.patience, min_delta=spec.min_delta,
                                 baseline=spec.baseline, start_from_epoch=spec.start_from_epoch,
                                 nan_policy=spec.nan_policy)

    def run(self, values) -> Outcome:
        cb = self._cb
        epochs = 0
        for epoch, v in enumerate(values):
            epochs = epoch + 1
            if cb.on_epoch_end(epoch, {self.monitor: v}):
                break
        return Outcome(epochs, cb.stopped_epoch, cb.best_epoch, cb.best_value, tuple(cb.improved_epochs))


class ReferenceBestCheckpointDriver:
    """Driver for our own ``BestCheckpoint`` + ``EarlyStopping`` writing real files into ``dirpath``."""

    def __init__(self, spec: StopSpec, dirpath, monitor: str = "val_loss"):
        from pytest_mlrepro.checkpoint.callbacks import BestCheckpoint

        self._stop = ReferenceEarlyStoppingDriver(spec, monitor)
        self.spec, self.monitor = spec, monitor
        self.name = "pytest_mlrepro.BestCheckpoint"
        self._n = next(_COUNTER)
        self._ckpt = BestCheckpoint(monitor, mode=spec.mode, min_delta=spec.min_delta, baseline=spec.baseline,
                                    start_from_epoch=spec.start_from_epoch, dirpath=dirpath,
                                    filename=f"best-{self._n}.pt", write_history=False, fsync=False)

    def run(self, values) -> Outcome:
        import torch

        model = torch.nn.Linear(1, 1)
        es = self._stop._cb
        epochs = 0
        for epoch, v in enumerate(values):
            epochs = epoch + 1
            with torch.no_grad():
                model.weight.fill_(float(epoch))
            self._ckpt.on_epoch_end(epoch, {self.monitor: v}, model)
            if es.on_epoch_end(epoch, {self.monitor: v}):
                break
        c = self._ckpt
        return Outcome(epochs, es.stopped_epoch, c.best_epoch, c.best_value, tuple(c.saved_epochs))


_COUNTER = itertools.count()
