"""`dpoflow demo`: a workspace with demo data and the locally built model, and one night of
the whole pipeline through Prefect's temporary local server (offline, a few CPU minutes).

Running it again on the same workspace simulates the next night: new events arrive (also on
the candidates the model sampled the night before) and the current production model samples.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import yaml

from dpoflow.flows.workspace import CONFIG_NAME, Workspace


def demo_config(root: Path) -> dict[str, Any]:
    """Small settings so the whole loop fits in minutes on 2 CPU cores."""
    inbox = root / "inbox"
    return {
        "nightly": {"inbox": {"prompts": str(inbox / "prompts.jsonl"), "served": str(inbox / "served.jsonl"),
                              "annotations": str(inbox / "annotations.jsonl")}},
        "sample": {"samplers": [{"model": "models@production", "n": 3, "temperature": [1.0], "top_p": [0.95],
                                 "max_new_tokens": 24, "seed": 0}], "shard_size": 8},
        "ingest": {"sources": [{"name": "demo-events", "kind": "files", "path": str(inbox / "events")}],
                   "half_life_days": 14},
        # a third of the prompts held out: the promotion gate needs 30+ compared prompts
        "balance": {"eval_fraction": 0.3, "near_dup": True},
        "train": {"max_steps": 24, "batch_size": 4, "lr": 5e-4, "max_length": 192, "max_prompt_length": 96,
                  "checkpoint_every": 12, "log_every": 4,
                  "eval": {"n_prompts": 64, "max_new_tokens": 16}},
    }


def _ensure_model(ws: Workspace) -> str:
    """Build the embedded default model once, taught the demo corpus (a short deterministic
    supervised warm-up, so it answers with words), and make it the first `production` model."""
    if "production" in ws.registry.tags():
        return ws.registry.version_of("models@production")
    from dpoflow.tasks.tiny_model import build_demo_model

    path = build_demo_model(ws.scratch / "base_model", seed=0)
    return ws.registry.register(path, note="embedded demo model (tasks.tiny_model, seed 0, warmed up on the "
                                "demo corpus)", tags=["production"])


def run_demo(workspace: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    from dpoflow.flows.local_server import flow_run_settings
    from dpoflow.flows.nightly import nightly_flow
    from dpoflow.tasks.demo_data import demo_night

    root = Path(workspace or "./dpoflow-workspace").resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.exists():
        cfg_path.write_text("# dpoflow demo config: every key is documented in the README.\n"
                            + yaml.safe_dump(demo_config(root), sort_keys=False, allow_unicode=True))
    ws = Workspace.open(root, overrides)
    model = _ensure_model(ws)
    night = int(ws.store.get_state("demo_night", 0)) + 1
    earlier: list[str] = []
    if ws.store.exists("candidates"):
        ids = ws.store.read("candidates", columns=["candidate_id", "origin"]).to_pylist()
        earlier = sorted(r["candidate_id"] for r in ids if r["origin"] == "sampled")
        earlier = random.Random(night).sample(earlier, min(40, len(earlier)))
    files = demo_night(root / "inbox", night, extra_response_ids=earlier)
    print(f"dpoflow demo: night {night} in {root} (production model {model})")
    t0 = time.perf_counter()
    with flow_run_settings():
        out = nightly_flow(workspace=str(root), overrides=overrides)
    ws.store.set_state("demo_night", night)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["night"] = night
    out["inputs"] = {k: str(v) for k, v in files.items()}
    return out


def evidence_lines(ws: Workspace, train: dict[str, Any]) -> list[str]:
    """What the night shows: held-out reward accuracy of the new and the production model,
    the generation comparison, and the gate's decision with every reason."""
    ev, d = train.get("eval") or {}, train.get("decision") or {}
    if not d:
        return []
    gen: dict[str, Any] = {}
    if (train.get("outputs") or {}).get("model_evals"):
        row = ws.store.read(train["outputs"]["model_evals"]).to_pylist()[0]
        gen = json.loads(row["metrics"] or "{}").get("generation") or {}

    def f(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, int | float) else "-"

    lines = ["", "evidence:",
             f"  held-out reward accuracy   new {f(ev.get('reward_accuracy'))}   production "
             f"{f(ev.get('baseline_reward_accuracy'))}"]
    if gen:
        lines.append(f"  generation comparison      {gen.get('wins')} wins, {gen.get('ties')} ties, {gen.get('losses')} "
                     f"losses over {gen.get('n_compared')} held-out prompts ({gen.get('scorer')})")
        lines.append(f"  flagged or empty outputs   new {f(gen.get('flagged_share'))}   production "
                     f"{f(gen.get('baseline_flagged_share'))}")
    improved = bool(d.get("promoted"))
    lines.append(f"\npromotion: {'PROMOTED ' + str(d.get('model_version')) if improved else 'not promoted'}"
                 + ("" if improved else ": this night shows no proven improvement, production stays "
                    f"{d.get('production')}"))
    lines += [f"  - {r}" for r in d.get("reasons") or []]
    return lines


def summary(out: dict[str, Any], workspace: Path) -> str:
    ws = Workspace.open(workspace)
    lines = [f"\nnight {out['night']} finished in {out['seconds']} s", "", "datasets:"]
    for name in ws.store.list():
        if name.startswith("shard_"):
            continue  # sampling's resumable work units
        info = ws.store.info(name)
        lines.append(f"  {info.ref:<22} {info.rows:>7} rows   ({info.stage})")
    lines.append("\nmodels:")
    for m in ws.registry.list():
        lines.append(f"  {m['model_version']:<16} {','.join(m['tags']) or '-'}")
    lines += evidence_lines(ws, out.get("train") or {})
    lines += [
        "",
        f"workspace:  {ws.root}",
        f"config:     {ws.root / CONFIG_NAME}",
        f"store:      {ws.store.root}",
        f"artifacts:  {ws.artifacts}  (plots, data card, eval report)",
        "",
        _ui_line(),
        f"Inspect data:                   dpoflow datasets list --workspace {ws.root}",
        f"Simulate the next night:        dpoflow demo --workspace {ws.root}",
    ]
    return "\n".join(lines)


def _ui_line() -> str:
    """Where to see the runs: the configured server's UI (its real address), else how to start one."""
    from dpoflow.flows.local_server import ui_url

    url = ui_url()
    if url:
        return f"See the runs in the Prefect UI:  {url}"
    return "See the runs in the Prefect UI:  prefect server start   (then open the UI address it prints)"
