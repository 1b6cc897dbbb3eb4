"""Checking deploy/prefect.yaml offline: what `prefect deploy` would reject, and dpoflow's rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dpoflow.flows.deployments import SERVE_ROUTE, flow_specs, pool_for

REPO_PREFECT_YAML = Path(__file__).resolve().parent.parent / "deploy" / "prefect.yaml"


def _schedule_from(raw: dict[str, Any]):
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    tz = raw.get("timezone")
    if raw.get("cron"):
        return CronSchedule(cron=raw["cron"], timezone=tz, day_or=raw.get("day_or", True))
    if raw.get("interval") is not None:
        return IntervalSchedule(interval=raw["interval"], anchor_date=raw.get("anchor_date"), timezone=tz)
    if raw.get("rrule"):
        return RRuleSchedule(rrule=raw["rrule"], timezone=tz)
    raise ValueError("a schedule needs one of cron, interval, rrule")


def check_prefect_yaml(path: str | os.PathLike[str] = REPO_PREFECT_YAML) -> list[str]:
    """Everything ``prefect deploy`` would reject (and a few dpoflow rules), without a server.

    Checks: the file parses and validates as Prefect's prefect.yaml model; each deployment's
    entrypoint imports to a ``@flow``; its parameters exist in the flow signature and pass the
    flow's parameter schema (required ones only where a schedule must supply them); schedules
    are valid cron/interval/rrule with a known timezone; work pools are named and GPU stages
    sit in the GPU pool; and the whole thing builds a ``DeploymentCreate`` (what the API gets).
    Returns the problems found, one string each ("deployment FLOW/NAME: ...").
    """
    from uuid import uuid4

    import yaml
    from prefect.client.schemas.actions import DeploymentCreate, DeploymentScheduleCreate
    from prefect.flows import Flow, load_flow_from_entrypoint
    from prefect.utilities.schema_tools import validate

    problems: list[str] = []
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: cannot read: {exc}"]
    if not isinstance(raw, dict) or not isinstance(raw.get("deployments"), list) or not raw["deployments"]:
        return [f"{path}: needs a top-level 'deployments' list"]
    try:
        from prefect.cli.deploy._models import PrefectYamlModel  # the model `prefect deploy` uses

        PrefectYamlModel.model_validate(raw)
    except ImportError:  # private module moved: the checks below still run
        pass
    except Exception as exc:
        problems.append(f"{path}: not a valid prefect.yaml: {exc}")
    seen: set[str] = set()
    for i, dep in enumerate(raw["deployments"]):
        name = dep.get("name") if isinstance(dep, dict) else None
        where = f"deployment {name or f'#{i}'}"
        if not name:
            problems.append(f"{where}: no name")
            continue
        if name == SERVE_ROUTE:
            problems.append(f"{where}: the name {SERVE_ROUTE!r} belongs to `dpoflow serve`'s deployments")
        try:
            fl = load_flow_from_entrypoint(str(dep.get("entrypoint")), use_placeholder_flow=False)
        except Exception as exc:
            problems.append(f"{where}: entrypoint {dep.get('entrypoint')!r} does not load: {exc}")
            continue
        if not isinstance(fl, Flow):
            problems.append(f"{where}: entrypoint {dep.get('entrypoint')!r} is not a @flow")
            continue
        where = f"deployment {fl.name}/{name}"
        if where in seen:
            problems.append(f"{where}: duplicate name")
        seen.add(where)
        params = dep.get("parameters") or {}
        schema = fl.parameters.model_dump(mode="json")
        unknown = sorted(set(params) - set(schema.get("properties", {})))
        if unknown:
            problems.append(f"{where}: parameter(s) {unknown} not in {fl.name}'s signature "
                            f"({', '.join(schema.get('properties', {}))})")
        raw_schedules = dep.get("schedules") or []
        errors = validate({k: v for k, v in params.items() if k not in unknown}, schema,
                          ignore_required=not raw_schedules)
        problems += [f"{where}: parameter {'.'.join(map(str, e.path)) or '?'}: {e.message}" for e in errors]
        schedules = []
        for s in raw_schedules:
            try:
                schedules.append(DeploymentScheduleCreate(
                    schedule=_schedule_from(s), active=s.get("active", True), parameters=s.get("parameters") or {}))
            except Exception as exc:
                problems.append(f"{where}: schedule {s!r}: {exc}")
        pool = dep.get("work_pool") or {}
        if not isinstance(pool, dict) or not pool.get("name"):
            problems.append(f"{where}: work_pool.name is missing")
            pool = {}
        elif fl.name in flow_specs() and pool["name"] != pool_for(fl.name):
            problems.append(f"{where}: runs on pool {pool['name']!r}, expected {pool_for(fl.name)!r}")
        limit, options = dep.get("concurrency_limit"), None
        if isinstance(limit, dict):
            if limit.get("collision_strategy"):
                options = {"collision_strategy": limit["collision_strategy"]}
            limit = limit.get("limit")
        try:
            DeploymentCreate(
                name=name, flow_id=uuid4(), entrypoint=dep["entrypoint"], parameters=params,
                parameter_openapi_schema=schema, enforce_parameter_schema=dep.get("enforce_parameter_schema", True),
                schedules=schedules, concurrency_limit=limit, concurrency_options=options, tags=dep.get("tags") or [],
                description=dep.get("description"), paused=dep.get("paused"),
                work_pool_name=pool.get("name"), work_queue_name=pool.get("work_queue_name"),
                job_variables=pool.get("job_variables") or {},
                pull_steps=dep.get("pull", raw.get("pull")),
            )
        except Exception as exc:
            problems.append(f"{where}: not a valid deployment: {exc}")
    return problems


def with_schedule(path: str | os.PathLike[str], cron: str, timezone: str) -> dict[str, Any]:
    """The prefect.yaml at `path` with every schedule's cron and timezone set (the nightly's)."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    for dep in raw.get("deployments") or []:
        for sched in dep.get("schedules") or []:
            if "cron" in sched:
                sched.update(cron=cron, timezone=timezone)
    return raw


