"""Running a stage and reading back what it did: through a deployment on a Prefect server
(`dpoflow run STAGE --deployment`), or here in this process.

What a run wrote is read from the store by its flow-run id (`reporting.stage_runs`), never
from a Prefect result: a deployment run's return value stays in the worker's process.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from dpoflow.flows.local_server import configured_api_url, flow_run_url


class NoServer(RuntimeError):
    """No Prefect server (or no deployment) to run on: a one-line error for the CLI."""


def api_health(url: str, timeout_s: float = 5.0) -> str | None:
    """None when the API at `url` answers /health, else why not."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def deployment_candidates(stage: str, route: str) -> list[str]:
    from dpoflow.flows.deployments import POOL_ROUTE, SERVE_ROUTE, deployment_name

    routes = [POOL_ROUTE, SERVE_ROUTE] if route == "auto" else [route]
    unknown = set(routes) - {POOL_ROUTE, SERVE_ROUTE}
    if unknown:
        raise NoServer(f"unknown deployment route {route!r}: use {POOL_ROUTE} or {SERVE_ROUTE}")
    return [deployment_name(stage, r) for r in routes]


def _workspace(ws: str | None, *candidates: Any) -> str | None:
    for c in (ws, *candidates, os.environ.get("DPOFLOW_WORKSPACE")):
        if c:
            return str(c)
    return None


def describe(flow: str, run_id: str, name: str, state: Any, workspace: str | None,
             overrides: list[str] | None = None, children: list[str] = ()) -> dict[str, Any]:
    """One flow run as the CLI prints it, with the stage runs it (and its subflows) recorded."""
    from dpoflow.flows.reporting import stage_runs
    from dpoflow.flows.workspace import Workspace

    stages: list[dict[str, Any]] = []
    if workspace is not None or os.environ.get("DPOFLOW_WORKSPACE"):
        store = Workspace.open(workspace, overrides).store
        for rid in [run_id, *children]:
            stages += stage_runs(store, rid)
    return {"flow": flow, "id": run_id, "name": name, "state": state.type.value if state else "UNKNOWN",
            "message": state.message if state else None, "url": flow_run_url(run_id),
            "workspace": workspace, "stages": stages}


class DeploymentRunner:
    """Runs stage deployments on the configured server and waits for each run to end."""

    def __init__(self, route: str = "auto", poll_s: float = 1.0) -> None:
        self.url = configured_api_url()
        if not self.url:
            raise NoServer("no Prefect server configured: set PREFECT_API_URL (the API address `dpoflow serve` "
                           "prints), or run without --deployment")
        why = api_health(self.url)
        if why:
            raise NoServer(f"no Prefect server answers at {self.url} ({why})")
        self.route, self.poll_s = route, poll_s

    def _deployment(self, client: Any, stage: str) -> Any:
        from prefect.exceptions import ObjectNotFound

        found = []
        for name in deployment_candidates(stage, self.route):
            try:
                found.append(client.read_deployment_by_name(name))
            except ObjectNotFound:
                continue
        if not found:
            raise NoServer(f"no deployment {' or '.join(deployment_candidates(stage, self.route))} on {self.url}: "
                           "start `dpoflow serve`, or deploy deploy/prefect.yaml (`dpoflow deploy apply`)")
        active = [d for d in found if not d.paused]  # serve pauses its deployments when it stops
        return (active or found)[0]

    def run(self, stage: str, params: dict[str, Any], workspace: str | None) -> dict[str, Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with get_client(sync_client=True) as client:
            dep = self._deployment(client, stage)
            fr = client.create_flow_run_from_deployment(dep.id, parameters=params)
            print(f"dpoflow: {stage}: flow run {fr.name} of deployment {stage}/{dep.name} "
                  f"({flow_run_url(str(fr.id)) or fr.id}); waiting", file=sys.stderr, flush=True)
            while not (fr.state and fr.state.is_final()):
                time.sleep(self.poll_s)
                fr = client.read_flow_run(fr.id)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr.id])))
        ws = _workspace(workspace, (fr.parameters or {}).get("workspace"), (dep.parameters or {}).get("workspace"))
        return describe(stage, str(fr.id), fr.name, fr.state, ws, params.get("overrides"),
                        [str(c.id) for c in children])


def local_run(flow: Any, params: dict[str, Any], workspace: str | None,
              overrides: list[str] | None) -> dict[str, Any]:
    """Run a stage flow in this process and describe it the same way."""
    from dpoflow.flows.local_server import flow_run_settings
    from dpoflow.flows.workspace import Workspace

    with flow_run_settings():
        state = flow(**params, return_state=True)
    ws = str(Workspace.open(workspace, overrides).root)
    run_id = str(state.state_details.flow_run_id)
    name = run_id
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with flow_run_settings(), get_client(sync_client=True) as client:
            name = client.read_flow_run(run_id).name
            children = [str(c.id) for c in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))]
    except Exception:  # noqa: BLE001 - the temporary server is gone: the store still knows the outputs
        children = []
    return describe(flow.name, run_id, name, state, ws, overrides, children)
