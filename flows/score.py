"""The `score` stage flow: candidates (+ prompts for references) -> scores."""

from __future__ import annotations

from prefect import flow

from dpoflow.flows.reporting import publish_table
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import scoring


def run_score(ws: Workspace, candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
              *, force: bool = False) -> StageRun:
    """Run the stage without Prefect (CLI / tests); `prompts` is skipped when that dataset does not exist."""
    if prompts and prompts.split("@", 1)[0] and not ws.store.exists(prompts.split("@", 1)[0]):
        prompts = None
    return run_stage(ws, "score", scoring.score, {"candidates": candidates, "prompts": prompts}, ws.config.score,
                     force=force)


@flow(name="score")
def score_flow(candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
               workspace: str | None = None, overrides: list[str] | None = None,
               force: bool = False) -> dict[str, str]:
    """Score candidates: BLEU / ROUGE against prompt references, rule flags, reward, auto_score."""
    ws = Workspace.open(workspace, overrides)
    run = run_score(ws, candidates, prompts, force=force)
    flagged = (run.report or {}).get("flagged") or {}
    publish_table("score-flags", [{"flag": k, "rows": v} for k, v in flagged.items()], "score: flagged candidates")
    return run.outputs
