"""Prefect shells of the feedback stages: `ingest` (events -> feedback_events + signals) and
`annotations` (annotations@V -> judgements). The work lives in tasks.feedback / tasks.annotations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import flow

from dpoflow.flows.reporting import publish_table
from dpoflow.flows.runner import StageRun, run_stage, stage_key
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import annotations as annot
from dpoflow.tasks import feedback


def _optional(ws: Workspace, ref: str | None) -> str | None:
    """A ref whose dataset may not exist yet (first run) -> None."""
    if not ref:
        return None
    name = ref.partition("@")[0]
    return ref if ws.store.exists(name) else None


def record_rerun_key(ws: Workspace, stage: str, fn: Callable[..., Any], inputs: dict[str, str | None],
                     config: Any, key_extra: dict[str, Any], outputs: dict[str, str]) -> None:
    """Record `outputs` under the content key of a rerun on `inputs` as well.

    Why: a stage that reads its own previous output (ingest, the annotations import) has a
    new content key after every run, since that input moved. With nothing new, a rerun would
    reproduce its input, so the outputs just written are also the outputs of that rerun: with
    them recorded under its key, the content key alone skips it, and any other write to the
    dataset (or new source data) changes the key and runs the stage."""
    pinned, _, _, key = stage_key(ws, stage, fn, inputs, config, key_extra)
    ws.store.record_outputs(key, stage, pinned, outputs)


def _with_secrets(cfg: feedback.IngestConfig) -> feedback.IngestConfig:
    """Load `url_secret` Prefect Secret blocks into this process's environment and point the
    source at that variable, so the core reads every URL the same way and the value never
    enters the config, the content key, logs or dataset metadata."""
    sources = []
    for src in cfg.sources:
        if src.url_secret and not src.url_env:
            from prefect.blocks.system import Secret

            var = "DPOFLOW_SECRET_" + "".join(c if c.isalnum() else "_" for c in src.url_secret).upper()
            os.environ[var] = str(Secret.load(src.url_secret).get())
            src = src.model_copy(update={"url_env": var})
        sources.append(src)
    return cfg.model_copy(update={"sources": sources})


def _fingerprints(cfg: feedback.IngestConfig, state: dict[str, Any]) -> dict[str, Any]:
    return {s.name: feedback.source_fingerprint(s, state.get(s.name) or {}) for s in cfg.sources}


def run_ingest(ws: Workspace, candidates: str | None = "candidates@latest",
               feedback_events: str | None = "feedback_events@latest", *, force: bool = False,
               config: feedback.IngestConfig | None = None, stage: str = "ingest") -> StageRun:
    """Run the ingest stage without requiring Prefect (CLI, tests, the import door); the flow
    calls this too.

    The content key covers a fingerprint of every source (files: names, sizes, mtimes; SQL:
    row count and max watermark), so new events are never skipped as "unchanged". Watermarks
    are stored only after the outputs were committed: a crash mid-run re-reads, never loses."""
    cfg = _with_secrets(config or ws.config.ingest)
    state = ws.store.get_state(feedback.STATE_KEY, {}) or {}
    inputs = {"candidates": _optional(ws, candidates), "served": _optional(ws, "served@latest"),
              "feedback_events": _optional(ws, feedback_events)}
    run = run_stage(ws, stage, feedback.ingest, inputs, cfg, force=force,
                    key_extra={"sources": _fingerprints(cfg, state)})
    if not run.skipped:
        new = dict(state)
        new.update(run.report.get("watermarks") or {})
        ws.store.set_state(feedback.STATE_KEY, new)
        rerun = {**inputs, "feedback_events": run.outputs["feedback_events"]}
        record_rerun_key(ws, stage, feedback.ingest, rerun, cfg, {"sources": _fingerprints(cfg, new)}, run.outputs)
        rows = [{"reason": k, "rows": v} for k, v in sorted((run.report.get("quarantined") or {}).items())]
        rows += [{"reason": f"dropped: {k}", "rows": v} for k, v in (run.report.get("dropped") or {}).items()]
        publish_table(f"{stage}-quarantine-reasons", rows, f"{stage}: quarantined / dropped rows per reason")
    return run


@flow(name="ingest")
def ingest_flow(candidates: str = "candidates@latest", feedback_events: str = "feedback_events@latest",
                workspace: str | None = None, overrides: list[str] | None = None,
                force: bool = False) -> dict[str, str]:
    """Ingest new behaviour events from the configured sources; returns the versions written."""
    ws = Workspace.open(workspace, overrides)
    return run_ingest(ws, candidates, feedback_events, force=force).outputs


def run_annotations(ws: Workspace, annotations: str = "annotations@latest", *, force: bool = False,
                    config: Any = None) -> StageRun:
    """annotations@V -> judgements (majority / mean / Bradley-Terry with agreement stats)."""
    cfg = config or ws.config.annotations
    run = run_stage(ws, "annotations", annot.aggregate_stage, {"annotations": annotations}, cfg, force=force)
    if not run.skipped:
        stats = ws.store.info(run.outputs["judgements"]).extra.get("annotators") or {}
        publish_table("annotator-reliability", annot.reliability_rows(stats),
                      "agreement of each annotator with the consensus")
    return run


@flow(name="annotations")
def annotations_flow(annotations: str = "annotations@latest", workspace: str | None = None,
                     overrides: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Aggregate human annotations into `judgements`; returns the versions written."""
    ws = Workspace.open(workspace, overrides)
    return run_annotations(ws, annotations, force=force).outputs
