"""The stage runner: the one piece of the shell that runs any stage.

    resolve input refs -> content key -> skip if produced -> call the core stage function
    -> write outputs (+ quarantine) with lineage -> log + Prefect table artifact

A stage function is plain Python over Arrow tables, ``fn(ctx: StageContext) -> StageResult``
(dpoflow.tasks.contract). It never imports Prefect; reporting happens here, and only when a
flow run is active.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dpoflow.flows.reporting import flow_run_id, publish_table, stage_finished, stage_logger
from dpoflow.flows.workspace import Workspace
from dpoflow.storage.schemas import QUARANTINE_KEY
from dpoflow.tasks.code_version import code_version
from dpoflow.tasks.contract import StageContext, StageResult


@dataclass
class StageRun:
    """What the shell reports of one stage run: the versions written (or reused) and counts."""

    stage: str
    outputs: dict[str, str]
    skipped: bool
    content_key: str
    report: dict[str, Any]
    seconds: float


def config_dict(config: Any) -> Any:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return config


def report_rows(stage: str, run: StageRun, rows_in: dict[str, int], rows_out: dict[str, int]) -> list[dict]:
    rows = [{"stage": stage, "what": f"in: {k}", "rows": v} for k, v in rows_in.items()]
    rows += [{"stage": stage, "what": f"out: {k}", "rows": v} for k, v in rows_out.items()]
    for reason, n in (run.report.get("dropped") or {}).items():
        rows.append({"stage": stage, "what": f"dropped: {reason}", "rows": n})
    for reason, n in (run.report.get("quarantined") or {}).items():
        rows.append({"stage": stage, "what": f"quarantined: {reason}", "rows": n})
    rows.append({"stage": stage, "what": "seconds", "rows": round(run.seconds, 3)})
    return rows


def stage_key(ws: Workspace, stage: str, fn: Callable[[StageContext], StageResult], inputs: dict[str, str | None],
              config: Any, key_extra: dict[str, Any] | None = None) -> tuple[dict[str, str], Any, str, str]:
    """(pinned inputs, config as data, code version, content key) of a run of `fn` on `inputs`:
    the one recipe of the key that decides whether a stage has run already."""
    pinned = {role: str(ws.store.resolve(ref)) for role, ref in inputs.items() if ref}
    cfg = config_dict(config)
    cv = code_version(fn.__module__)
    return pinned, cfg, cv, ws.store.content_key(stage, {**pinned, **(key_extra or {})}, cfg, cv)


def run_stage(
    ws: Workspace,
    stage: str,
    fn: Callable[[StageContext], StageResult],
    inputs: dict[str, str | None],
    config: Any,
    *,
    force: bool = False,
    key_extra: dict[str, Any] | None = None,
    hold: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    options: dict[str, Any] | None = None,
    registry: Any | None = None,
) -> StageRun:
    """Run one stage with versioned inputs and outputs; skip it when nothing changed.

    `inputs` maps roles to refs (``None`` = optional input absent); refs are pinned to
    versions before anything else, so the content key and the lineage name exact versions.
    `key_extra` adds things the key must cover that are not dataset versions (e.g. the
    fingerprint of an external file being imported). `hold` is a resource to hold while the
    stage function runs (e.g. a GPU slot); a skipped stage never waits for it. `options`
    are settings from outside the stage's section that it may read (``ctx.options``);
    `registry` replaces the workspace's model registry (e.g. a view with pinned tags).
    The code version is derived from the imports of the module that defines `fn`
    (see tasks/code_version.py).
    """
    t0 = time.perf_counter()
    store = ws.store
    pinned, cfg, cv, key = stage_key(ws, stage, fn, inputs, config, key_extra)
    logger = stage_logger(stage)
    if not force:
        found = store.find_outputs(key)
        if found is not None:
            logger.info("%s: inputs, config and code unchanged -> reusing %s", stage, found)
            run = StageRun(stage, found, True, key, {"skipped": True}, time.perf_counter() - t0)
            publish_table(f"{stage}-report", [{"stage": stage, "what": f"reused: {k}", "rows": v}
                                              for k, v in found.items()], f"{stage} skipped (unchanged)")
            stage_finished(store, run, pinned, {})
            return run
    run_id = flow_run_id()
    ctx = StageContext(stage, pinned, config, logger, store=ws.store, registry=registry or ws.registry,
                       scratch_root=ws.scratch, artifacts_root=ws.artifacts, flow_run_id=run_id,
                       options=options or {})
    with hold() if hold else contextlib.nullcontext():
        result = fn(ctx)
    parents = list(pinned.values())
    outputs: dict[str, str] = {}
    rows_out: dict[str, int] = {}
    bases: dict[str, int] = {}  # a stage that read a version of its own output dataset (read-modify-write)
    for ref in pinned.values():
        n, _, v = ref.partition("@")
        bases[n] = max(bases.get(n, -1), int(v))
    for role, ref in inputs.items():  # its own dataset as an absent input: computed from nothing
        if not ref and role in result.outputs:
            bases.setdefault(role, -1)
    for name, data in result.outputs.items():
        # computed from bases[name]: a commit on top of a newer version is a ConflictError, not a lost update
        info = store.write(name, data, parents=parents, stage=stage, config=cfg, code_version=cv,
                           content_key=key, flow_run_id=run_id, extra=result.metadata.get(name),
                           expected_version=bases.get(name))
        outputs[name] = info.ref
        rows_out[name] = info.rows
    if result.quarantine is not None and result.quarantine.num_rows:
        # keyed by content: a rerun after a kill past this commit adds the same bad rows once
        q = store.append_unique("quarantine", result.quarantine, QUARANTINE_KEY, parents=parents, stage=stage,
                                content_key=key, flow_run_id=run_id)
        outputs["quarantine"] = q.ref if q else str(store.resolve("quarantine"))
        rows_out["quarantine (added)"] = result.quarantine.num_rows
    store.record_outputs(key, stage, pinned, outputs)
    run = StageRun(stage, outputs, False, key, result.report, time.perf_counter() - t0)
    rows_in = {ref: store.info(ref).rows for ref in pinned.values()}
    logger.info("%s: %s -> %s in %.2fs %s", stage, pinned, outputs, run.seconds,
                {k: v for k, v in result.report.items() if k in ("dropped", "quarantined")})
    publish_table(f"{stage}-report", report_rows(stage, run, rows_in, rows_out), f"{stage}: rows in / out")
    stage_finished(store, run, pinned, rows_out)
    if run_id:  # new versions: offer them in the deployments' custom-run forms
        from dpoflow.flows.version_choices import refresh_after_run

        refresh_after_run(store, str(ws.root))
    return run
