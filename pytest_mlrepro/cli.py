"""``mlrepro``: audit trainings from the shell (no pytest needed) and publish W&B reports later.

    mlrepro audit fixtures/mlp_dropout.py:train fixtures/time_seed.py --report out/report.json
    mlrepro audit train.py --seed 3 --json out/audit.json -- --epochs 2   # the program's own args after --
    mlrepro audit --catalog fixtures/catalog.json --expect      # the example trainings
    mlrepro compare --base origin/main train.py:train --json out/compare.json   # where this change parts
    mlrepro calibrate train.py:train --runs 5 --baseline tests/__mlrepro__/test_x/test_y.json
    mlrepro publish mlrepro-out/wandb/mlrepro-report-<session>.json   # after `wandb sync`, create the Report

Options may come anywhere before ``--``; everything after ``--`` is the script targets' argv.
Exit status of ``audit``: 0 when every audit is deterministic and every check passed (with
``--expect``: when every verdict is the one the catalog expects), 1 when one is not, 2 on bad usage or
a target that could not be audited (not found, a syntax error, a crash, a timeout; checked before any
audit where that is possible). Progress goes to stderr, one line per replica and extra run; each
replica's stdout/stderr is kept under ``OUT/logs/<target>/``.
``compare``: 0 when both commits train to the same weights, 1 when not, 2 on bad usage (ref, repository,
target). ``calibrate``: 0 when the calibration was written, 1 when the audit failed, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from .config import CLI_OPTIONS, SEEDING_MODES, split
from .errors import ConfigError, MlreproError


def _text_type(option):
    """argparse type of a table option: a bad value is a usage error (exit 2) with the table's message."""
    def convert(raw: str):
        try:
            return option.from_text(raw)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = option.name  # argparse names the type in its messages
    return convert


# CLI defaults that differ from the table's: everything lands under --out unless placed elsewhere
_CLI_HELP = {"report": "the JSON report. Default: OUT/report.json", "wandb_dir": "folder W&B runs go under. Default: OUT"}


def _add_table_options(parser: argparse.ArgumentParser, keep=lambda option: True) -> None:
    """The table's options (the same as pytest's --mlrepro-* options and the marker's keywords)."""
    for option in CLI_OPTIONS:
        if keep(option):
            choices = f" ({', '.join(option.choices)})" if option.choices else ""
            text = _CLI_HELP.get(option.name, f"{option.help}{choices}. Default: {option.default!r}")
            text = text.replace("%", "%%")  # argparse %-formats help texts ("2 % of the step time")
            parser.add_argument(f"--{option.flag}", dest=option.name, type=_text_type(option), default=None,
                                metavar=option.name.upper(), help=text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlrepro", description="Determinism audits of ML training code.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="run trainings twice and compare their weights bit for bit")
    a.add_argument("targets", nargs="*", help="'module:fn', 'file.py:fn' or 'script.py' (a script's own args after --)")
    a.add_argument("--catalog", type=Path, help="a catalog JSON (like fixtures/catalog.json) listing targets, args and expectations")
    a.add_argument("--expect", action="store_true", help="with --catalog: succeed when every verdict is the expected one")
    a.add_argument("--json", type=Path, metavar="PATH",
                   help="write the audit's result (the report schema's audit entry) to PATH; one target only")
    a.add_argument("--out", type=Path, default=Path("mlrepro-out"),
                   help="output folder (created): the report, plots and W&B runs go here unless placed elsewhere. Default: %(default)s")
    _add_table_options(a)
    c = sub.add_parser("compare", help="compare a training across two commits: REF (in a temporary git worktree) "
                                       "against the work tree as it is")
    c.add_argument("target", help="'file.py:fn', 'script.py' or 'module:fn' relative to the current folder (or an absolute "
                                  "path inside the repository); at REF the same path relative to the repository root")
    c.add_argument("--base", required=True, metavar="REF", help="the commit to compare with (a branch, tag, sha, HEAD~1)")
    c.add_argument("--json", type=Path, metavar="PATH", help="write the result (the report schema's audit entry) to PATH")
    _add_table_options(c, lambda option: option.audit and option.name != "runs")  # one replica a side: no --runs
    k = sub.add_parser("calibrate", help="run N replicas (--runs) and keep how far their curves spread, with the "
                                         "tolerances that recommends, in a baseline")
    k.add_argument("target", help="'module:fn', 'file.py:fn' or 'script.py'")
    k.add_argument("--baseline", type=Path, required=True, metavar="PATH",
                   help="the baseline file (a test's __mlrepro__/<module>/<test>.json); created when missing")
    k.add_argument("--audit-index", type=int, default=0, help="which audit of the test's baseline. Default: %(default)r")
    k.add_argument("--factor", type=float, default=2.0, help="tolerance = factor x the largest spread. Default: %(default)r")
    k.add_argument("--test", default=None, help="the test id a new baseline records. Default: the target")
    _add_table_options(k, lambda option: option.audit)
    pub = sub.add_parser("publish", help="create the W&B Report saved by an offline session (after `wandb sync`)")
    pub.add_argument("spec", type=Path, help="the wandb-report spec JSON written beside the offline runs")
    pub.add_argument("--timeout", type=float, default=60.0, help="Default: %(default)r")
    return p


