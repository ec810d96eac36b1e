"""Which diagnosis reruns to run, and when to stop.

``run_batch(list of control sets)`` runs one rerun pair per set (concurrently where the audit has
slots) and returns an :class:`Experiment` per set. The schedule, ``width`` pairs at a time:
1. the most likely controls (the first ``width`` the evidence hinted at); stop at a confirmation;
2. a screen with every control that cannot make a correct program fail, all at once: if even that
   leaves the replicas different, no single one of them can help, so only the hinted controls left
   out of the screen are tried before giving up;
3. otherwise the remaining controls, ``width`` at a time, until one confirms.
A divergence no control can remove (a nondeterministic kernel) costs two or three reruns, not twelve."""
from __future__ import annotations

from typing import Callable

from ..controls import BY_NAME
from .conclude import Experiment


def schedule(plan_order: list, run_batch: Callable[[list], list], width: int = 1, hinted: frozenset = None) -> list:
    """Run experiments by the schedule above; returns them in the order they ran. ``hinted``: the
    controls the evidence pointed at (default: all of the plan); without any, the screen comes first,
    and a control that may fail is tried only when hinted."""
    width = max(1, width)
    hinted = frozenset(plan_order) if hinted is None else hinted
    done: list = []

    def batch(sets: list) -> list:
        results = run_batch(sets) if sets else []
        done.extend(results)
        return results

    def confirms(results: list) -> bool:
        return any(x.agreed and len(x.controls) == 1 for x in results)

    first = [c for c in plan_order if c in hinted][:width]
    if not plan_order or confirms(batch([frozenset({c}) for c in first])):
        return done
    safe = [c for c in plan_order if not BY_NAME[c].may_fail]
    risky = [c for c in plan_order if BY_NAME[c].may_fail and c not in first and c in hinted]
    remaining = [c for c in safe if c not in first]
    if len(safe) > 1 and remaining:
        screen = batch([frozenset(safe)])
        if not screen[0].agreed and screen[0].error is None:
            remaining = []  # not even all of them together: none alone will (a screen that failed proves nothing)
    for i in range(0, len(remaining + risky), width):
        if confirms(batch([frozenset({c}) for c in (remaining + risky)[i:i + width]])):
            break
    return done
