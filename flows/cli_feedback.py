"""CLI plugin for feedback: `dpoflow feedback ingest|formulas|annotators` (`dpoflow import
annotations FILE` is the import door's: flows/importing.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def cmd_ingest(args: argparse.Namespace) -> int:
    from dpoflow.flows.ingest import run_ingest
    from dpoflow.flows.workspace import Workspace
    from dpoflow.tasks.feedback import SourceError

    ws = Workspace.open(args.workspace, args.set or None, create=False)
    try:
        run = run_ingest(ws, force=args.force)
    except SourceError as exc:  # a misconfigured or unreachable source: one line, no secret
        print(f"dpoflow: error: {exc}", file=sys.stderr)
        return 2
    rep = run.report
    lines = [f"{'reused' if run.skipped else 'wrote'}: {', '.join(run.outputs.values())}"]
    if not run.skipped:
        lines.append(f"rows in {rep['rows_in']}, accepted {rep['accepted']}, events total {rep['events_total']}")
        lines += [f"  quarantined {n}: {r}" for r, n in sorted(rep.get("quarantined", {}).items())]
        lines += [f"  dropped {n}: {r}" for r, n in sorted(rep.get("dropped", {}).items())]
    if args.json:
        print(json.dumps({"outputs": run.outputs, "skipped": run.skipped, "report": rep}, indent=1, default=str))
    else:
        print("\n".join(lines))
    return 0


def cmd_formulas(args: argparse.Namespace) -> int:
    from dpoflow.tasks.feedback import signal_formulas_markdown

    print(signal_formulas_markdown().strip())
    return 0


def cmd_annotators(args: argparse.Namespace) -> int:
    from dpoflow.flows.workspace import Workspace

    ws = Workspace.open(args.workspace, args.set or None, create=False)
    info = ws.store.info(args.ref)
    stats = info.extra.get("annotators") or {}
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{'annotator':<24} {'labels':>7} {'scored':>7} reliability")
    for a, s in sorted(stats.items()):
        rel = "-" if s.get("reliability") is None else f"{s['reliability']:.3f}"
        print(f"{a:<24} {s['labels']:>7} {s['scored']:>7} {rel}")
    return 0


def register(sub: Any) -> None:
    common = getattr(sub, "common", None)
    listing = getattr(sub, "listing", None)
    parents = [p for p in (common, listing) if p is not None]
    fb = sub.add_parser("feedback", help="behaviour events and human annotations").add_subparsers(dest="sub", required=True)
    s = fb.add_parser("ingest", parents=parents, help="ingest new events from the configured sources")
    s.add_argument("--force", action="store_true", help="run even if no source changed")
    s.set_defaults(func=cmd_ingest)
    s = fb.add_parser("formulas", parents=parents, help="print the signal formulas")
    s.set_defaults(func=cmd_formulas)
    s = fb.add_parser("annotators", parents=parents, help="per-annotator reliability of a judgements version")
    s.add_argument("ref", nargs="?", default="judgements@latest")
    s.set_defaults(func=cmd_annotators)