def _configs(ns: argparse.Namespace) -> tuple:
    """The validated audit and session configs of the command line (ConfigError on a bad combination)."""
    values = {o.name: getattr(ns, o.name) for o in CLI_OPTIONS if getattr(ns, o.name) is not None}
    audit_config, session = split(values)
    return audit_config, session


def _catalog_entries(path: Path, device: str) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"mlrepro: cannot read catalog {path}: {exc}")
    if device != "cuda":
        try:
            from .devices import inventory  # a probe subprocess: CUDA must not start in this process

            has_cuda = bool(inventory().devices)
        except ImportError:
            has_cuda = False
        skipped = [e["name"] for e in entries if e.get("requires") == "cuda" and not has_cuda]
        if skipped:
            print(f"mlrepro: skipping {', '.join(skipped)} (needs CUDA; none visible)")
        entries = [e for e in entries if not (e.get("requires") == "cuda" and not has_cuda)]
    return entries


def _slug(target: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in target).strip("-")


def _publish_config(ns: argparse.Namespace, session):
    from .publish.config import PublishConfig

    return PublishConfig(report_path=Path(session.report) if session.report else ns.out / "report.json",
                         wandb_dir=Path(session.wandb_dir) if session.wandb_dir else ns.out, wandb_mode=session.wandb,
                         project=session.wandb_project, entity=session.wandb_entity, group=session.wandb_group,
                         tags=session.wandb_tags)


def _usage(message: str) -> int:
    print(f"mlrepro: {message}", file=sys.stderr)
    return 2


def verdict_line(result, *, seeding_given: bool) -> str:
    """The result's summary line with who seeded: a function target audited under the default harness
    seeding is said to be, since that seeding hides a program that never seeds itself."""
    line = result.summary_line()
    if result.seeding not in SEEDING_MODES:
        return line
    if result.seeding == "harness" and not seeding_given:
        return (f"{line}  [seeding: harness, the default for a function target: every generator was seeded for it, "
                "so a program that never seeds itself passes too; --seeding program audits its own seeding]")
    return f"{line}  [seeding: {result.seeding}]"


def _exit_status(results: list) -> int:
    """2 when a target could not be audited, 1 when one is not reproducible or a check failed, else 0."""
    if any(r.error is not None for r in results):
        return 2
    return 0 if all(r.verdict == "deterministic" for r in results) else 1


