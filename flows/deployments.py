"""Deployments: one per stage flow (custom runs from the UI or `dpoflow run --deployment`),
one for `import` and the `nightly` deployment with its cron schedule, served from this process
(`dpoflow serve`) or declared in deploy/prefect.yaml for workers.

Prefect is imported inside functions: importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from dpoflow.flows.gpu_slots import ensure_gpu_limit
from dpoflow.flows.local_server import configured_api_url, ensure_server
from dpoflow.flows.registry import STAGES

CPU_POOL = "dpoflow-cpu"
GPU_POOL = "dpoflow-gpu"
# Deployments on the GPU pool: the registry's GPU stages, and the nightly flow, which runs
# them in-process as subflows.
GPU_STAGES = frozenset({s.name for s in STAGES.values() if s.pool == "gpu"} | {"nightly"})
# Flows deployed besides the STAGES: the nightly DAG and the manual import of a file.
NIGHTLY_FLOW = "dpoflow.flows.nightly:nightly_flow"
EXTRA_FLOWS = {"import": "dpoflow.flows.importing:import_flow", "nightly": NIGHTLY_FLOW}


# The two routes name their deployments apart, so neither takes over the other's: `dpoflow
# serve` registers FLOW/serve (runs in serve's process), deploy/prefect.yaml FLOW/workers (runs
# on the work pools' workers).
SERVE_ROUTE = "serve"
POOL_ROUTE = "workers"


def deployment_name(flow: str, route: str = POOL_ROUTE) -> str:
    """Full name of a dpoflow deployment (``flow/deployment``)."""
    return f"{flow}/{route}"


def nightly_schedule(workspace: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                     cron: str | None = None, timezone: str | None = None) -> tuple[str, str]:
    """(cron, timezone) of the nightly deployment: the arguments, else the workspace config's
    `nightly.cron` / `nightly.timezone` (without creating the workspace)."""
    from dpoflow.flows.config import load_config
    from dpoflow.flows.workspace import CONFIG_NAME

    root = Path(workspace or os.environ.get("DPOFLOW_WORKSPACE") or "./dpoflow-workspace")
    path = root / CONFIG_NAME
    cfg = load_config(path if path.exists() else None, overrides).nightly
    return cron or cfg.cron, timezone or cfg.timezone


def flow_specs() -> dict[str, str]:
    """Every deployable flow: deployment name -> ``module:function``, in nightly order."""
    return {**{name: s.flow for name, s in STAGES.items()}, **EXTRA_FLOWS}


def pool_for(name: str) -> str:
    return GPU_POOL if name in GPU_STAGES else CPU_POOL


def _load_flow(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_deployments(workspace: str | os.PathLike[str] | None = None, *, cron: str | None = "0 2 * * *",
                      timezone: str = "UTC", names: list[str] | None = None,
                      overrides: list[str] | None = None, strict: bool = False) -> tuple[list[Any], list[str]]:
    """Runner deployments of every flow that exists in this checkout (+ the missing ones' names).

    Every deployment gets ``workspace`` (made absolute: flow runs start in other processes)
    as a default parameter, so a "custom run" in the UI only needs the dataset versions and
    settings that change. ``cron=None`` serves the nightly deployment without a schedule.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    ws = str(Path(workspace or os.environ.get("DPOFLOW_WORKSPACE") or "./dpoflow-workspace").resolve())
    schedules = []
    if cron:
        schedules = [CronSchedule(cron=cron, timezone=timezone)]  # validates both, clear errors
    wanted = names or list(flow_specs())
    unknown = sorted(set(wanted) - set(flow_specs()))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; known: {', '.join(flow_specs())}")
    deployments, missing = [], []
    for name in wanted:
        spec = flow_specs()[name]
        try:
            fl = _load_flow(spec)
        except (ImportError, AttributeError) as exc:
            if strict:
                raise
            missing.append(f"{name} ({spec}: {exc})")
            continue
        params: dict[str, Any] = {"workspace": ws}
        if overrides and "overrides" in fl.parameters.properties:
            params["overrides"] = list(overrides)
        kind = "gpu" if name in GPU_STAGES else "cpu"
        dep = fl.to_deployment(
            name=SERVE_ROUTE,
            parameters=params,
            schedules=schedules if name == "nightly" else None,
            tags=["dpoflow", kind, SERVE_ROUTE] + (["nightly"] if name == "nightly" else ["stage"]),
            description=(fl.description or "").strip() or None,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        _offer_versions(dep, name, ws)
        deployments.append(dep)
    return deployments, missing


def _offer_versions(dep: Any, flow_name: str, workspace: str) -> None:
    """The stored versions as choices in the deployment's custom-run form (when the workspace
    exists; opening it here must not create it)."""
    from prefect.utilities.callables import ParameterSchema

    from dpoflow.flows.version_choices import with_version_choices
    from dpoflow.flows.workspace import Workspace

    if not Path(workspace).is_dir():
        return
    schema = dep._parameter_openapi_schema.model_dump(mode="json")  # Prefect keeps the form schema here
    try:
        schema = with_version_choices(flow_name, schema, Workspace.open(workspace, create=False).store)
    except Exception as exc:  # noqa: BLE001 - an unreadable store leaves free-text fields, not a failed serve
        print(f"dpoflow: no version choices for {flow_name}: {exc}", file=sys.stderr)
        return
    dep._parameter_openapi_schema = ParameterSchema.model_validate(schema)


def owned_by_a_pool(deployments: list[Any]) -> list[str]:
    """Names among `deployments` that already exist on the server attached to a work pool:
    serving them would take them over from the workers (their runs would start here)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                found = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if found.work_pool_name:
                taken.append(f"{d.flow_name}/{d.name} (work pool {found.work_pool_name})")
    return taken


def serve_all(workspace: str | os.PathLike[str] | None = None, *, cron: str | None = None,
              timezone: str | None = None, schedule: bool = True, names: list[str] | None = None,
              overrides: list[str] | None = None, limit: int | None = None,
              start_server: bool = True, server_home: str | os.PathLike[str] | None = None,
              port: int | None = None) -> None:
    """Serve the FLOW/serve deployments from this machine until interrupted (Ctrl-C).

    The nightly schedule is `cron` / `timezone`, else the workspace config's `nightly.cron` /
    `nightly.timezone`. With no Prefect server configured, a local one is started first (see
    :func:`ensure_server`) and stopped again on exit. ``limit`` caps concurrent flow runs.
    Deployments of the same name that a work pool owns are never taken over (RuntimeError).
    On exit Prefect pauses exactly the deployments served here.
    """
    from prefect import serve

    from dpoflow.flows.local_server import ui_url

    if not start_server and not configured_api_url():
        raise RuntimeError("no Prefect server configured: set PREFECT_API_URL (or drop --no-server)")
    cron, timezone = nightly_schedule(workspace, overrides, cron, timezone)
    deployments, missing = build_deployments(workspace, cron=cron if schedule else None, timezone=timezone,
                                             names=names, overrides=overrides)
    for m in missing:
        print(f"dpoflow serve: not serving {m}", file=sys.stderr, flush=True)
    if not deployments:
        raise RuntimeError("no flow could be loaded: nothing to serve")
    home = server_home or Path(deployments[0].parameters["workspace"]) / ".prefect-server"
    server = ensure_server(home=home, port=port) if start_server else contextlib.nullcontext(configured_api_url())
    with server as url:
        taken = owned_by_a_pool(deployments)
        if taken:
            raise RuntimeError(f"not serving {', '.join(taken)}: a work pool's workers run them; "
                               "delete them (prefect deployment delete NAME) or serve against another server")
        ensure_gpu_limit()
        sched = f"'{cron}' ({timezone})" if schedule else "none"
        print(f"dpoflow serve: {len(deployments)} deployment(s): "
              f"{', '.join(f'{d.flow_name}/{d.name}' for d in deployments)}; nightly schedule: {sched}"
              + (f"; API {url}; UI {ui_url(url)}" if url else ""), flush=True)
        serve(*deployments, limit=limit, print_starting_message=False)
