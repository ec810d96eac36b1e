"""The ``mlrepro`` fixture's object: the audit API bound to the resolved options of one test.

Every audit or check it runs is recorded for the terminal summary, the JSON report and W&B, and
attached to the test's report (a section and JUnit properties).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

from .config import PROCESS_ISOLATIONS, AuditConfig

CALL_KEYWORDS = ("workdir", "rootdir", "localize_divergence", "diagnose")  # audit() arguments that are no options


class MlreproHandle:
    def __init__(self, item, config: AuditConfig, marker_target: Any, make_workdir: Callable[[], Path],
                 record: Callable[[Any, Any], None], sources: Optional[dict] = None, base: Optional[str] = None):
        self._item = item
        self.base = base  # a git ref: audits become comparisons of commits (--mlrepro-base)
        self.sources = dict(sources or {})  # where each option's value came from (command line, MLREPRO_*, ini, marker)
        self.config = config
        self.marker_target = marker_target
        self._make_workdir = make_workdir
        self._record = record
        self.results: list = []

    @property
    def options(self) -> AuditConfig:
        """The test's audit settings (the session's options with the marker's keywords on top)."""
        return self.config

    def audit(self, target: Any = None, **overrides: Any):
        """Audit ``target`` (default: the marker's) with this test's options; keyword overrides win."""
        from .auditing import audit

        target = target if target is not None else self.marker_target
        if target is None:
            raise ValueError("mlrepro.audit(): no target given and the test's mlrepro marker names none")
        call = {k: overrides.pop(k) for k in CALL_KEYWORDS if k in overrides}
        call.setdefault("rootdir", str(self._item.config.rootpath))
        config = self.config.merged(overrides)
        if self.base is not None:  # pytest --mlrepro-base=REF: this commit against REF, not replica against replica
            from .commits import compare_commits

            from .errors import MlreproError

            isolation = config.isolation if config.isolation in PROCESS_ISOLATIONS else "process"
            config = dataclasses.replace(config, isolation=isolation, runs=AuditConfig.runs)
            try:
                result = compare_commits(target, self.base, config, rootdir=call["rootdir"],
                                         **({"localize_divergence": call["localize_divergence"]}
                                            if "localize_divergence" in call else {}))
            except MlreproError as exc:  # an unknown ref, no repository, the target missing at the ref
                import pytest

                pytest.fail(f"mlrepro --mlrepro-base={self.base}: {exc}", pytrace=False)
        else:
            call.setdefault("workdir", self._make_workdir())
            result = audit(target, config, **call)
        self._add(result)
        return result

    def check(self, name: str, findings: list, *, strict: bool = True):
        """Record check findings (checkpoint reload, conformance, comparator) as one result of this test.

        With ``strict`` (the default) a finding whose verdict is fail or error fails the test right here,
        so a check cannot be red in the summary while its test is green; ``strict=False`` returns the
        result for the test to inspect.
        """
        from .result import AuditResult

        result = AuditResult(target=name, seed=self.config.seed, runs=0, device=self.config.device, isolation="-",
                             seeding="-", comparison={}, deterministic=True, findings=list(findings), compared="none",
                             kind="checks")
        self._add(result)
        failing = [f for f in result.findings if f.verdict in ("fail", "error")]
        if strict and failing:
            import pytest

            pytest.fail(f"{name}: " + "; ".join(f"[{f.check}] {f.verdict}: {f.message}" for f in failing), pytrace=False)
        return result

    def check_reload(self, checkpoint_path, *, strict: bool = True, **kwargs):
        from .checkpoint.reload import check_reload

        return self.check(f"reload:{Path(checkpoint_path).name}", check_reload(checkpoint_path, **kwargs), strict=strict)

    def check_conformance(self, driver_factory, *, strict: bool = True, **kwargs):
        from .checkpoint.conformance import check_conformance

        return self.check(f"conformance:{kwargs.get('monitor', '')}", [check_conformance(driver_factory, **kwargs)],
                          strict=strict)

    def check_comparator(self, make_driver, *, strict: bool = True, **kwargs):
        from .checkpoint.conformance import check_comparator

        return self.check(f"comparator:{kwargs.get('monitor', '')}", [check_comparator(make_driver, **kwargs)],
                          strict=strict)

    def _add(self, result) -> None:
        self.results.append(result)
        self._record(self._item, result)
