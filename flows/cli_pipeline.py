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


def run_stages(stage: str, inputs: list[str], workspace: str | None, overrides: list[str], force: bool,
               downstream: bool, deployment: bool = False) -> dict[str, Any]:
    """Run `stage` (and with `downstream` every later stage, fed with what the earlier wrote)."""
    from dpoflow.flows.registry import stage_flow

    order = list(STAGES)
    todo = order[order.index(stage):] if downstream else [stage]
    produced: dict[str, str] = {}
    results: dict[str, Any] = {}
    for i, name in enumerate(todo):
        kw: dict[str, Any] = {k: v for k, v in produced.items() if k in STAGES[name].input_roles()}
        if i == 0:
            kw.update(_inputs_to_params(name, inputs))
        kw.update({"workspace": workspace, "overrides": overrides or None, "force": force})
        if deployment:
            from prefect.deployments import run_deployment

            fr = run_deployment(name=f"{name}/{name}", parameters=kw, timeout=None)
            if not fr.state.is_completed():
                raise SystemExit(f"dpoflow: error: {name} deployment run ended {fr.state.name}: {fr.state.message}")
            res = fr.state.result()
        else:
            from dpoflow.flows.local_server import flow_run_settings

            with flow_run_settings():
                res = stage_flow(name)(**kw)
        results[name] = res
        flat = res.get("outputs", res) if isinstance(res, dict) else {}
        produced.update({k: v for k, v in flat.items() if isinstance(v, str) and "@" in v})
    return results


def cmd_run(args: argparse.Namespace) -> int:
    res = run_stages(args.stage, args.input, args.workspace, args.set, args.force, args.downstream,
                     args.deployment)
    print(json.dumps(res, indent=1, default=str, ensure_ascii=False))
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
    print(summary(out, root))
    return 0


def register(sub: Any) -> None:
    common, listing = sub.common, sub.listing
    s = sub.add_parser("run", parents=[common], help="run one stage (and optionally everything after it)")
    s.add_argument("stage", choices=list(STAGES))
    s.add_argument("--input", action="append", default=[], metavar="NAME@VERSION",
                   help="pin an input version, e.g. --input candidates@3 (repeatable)")
    s.add_argument("--force", action="store_true", help="run even if inputs, config and code are unchanged")
    s.add_argument("--downstream", action="store_true", help="also run every stage after this one")
    s.add_argument("--deployment", action="store_true",
                   help="run through the stage's deployment on the configured Prefect server")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("nightly", parents=[common], help="run the whole nightly flow now")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_nightly)
    s = sub.add_parser("demo", parents=[common, listing],
                       help="build the demo workspace and run one night (again: the next night)")
    s.set_defaults(func=cmd_demo)