def _prefect(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def apply_prefect_yaml(path: str | os.PathLike[str] = REPO_PREFECT_YAML, *, cron: str, timezone: str,
                       create_pools: bool = True) -> list[str]:
    """`prefect deploy --all` of `path`, with the nightly schedule set to `cron` in `timezone`.

    Why not `prefect deploy --all --timezone ...`: with `--all`, Prefect drops the command
    line's schedule options, so the file's own timezone would win. A copy of the file with the
    schedule set is deployed instead. Missing work pools are created as process pools first.
    Returns what was done, one line each; RuntimeError with Prefect's output on failure."""
    import tempfile

    import yaml

    done = []
    raw = with_schedule(path, cron, timezone)
    if create_pools:
        pools = {(d.get("work_pool") or {}).get("name") for d in raw["deployments"]} - {None}
        listed = _prefect("work-pool", "ls")
        for pool in sorted(pools):
            if pool not in listed.stdout:
                r = _prefect("work-pool", "create", pool, "--type", "process")
                if "already exists" in r.stdout + r.stderr:  # the table `ls` prints may cut long names
                    continue
                if r.returncode != 0:
                    raise RuntimeError(f"prefect work-pool create {pool} failed:\n{r.stdout}{r.stderr}")
                done.append(f"created process work pool {pool}")
    with tempfile.TemporaryDirectory(prefix="dpoflow-deploy-") as tmp:
        copy = Path(tmp) / "prefect.yaml"
        copy.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        r = _prefect("deploy", "--prefect-file", str(copy), "--all", cwd=tmp)
    if r.returncode != 0:
        raise RuntimeError(f"prefect deploy failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    done.append(f"deployed {len(raw['deployments'])} deployment(s) from {path}; nightly schedule '{cron}' ({timezone})")
    return done