def _audit(ns: argparse.Namespace) -> int:
    from .auditing import audit
    from .preflight import check_target
    from .publish.json_report import check_report_path
    from .publish.session import publish_session
    from .publish.terminal import summary_lines
    from .result import AuditError, AuditResult
    from .run_log import RunLog

    if ns.expect and not ns.catalog:
        return _usage("--expect needs --catalog")
    try:
        base, session = _configs(ns)
        publish = _publish_config(ns, session)
    except MlreproError as exc:
        return _usage(str(exc))
    if ns.program_args and not any(_is_script(t) for t in ns.targets):
        return _usage(f"the program arguments after -- ({' '.join(ns.program_args)}) go to script targets, and none "
                      "is given; a function target takes none")
    jobs: list[tuple[str, list, Optional[dict]]] = [
        (t, list(ns.program_args) if _is_script(t) else [], None) for t in ns.targets]
    # a catalog entry may add best-checkpoint checks ("checkpoint": {...}) and expect them to pass or fail ("checks")
    if ns.catalog:
        jobs += [(e["target"], list(e.get("args", [])), e) for e in _catalog_entries(ns.catalog, base.device)]
    if not jobs:
        return _usage("nothing to audit: give targets or --catalog")
    if ns.json is not None and len(jobs) > 1:
        return _usage(f"--json writes one audit's entry and {len(jobs)} targets were given; --report PATH writes the "
                      "session report, which lists every audit")
    rootdir = ns.catalog.resolve().parent.parent if ns.catalog else Path.cwd()
    try:
        for target, _, _ in jobs:  # every target before any audit: a typo costs no training
            check_target(target, rootdir=rootdir)
        check_report_path(publish.report_path)  # before any audit: a report that cannot be written stops here
        if ns.json is not None:
            check_report_path(ns.json)
    except MlreproError as exc:
        return _usage(str(exc))
    results, as_expected = [], True
    for target, args, entry in jobs:
        overrides: dict = {"args": args}
        if entry and entry.get("requires") == "cuda":
            overrides["device"] = "cuda"
        workdir = None
        if entry and entry.get("checkpoint"):  # kept: the best checkpoint becomes a W&B artifact
            overrides["checkpoint"] = entry["checkpoint"]
            workdir = ns.out / "runs" / _slug(target)
            shutil.rmtree(workdir, ignore_errors=True)
        logs = ns.out / "logs" / _slug(target)
        shutil.rmtree(logs, ignore_errors=True)  # this audit's logs only
        try:
            result = audit(target, base.merged(overrides), rootdir=rootdir, workdir=workdir,
                           progress=RunLog(target, logs))
        except MlreproError as exc:  # the device, a catalog entry: say so, audit the others
            result = AuditResult(target=str(target), seed=base.seed, runs=base.runs, device=overrides.get("device", base.device),
                                 isolation=base.isolation, seeding="-", comparison={}, deterministic=False,
                                 error=AuditError(type=type(exc).__name__, message=str(exc)))
        results.append(result)
        mark = ""
        if entry is not None:
            ok = result.error is None and result.deterministic == entry["deterministic"]
            if entry.get("checks"):
                failed = any(f.verdict in ("fail", "error") for f in result.findings)
                ok = ok and failed == (entry["checks"] == "fail")
            as_expected &= ok
            mark = "  [as expected]" if ok else "  [UNEXPECTED]"
        print(verdict_line(result, seeding_given=base.seeding is not None) + mark, flush=True)
    try:
        ns.out.mkdir(parents=True, exist_ok=True)
        outcome = publish_session(results, publish, session_info={"command": "mlrepro " + " ".join(sys.argv[1:])})
        errors = list(getattr(outcome, "errors", []))
    except Exception as exc:  # W&B trouble never changes a verdict; a lost report does
        outcome, errors = None, [f"publishing failed: {type(exc).__name__}: {exc}"]
    if ns.json is not None:
        errors += _write_json(ns.json, results[0])
    print()
    for line in summary_lines(results, outcome):
        print(line)
    for message in errors:
        print(f"mlrepro: {message}", file=sys.stderr)
    status = _exit_status(results)
    if status == 2:
        return 2
    if errors:
        return 1
    if ns.expect:
        return 0 if as_expected else 1
    return status


def _is_script(target: str) -> bool:
    return target.endswith(".py")


def _program_args(ns: argparse.Namespace) -> list:
    """A single script target's argv (after ``--``); a function target takes none (MlreproError)."""
    if ns.program_args and not _is_script(ns.target):
        raise MlreproError(f"the program arguments after -- ({' '.join(ns.program_args)}) go to a script target; "
                           f"{ns.target} is a function, which takes none")
    return list(ns.program_args)


def _write_json(path: Path, result) -> list:
    """The result's report entry (``AuditResult.to_dict``), written atomically; the errors, as sentences."""
    from .atomic import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")
    except OSError as exc:
        return [f"cannot write {path}: {exc.strerror or exc}"]
    return []


