"""Prefect shells of the feedback stages: `ingest` (events -> feedback_events + signals) and
`annotations` (annotations@V -> judgements). The work lives in tasks.feedback / tasks.annotations.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow

from dpoflow.flows.stage import StageContext, StageResult, StageRun, code_version, publish_table, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.storage.store import StoreError
from dpoflow.tasks import annotations as annot
from dpoflow.tasks import feedback


def _optional(ws: Workspace, ref: str | None) -> str | None:
    """A ref whose dataset may not exist yet (first run) -> None."""
    if not ref:
        return None
    name = ref.partition("@")[0]
    return ref if ws.store.exists(name) else None


LAST_RUN_KEY = "ingest.last_run"


def _still_latest(ws: Workspace, outputs: dict[str, str]) -> bool:
    """The outputs of our last run are still the newest versions (nobody wrote after us)."""
    try:
        return all(ws.store.latest(ref.partition("@")[0]) == int(ref.partition("@")[2])
                   for name, ref in outputs.items() if name != "quarantine")
    except (StoreError, ValueError):  # a dataset was removed, or a malformed record
        return False


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


def run_ingest(ws: Workspace, candidates: str | None = "candidates@latest",
               feedback_events: str | None = "feedback_events@latest", *, force: bool = False,
               config: feedback.IngestConfig | None = None) -> StageRun:
    """Run the ingest stage without requiring Prefect (CLI, tests); the flow calls this too.

    The content key covers a fingerprint of every source (files: names, sizes, mtimes; SQL:
    row count and max watermark), so new events are never skipped as "unchanged". Watermarks
    are stored only after the outputs were committed: a crash mid-run re-reads, never loses."""
    cfg = _with_secrets(config or ws.config.ingest)
    state = ws.store.get_state(feedback.STATE_KEY, {}) or {}
    fp = {s.name: feedback.source_fingerprint(s, state.get(s.name) or {}) for s in cfg.sources}
    inputs = {"candidates": _optional(ws, candidates), "feedback_events": _optional(ws, feedback_events)}
    # The stage reads its own previous output, so its content key changes after every run; an
    # unchanged source fingerprint + candidates + config since our last run means nothing new.
    last = ws.store.get_state(LAST_RUN_KEY, None) or {}
    pinned_c = str(ws.store.resolve(inputs["candidates"])) if inputs["candidates"] else None
    signature = json.dumps({"sources": fp, "candidates": pinned_c, "config": cfg.model_dump(mode="json"),
                            "code": code_version(feedback.ingest, feedback)}, sort_keys=True, default=str)
    if not force and last.get("signature") == signature and _still_latest(ws, last.get("outputs") or {}):
        return StageRun("ingest", dict(last["outputs"]), True, last.get("content_key", ""), {"skipped": True}, 0.0)
    run = run_stage(ws, "ingest", feedback.ingest, inputs, cfg, force=force, code=(feedback,),
                    key_extra={"sources": fp})
    if not run.skipped:
        new = dict(state)
        new.update(run.report.get("watermarks") or {})
        ws.store.set_state(feedback.STATE_KEY, new)
        fp_after = {s.name: feedback.source_fingerprint(s, new.get(s.name) or {}) for s in cfg.sources}
        signature = json.dumps({"sources": fp_after, "candidates": pinned_c, "config": cfg.model_dump(mode="json"),
                                "code": code_version(feedback.ingest, feedback)}, sort_keys=True, default=str)
        ws.store.set_state(LAST_RUN_KEY, {"signature": signature, "outputs": run.outputs,
                                          "content_key": run.content_key})
        rows = [{"reason": k, "rows": v} for k, v in sorted((run.report.get("quarantined") or {}).items())]
        rows += [{"reason": f"dropped: {k}", "rows": v} for k, v in (run.report.get("dropped") or {}).items()]
        publish_table("ingest-quarantine-reasons", rows, "ingest: quarantined / dropped rows per reason")
    return run


@flow(name="ingest")
def ingest_flow(candidates: str = "candidates@latest", feedback_events: str = "feedback_events@latest",
                workspace: str | None = None, overrides: list[str] | None = None,
                force: bool = False) -> dict[str, str]:
    """Ingest new behaviour events from the configured sources; returns the versions written."""
    ws = Workspace.open(workspace, overrides)
    return run_ingest(ws, candidates, feedback_events, force=force).outputs


def _annotations_stage(ctx: StageContext) -> StageResult:
    table = ctx.read("annotations")
    judgements, stats = annot.aggregate(table, ctx.config)
    rows = [{"annotator": a, **v} for a, v in sorted(stats["annotators"].items())]
    publish_table("annotator-reliability", rows, "agreement of each annotator with the consensus")
    report = {k: v for k, v in stats.items() if k != "annotators"}
    report["annotators"] = len(stats["annotators"])
    return StageResult(outputs={"judgements": judgements}, report=report,
                       metadata={"judgements": {"agreement": stats.get("agreement"),
                                                "annotators": stats["annotators"]}})


_annotations_stage.__module__ = annot.__name__


def run_annotations(ws: Workspace, annotations: str = "annotations@latest", *, force: bool = False,
                    config: Any = None) -> StageRun:
    """annotations@V -> judgements (majority / mean / Bradley-Terry with agreement stats)."""
    cfg = config or ws.config.annotations
    return run_stage(ws, "annotations", _annotations_stage, {"annotations": annotations}, cfg,
                     force=force, code=(annot,))


@flow(name="annotations")
def annotations_flow(annotations: str = "annotations@latest", workspace: str | None = None,
                     overrides: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Aggregate human annotations into `judgements`; returns the versions written."""
    ws = Workspace.open(workspace, overrides)
    return run_annotations(ws, annotations, force=force).outputs
