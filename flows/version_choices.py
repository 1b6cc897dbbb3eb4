"""The custom-run form offers the stored dataset versions, not free text.

Prefect's UI draws a deployment's parameters from its OpenAPI schema; a string with an
``enum`` becomes a drop-down. Each stage deployment's input parameters (read from the stage
registry) get the versions of their dataset as choices, newest first after ``@latest``, with
the dataset's tags. The list is set when deployments are built (serve, ``deploy apply``) and
refreshed at the end of every run started from a deployment, so tonight's versions are
offered tomorrow morning. Versions a store gc removed are not offered.
"""

from __future__ import annotations

import copy
from typing import Any

from dpoflow.flows.registry import STAGES

LISTED, OTHER = "stored version", "other ref (name@version or name@tag)"


def dataset_choices(store: Any, dataset: str) -> list[str]:
    """``name@latest``, the live versions newest first, then ``name@tag`` for its tags."""
    if not store.exists(dataset):
        return []
    gone = store.collected(dataset)
    versions = [v for v in range(store.latest(dataset), -1, -1) if v not in gone]
    return ([f"{dataset}@latest"] + [f"{dataset}@{v}" for v in versions]
            + [f"{dataset}@{t}" for t in sorted(store.tags(dataset))])


def _with_choices(prop: dict[str, Any], choices: list[str]) -> dict[str, Any]:
    """`prop` (a string, or an optional one: anyOf string | null) as a choice of `choices` or,
    still, any other ref: validation must not refuse a version written since the last refresh."""
    prop = copy.deepcopy(prop)
    branches = prop.pop("anyOf", None) or [{"type": prop.pop("type", "string")}]
    rest = [b for b in branches if b.get("type") != "string"]  # e.g. null for an optional input
    prop["anyOf"] = [{"type": "string", "enum": list(choices), "title": LISTED},
                     {"type": "string", "title": OTHER}, *rest]
    return prop


def with_version_choices(flow_name: str, schema: dict[str, Any], store: Any) -> dict[str, Any]:
    """`schema` (a flow's parameter schema as JSON) with each input's stored versions as choices.
    A dataset with no version yet keeps a free-text field."""
    stage = STAGES.get(flow_name)
    if stage is None:
        return schema
    schema = copy.deepcopy(schema)
    props = schema.get("properties") or {}
    for inp in stage.inputs:
        choices = dataset_choices(store, inp.dataset)
        if inp.role in props and choices:
            default = props[inp.role].get("default")
            if isinstance(default, str) and default not in choices:
                choices = [default, *choices]
            props[inp.role] = _with_choices(props[inp.role], choices)
    return schema


def refresh_version_choices(store: Any, workspace: str) -> int:
    """Update the schema of every stage deployment of `workspace` on the server; returns how
    many changed. Deployments of other workspaces are left alone (``workspace: null``, the
    worker's $DPOFLOW_WORKSPACE, counts as this one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    changed = 0
    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=list(STAGES))))
        flows = {fid: client.read_flow(fid).name for fid in {d.flow_id for d in found}}  # one read per flow
        for d in found:
            if (d.parameters or {}).get("workspace") not in (None, workspace) or not d.parameter_openapi_schema:
                continue
            schema = with_version_choices(flows[d.flow_id], d.parameter_openapi_schema, store)
            if schema != d.parameter_openapi_schema:
                client.update_deployment(d.id, DeploymentUpdate(parameter_openapi_schema=schema))
                changed += 1
    return changed


def refresh_after_run(store: Any, workspace: str) -> None:
    """After a run started from a deployment wrote versions: offer them in the forms. A failed
    refresh is logged, never a failed run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        return
    try:
        refresh_version_choices(store, workspace)
    except Exception as exc:  # noqa: BLE001 - the form is a convenience; the run's work is done
        from dpoflow.flows.reporting import stage_logger

        stage_logger("deployments").warning("could not refresh the version choices of the run forms: %s", exc)
