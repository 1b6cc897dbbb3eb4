"""The `pairs` stage flow: candidates + whatever signals exist -> a new `pairs` version."""

from __future__ import annotations

from prefect import flow

from dpoflow.flows.reporting import publish_table
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import pairs as pairs_task

OPTIONAL = ("prompts", "scores", "signals", "judgements")


def resolve_inputs(ws: Workspace, refs: dict[str, str | None]) -> dict[str, str | None]:
    """Optional `name@latest` inputs whose dataset does not exist yet are left out (None)."""
    out: dict[str, str | None] = {}
    for role, ref in refs.items():
        if not ref:
            out[role] = None
            continue
        name = ref.split("@", 1)[0]
        out[role] = ref if (role == "candidates" or ws.store.exists(name)) else None
    return out


def run_pairs(ws: Workspace, candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
              scores: str | None = "scores@latest", signals: str | None = "signals@latest",
              judgements: str | None = "judgements@latest", pairs_import: str | None = None,
              *, force: bool = False) -> StageRun:
    """The stage without Prefect (for tests, the CLI and the nightly flow)."""
    inputs = resolve_inputs(ws, {"candidates": candidates, "prompts": prompts, "scores": scores,
                                 "signals": signals, "judgements": judgements, "pairs_import": pairs_import})
    return run_stage(ws, "pairs", pairs_task.pairs, inputs, ws.config.pairs, force=force)


@flow(name="pairs")
def pairs_flow(candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
               scores: str | None = "scores@latest", signals: str | None = "signals@latest",
               judgements: str | None = "judgements@latest", pairs_import: str | None = None,
               workspace: str | None = None, overrides: list[str] | None = None, force: bool = False
               ) -> dict[str, str]:
    """Merge signals per prompt and expand rankings into preference pairs.

    Optional inputs default to their latest version and are skipped when the dataset does not
    exist; pass an empty string to leave one out. `pairs_import` is a user-imported `pairs`
    version (e.g. `pairs@imported`) whose rows pass through with source "imported".
    """
    ws = Workspace.open(workspace, overrides)
    run = run_pairs(ws, candidates, prompts, scores, signals, judgements, pairs_import, force=force)
    rep = run.report
    if not run.skipped:
        rows = [{"what": "considered", "pairs": rep.get("considered", 0)}, {"what": "kept", "pairs": rep.get("kept", 0)}]
        rows += [{"what": f"dropped: {k}", "pairs": v} for k, v in (rep.get("dropped") or {}).items()]
        rows += [{"what": f"source: {k}", "pairs": v} for k, v in (rep.get("sources") or {}).items()]
        publish_table("pairs-funnel", rows, "pairs: considered, kept, dropped by reason, kept by source")
    return run.outputs
