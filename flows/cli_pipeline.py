"""`dpoflow run STAGE` (manual reruns with pinned inputs), `dpoflow nightly`, `dpoflow demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dpoflow.flows.registry import STAGES, stage


def _inputs_to_params(name: str, inputs: list[str]) -> dict[str, str]:
    """`--input candidates@3` -> {"candidates": "candidates@3"}: a ref goes to the input role
    of that name, else to the one input that reads that dataset (`pairs@2` -> pairs_import)."""
    roles = {i.role: i for i in stage(name).inputs}
    out = {}
    for ref in inputs:
        dataset = ref.split("@", 1)[0]
        role = dataset if dataset in roles else next((r for r, i in roles.items() if i.dataset == dataset), None)
        if role is None:
            raise SystemExit(f"dpoflow: error: stage {name!r} has no input {dataset!r} (inputs: {', '.join(roles)})")
        out[role] = ref
    return out


def _call_params(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Only the parameters the user set: an unset workspace / overrides keeps the deployment's
    default (serve pins the workspace there)."""
    out = {k: v for k, v in kw.items() if v is not None and not (k == "overrides" and not v)}
    if out.get("workspace"):
        out["workspace"] = str(Path(out["workspace"]).resolve())
    return out


def run_stages(stage: str, inputs: list[str], workspace: str | None, overrides: list[str], force: bool,
               downstream: bool, deployment: str | None = None) -> list[dict[str, Any]]:
    """Run `stage` (and with `downstream` every later stage, fed with what the earlier wrote).

    Returns one entry per flow run: its id, state, name, workspace and the stage runs it
    recorded in the store (inputs, outputs, rows, seconds, skipped)."""
    from dpoflow.flows.registry import stage_flow

    order = list(STAGES)
    todo = order[order.index(stage):] if downstream else [stage]
    produced: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    remote = None
    if deployment:
        from dpoflow.flows.deployment_runs import DeploymentRunner

        remote = DeploymentRunner(deployment)
    for i, name in enumerate(todo):
        kw: dict[str, Any] = {k: v for k, v in produced.items() if k in STAGES[name].input_roles()}
        if i == 0:
            kw.update(_inputs_to_params(name, inputs))
        kw.update({"workspace": workspace, "overrides": overrides or None, "force": force})
        if remote is not None:
            res = remote.run(name, _call_params(name, kw), workspace)
        else:
            from dpoflow.flows.deployment_runs import local_run

            res = local_run(stage_flow(name), kw, workspace, overrides)
        results.append(res)
        if res["state"] != "COMPLETED":
            break
        for step in res["stages"]:
            produced.update({k: v for k, v in step["outputs"].items() if isinstance(v, str) and "@" in v})
    return results


def _lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        lines.append(f"{r['flow']} run {r['name']!r}: {r['state']}" + (f" ({r['url']})" if r.get("url") else ""))
        for s in r["stages"]:
            ins = ", ".join(s["inputs"].values()) or "-"
            if s["skipped"]:
                lines.append(f"  {s['stage']}: {ins} unchanged -> reused {', '.join(s['outputs'].values())}")
                continue
            outs = ", ".join(f"{ref} ({s['rows'].get(k, '?')} rows)" for k, ref in s["outputs"].items())
            secs = f" in {s['seconds']:.1f} s" if s.get("seconds") is not None else ""
            lines.append(f"  {s['stage']}: {ins} -> {outs}{secs}")
        if r["state"] != "COMPLETED" and r.get("message"):
            lines.append(f"  {r['message']}")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    import sys

    from dpoflow.flows.deployment_runs import NoServer

    if args.input and not args.deployment:  # a pinned version that does not exist: one line, before any run
        from dpoflow.flows.workspace import Workspace

        _inputs_to_params(args.stage, args.input)  # an unknown input role first
        store = Workspace.open(args.workspace, args.set or None, create=False).store
        for ref in args.input:
            store.resolve(ref)
    try:
        res = run_stages(args.stage, args.input, args.workspace, args.set, args.force, args.downstream,
                         args.deployment)
    except NoServer as exc:
        print(f"dpoflow: error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in res if r["state"] != "COMPLETED"]
    if args.json:
        print(json.dumps(res, indent=1, default=str, ensure_ascii=False))
    else:
        print("\n".join(_lines(res)))
    if failed:
        f = failed[0]
        print(f"dpoflow: error: {f['flow']} run {f['name']!r} ended {f['state']}: {f.get('message') or ''}",
              file=sys.stderr)
        return 1
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from dpoflow.flows.local_server import flow_run_settings
    from dpoflow.flows.nightly import nightly_flow

    with flow_run_settings():
        res = nightly_flow(workspace=args.workspace, overrides=args.set or None, force=args.force)
    print(json.dumps(res, indent=1, default=str, ensure_ascii=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpoflow.flows.demo import run_demo, summary

    root = Path(args.workspace or "./dpoflow-workspace")
    out = run_demo(root, args.set or None)
    if getattr(args, "json", False):
        print(json.dumps(out, indent=1, default=str, ensure_ascii=False))
    else:
        print(summary(out, root))
    return 0


def register(sub: Any) -> None:
    common, listing = sub.common, sub.listing
    s = sub.add_parser("run", parents=[common, listing], help="run one stage (and optionally everything after it)")
    s.add_argument("stage", choices=list(STAGES))
    s.add_argument("--input", action="append", default=[], metavar="NAME@VERSION",
                   help="pin an input version, e.g. --input candidates@3 (repeatable)")
    s.add_argument("--force", action="store_true", help="run even if inputs, config and code are unchanged")
    s.add_argument("--downstream", action="store_true", help="also run every stage after this one")
    s.add_argument("--deployment", nargs="?", const="auto", default=None, metavar="ROUTE",
                   help="run through the stage's deployment on the configured Prefect server (PREFECT_API_URL) "
                        "and wait for it: `workers` (deploy/prefect.yaml), `serve` (dpoflow serve), or "
                        "without a value the one that exists (workers first)")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("nightly", parents=[common], help="run the whole nightly flow now")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_nightly)
    s = sub.add_parser("demo", parents=[common, listing],
                       help="build the demo workspace and run one night (again: the next night)")
    s.set_defaults(func=cmd_demo)
