"""pytest hooks and the ``mlrepro`` fixture. Loading this module imports neither torch nor wandb:
those load only when an audit runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .config import TEXT_OPTIONS, AuditConfig, Resolved, marker_signature
from .errors import ConfigError, MlreproError
from .options import MARKER_ALLOWED, add_pytest_options, resolve, with_marker

options_key = pytest.StashKey[Resolved]()
results_key = pytest.StashKey[list]()
outcome_key = pytest.StashKey[Any]()
publish_config_key = pytest.StashKey[Any]()
handle_key = pytest.StashKey[Any]()
marker_config_key = pytest.StashKey[AuditConfig]()
deselected_key = pytest.StashKey[list]()
unused_key = pytest.StashKey[list]()  # baselines no collected test uses (paths as strings)
baseline_notes_key = pytest.StashKey[list]()  # baselines written or updated this session

SKIP_REASON = "mlrepro audits are off: pass --mlrepro to run them"
MARKER_SIGNATURE = (
    f"{marker_signature()}: a determinism audit; skipped unless pytest runs with --mlrepro. With a target and no "
    "call of the mlrepro fixture, the test audits the target and fails unless it is deterministic."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mlrepro", "determinism audits of ML training (pytest-mlrepro)")
    group.addoption("--mlrepro", action="store_true", dest="mlrepro", default=False,
                    help="run determinism audits (tests marked mlrepro and the mlrepro fixture); without it they are skipped. Default: False")
    add_pytest_options(group, parser.addini)


def _publish_config(resolved: Resolved, rootdir: Path):
    """The publishers' config; built at session start so a bad path or name stops the session early."""
    from .publish.config import PublishConfig

    s = resolved.session
    return PublishConfig(
        report_path=Path(s.report) if s.report else None, wandb_mode=s.wandb,
        wandb_dir=Path(s.wandb_dir) if s.wandb_dir else rootdir / "mlrepro-out", project=s.wandb_project,
        entity=s.wandb_entity, group=s.wandb_group, tags=s.wandb_tags)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_SIGNATURE)
    try:
        resolved = resolve(config.getoption, config.getini)
        config.stash[publish_config_key] = publish = _publish_config(resolved, Path(config.rootpath))
        if resolved.enabled and publish.report_path is not None and not hasattr(config, "workerinput"):
            from .publish.json_report import check_report_path

            check_report_path(publish.report_path)
        if resolved.session.target:  # a typo in --mlrepro-target stops the session before anything runs
            from .preflight import check_target

            for target in resolved.session.target:
                check_target(target, rootdir=config.invocation_params.dir)
    except MlreproError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[options_key] = resolved
    config.stash[results_key] = []
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "mlrepro-xdist")


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    r = config.stash.get(options_key, None)
    if r is None or not r.enabled:
        return None
    a, s = r.audit, r.session
    return [f"mlrepro: seed={a.seed} device={a.device} isolation={a.isolation} runs={a.runs} "
            f"deterministic-settings={'on' if a.deterministic else 'off'} timeout={a.timeout or 'none'} "
            f"wandb={s.wandb} report={s.report or '-'}" + (f" base={s.base}" if s.base else "")
            + (f" baselines={s.baseline_mode}" if s.baseline_mode else "")]


def _marker_config(item: pytest.Item) -> AuditConfig:
    """The test's validated audit config (session options with the marker's keywords on top)."""
    cached = item.stash.get(marker_config_key, None)
    if cached is not None:
        return cached
    session = item.config.stash[options_key].audit
    marker = item.get_closest_marker("mlrepro")
    if marker is None:
        return session
    if len(marker.args) > 1 or (marker.args and "target" in marker.kwargs):
        raise ConfigError("mlrepro marker: give the target once (one positional argument or target=)")
    unknown = sorted(set(marker.kwargs) - MARKER_ALLOWED)
    if unknown:
        raise ConfigError(f"mlrepro marker: unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(sorted(MARKER_ALLOWED))}")
    try:
        cfg = with_marker(session, marker.kwargs)
    except ConfigError as exc:
        raise ConfigError(f"mlrepro marker: {exc}") from None
    item.stash[marker_config_key] = cfg
    return cfg


def _marker_target(item: pytest.Item) -> Any:
    marker = item.get_closest_marker("mlrepro")
    if marker is None:
        return None
    return marker.args[0] if marker.args else marker.kwargs.get("target")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mlrepro") is None:
        return
    try:
        _marker_config(item)
        problem = None
    except ConfigError as exc:
        problem = exc
    if problem is not None:
        if item.config.stash[options_key].enabled:  # listed in the summary and the report too
            _record(item, _config_error_result(item, problem))
        pytest.fail(str(problem), pytrace=False)
    if not item.config.stash[options_key].enabled:
        pytest.skip(SKIP_REASON)


