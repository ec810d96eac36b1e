"""Cause rules, plan, schedule and conclusion, table by table over typed evidence: no replica runs."""
from __future__ import annotations

import pytest

from pytest_mlrepro.causes import (DivergenceFacts, Evidence, Experiment, LoaderRecord, ReplicaEvidence, SeedCall,
                                   diagnose, hints, plan, schedule)
from pytest_mlrepro.causes import rules
from pytest_mlrepro.controls import CONTROLS
from pytest_mlrepro.probes import seed_value
from pytest_mlrepro.result import CAUSE_KINDS, AuditResult, Cause

ALL = [c.name for c in CONTROLS]


def rep(mode="program", calls=(), seeded=(), loaders=(), rng=None, ops=()):
    return ReplicaEvidence(seeding_mode=mode, calls=tuple(calls), seeded=frozenset(seeded), loaders=tuple(loaders),
                           flagged_ops=tuple(ops), rng_at_first_step=rng)


def ev(a=None, b=None, phase=None, inputs=None, rng_matched=None, env=None):
    a = a or rep()
    return Evidence(a=a, b=b or a, divergence=DivergenceFacts(phase=phase, module="m", inputs_matched=inputs,
                                                              rng_matched=rng_matched), env_diff=env or {})


def call(api, kind="value", value=None, site="train.py:3", origin="user"):
    return SeedCall(api=api, kind=kind, value=value, site=site, origin=origin)


def loader(order="h1", seed=1, workers=0, sampler="RandomSampler"):
    return LoaderRecord(site="train.py:9", sampler=sampler, num_workers=workers, base_seed=seed, index_hash=order)


@pytest.mark.parametrize("given, expected", [
    (None, ("unseeded", None)), (7, ("value", 7)), ("abc", ("value", "abc")), ([1, 2], ("value", "[1, 2]")),
    (b"\x00", ("value", "6e340b9cffb37a98")),
])
def test_seed_values_are_values(given, expected):
    assert seed_value(given) == expected


def test_an_objects_repr_is_never_a_seed_value():
    import numpy as np
    import torch

    assert seed_value(np.random.default_rng(3)) == ("object", "Generator")
    assert seed_value(torch.Generator()) == ("object", "Generator")
    assert seed_value(np.int64(5)) == ("value", 5) and seed_value(torch.tensor(6)) == ("value", 6)
    assert seed_value(np.random.SeedSequence(9)) == ("value", 9)
    # two different Generator objects passed through default_rng are the same evidence: no differing "seed"
    a = rep(calls=[call("numpy.random.default_rng", *seed_value(np.random.default_rng()))])
    b = rep(calls=[call("numpy.random.default_rng", *seed_value(np.random.default_rng()))])
    assert rules.seed_values_differ(ev(a, b)) is None


# rule -> (evidence, expected (kind, first control) or None)
RULE_TABLE = [
    ("seed_values_differ", ev(rep(calls=[call("random.seed", value=1)]), rep(calls=[call("random.seed", value=2)])),
     ("time_seed", "clock")),
    ("seed_values_differ", ev(rep(calls=[call("random.seed", value=1)]), rep(calls=[call("random.seed", value=1)])), None),
    ("seed_values_differ", ev(rep(calls=[call("torch.manual_seed", value=1, origin="torch")]),
                              rep(calls=[call("torch.manual_seed", value=2, origin="torch")])), None),
    ("loader_order_differs", ev(rep(loaders=[loader("h1")]), rep(loaders=[loader("h2")])), ("data_order", "torch_cpu")),
    ("loader_order_differs", ev(rep(loaders=[loader("h1", sampler="MySampler")]), rep(loaders=[loader("h2", sampler="MySampler")])),
     ("data_order", "python_rng")),
    ("loader_order_differs", ev(rep(loaders=[loader("h1")])), None),
    ("worker_seeds_differ", ev(rep(loaders=[loader(seed=1, workers=2)]), rep(loaders=[loader(seed=2, workers=2)]), phase="input"),
     ("worker_seeding", "worker_seeding")),
    ("worker_seeds_differ", ev(rep(loaders=[loader(seed=1, workers=0)]), rep(loaders=[loader(seed=2, workers=0)])), None),
    ("worker_seeds_differ", ev(rep(loaders=[loader(seed=1, workers=2)]), rep(loaders=[loader(seed=2, workers=2)]),
                               phase="forward"), None),
    ("thread_counts_differ", ev(env={"num_threads": (1, 2)}), ("thread_count", "threads")),
    ("thread_counts_differ", ev(), None),
    ("unseeded_generator_made", ev(rep(calls=[call("numpy.random.default_rng", "unseeded")])), ("unseeded_rng", "numpy_unseeded")),
    ("unseeded_generator_made", ev(rep(calls=[call("numpy.random.RandomState", "unseeded")])), ("unseeded_rng", "numpy_unseeded")),
    ("unseeded_generator_made", ev(rep(calls=[call("random.Random", "unseeded")])), ("unseeded_rng", "python_rng")),
    ("unseeded_generator_made", ev(rep(calls=[call("random.Random", "unseeded", origin="library")])), None),
    ("unseeded_generator_made", ev(rep(calls=[call("numpy.random.default_rng", "object")])), None),
    ("unseeded_globals", ev(rep(seeded={"numpy"}, rng={"python": "1", "numpy": "x"}), rep(rng={"python": "2", "numpy": "y"})),
     ("unseeded_rng", "python_rng")),
    ("unseeded_globals", ev(rep(mode="harness", rng={"python": "1"}), rep(mode="harness", rng={"python": "2"})), None),
    ("kernel_with_matching_inputs", ev(phase="forward", inputs=True, rng_matched=True), ("nondeterministic_kernel", "deterministic_kernels")),
    ("kernel_with_matching_inputs", ev(phase="forward", inputs=True, rng_matched=False), None),
    ("kernel_with_matching_inputs", ev(phase="input", inputs=False), None),
    ("draw_in_forward", ev(phase="forward", inputs=True, rng_matched=False), ("unseeded_rng", "python_rng")),
    ("reads_entropy", ev(rep(calls=[call("uuid.uuid4", "read")])), ("os_entropy", "entropy")),
    ("reads_entropy", ev(rep(calls=[call("time.time", "read")])), None),
    ("reads_clock", ev(rep(calls=[call("time.time_ns", "read")])), ("clock", "clock")),
    ("reads_clock", ev(rep(calls=[call("os.urandom", "read")])), None),
    ("input_differs", ev(phase="input"), ("data_order", "hash_seed")),
    ("input_differs", ev(phase="init"), None),
]


