"""The `ref_logps` and `train` flows: the steps of `flows.train_steps` as Prefect runs.

``train_flow`` runs ``ref_logps`` as one subflow (computing dpo_train's and dpo_eval's) and
``train``, ``evaluate`` and ``promote`` as task runs, then publishes the curves, the eval
report and the promotion decision as artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dpoflow.flows.reporting import embed_images, publish_markdown, publish_table
from dpoflow.flows.runner import StageRun
from dpoflow.flows.train_steps import TrainOutcome, ref_logps_steps, train_pipeline
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks.training import ref_logps, stage


def publish_outcome(ws: Workspace, out: TrainOutcome) -> None:
    """Prefect artifacts: training curves (table + PNG path), eval report, promotion decision."""
    if out.outputs.get("train_runs"):
        run = stage._row(ws.store.read(out.outputs["train_runs"]))
        metrics_file = ws.artifacts / "train" / f"{run['run_id']}-metrics.jsonl"
        rows = []
        if metrics_file.exists():
            hist = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            every = max(1, len(hist) // 25)
            keep = ("step", "loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "tokens_per_s")
            rows = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items() if k in keep}
                    for i, h in enumerate(hist) if i % every == 0 or i == len(hist) - 1]
        publish_table("train-curves", rows, f"training curves of {out.model_version} (PNG: {out.curves_path})")
        publish_markdown("train-curves-image", embed_images(  # the PNG itself: the UI may run anywhere
            f"# Training curves of `{out.model_version}`\n\n![training curves]({out.curves_path})\n\n"
            f"PNG in the workspace: `{out.curves_path}`"), "training curves PNG")
    if out.report_path:
        from pathlib import Path

        report = Path(out.report_path)
        publish_markdown("eval-report", embed_images(report.read_text(), report.parent),
                         f"evaluation of {out.model_version}")
    if out.decision:
        d = out.decision
        verdict = "PROMOTED to production" if d["promoted"] else "not promoted"
        md = (f"# Promotion of `{d['model_version']}`: {verdict}\n\n"
              f"- gate passed: {d['passed']}\n- production before: {d['previous_production'] or 'none'}\n"
              f"- production now: {d['production'] or 'none'}\n\n## Reasons\n\n"
              + "\n".join(f"- {r}" for r in d["reasons"]))
        publish_markdown("promotion-decision", md, "promotion gate decision with reasons")


@flow(name="ref_logps")
def ref_logps_flow(pairs: list[str] | None = None, workspace: str | None = None,
                   overrides: list[str] | None = None, force: bool = False,
                   model: str | None = None) -> dict[str, dict[str, Any]]:
    """Reference log-probs of each pairs version (default: dpo_train@latest) with `model` (default:
    the configured reference model), stored once per pairs version and reference model version.
    Returns pairs version -> {"ref_logps": version, "skipped": whether stored rows were reused}."""
    ws = Workspace.open(workspace, overrides)
    refs = pairs or ["dpo_train@latest"]
    pinned = ref_logps.resolve_model(ws.registry, model) if model else None
    return {p: {"ref_logps": r.outputs["ref_logps"], "skipped": r.skipped}
            for p, r in zip(refs, ref_logps_steps(ws, refs, force=force, model=pinned), strict=True)}


@task(name="train-step", task_run_name="{name}", cache_policy=NO_CACHE, persist_result=False)
def _step_task(name: str, fn: Callable[[], StageRun]) -> StageRun:
    return fn()


def _prefect_runner(workspace: str | None, overrides: list[str] | None) -> Callable[..., Any]:
    def runner(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if name == "ref_logps":  # one subflow for the train and the eval set
            pairs, model = args[1], kw.get("model")
            out = ref_logps_flow(pairs=pairs, workspace=workspace, overrides=overrides, force=kw.get("force", False),
                                 model=model.ref if model else None)
            return [StageRun("ref_logps", {"ref_logps": out[p]["ref_logps"]}, out[p]["skipped"], "", {}, 0.0)
                    for p in pairs]
        return _step_task(name, lambda: fn(*args, **kw))

    return runner


@flow(name="train")
def train_flow(dpo_train: str = "dpo_train@latest", dpo_eval: str | None = "dpo_eval@latest",
               workspace: str | None = None, overrides: list[str] | None = None, force: bool = False,
               promote: bool = False, night: str | None = None) -> dict[str, Any]:
    """ref_logps -> DPO training -> evaluation on dpo_eval -> promotion gate (moves production
    only with promote=true; the nightly passes it, and the night's id)."""
    ws = Workspace.open(workspace, overrides)
    out = train_pipeline(ws, dpo_train, dpo_eval, force=force, promote=promote, night=night,
                         runner=_prefect_runner(str(ws.root), overrides))
    publish_outcome(ws, out)
    return out.to_dict()

