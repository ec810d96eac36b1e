"""The ``mlrepro`` fixture's object: the audit API bound to the resolved options of one test.

Every audit or check it runs is recorded for the terminal summary, the JSON report and W&B, and
attached to the test's report (a section and JUnit properties).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .options import AUDIT_KEYWORDS, MARKER_KEYS, MlreproOptions


class MlreproHandle:
    def __init__(self, item, options: MlreproOptions, make_workdir: Callable[[], Path], record: Callable[[Any, Any], None]):
        self._item = item
        self.options = options
        self._make_workdir = make_workdir
        self._record = record
        marker = item.get_closest_marker("mlrepro")
        self.marker_target = marker.args[0] if marker and marker.args else (marker.kwargs.get("target") if marker else None)
        self.marker_audit_kwargs = {k: v for k, v in (marker.kwargs.items() if marker else ()) if k in AUDIT_KEYWORDS}
        self.results: list = []

    def audit(self, target: Any = None, **overrides: Any):
        """Audit ``target`` (default: the marker's) with this test's options; keyword overrides win."""
        from .auditing import audit

        target = target if target is not None else self.marker_target
        if target is None:
            raise ValueError("mlrepro.audit(): no target given and the test's mlrepro marker names none")
        kwargs = {k: getattr(self.options, k) for k in MARKER_KEYS}
        kwargs.update(self.marker_audit_kwargs)
        kwargs.update(overrides)
        kwargs.setdefault("workdir", self._make_workdir())
        kwargs.setdefault("rootdir", str(self._item.config.rootpath))
        result = audit(target, **kwargs)
        self._add(result)
        return result

    def check(self, name: str, findings: list):
        """Record check findings (checkpoint reload, conformance, comparator) as one result of this test."""
        from .result import AuditResult

        result = AuditResult(target=name, seed=self.options.seed, runs=0, device=self.options.device, isolation="-",
                             seeding="-", comparison={}, deterministic=True, findings=list(findings), compared="none",
                             kind="checks")
        self._add(result)
        return result

    def check_reload(self, checkpoint_path, **kwargs):
        from .checkpoint.reload import check_reload

        return self.check(f"reload:{Path(checkpoint_path).name}", check_reload(checkpoint_path, **kwargs))

    def check_conformance(self, driver_factory, **kwargs):
        from .checkpoint.conformance import check_conformance

        return self.check(f"conformance:{kwargs.get('monitor', '')}", [check_conformance(driver_factory, **kwargs)])

    def check_comparator(self, make_driver, **kwargs):
        from .checkpoint.conformance import check_comparator

        return self.check(f"comparator:{kwargs.get('monitor', '')}", [check_comparator(make_driver, **kwargs)])

    def _add(self, result) -> None:
        self.results.append(result)
        self._record(self._item, result)