@pytest.mark.parametrize("rule, evidence, expected", RULE_TABLE, ids=[f"{r[0]}-{i}" for i, r in enumerate(RULE_TABLE)])
def test_rule_table(rule, evidence, expected):
    hint = getattr(rules, rule)(evidence)
    assert (None if hint is None else (hint.kind, hint.controls[0])) == expected
    if hint is not None:
        assert hint.rule == rule and hint.kind in CAUSE_KINDS and set(hint.controls) <= set(ALL)


def test_every_rule_is_in_the_table_and_the_order_is_fixed():
    assert {r[0] for r in RULE_TABLE} == {f.__name__ for f in rules.RULES}
    e = ev(rep(calls=[call("random.Random", "unseeded")]), phase="input")
    assert [h.rule for h in hints(e)] == ["unseeded_generator_made", "input_differs"]


def test_the_plan_tries_hinted_controls_first_and_only_applicable_ones():
    e = ev(rep(calls=[call("random.Random", "unseeded")]), phase="input")
    order = plan(hints(e), [c for c in ALL if c != "hash_seed"])
    assert order[:3] == ["python_rng", "entropy", "clock"] and "hash_seed" not in order
    assert sorted(order) == sorted(c for c in ALL if c != "hash_seed")
    assert plan([], ["threads", "python_rng"]) == ["python_rng", "threads"]  # the table's order


def _fake(agreeing: set):
    """run_batch that agrees when the controls include one of ``agreeing``; records every set."""
    ran = []

    def run_batch(sets):
        ran.extend(sets)
        return [Experiment(s, bool(s & agreeing), "x") for s in sets]

    return run_batch, ran


@pytest.mark.parametrize("agreeing, width, expected, last_batch", [
    ({"python_rng"}, 1, 1, [{"python_rng"}]),  # the hint is right: one rerun
    (set(), 1, 3, [{"deterministic_kernels"}]),  # nothing helps: first, screen, the one the screen left out
    ({"clock"}, 1, 4, [{"clock"}]),  # first fails, the screen agrees, then one by one (entropy, clock)
    ({"clock"}, 2, 5, [{"clock"}, {"numpy_global"}]),  # two at a time: [python_rng, entropy], screen, [clock, numpy_global]
])
def test_the_schedule_stops_at_the_first_confirmation(agreeing, width, expected, last_batch):
    order = ["python_rng", "entropy", "clock", "numpy_global", "deterministic_kernels"]
    run_batch, ran = _fake(agreeing)
    done = schedule(order, run_batch, width)
    assert [x.controls for x in done] == ran and len(ran) == expected
    assert ran[-len(last_batch):] == last_batch
    screens = [s for s in ran if len(s) > 1]
    assert screens in ([], [frozenset(order) - {"deterministic_kernels"}])  # the screen never holds a control that may fail
    assert schedule([], run_batch) == []


