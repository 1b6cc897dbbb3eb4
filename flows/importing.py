"""The import doors' shell: `dpoflow import DATASET PATH` (and the nightly inbox) bring an
external file in through the core's stage functions.

- Most datasets: tasks.importing.import_stage adds the file's valid rows to the latest version
  (``replace=True`` starts from nothing and names the version it supersedes).
- `feedback_events`: the ingest stage itself, with the file as its one source, so an imported
  event passes exactly the rules of an ingested one (known types, timestamp window, orphans,
  exactly-once, abuse filters).
- `annotations`: tasks.annotations.import_stage, then the aggregation into `judgements`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from dpoflow.flows.ingest import record_rerun_key, run_annotations, run_ingest
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.storage.schemas import SCHEMAS, schema_for
from dpoflow.tasks import annotations as annot
from dpoflow.tasks import importing
from dpoflow.tasks.feedback import SourceConfig


def _latest(ws: Workspace, name: str) -> str | None:
    return str(ws.store.resolve(f"{name}@latest")) if ws.store.exists(name) else None


def import_dataset(ws: Workspace, dataset: str, path: str | Path, *, force: bool = False,
                   replace: bool = False) -> StageRun:
    """Import without Prefect (the CLI's fast path); the same stage pattern as the flow.

    The run's report names the version the import added to (``added_to``) or, with
    `replace`, the version it superseded (``replaced``)."""
    if schema_for(dataset) is None:
        raise importing.ImportError_(f"dataset {dataset!r} has no contract (importable: {', '.join(SCHEMAS)})")
    if dataset == "annotations":
        raise importing.ImportError_("annotations have their own formats: use import_annotations")
    files = importing.list_files(path)
    previous = _latest(ws, dataset)
    if dataset == "feedback_events":
        run = import_events(ws, path, files, force=force, replace=replace)
    else:
        config = {"dataset": dataset, "path": str(path), "on_bad_rows": ws.config.import_.on_bad_rows}
        inputs = {"previous": None if replace else previous}
        key_extra = {"files": importing.fingerprint(files)}
        # with replace the key names no previous version, so an old replace could be "reused": always run
        run = run_stage(ws, f"import:{dataset}", importing.import_stage, inputs, config,
                        force=force or replace, key_extra=key_extra)
        if not run.skipped and dataset in run.outputs:
            record_rerun_key(ws, f"import:{dataset}", importing.import_stage, {"previous": run.outputs[dataset]},
                             config, key_extra, run.outputs)
    if previous and not run.skipped and dataset in run.outputs:
        run.report["replaced" if replace else "added_to"] = previous
    return run


def import_events(ws: Workspace, path: str | Path, files: list[Path], *, force: bool = False,
                  replace: bool = False) -> StageRun:
    """`feedback_events` files through the ingest stage, as its one source (`import`): the
    stage adds them to the latest events (none with `replace`). Configured sources are not
    read; their watermarks are left as they are."""
    if all(_empty(f) for f in files):  # nothing to add: no new version
        report = {"files": [str(f) for f in files], "rows_in": 0, "rows_out": 0, "quarantined": {}}
        return StageRun("import:feedback_events", {}, False, "", report, 0.0)
    src = SourceConfig(name="import", kind="files", path=str(Path(path).resolve()))
    cfg = ws.config.ingest.model_copy(update={"sources": [src]})
    run = run_ingest(ws, feedback_events=None if replace else "feedback_events@latest", force=force or replace,
                     config=cfg, stage="import:feedback_events")
    if not run.skipped:
        rep = run.report
        rep["files"] = [str(f) for f in files]
        rep["rows_out"] = rep.get("accepted", 0)
    return run


def _empty(f: Path) -> bool:
    """A file without a byte, or a small text file of whitespace only."""
    size = f.stat().st_size
    return size == 0 or (size < 1 << 20 and f.suffix.lower() != ".parquet" and not f.read_bytes().strip())


def import_annotations(ws: Workspace, path: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Import a JSONL / CSV / Label Studio file into `annotations` (added to the previous
    version; the same annotator's later label of the same items wins) and aggregate it into
    `judgements`."""
    p = Path(path)
    if not p.is_file():
        raise annot.AnnotationFormatError(f"{p} does not exist or is not a file")
    config = {"file": str(p.resolve()), "annotations": ws.config.annotations.model_dump(mode="json")}
    key_extra = {"file": importing.fingerprint([p])}
    # candidates: Label Studio pairwise tasks that show texts are matched to them (only such
    # files read candidates, so a new night's candidates do not re-import a JSONL / CSV file)
    inputs = {"annotations": _latest(ws, "annotations"),
              "candidates": _latest(ws, "candidates") if annot.matches_candidate_texts(p) else None}
    run = run_stage(ws, "import:annotations", annot.import_stage, inputs, config, force=force, key_extra=key_extra)
    if not run.skipped:
        record_rerun_key(ws, "import:annotations", annot.import_stage,
                         {**inputs, "annotations": run.outputs["annotations"]}, config, key_extra, run.outputs)
    jrun = run_annotations(ws, run.outputs["annotations"], force=force)
    out = {"annotations": run.outputs["annotations"], "judgements": jrun.outputs.get("judgements"),
           "skipped": run.skipped}
    if not run.skipped:
        rep = run.report
        out.update(rows_in=rep["rows_in"], rows_out=rep["rows_out"], format=rep["format"],
                   quarantined=rep["quarantined"])
        if "quarantine" in run.outputs:
            out["quarantine"] = run.outputs["quarantine"]
    if not jrun.skipped:
        out["agreement"] = jrun.report.get("agreement")
        out["pairwise_fleiss_kappa"] = jrun.report.get("pairwise_fleiss_kappa")
    return out


@flow(name="import")
def import_flow(name: str, path: str, workspace: str | None = None, overrides: list[str] | None = None,
                force: bool = False, replace: bool = False) -> dict[str, str]:
    """Import `path` (a file or a folder of Parquet / JSONL / CSV) into dataset `name`."""
    ws = Workspace.open(workspace, overrides)
    if name == "annotations":
        res = import_annotations(ws, path, force=force)
        return {k: v for k, v in res.items() if k in ("annotations", "judgements", "quarantine") and v}
    return import_dataset(ws, name, path, force=force, replace=replace).outputs
