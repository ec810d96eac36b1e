"""One target audited several times in a session: every audit keeps its own plots, run and name."""
from __future__ import annotations

import hashlib
import json

from pytest_mlrepro.publish import PublishConfig, publish_session, read_report
from pytest_mlrepro.publish.naming import RUN_NAME_MAX, AuditName, audit_names, target_slug
from pytest_mlrepro.result import AuditResult
from pytest_mlrepro.wandb_offline import read_run

NONDET = "examples/unseeded.py:train"


def _copy(result, **changes) -> AuditResult:
    r = AuditResult.from_dict(result.to_dict())
    for k, v in changes.items():
        setattr(r, k, v)
    return r


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_target_audited_once_keeps_its_plain_name(sample_results):
    results = [sample_results[k] for k in ("deterministic", "nondeterministic", "checkpoint")]
    names = audit_names(results)
    assert [n.label for n in names] == [r.target for r in results]
    assert [n.run_name for n in names] == [r.target for r in results]
    assert [n.slug for n in names] == [target_slug(r.target) for r in results]  # file names as before


def test_audits_of_one_target_are_told_apart_by_what_differs(sample_results):
    base = sample_results["nondeterministic"]
    results = [_copy(base, seed=0), _copy(base, seed=1), _copy(base, seed=1), sample_results["deterministic"]]
    labels = [n.label for n in audit_names(results)]
    assert labels == [f"{NONDET} [seed 0]", f"{NONDET} [seed 1]", f"{NONDET} [seed 1, #2]", "tests/test_train.py::test_mlp"]
    two_tests = [_copy(base, test="tests/a.py::test_a"), _copy(base, test="tests/b.py::test_b")]
    assert [n.label for n in audit_names(two_tests)] == [f"{NONDET} [tests/a.py::test_a]", f"{NONDET} [tests/b.py::test_b]"]
    twins = [_copy(base), _copy(base)]  # same test, target and seed: only a counter tells them apart
    assert [n.label for n in audit_names(twins)] == [NONDET, f"{NONDET} [#2]"]
    names = audit_names(results + two_tests + twins)
    assert len({n.slug for n in names}) == len({n.run_name for n in names}) == len(names)
    assert audit_names(results) == audit_names([_copy(r) for r in results])  # stable: same session, same names


def test_names_stay_unique_when_cut_to_the_run_name_limit(sample_results):
    long = "pkg/" + "x" * 200 + ".py:train"
    results = [_copy(sample_results["nondeterministic"], target=long, seed=s) for s in (0, 1)]
    names = audit_names(results)
    assert [len(n.run_name) for n in names] == [RUN_NAME_MAX, RUN_NAME_MAX]
    assert names[0].run_name.endswith("x… [seed 0]") and names[1].run_name.endswith("x… [seed 1]")  # cut visibly, suffix kept
    assert names[0].slug != names[1].slug and all(len(n.slug) < 120 for n in names)
    # a suffixed label that happens to be another target's name still gets a name of its own
    clash = [_copy(results[0], target="t", seed=0), _copy(results[0], target="t", seed=1),
             _copy(results[0], target="t [seed 0]")]
    assert len({n.label for n in audit_names(clash)}) == 3
    assert AuditName("t").run_name == "t"


def test_a_target_audited_twice_keeps_both_plots_and_both_runs_get_their_own(tmp_path, sample_results, wandb_home):
    """Seeds 7 and 8 of one target, and seed 8 again: six PNGs, three runs, each with its own images."""
    first = sample_results["nondeterministic"]
    second = _copy(first, seed=8)
    for m in second.replicas[1].metrics:  # another seed, other curves: the pictures must differ
        m["loss"] += 0.5
    third = _copy(second)
    results = [first, second, third]
    config = PublishConfig(report_path=tmp_path / "report.json", wandb_dir=tmp_path / "wb", project="mlrepro-tests")
    outcome = publish_session(results, config, session_info={"id": "twice"})
    assert outcome.warnings == [] and outcome.errors == []

    pngs = sorted((tmp_path / "report-plots").glob("*.png"))
    assert len(pngs) == 6, [p.name for p in pngs]
    assert outcome.plots == {NONDET: outcome.plots[NONDET]} and sorted(outcome.plots[NONDET]) == pngs
    names = audit_names(results)
    per_audit = [outcome.plots[NONDET][2 * i:2 * i + 2] for i in range(3)]
    for name, paths in zip(names, per_audit):
        assert [p.name for p in paths] == [f"{name.slug}-metrics.png", f"{name.slug}-step-divergence.png"]
    assert _sha(per_audit[0][0]) != _sha(per_audit[1][0])  # seed 8's curves did not overwrite seed 7's

    runs = outcome.wandb_runs
    assert [r.name for r in runs] == [f"{NONDET} [seed 7]", f"{NONDET} [seed 8]", f"{NONDET} [seed 8, #2]"]
    assert len({r.run_id for r in runs}) == 3 and len({r.run_dir for r in runs}) == 3
    for info, paths in zip(runs, per_audit):
        run = read_run(info.run_dir)
        assert run.display_name == info.name and run.config["seed"] == results[info.audit].seed
        logged = {k: v for row in run.history for k, v in row.items() if k.startswith("plots/")}
        images = {k: _sha(info.run_dir / "files" / ref["path"]) for k, ref in logged.items()}
        assert images == {"plots/metrics": _sha(paths[0]), "plots/step_divergence": _sha(paths[1])}

    report = read_report(tmp_path / "report.json")
    assert report["outputs"]["plots"] == {NONDET: [str(p) for p in outcome.plots[NONDET]]}
    assert [r["name"] for r in report["outputs"]["wandb_runs"]] == [r.name for r in runs]
    spec = json.loads(outcome.report_spec_path.read_text())
    assert [(a["name"], a["run_id"]) for a in spec["audits"]] == [(r.name, r.run_id) for r in runs]