def test_without_hints_the_screen_comes_first_and_a_control_that_may_fail_is_not_tried():
    run_batch, ran = _fake(set())
    schedule(["python_rng", "clock", "deterministic_kernels"], run_batch, 1, hinted=frozenset())
    assert ran == [frozenset({"python_rng", "clock"})]
    run_batch, ran = _fake({"clock"})
    schedule(["python_rng", "clock", "deterministic_kernels"], run_batch, 1, hinted=frozenset())
    assert ran == [frozenset({"python_rng", "clock"}), {"python_rng"}, {"clock"}]


def _conclude(e, agreeing, applicable=ALL):
    run_batch, _ = _fake(agreeing)
    return diagnose(e, applicable, run_batch)


def test_the_cause_is_the_control_that_made_the_replicas_agree_not_the_hint():
    # the evidence says "a seed value differs" but the rerun shows os entropy: the experiment wins
    e = ev(rep(calls=[call("random.seed", value=1)]), rep(calls=[call("random.seed", value=2)]))
    cause = _conclude(e, {"entropy"})
    assert (cause.kind, cause.confirmed, cause.control) == ("time_seed", True, "entropy")
    assert "confirmed by rerun" in cause.detail and "uuid" in cause.detail
    # a thread-count difference that a thread control does not fix, while a torch control does
    cause = _conclude(ev(env={"num_threads": (1, 2)}), {"torch_cpu"})
    assert (cause.kind, cause.control) == ("unseeded_rng", "torch_cpu")


@pytest.mark.parametrize("sampler, agreeing, kind, advice, not_advice", [
    ("RandomSampler", {"torch_cpu"}, "data_order", "generator=torch.Generator().manual_seed", None),
    ("ShuffleSampler", {"python_rng"}, "data_order", "(ShuffleSampler) shuffles with its own generator, which generator= "
     "does not reach: seed it: random.seed(seed) for the global, random.Random(seed)", "pass generator="),
    ("ShuffleSampler", {"numpy_unseeded"}, "data_order", "(ShuffleSampler) shuffles with its own generator, which "
     "generator= does not reach: pass a seed where it is created: np.random.default_rng(seed)", "pass generator="),
    # torch's RandomSampler draws from torch: python `random` confirmed upstream of it (say, a seed drawn from it)
    ("RandomSampler", {"python_rng"}, "data_order", "seed it: random.seed(seed)", "its own generator"),
])
def test_the_advice_fits_the_mechanism(sampler, agreeing, kind, advice, not_advice):
    a = rep(loaders=[loader("h1", sampler=sampler)], calls=[call("random.Random", "unseeded", site="s.py:12")])
    cause = _conclude(ev(a, rep(loaders=[loader("h2", sampler=sampler)])), agreeing)
    assert cause.kind == kind and cause.confirmed and advice in cause.detail
    assert not_advice is None or not_advice not in cause.detail


@pytest.mark.parametrize("agreeing, kind, site", [
    ({"numpy_unseeded"}, "unseeded_rng", "numpy Generator created without a seed at aug.py:28"),
    ({"hash_seed"}, "hash_seed", None), ({"listing_order"}, "listing_order", None), ({"clock"}, "clock", None),
    ({"entropy"}, "os_entropy", None), ({"threads"}, "nondeterministic_kernel", None),
    ({"deterministic_kernels"}, "nondeterministic_kernel", None), ({"worker_seeding"}, "worker_seeding", None),
])
def test_each_confirming_control_names_its_cause(agreeing, kind, site):
    a = rep(calls=[call("numpy.random.default_rng", "unseeded", site="aug.py:28")])
    # strict deterministic kernels may fail a correct program: tried only where a kernel is suspected
    kernel = "deterministic_kernels" in agreeing
    cause = _conclude(ev(a, phase="forward", inputs=kernel, rng_matched=True if kernel else None), agreeing)
    assert (cause.kind, cause.confirmed, cause.control) == (kind, True, next(iter(agreeing)))
    assert site is None or site in cause.detail


def test_the_thread_control_names_a_thread_count_only_where_the_counts_differed():
    differed = _conclude(ev(env={"num_threads": (1, 2)}), {"threads"})
    assert (differed.kind, differed.control) == ("thread_count", "threads") and "pin the thread count" in differed.detail
    # same count in both replicas, and one thread makes them agree: a multi-threaded kernel, not the count
    same = _conclude(ev(phase="forward", inputs=True, rng_matched=True), {"threads"})
    assert (same.kind, same.confirmed, same.control) == ("nondeterministic_kernel", True, "threads")
    assert "pin the thread count" not in same.detail and "same thread count" in same.detail


