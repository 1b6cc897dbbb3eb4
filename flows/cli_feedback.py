"""CLI plugin for feedback: `dpoflow import annotations FILE` (through `import_annotations`, called
by the lead's generic import command), `dpoflow feedback ingest|formulas|annotators`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpoflow.flows.stage import StageContext, StageResult, run_stage
from dpoflow.flows.workspace import Workspace


def import_annotations(ws: Workspace, path: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Import a JSONL / CSV / Label Studio file into `annotations` (union with the previous version,
    the same annotator's later label of the same items wins) and aggregate it into `judgements`."""
    from dpoflow.flows.ingest import run_annotations
    from dpoflow.tasks import annotations as annot
    from dpoflow.tasks.importing import fingerprint

    p = Path(path)
    new, quarantine, report = annot.read_annotations(p, ws.config.annotations)
    # the import reads its own previous version, so its content key changes after each import:
    # a file already imported (same path, size, mtime) is recognised by a record in the store
    fp = fingerprint([p])
    done = ws.store.get_state("annotations.imported", {}) or {}
    if not force and fp in done.values() and ws.store.exists("annotations"):
        jrun = run_annotations(ws, "annotations@latest")
        return {"annotations": str(ws.store.resolve("annotations@latest")),
                "judgements": jrun.outputs.get("judgements"), "skipped": True}

    def stage(ctx: StageContext) -> StageResult:
        table, q = new, quarantine
        if q.num_rows and ws.store.exists("quarantine"):  # a bad row seen in an earlier import: once
            old = ws.store.read("quarantine", columns=["raw"], filter=pa.compute.field("dataset") == "annotations")
            q = q.filter(pa.compute.invert(pa.compute.is_in(q.column("raw"), value_set=old.column("raw"))))
        if ctx.has("annotations"):
            prev = ctx.read("annotations")
            keep = pa.compute.invert(pa.compute.is_in(prev.column("annotation_id"), value_set=new.column("annotation_id")))
            table = pa.concat_tables([prev.filter(keep), new])
        return StageResult(outputs={"annotations": table}, quarantine=q, report=report,
                           metadata={"annotations": {"file": str(p)}})

    stage.__module__ = annot.__name__
    prev = "annotations@latest" if ws.store.exists("annotations") else None
    run = run_stage(ws, "import:annotations", stage, {"annotations": prev}, {"file": str(p.resolve())},
                    force=force, code=(annot,), key_extra={"file": fp})
    done[str(p.resolve())] = fp
    ws.store.set_state("annotations.imported", done)
    jrun = run_annotations(ws, run.outputs["annotations"], force=force)
    out = {"annotations": run.outputs["annotations"], "judgements": jrun.outputs.get("judgements"),
           "skipped": run.skipped}
    if not run.skipped:
        out.update(rows_in=report["rows_in"], rows_out=report["rows_out"], format=report["format"],
                   quarantined=report["quarantined"])
        if "quarantine" in run.outputs:
            out["quarantine"] = run.outputs["quarantine"]
    if not jrun.skipped:
        out["agreement"] = jrun.report.get("agreement")
        out["pairwise_fleiss_kappa"] = jrun.report.get("pairwise_fleiss_kappa")
    return out


def cmd_ingest(args: argparse.Namespace) -> int:
    from dpoflow.flows.ingest import run_ingest

    ws = Workspace.open(args.workspace, args.set or None)
    run = run_ingest(ws, force=args.force)
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
    ws = Workspace.open(args.workspace, args.set or None)
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