def _config_error_result(item: pytest.Item, exc: Exception):
    from .result import AuditError, AuditResult

    cfg = item.config.stash[options_key].audit
    target = _marker_target(item)
    return AuditResult(target=str(target) if target is not None else item.nodeid, seed=cfg.seed, runs=cfg.runs,
                       device=cfg.device, isolation=cfg.isolation, seeding="-", comparison={}, deterministic=False,
                       error=AuditError(type=type(exc).__name__, message=str(exc)))


def _record(item: pytest.Item, result: Any) -> None:
    from .publish.terminal import junit_properties

    result.test = item.nodeid
    item.config.stash[results_key].append(result)
    item.add_report_section("call", "mlrepro", result.explain())
    item.user_properties.extend(junit_properties(result))


def _handle(item: pytest.Item, factory: pytest.TempPathFactory):
    from .fixture import MlreproHandle

    marker = item.get_closest_marker("mlrepro")
    sources = dict(item.config.stash[options_key].sources)
    sources.update({k: "marker" for k in (marker.kwargs if marker else ()) if k != "target"})
    return MlreproHandle(item, _marker_config(item), _marker_target(item), lambda: factory.mktemp("mlrepro"), _record,
                         sources=sources, base=item.config.stash[options_key].session.base)


@pytest.fixture
def mlrepro(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The audit API bound to this test's options (marker > command line > environment > ini)."""
    if not request.config.stash[options_key].enabled:
        pytest.skip(SKIP_REASON)
    handle = _handle(request.node, tmp_path_factory)
    request.node.stash[handle_key] = handle
    return handle


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A marked test with a target that did not audit it itself audits it after its body; then, with
    --mlrepro-baseline, the test's audits are gated against its stored baseline."""
    result = yield
    handle = item.stash.get(handle_key, None)
    if _marker_target(item) is not None:
        if handle is None:
            handle = _handle(item, item.config._tmp_path_factory)  # type: ignore[attr-defined]
        if not handle.results:
            handle.audit().assert_deterministic()
    _gate(item, handle)
    return result


def _test_name(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name


def _gate(item: pytest.Item, handle: Any) -> None:
    """With --mlrepro-baseline: compare this test's audits with its stored baseline, fail on a mismatch."""
    mode = item.config.stash[options_key].session.baseline_mode
    if mode is None or handle is None or not handle.results:
        return
    from .baseline.gate import run_gate
    from .baseline.store import baseline_path

    outcome = run_gate(handle.results, test_id=item.nodeid, path=baseline_path(item.path, _test_name(item)), mode=mode,
                       tolerances=handle.config.tolerances)
    if outcome is None:
        return
    if outcome.passed:
        item.add_report_section("call", "mlrepro baseline", outcome.message)
    if outcome.written == "baseline" and outcome.passed:
        item.config.stash.setdefault(baseline_notes_key, []).append(outcome.message)
    if not outcome.passed:
        pytest.fail(outcome.message, pytrace=False)


@pytest.hookimpl(tryfirst=True)  # before -k / -m / --deselect see the items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """--mlrepro-target: one test item per check of each target, collected without a test file."""
    resolved = config.stash.get(options_key, None)
    if resolved is None or not resolved.session.target:
        return
    from .target_items import collectors

    for collector in collectors(session, resolved.session.target, Path(config.invocation_params.dir), _audit_target,
                                _record_target):
        new = collector.collect()
        config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, new))
        items.extend(new)


def _audit_target(collector: Any, item: pytest.Item) -> Any:
    """The audit of one --mlrepro-target, run by the first of its items this process runs."""
    resolved = item.config.stash[options_key]
    if not resolved.enabled:
        pytest.skip(SKIP_REASON)
    from .auditing import audit
    from .result import AuditError, AuditResult

    cfg = resolved.audit
    try:
        result = audit(collector.target, cfg, rootdir=collector.rootdir,
                       workdir=item.config._tmp_path_factory.mktemp("mlrepro-target"))  # type: ignore[attr-defined]
    except MlreproError as exc:  # no CUDA where it was asked for, ...: every item of the target says so
        result = AuditResult(target=collector.target, seed=cfg.seed, runs=cfg.runs, device=cfg.device,
                             isolation=cfg.isolation, seeding="-", comparison={}, deterministic=False,
                             error=AuditError(type=type(exc).__name__, message=str(exc)))
    return result


def _record_target(item: pytest.Item, result: Any) -> None:
    """A target's audit, recorded once (by its reproducible item) under the target's node id."""
    _record(item, result)
    result.test = item.parent.nodeid


