"""`dpoflow train`: ref_logps + train + evaluate (+ promote) on a given dpo_train version,
without re-running the data stages. `dpoflow ref-logps` computes (or reuses) reference log-probs."""

from __future__ import annotations

import argparse
import json


def cmd_train(args: argparse.Namespace) -> int:
    from dpoflow.flows.workspace import Workspace

    overrides = list(getattr(args, "set", None) or [])
    if args.eval and args.eval.lower() == "none":
        args.eval = None
    if args.prefect:
        from dpoflow.flows.train import train_flow

        result = train_flow(dpo_train=args.data, dpo_eval=args.eval, workspace=args.workspace,
                            overrides=overrides or None, force=args.force, promote=args.promote)
    else:
        from dpoflow.flows.train_steps import train_pipeline

        ws = Workspace.open(args.workspace, overrides or None)
        result = train_pipeline(ws, args.data, args.eval, force=args.force, promote=args.promote).to_dict()
    if args.json:
        print(json.dumps(result, indent=1, default=str, ensure_ascii=False))
        return 0
    skipped = result.get("skipped") or {}
    for name, ref in (result.get("outputs") or {}).items():
        step = {"eval_ref_logps": "eval_ref_logps", "train_runs": "train", "model_evals": "evaluate",
                "promotions": "promote"}.get(name, name)
        print(f"{name:<16} {ref}{'  (reused)' if skipped.get(step) else ''}")
    print(f"model            {result.get('model_version')}")
    for w in result.get("warnings") or []:
        print(f"WARNING          {w}")
    ev = result.get("eval") or {}
    if ev:
        keys = ("reward_accuracy", "reward_margin", "eval_loss", "win_rate")
        print("eval             " + "  ".join(f"{k}={ev[k]:.4g}" for k in keys if isinstance(ev.get(k), int | float)))
    d = result.get("decision")
    if d:
        asked = "asked with --promote" if args.promote else "manual run: production moves only with --promote"
        print(f"promotion        {'PROMOTED' if d['promoted'] else 'not promoted'} (production: "
              f"{d['production'] or 'none'}; {asked})")
        for r in d["reasons"]:
            print(f"  - {r}")
    if result.get("report"):
        print(f"report           {result['report']}")
    if result.get("curves"):
        print(f"curves           {result['curves']}")
    return 0


def cmd_ref_logps(args: argparse.Namespace) -> int:
    from dpoflow.flows.train_steps import ref_logps_for
    from dpoflow.flows.workspace import Workspace

    ws = Workspace.open(args.workspace, list(getattr(args, "set", None) or []) or None)
    run = ref_logps_for(ws, args.pairs, ws.config.train, force=args.force)
    data = {"outputs": run.outputs, "skipped": run.skipped, "report": run.report}
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(f"{run.outputs['ref_logps']}{'  (reused: same pairs, reference model and tokenization)' if run.skipped else ''}")
    return 0


def register(sub) -> None:
    parents = [p for p in (getattr(sub, "common", None), getattr(sub, "listing", None)) if p is not None]
    s = sub.add_parser("train", parents=parents, help="reference log-probs + DPO training + evaluation + promotion",
                       description="Train on a dpo_train version without re-running the data stages. "
                       "Unchanged steps are reused (a β sweep reuses the stored reference log-probs).")
    s.add_argument("--data", default="dpo_train@latest", help="training pairs, e.g. dpo_train@3")
    s.add_argument("--eval", default="dpo_eval@latest",
                   help="held-out pairs (default dpo_eval@latest when it exists; 'none' to skip)")
    s.add_argument("--force", action="store_true", help="re-run every step even if unchanged")
    s.add_argument("--promote", action="store_true",
                   help="move production when the gate passes (without it a manual run only reports the decision)")
    s.add_argument("--no-promote", action="store_true", help=argparse.SUPPRESS)  # the default now
    s.add_argument("--prefect", action="store_true", help="run as the Prefect `train` flow (UI, artifacts)")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("ref-logps", parents=parents, help="compute or reuse reference log-probs of a pairs version")
    s.add_argument("pairs", help="dpo_train@V or dpo_eval@V")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_ref_logps)