def test_without_a_confirming_rerun_the_best_hint_is_marked_unconfirmed():
    cause = _conclude(ev(phase="forward", inputs=True, rng_matched=True, a=rep(ops=["put_ at k.py:3"])), set())
    assert (cause.kind, cause.confirmed, cause.control) == ("nondeterministic_kernel", False, None)
    assert "not confirmed" in cause.detail and "torch flagged: put_ at k.py:3" in cause.detail
    assert [r["controls"] for r in cause.reruns][0] == ["deterministic_kernels"]  # then the screen: 2 reruns
    assert len(cause.reruns) == 2 and not any(r["agreed"] for r in cause.reruns)
    unknown = _conclude(ev(), set())
    assert (unknown.kind, unknown.confirmed) == ("unknown", False) and "no control" in unknown.detail
    assert len(unknown.reruns) == 1  # no hint: the screen alone


def test_only_all_controls_together_is_said_so():
    def run_batch(sets):
        return [Experiment(s, len(s) > 1, "x") for s in sets]

    cause = diagnose(ev(phase="input"), ALL, run_batch)
    assert cause.kind == "data_order" and not cause.confirmed and "only all of them together" in cause.detail


def test_cause_round_trips_through_the_report():
    cause = Cause("unseeded_rng", "d", {"site": "a.py:1"}, confirmed=True, control="python_rng",
                  reruns=[{"controls": ["python_rng"], "agreed": True, "label": "control-python_rng", "error": None}])
    result = AuditResult(target="t", seed=0, runs=2, device="cpu", isolation="process", seeding="program",
                         comparison={"mode": "bitwise"}, deterministic=False, cause=cause)
    back = AuditResult.from_dict(result.to_dict())
    assert back.cause == cause
    old = result.to_dict()
    for key in ("confirmed", "control", "reruns"):
        old["cause"].pop(key)
    assert AuditResult.from_dict(old).cause == Cause("unseeded_rng", "d", {"site": "a.py:1"})


def test_diagnosis_reruns_use_the_cores_not_the_replica_count():
    from pytest_mlrepro.auditing import diagnosis_width, replica_slots
    from pytest_mlrepro.config import AuditConfig

    four = AuditConfig(parallel=4).validate()
    assert replica_slots(four, four.runs) == 2 and diagnosis_width(four) == 2  # two pairs, though runs=2
    assert diagnosis_width(AuditConfig(parallel=1).validate()) == 1
    assert diagnosis_width(AuditConfig(isolation="inprocess", parallel=4).validate()) == 1


def test_a_screen_that_failed_proves_nothing_and_the_single_controls_still_run():
    ran = []

    def run_batch(sets):  # all controls at once time out (a program polling the fixed clock); python_rng alone agrees
        ran.extend(sets)
        return [Experiment(s, False, "x", error="timed out") if len(s) > 1 else Experiment(s, s == {"python_rng"}, "x")
                for s in sets]

    done = schedule(["clock", "python_rng", "entropy"], run_batch, 1, hinted=frozenset())
    assert ran == [frozenset({"clock", "python_rng", "entropy"}), {"clock"}, {"python_rng"}]
    assert done[-1].agreed and done[-1].controls == {"python_rng"}


@pytest.mark.parametrize("recurs", [True, False])
def test_a_race_confirmed_by_one_rerun_is_checked_against_a_rerun_without_controls(recurs):
    """One thread (both replicas already had the same count) or strict kernels made a pair agree: a race can
    do that by chance, so the pair is rerun without any control. If it agrees too, nothing is confirmed."""
    e = ev(rep(), rep(), phase="forward", inputs=True, rng_matched=True)
    ran = []

    def run_batch(sets):
        ran.extend(sets)
        return [Experiment(s, bool(s & {"threads"}) or (not s and not recurs), "x") for s in sets]

    cause = diagnose(e, ALL, run_batch)
    assert ran[-1] == frozenset()  # the uncontrolled rerun, last
    if recurs:  # it still differed without controls: the thread control is what made the pair agree
        assert (cause.kind, cause.confirmed, cause.control) == ("nondeterministic_kernel", True, "threads")
    else:
        assert not cause.confirmed and cause.control is None and cause.evidence["intermittent"]
        assert "also in a rerun without any control" in cause.detail


def test_a_seed_confirmed_by_rerun_needs_no_uncontrolled_rerun():
    """An unseeded generator differs in every run of the pair: its confirming rerun is proof enough."""
    ran = []

    def run_batch(sets):
        ran.extend(sets)
        return [Experiment(s, bool(s & {"python_rng"}), "x") for s in sets]

    e = ev(rep(calls=[call("random.Random", "unseeded", site="s.py:1")]), rep())
    assert diagnose(e, ALL, run_batch).confirmed and frozenset() not in ran
    e_threads = ev(env={"num_threads": (1, 2)})  # counts that differ: a deterministic difference, no race
    ran.clear()

    def threads_batch(sets):
        ran.extend(sets)
        return [Experiment(s, bool(s & {"threads"}), "x") for s in sets]

    assert diagnose(e_threads, ALL, threads_batch).confirmed and frozenset() not in ran
