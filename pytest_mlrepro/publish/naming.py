"""One name per audit of a session, shared by plot files, W&B run names and artifact names.

A session may audit the same target more than once (several seeds, or two tests auditing the same
function); anything named after the target alone would then be overwritten or confused. An audit
keeps the plain target as its name when the target is audited once (so names stay what users know);
otherwise the name adds what tells the audits apart (the test id and / or the seed) and, only when
even those coincide, a counter.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

RUN_NAME_MAX = 128  # W&B display names: the report schema promises at most 128 characters


def _readable(text: str, limit: int) -> str:
    """``text`` reduced to file-name-safe characters and cut to ``limit``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:limit].strip("-.")


def target_slug(target: str) -> str:
    """A file-name-safe, collision-free stem for ``target`` (readable prefix + short hash)."""
    readable = _readable(target, 60) or "target"
    return f"{readable}-{hashlib.sha1(target.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class AuditName:
    """How one audit is named: ``target`` plus a ``suffix`` such as `` [seed 1]`` ("" when unique)."""

    target: str
    suffix: str = ""

    @property
    def label(self) -> str:
        return self.target + self.suffix

    @property
    def run_name(self) -> str:
        """The W&B display name: the label, cut in the target so the distinguishing suffix survives."""
        if not self.suffix:
            return self.target[:RUN_NAME_MAX]
        if len(self.label) <= RUN_NAME_MAX:
            return self.label
        suffix = self.suffix[: RUN_NAME_MAX // 2]
        return self.target[: RUN_NAME_MAX - len(suffix) - 1] + "…" + suffix

    @property
    def slug(self) -> str:
        """File-name stem: the target's slug when unique (unchanged names), else readable parts + hash."""
        if not self.suffix:
            return target_slug(self.target)
        digest = hashlib.sha1(self.label.encode()).hexdigest()[:8]
        return f"{_readable(self.target, 60) or 'target'}-{_readable(self.suffix, 40)}-{digest}"


def _test_of(result):
    """The test id when it adds something to the target (often they are the same string)."""
    test = getattr(result, "test", None)
    return test if test and test != result.target else None


def _suffixes(results: list) -> list:
    """Suffixes for audits sharing one target: the parts that differ between them, then a counter."""
    tests = {_test_of(r) for r in results}
    seeds = {r.seed for r in results}
    seen: Counter = Counter()
    out = []
    for r in results:
        parts = []
        if len(tests) > 1:
            parts.append(_test_of(r) or "no test")
        if len(seeds) > 1:
            parts.append(f"seed {r.seed}")
        seen[tuple(parts)] += 1
        if seen[tuple(parts)] > 1:
            parts.append(f"#{seen[tuple(parts)]}")
        out.append(f" [{', '.join(parts)}]" if parts else "")
    return out


def audit_names(results) -> list:
    """One ``AuditName`` per result, in order, unique within the session (labels and slugs)."""
    results = list(results)
    by_target = defaultdict(list)
    for i, r in enumerate(results):
        by_target[r.target].append(i)
    names: list = [None] * len(results)
    for target, idx in by_target.items():
        for i, suffix in zip(idx, _suffixes([results[i] for i in idx])):
            names[i] = AuditName(target, suffix)
    return _dedupe(names)


def _dedupe(names: list) -> list:
    """Guard against a suffixed label equal to another target's name: count on until unique."""
    used_labels, used_slugs, out = set(), set(), []
    for n in names:
        k = 1
        while n.label in used_labels or n.slug in used_slugs:
            k += 1
            n = AuditName(n.target, f"{n.suffix} #{k}" if n.suffix else f" [#{k}]")
        used_labels.add(n.label)
        used_slugs.add(n.slug)
        out.append(n)
    return out