def _compare(ns: argparse.Namespace) -> int:
    """``mlrepro compare --base REF TARGET``: 0 when the commits agree, 1 when not (or a side failed), 2 on bad usage."""
    from .commits import compare_commits, report_lines
    from .publish.json_report import check_report_path

    values = {o.name: getattr(ns, o.name) for o in CLI_OPTIONS
              if o.audit and o.name != "runs" and getattr(ns, o.name) is not None}
    try:
        if ns.json is not None:
            check_report_path(ns.json)  # before anything runs
        result = compare_commits(ns.target, ns.base, args=_program_args(ns), **values)
    except MlreproError as exc:
        return _usage(str(exc))
    for line in report_lines(result):
        print(line, flush=True)
    for message in _write_json(ns.json, result) if ns.json is not None else []:
        print(f"mlrepro: {message}", file=sys.stderr)
        return 1
    return 0 if result.error is None and result.deterministic else 1


def _calibrate(ns: argparse.Namespace) -> int:
    """``mlrepro calibrate TARGET --runs N --baseline PATH``: 0 written, 1 the audit failed, 2 bad usage."""
    from .auditing import audit
    from .baseline.calibrate import calibrate
    from .baseline.record import BaselineError

    values = {o.name: getattr(ns, o.name) for o in CLI_OPTIONS if o.audit and getattr(ns, o.name) is not None}
    values.setdefault("runs", 5)
    try:
        config = split(values)[0]
        result = audit(ns.target, config, args=_program_args(ns))
    except MlreproError as exc:
        return _usage(str(exc))
    print(result.summary_line(), flush=True)
    if result.error is not None:
        return 1
    try:
        entry = calibrate(result, ns.baseline, test=ns.test, audit_index=ns.audit_index, factor=ns.factor)
    except BaselineError as exc:
        return _usage(str(exc))
    for name, s in entry.calibration["spread"].items():
        tol = entry.calibration["tolerances"][name]
        print(f"  {name}: largest spread {s['max_abs']:.3g} (relative {s['max_rel']:.3g}) over {s['points']} points "
              f"-> atol {tol['atol']:.3g}")
    print(f"calibration of {len(result.replicas)} replicas written to {ns.baseline}")
    return 0


def _publish(ns: argparse.Namespace) -> int:
    from .publish.wandb_report_spec import publish_report_spec

    try:
        url = publish_report_spec(ns.spec, timeout=ns.timeout)
    except Exception as exc:
        print(f"mlrepro publish: {ns.spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


def split_program_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """mlrepro's own words, and the program's: everything after the first ``--``."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def main(argv: Optional[list[str]] = None) -> int:
    """SIGTERM / SIGHUP / SIGINT (a CI runner cancelling the job, Ctrl-C) kill the running replicas
    with their process trees, let the audit remove its temporary folder, and end with 128 + signal."""
    import signal

    from .process_tree import Interrupted, interrupt_on_signals, signal_name

    words, program_args = split_program_args(sys.argv[1:] if argv is None else list(argv))
    removed = next((w for w in words if w == "--args" or w.startswith("--args=")), None)
    if removed is not None:
        return _usage("--args is gone (it swallowed every option after it): put the program's own arguments last, "
                      "after --, as in: mlrepro audit train.py --seed 1 -- --epochs 2")
    parser = _parser()
    if words[:1] == ["audit"]:  # targets and options in any order (options after a target too)
        audit_parser = parser._subparsers._group_actions[0].choices["audit"]
        ns = audit_parser.parse_intermixed_args(words[1:], argparse.Namespace(command="audit"))
    else:
        ns = parser.parse_args(words)
    ns.program_args = program_args
    if program_args and ns.command == "publish":
        return _usage("publish takes no program arguments after --")
    try:
        with interrupt_on_signals():
            if ns.command == "compare":
                return _compare(ns)
            if ns.command == "calibrate":
                return _calibrate(ns)
            if ns.command == "audit":
                return _audit(ns)
            return _publish(ns)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        try:
            print(f"mlrepro: interrupted by {signal_name(signum)}; running replicas were stopped and temporary "
                  "files removed", file=sys.stderr, flush=True)
        except OSError:  # the terminal or pipe went away with the job
            pass
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