def pytest_deselected(items: list) -> None:
    if items:
        items[0].config.stash.setdefault(deselected_key, []).extend(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """With baselines on: find the stored baselines no collected test uses (listed at the end)."""
    config = session.config
    resolved = config.stash.get(options_key, None)
    if resolved is None or not resolved.enabled or resolved.session.baseline_mode is None:
        return
    from .baseline.store import baseline_path, unused

    items = [*session.items, *config.stash.get(deselected_key, [])]
    partial = {str(Path(a.split("::", 1)[0]).resolve()) for a in config.args if "::" in a}  # some tests of it only
    modules = {Path(i.path) for i in items if str(Path(i.path).resolve()) not in partial}
    expected = {baseline_path(i.path, _test_name(i)) for i in items}
    config.stash[unused_key] = [str(p) for p in unused(expected, modules)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    options = config.stash.get(options_key, None)
    if options is None or not options.enabled:
        return
    if hasattr(config, "workerinput"):  # an xdist worker hands its results to the controller, which publishes
        config.workeroutput["mlrepro_results"] = json.dumps([r.to_dict() for r in config.stash[results_key]])
        config.workeroutput["mlrepro_unused"] = json.dumps(config.stash.get(unused_key, None))
        config.workeroutput["mlrepro_baseline_notes"] = json.dumps(config.stash.get(baseline_notes_key, []))
        return
    _prune(config, session)
    results = config.stash[results_key]
    if not results:
        return
    from .publish.session import publish_session

    resolved = config.stash[options_key]
    session_info = {"command": "pytest " + " ".join(config.invocation_params.args), "rootdir": str(config.rootpath),
                    "exitstatus": int(exitstatus),
                    "options": _plain(resolved)}
    try:
        outcome = publish_session(results, config.stash[publish_config_key], session_info=session_info)
    except Exception as exc:  # W&B trouble never changes a verdict; a lost report does (below)
        outcome = _FailedPublish(f"publishing failed: {type(exc).__name__}: {exc}",
                                 report_asked=config.stash[publish_config_key].report_path is not None)
    config.stash[outcome_key] = outcome
    if getattr(outcome, "errors", None) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # the report asked for was not written


def _plain(resolved: Resolved) -> dict:
    """The session's text options, as the report records them."""
    return {o.name: getattr(resolved.audit if o.audit else resolved.session, o.name) for o in TEXT_OPTIONS}


def _prune(config: pytest.Config, session: pytest.Session) -> None:
    """--mlrepro-prune removes the unused baselines (only when every test passed: nothing is lost to a
    collection error)."""
    resolved = config.stash[options_key]
    unused = config.stash.get(unused_key, None)
    if not resolved.session.prune or not unused:
        return
    if session.testsfailed or session.exitstatus not in (0, pytest.ExitCode.OK):
        config.stash[unused_key] = unused  # listed, kept
        config.stash.setdefault(baseline_notes_key, []).append("not pruned: the session had failures")
        return
    for path in unused:
        Path(path).unlink(missing_ok=True)
    config.stash.setdefault(baseline_notes_key, []).append(f"pruned {len(unused)} unused baseline(s)")
    config.stash[unused_key] = []


class _FailedPublish:
    """The outcome when publishing raised: a warning, and an error when a report was asked for."""

    def __init__(self, message: str, report_asked: bool = True):
        self.warnings = [message]
        self.errors = [message] if report_asked else []
        self.paths = []


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    options = config.stash.get(options_key, None)
    if options is None or not options.enabled or hasattr(config, "workerinput"):
        return
    results = config.stash.get(results_key, [])
    notes, unused = config.stash.get(baseline_notes_key, []), config.stash.get(unused_key, None) or []
    if not results and not notes and not unused:
        return
    from .publish.terminal import summary_lines

    terminalreporter.write_sep("=", "mlrepro")
    if results:
        for line in summary_lines(results, config.stash.get(outcome_key, None)):
            terminalreporter.write_line(line)
    for note in notes:
        terminalreporter.write_line(note)
    if unused:
        terminalreporter.write_line(f"{len(unused)} unused baseline(s) (no test uses them; remove with --mlrepro-prune):")
        for path in unused:
            terminalreporter.write_line(f"  {path}")


class XdistHooks:
    """Registered only when pytest-xdist is present: merge the workers' results on the controller."""

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        from .result import AuditResult

        output = getattr(node, "workeroutput", {})
        stash = node.config.stash
        for d in json.loads(output.get("mlrepro_results") or "[]"):
            stash[results_key].append(AuditResult.from_dict(d))
        stash.setdefault(baseline_notes_key, []).extend(json.loads(output.get("mlrepro_baseline_notes") or "[]"))
        unused = json.loads(output.get("mlrepro_unused") or "null")
        if unused is not None:  # every worker collects every test: a baseline is unused if unused for all
            known = stash.get(unused_key, None)
            stash[unused_key] = unused if known is None else [p for p in known if p in set(unused)]
