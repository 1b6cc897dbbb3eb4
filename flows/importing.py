"""The `import` stage flow: bring an external file in as a new, validated dataset version."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dpoflow.flows.stage import StageContext, StageResult, StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.storage.schemas import SCHEMAS, schema_for
from dpoflow.tasks import importing


def import_stage(dataset: str, path: str):
    """A stage function (closure over the file) for run_stage."""

    def fn(ctx: StageContext) -> StageResult:
        good, quarantine, report = importing.import_files(dataset, path)
        if ctx.workspace.config.import_.on_bad_rows == "fail" and quarantine.num_rows:
            raise ValueError(f"{quarantine.num_rows} bad row(s) in {path}: {report['quarantined']}")
        return StageResult(outputs={dataset: good}, quarantine=quarantine, report=report,
                           metadata={dataset: {"files": report["files"]}})

    fn.__module__ = importing.__name__
    return fn


def import_dataset(ws: Workspace, dataset: str, path: str | Path, *, force: bool = False) -> StageRun:
    """Import without Prefect (the CLI's fast path); the same stage pattern as the flow."""
    if schema_for(dataset) is None:
        raise importing.ImportError_(f"dataset {dataset!r} has no contract (importable: {', '.join(SCHEMAS)})")
    files = importing.list_files(path)
    return run_stage(ws, f"import:{dataset}", import_stage(dataset, str(path)), {}, ws.config.import_,
                     force=force, code=(importing,), key_extra={"files": importing.fingerprint(files)})


@flow(name="import")
def import_flow(name: str, path: str, workspace: str | None = None, overrides: list[str] | None = None,
                force: bool = False) -> dict[str, str]:
    """Import `path` (a file or a folder of Parquet / JSONL / CSV) as a new version of `name`."""
    ws = Workspace.open(workspace, overrides)
    return import_dataset(ws, name, path, force=force).outputs
