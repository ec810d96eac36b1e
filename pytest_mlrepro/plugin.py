"""pytest hooks and the ``mlrepro`` fixture. Loading this module imports neither torch nor wandb:
those load only when an audit runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .options import AUDIT_KEYWORDS, MARKER_KEYS, OPTIONS, MlreproOptions, resolve

options_key = pytest.StashKey[MlreproOptions]()
results_key = pytest.StashKey[list]()
outcome_key = pytest.StashKey[Any]()
handle_key = pytest.StashKey[Any]()

SKIP_REASON = "mlrepro audits are off: pass --mlrepro to run them"
MARKER_SIGNATURE = (
    "mlrepro(target=None, *, seed=0, device='auto', isolation='process', timeout=None, runs=2, deterministic=True, trace_every=1, "
    "args=(), kwargs=None, seeding=None, mode='bitwise', atol=0.0, rtol=0.0, max_ulp=0, checkpoint=None, cwd='replica'): a determinism audit; "
    "skipped unless pytest runs with --mlrepro. With a target and no call of the mlrepro fixture, the test "
    "audits the target and fails unless it is deterministic."
)
MARKER_ALLOWED = frozenset(MARKER_KEYS) | frozenset(AUDIT_KEYWORDS) | {"target"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mlrepro", "determinism audits of ML training (pytest-mlrepro)")
    group.addoption("--mlrepro", action="store_true", dest="mlrepro", default=False,
                    help="run determinism audits (tests marked mlrepro and the mlrepro fixture); without it they are skipped. Default: False")
    for name, (_parse, default, text) in OPTIONS.items():
        group.addoption("--mlrepro-" + name.replace("_", "-"), dest=f"mlrepro_{name}", default=None, metavar=name.upper(),
                        help=f"{text}. Env MLREPRO_{name.upper()}, ini mlrepro_{name}. Default: {default!r}")
        parser.addini(f"mlrepro_{name}", help=f"pytest-mlrepro: {text}", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_SIGNATURE)
    try:
        options = resolve(config.getoption, config.getini)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[options_key] = options
    config.stash[results_key] = []
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "mlrepro-xdist")


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    o = config.stash.get(options_key, None)
    if o is None or not o.enabled:
        return None
    return [f"mlrepro: seed={o.seed} device={o.device} isolation={o.isolation} runs={o.runs} "
            f"deterministic-settings={'on' if o.deterministic else 'off'} timeout={o.timeout or 'none'} "
            f"wandb={o.wandb} report={o.report or '-'}"]


def _marker_problem(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("mlrepro")
    if marker is None:
        return None
    unknown = sorted(set(marker.kwargs) - MARKER_ALLOWED)
    if unknown:
        return f"mlrepro marker: unknown keyword(s) {', '.join(unknown)}; allowed: {', '.join(sorted(MARKER_ALLOWED))}"
    if len(marker.args) > 1 or (marker.args and "target" in marker.kwargs):
        return "mlrepro marker: give the target once (one positional argument or target=)"
    try:
        item.config.stash[options_key].with_marker(marker.kwargs)
    except (TypeError, ValueError) as exc:
        return f"mlrepro marker: {exc}"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    problem = _marker_problem(item)
    if problem:
        pytest.fail(problem, pytrace=False)
    if item.get_closest_marker("mlrepro") is not None and not item.config.stash[options_key].enabled:
        pytest.skip(SKIP_REASON)


def _record(item: pytest.Item, result: Any) -> None:
    from .publish.terminal import junit_properties

    result.test = item.nodeid
    item.config.stash[results_key].append(result)
    item.add_report_section("call", "mlrepro", result.explain())
    item.user_properties.extend(junit_properties(result))


@pytest.fixture
def mlrepro(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The audit API bound to this test's options (marker > command line > environment > ini)."""
    from .fixture import MlreproHandle

    config = request.config
    options = config.stash[options_key]
    if not options.enabled:
        pytest.skip(SKIP_REASON)
    marker = request.node.get_closest_marker("mlrepro")
    if marker is not None:
        options = options.with_marker(marker.kwargs)
    handle = MlreproHandle(request.node, options, lambda: tmp_path_factory.mktemp("mlrepro"), _record)
    request.node.stash[handle_key] = handle
    return handle


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A marked test with a target that did not audit it itself audits it after its body."""
    result = yield
    marker = item.get_closest_marker("mlrepro")
    if marker is None or not (marker.args or "target" in marker.kwargs):
        return result
    handle = item.stash.get(handle_key, None)
    if handle is None:
        from .fixture import MlreproHandle

        factory = item.config._tmp_path_factory  # type: ignore[attr-defined]
        options = item.config.stash[options_key].with_marker(marker.kwargs)
        handle = MlreproHandle(item, options, lambda: factory.mktemp("mlrepro"), _record)
    if not handle.results:
        handle.audit().assert_deterministic()
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    options = config.stash.get(options_key, None)
    if options is None or not options.enabled:
        return
    if hasattr(config, "workerinput"):  # an xdist worker hands its results to the controller, which publishes
        config.workeroutput["mlrepro_results"] = json.dumps([r.to_dict() for r in config.stash[results_key]])
        return
    results = config.stash[results_key]
    if not results:
        return
    from .publish.config import PublishConfig
    from .publish.session import publish_session

    rootdir = Path(config.rootpath)
    try:
        publish_config = PublishConfig(
            report_path=Path(options.report) if options.report else None,
            wandb_mode=options.wandb, wandb_dir=Path(options.wandb_dir) if options.wandb_dir else rootdir / "mlrepro-out",
            project=options.wandb_project, entity=options.wandb_entity, group=options.wandb_group, tags=options.wandb_tags)
        session_info = {"command": "pytest " + " ".join(config.invocation_params.args), "rootdir": str(rootdir),
                        "exitstatus": int(exitstatus), "options": {k: getattr(options, k) for k in OPTIONS}}
        config.stash[outcome_key] = publish_session(results, publish_config, session_info=session_info)
    except Exception as exc:  # publishing never changes a verdict
        config.stash[outcome_key] = _FailedPublish(f"publishing failed: {type(exc).__name__}: {exc}")


class _FailedPublish:
    def __init__(self, message: str):
        self.warnings = [message]
        self.paths = []


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    options = config.stash.get(options_key, None)
    if options is None or not options.enabled or hasattr(config, "workerinput"):
        return
    results = config.stash.get(results_key, [])
    if not results:
        return
    from .publish.terminal import summary_lines

    terminalreporter.write_sep("=", "mlrepro")
    for line in summary_lines(results, config.stash.get(outcome_key, None)):
        terminalreporter.write_line(line)


class XdistHooks:
    """Registered only when pytest-xdist is present: merge the workers' results on the controller."""

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        from .result import AuditResult

        payload = getattr(node, "workeroutput", {}).get("mlrepro_results")
        if not payload:
            return
        results = node.config.stash[results_key]
        for d in json.loads(payload):
            results.append(AuditResult.from_dict(d))
