"""The `balance` stage flow: `pairs` -> `dpo_train` + `dpo_eval`, with a funnel report and data card."""

from __future__ import annotations

from prefect import flow

from dpoflow.flows.reporting import publish_markdown, publish_table
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import balance as balance_task


def run_balance(ws: Workspace, pairs: str = "pairs@latest", *, force: bool = False) -> StageRun:
    """The stage without Prefect (for tests, the CLI and the nightly flow)."""
    return run_stage(ws, "balance", balance_task.balance, {"pairs": pairs}, ws.config.balance, force=force)


@flow(name="balance")
def balance_flow(pairs: str = "pairs@latest", workspace: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, str]:
    """De-duplicate, cap, mix and length-balance pairs, then split them by prompt group."""
    ws = Workspace.open(workspace, overrides)
    run = run_balance(ws, pairs, force=force)
    rep = run.report
    if not run.skipped:
        publish_table("balance-funnel", rep.get("funnel", []), "balance: pairs in / dropped / out per step")
        card = (ws.artifacts / "balance" / "data_card.md")
        if card.exists():
            publish_markdown("preference-data-card", card.read_text(encoding="utf-8"),
                             f"preference data card for {run.outputs.get('dpo_train')}")
    return run.outputs
