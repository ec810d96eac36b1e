"""``pytest --mlrepro --mlrepro-target=prog.py``: audits for CI without a test file.

Each target becomes a collector ``mlrepro::<target>`` with one item per check: ``reproducible`` (the
replicas ran and matched) and one per check an audit of a target can report (``training.metrics``,
``weights.finite``, the ``framework.*`` checks, ...), plus ``other-checks`` for any failing finding of a
check with no item of its own, so none is lost. The items are the same whatever the audit finds
(collection never runs the training, and xdist workers collect alike); the audit runs once per target
and process, when its first item runs, and every item of the target reads that one result. The
``reproducible`` item records it for the summary and the report, so it is listed once even when xdist
sends a target's items to two workers (``--dist loadgroup`` keeps them on one: each target is an
``xdist_group``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from . import checks

REPRODUCIBLE_ITEM = "reproducible"
OTHER_ITEM = "other-checks"
# checks an audit of a bare target never reports: the fixture's explicit checks, the baseline gate and
# commit comparisons, and best-checkpoint checks (they need the checkpoint= option, which has no text form)
NOT_FROM_TARGETS = frozenset({checks.CONFORMANCE, checks.DIRECTION, checks.METADATA, checks.BASELINE, checks.COMMITS,
                              checks.RELOAD, checks.HISTORY, checks.REPRODUCIBLE})
FAILING = ("fail", "error")


def item_checks() -> tuple:
    """The check names that get an item of their own, in checks.ALL's order."""
    return tuple(c for c in checks.ALL if c not in NOT_FROM_TARGETS)


class CheckFailed(Exception):
    """An item's check failed; its message is the whole failure report (no traceback)."""


class TargetCollector(pytest.Collector):
    """One ``--mlrepro-target``: its items, and the audit they share."""

    def __init__(self, *, target: str, rootdir: Path, run_audit: Callable[["TargetCollector", pytest.Item], Any],
                 record: Callable[[pytest.Item, Any], None], **kwargs):
        super().__init__(**kwargs)
        self.target, self.rootdir, self._run_audit, self.record = target, rootdir, run_audit, record
        self._result: Optional[Any] = None
        self._failure: Optional[tuple] = None  # (exception, traceback): the audit raised; no item reruns it

    def collect(self) -> list:
        names = (REPRODUCIBLE_ITEM, *item_checks(), OTHER_ITEM)
        items = [CheckItem.from_parent(self, name=name) for name in names]
        if self.config.pluginmanager.hasplugin("xdist"):  # the marker exists only with xdist
            for item in items:
                item.add_marker(pytest.mark.xdist_group(self.nodeid))
        return items

    def result(self, item: pytest.Item) -> Any:
        if self._failure is not None:  # with its first traceback, not one grown by every re-raise
            raise self._failure[0].with_traceback(self._failure[1])
        if self._result is None:
            try:
                self._result = self._run_audit(self, item)
            except Exception as exc:  # pytest's skip / fail outcomes are BaseExceptions: not kept, asked again
                self._failure = (exc, exc.__traceback__)
                raise
        return self._result


class CheckItem(pytest.Item):
    """One check of a target's audit."""

    def runtest(self) -> None:
        result = self.parent.result(self)
        if self.name == REPRODUCIBLE_ITEM:
            self.parent.record(self, result)
        outcome, message = judge(self.name, result)
        if outcome == "skip":
            pytest.skip(message)
        if outcome == "fail":
            raise CheckFailed(message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"mlrepro check {self.name} of {self.parent.target}"  # not a suffix of the node id


def judge(name: str, result: Any) -> tuple[str, str]:
    """(pass | fail | skip, message) of the item ``name`` over an AuditResult."""
    if name == REPRODUCIBLE_ITEM:
        if result.error is not None or not result.deterministic:
            return "fail", result.explain()
        return "pass", result.summary_line()
    own = set(item_checks())
    findings = [f for f in result.findings if (f.check == name if name != OTHER_ITEM else f.check not in own)]
    if result.error is not None and name != OTHER_ITEM:
        return "skip", f"not checked: the audit of {result.target} did not run ({result.error.type})"
    failing = [f for f in findings if f.verdict in FAILING]
    if failing:
        return "fail", "\n".join(f"[{f.check}] {f.verdict}: {f.message}" for f in failing)
    if findings and all(f.verdict == "skip" for f in findings):
        return "skip", "; ".join(f.message for f in findings)
    return "pass", "; ".join(f.message for f in findings) or "no finding"


def collectors(session: pytest.Session, targets: tuple, rootdir: Path,
               run_audit: Callable[[TargetCollector, pytest.Item], Any], record: Callable[[pytest.Item, Any], None]) -> list:
    """One collector per target (targets are checked at configure time: each here resolves)."""
    from .targets import resolve

    out = []
    for target in dict.fromkeys(targets):  # a target given twice is audited once
        spec = resolve(target, rootdir=rootdir)
        path = Path(spec.path) if spec.path else Path(session.path)
        out.append(TargetCollector.from_parent(session, name=f"mlrepro::{target}", nodeid=f"mlrepro::{target}",
                                               path=path, target=target, rootdir=rootdir, run_audit=run_audit,
                                               record=record))
    return out
