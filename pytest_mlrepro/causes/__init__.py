"""Name the cause of a divergence by controlled reruns.

evidence.py reads the replicas' records into typed evidence; rules.py is the ordered list of named
rules that turn it into hints (which controls to try first); reruns.py schedules the controlled
reruns; conclude.py names the cause from the rerun that made the replicas agree."""
from __future__ import annotations

from typing import Callable

from ..result import Cause
from .conclude import Experiment, conclude, confirmed_control, needs_uncontrolled_rerun, plan
from .evidence import DivergenceFacts, Evidence, LoaderRecord, ReplicaEvidence, SeedCall
from .reruns import schedule
from .rules import RULES, Hint, hints

__all__ = ["Cause", "DivergenceFacts", "Evidence", "Experiment", "Hint", "LoaderRecord", "RULES", "ReplicaEvidence",
           "SeedCall", "conclude", "diagnose", "hints", "plan", "schedule"]


def diagnose(evidence: Evidence, applicable: list, run_batch: Callable[[list], list], *, width: int = 1) -> Cause:
    """Hints from the evidence order the controls; reruns decide."""
    found = hints(evidence)
    order = plan(found, applicable)
    hinted = frozenset(c for h in found for c in h.controls)
    experiments = schedule(order, run_batch, width, hinted)
    if needs_uncontrolled_rerun(evidence, confirmed_control(order, experiments)):
        experiments += run_batch([frozenset()])  # does the divergence recur without any control?
    return conclude(evidence, found, order, experiments)
