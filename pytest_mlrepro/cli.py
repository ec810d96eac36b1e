"""``mlrepro``: audit trainings from the shell (no pytest needed) and publish W&B reports later.

    mlrepro audit fixtures/mlp_dropout.py:train fixtures/time_seed.py --report out/report.json
    mlrepro audit --catalog fixtures/catalog.json --expect      # the example trainings
    mlrepro publish mlrepro-out/wandb/mlrepro-report-<session>.json   # after `wandb sync`, create the Report

Exit status of ``audit``: 0 when every audit is deterministic and every check passed (with
``--expect``: when every verdict is the one the catalog expects), 1 otherwise, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlrepro", description="Determinism audits of ML training code.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="run trainings twice and compare their weights bit for bit")
    a.add_argument("targets", nargs="*", help="'module:fn', 'file.py:fn' or 'script.py' (script args after --args)")
    a.add_argument("--catalog", type=Path, help="a catalog JSON (like fixtures/catalog.json) listing targets, args and expectations")
    a.add_argument("--expect", action="store_true", help="with --catalog: succeed when every verdict is the expected one")
    a.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                   help="argv for the script targets (everything after it; function targets take none)")
    a.add_argument("--seed", type=int, default=0, help="Default: %(default)r")
    a.add_argument("--runs", type=int, default=2, help="Default: %(default)r")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="Default: %(default)r")
    a.add_argument("--isolation", choices=("process", "inprocess"), default="process", help="Default: %(default)r")
    a.add_argument("--timeout", type=float, default=None, help="seconds per replica. Default: no limit")
    a.add_argument("--trace-every", type=int, default=1, help="fingerprint every k-th optimizer step. Default: %(default)r")
    a.add_argument("--out", type=Path, default=Path("mlrepro-out"),
                   help="output folder (created): the report, plots and W&B runs go here unless placed elsewhere. Default: %(default)s")
    a.add_argument("--report", type=Path, default=None, help="the JSON report. Default: OUT/report.json")
    a.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline", help="Default: %(default)r")
    a.add_argument("--wandb-dir", type=Path, default=None, help="folder W&B runs go under. Default: OUT")
    a.add_argument("--wandb-project", default="pytest-mlrepro", help="Default: %(default)r")
    a.add_argument("--wandb-entity", default=None)
    a.add_argument("--wandb-group", default=None)
    a.add_argument("--wandb-tags", default="", help="comma-separated")
    pub = sub.add_parser("publish", help="create the W&B Report saved by an offline session (after `wandb sync`)")
    pub.add_argument("spec", type=Path, help="the wandb-report spec JSON written beside the offline runs")
    pub.add_argument("--timeout", type=float, default=60.0, help="Default: %(default)r")
    return p


def _catalog_entries(path: Path, device: str) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"mlrepro: cannot read catalog {path}: {exc}")
    if device != "cuda":
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        skipped = [e["name"] for e in entries if e.get("requires") == "cuda" and not has_cuda]
        if skipped:
            print(f"mlrepro: skipping {', '.join(skipped)} (needs CUDA; none visible)")
        entries = [e for e in entries if not (e.get("requires") == "cuda" and not has_cuda)]
    return entries


def _slug(target: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in target).strip("-")


def _audit(ns: argparse.Namespace) -> int:
    from .auditing import audit
    from .errors import MlreproError
    from .result import AuditError, AuditResult
    from .publish.config import PublishConfig
    from .publish.session import publish_session
    from .publish.terminal import summary_lines

    if ns.expect and not ns.catalog:
        print("mlrepro: --expect needs --catalog", file=sys.stderr)
        return 2
    jobs: list[tuple[str, list, Optional[dict]]] = [
        (t, list(ns.args) if t.endswith(".py") else [], None) for t in ns.targets]
    # a catalog entry may add best-checkpoint checks ("checkpoint": {...}) and expect them to pass or fail ("checks")
    if ns.catalog:
        jobs += [(e["target"], list(e.get("args", [])), e) for e in _catalog_entries(ns.catalog, ns.device)]
    if not jobs:
        print("mlrepro: nothing to audit: give targets or --catalog", file=sys.stderr)
        return 2
    rootdir = ns.catalog.resolve().parent.parent if ns.catalog else Path.cwd()
    results, as_expected = [], True
    for target, args, entry in jobs:
        device = ns.device
        if entry and entry.get("requires") == "cuda":
            device = "cuda"
        workdir = None
        if entry and entry.get("checkpoint"):  # kept: the best checkpoint becomes a W&B artifact
            workdir = ns.out / "runs" / _slug(target)
            shutil.rmtree(workdir, ignore_errors=True)
        try:
            result = audit(target, args=args, seed=ns.seed, runs=ns.runs, device=device, isolation=ns.isolation,
                           timeout=ns.timeout, rootdir=rootdir, trace_every=ns.trace_every,
                           checkpoint=(entry or {}).get("checkpoint"), workdir=workdir)
        except (MlreproError, ValueError) as exc:  # a bad target: say so, audit the others
            result = AuditResult(target=str(target), seed=ns.seed, runs=ns.runs, device=device, isolation=ns.isolation,
                                 seeding="-", comparison={}, deterministic=False,
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
        print(result.summary_line() + mark, flush=True)
    try:
        ns.out.mkdir(parents=True, exist_ok=True)
        config = PublishConfig(report_path=ns.report or ns.out / "report.json", wandb_dir=ns.wandb_dir or ns.out, wandb_mode=ns.wandb,
                               project=ns.wandb_project, entity=ns.wandb_entity, group=ns.wandb_group, tags=ns.wandb_tags)
        outcome = publish_session(results, config, session_info={"command": "mlrepro " + " ".join(sys.argv[1:])})
    except Exception as exc:  # publishing never changes a verdict
        outcome = None
        print(f"mlrepro: publishing failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print()
    for line in summary_lines(results, outcome):
        print(line)
    if ns.expect:
        return 0 if as_expected else 1
    return 0 if all(r.verdict == "deterministic" for r in results) else 1


def _publish(ns: argparse.Namespace) -> int:
    from .publish.wandb_report_spec import publish_report_spec

    try:
        url = publish_report_spec(ns.spec, timeout=ns.timeout)
    except Exception as exc:
        print(f"mlrepro publish: {ns.spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "audit":
        return _audit(ns)
    return _publish(ns)


if __name__ == "__main__":
    sys.exit(main())
