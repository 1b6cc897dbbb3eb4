"""Deployments: serve every stage flow + the nightly schedule, guard GPUs, check prefect.yaml.

Three pieces, all usable without a worker or a container:

* :func:`serve_all` builds one deployment per stage flow (for manual "custom runs" with
  parameters from the UI or ``dpoflow run --deployment``), one for ``import`` and the
  ``nightly`` deployment with its cron schedule, and serves them from this process
  (``prefect.serve``): the runner polls the server and runs each flow run in a subprocess.
* :func:`ensure_server` makes sure there is a Prefect server that can run schedules.
  Prefect's temporary (ephemeral) server cannot, so when no ``PREFECT_API_URL`` is
  configured we start a real ``prefect server start`` (SQLite, loopback only) as a child
  process, wait until it is healthy and point this process at it.
* :func:`gpu_slot` holds a slot of the global concurrency limit ``gpu`` (limit 1 by
  default) around GPU work, so a manual ``train`` run and the nightly's ``sample`` never
  share one GPU, whichever worker or serve process runs them.

Prefect is imported inside functions: importing this module stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoflow.flows.registry import STAGES

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
CPU_POOL = "dpoflow-cpu"
GPU_POOL = "dpoflow-gpu"
# Deployments on the GPU pool: the registry's GPU stages, and the nightly flow, which runs
# them in-process as subflows.
GPU_STAGES = frozenset({s.name for s in STAGES.values() if s.pool == "gpu"} | {"nightly"})
# Flows deployed besides the STAGES: the nightly DAG and the manual import of a file.
NIGHTLY_FLOW = "dpoflow.flows.nightly:nightly_flow"
EXTRA_FLOWS = {"import": "dpoflow.flows.importing:import_flow", "nightly": NIGHTLY_FLOW}
# Name of the global concurrency limit GPU stages take a slot of; "" disables the guard.
GPU_LIMIT_ENV = "DPOFLOW_GPU_LIMIT"
GPU_SLOTS_ENV = "DPOFLOW_GPU_SLOTS"  # slots to create the limit with if missing (= GPUs per host)
DEFAULT_GPU_LIMIT = "gpu"
REPO_PREFECT_YAML = Path(__file__).resolve().parent.parent / "deploy" / "prefect.yaml"


def deployment_name(flow: str) -> str:
    """Full name of a dpoflow deployment (``flow/deployment``): each flow's deployment bears its name."""
    return f"{flow}/{flow}"


def flow_specs() -> dict[str, str]:
    """Every deployable flow: deployment name -> ``module:function``, in nightly order."""
    return {**{name: s.flow for name, s in STAGES.items()}, **EXTRA_FLOWS}


def pool_for(name: str) -> str:
    return GPU_POOL if name in GPU_STAGES else CPU_POOL


# --- the GPU guard ------------------------------------------------------------------------

def gpu_limit_name() -> str | None:
    name = os.environ.get(GPU_LIMIT_ENV, DEFAULT_GPU_LIMIT).strip()
    return name or None


_ENSURED: set[str] = set()


def ensure_gpu_limit(name: str | None = None, slots: int | None = None) -> str | None:
    """Create the global concurrency limit if it does not exist yet (an existing one is kept,
    so an operator's ``prefect gcl create gpu --limit 4`` on a 4-GPU host wins)."""
    name = name or gpu_limit_name()
    if not name or name in _ENSURED:
        return name
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    slots = slots or int(os.environ.get(GPU_SLOTS_ENV, "1"))
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another process won the race
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    _ENSURED.add(name)
    return name


@contextlib.contextmanager
def gpu_slot(occupy: int = 1, timeout_s: float | None = None, *, device: str = "cuda") -> Iterator[None]:
    """Hold ``occupy`` slots of the GPU concurrency limit for the duration of the block.

    Wrap only the GPU work of a stage flow (the model load + generate / train loop), never
    the nightly flow as a whole: its GPU subflows take their own slots, and a slot held by
    the parent would deadlock them. Outside a flow run (plain Python, the CLI's local fast
    path) there is no server to ask and the block just runs. ``device`` is the one the stage
    resolved (`dpoflow.tasks.generation.pick_device`): a stage running on CPU has no GPU to guard, so
    its block just runs too. ``occupy`` = GPUs the stage uses (a
    torchrun launch over 4 GPUs takes 4 of a 4-slot limit). ``timeout_s`` bounds the wait
    for a free GPU (``TimeoutError`` after it); ``None`` waits as long as it takes.
    """
    from dpoflow.flows.reporting import flow_run_id

    name = gpu_limit_name()
    if not name or not flow_run_id() or device == "cpu":
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_gpu_limit(name)
    with concurrency(name, occupy=occupy, timeout_seconds=timeout_s, strict=True):
        yield


# --- building and serving deployments -----------------------------------------------------

def _load_flow(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_deployments(workspace: str | os.PathLike[str] | None = None, *, cron: str | None = DEFAULT_CRON,
                      timezone: str = DEFAULT_TIMEZONE, names: list[str] | None = None,
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
        deployments.append(fl.to_deployment(
            name=name,
            parameters=params,
            schedules=schedules if name == "nightly" else None,
            tags=["dpoflow", kind] + (["nightly"] if name == "nightly" else ["stage"]),
            description=(fl.description or "").strip() or None,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments, missing


def serve_all(workspace: str | os.PathLike[str] | None = None, *, cron: str | None = DEFAULT_CRON,
              timezone: str = DEFAULT_TIMEZONE, names: list[str] | None = None,
              overrides: list[str] | None = None, limit: int | None = None,
              start_server: bool = True, server_home: str | os.PathLike[str] | None = None,
              port: int | None = None) -> None:
    """Serve all deployments from this machine until interrupted (Ctrl-C).

    With no Prefect server configured, a local one is started first (see
    :func:`ensure_server`) and stopped again on exit. ``limit`` caps concurrent flow runs.
    """
    from prefect import serve

    if not start_server and not configured_api_url():
        raise RuntimeError("no Prefect server configured: set PREFECT_API_URL (or drop --no-server)")
    deployments, missing = build_deployments(workspace, cron=cron, timezone=timezone, names=names,
                                             overrides=overrides)
    for m in missing:
        print(f"dpoflow serve: not serving {m}", file=sys.stderr, flush=True)
    if not deployments:
        raise RuntimeError("no flow could be loaded: nothing to serve")
    home = server_home or Path(deployments[0].parameters["workspace"]) / ".prefect-server"
    server = ensure_server(home=home, port=port) if start_server else contextlib.nullcontext(configured_api_url())
    with server as url:
        ensure_gpu_limit()
        sched = f"'{cron}' ({timezone})" if cron else "none"
        print(f"dpoflow serve: {len(deployments)} deployment(s): "
              f"{', '.join(f'{d.flow_name}/{d.name}' for d in deployments)}; nightly schedule: {sched}"
              + (f"; API {url}" if url else ""), flush=True)
        serve(*deployments, limit=limit, print_starting_message=False)


# --- a local Prefect server ---------------------------------------------------------------

def configured_api_url() -> str | None:
    """The API URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url or None


_SETTINGS: dict[tuple[int, str], tuple[Any, Any]] = {}


def settings_context(updates: dict[Any, Any]) -> Any:
    """A Prefect ``SettingsContext`` = the current settings with ``updates``. The updated
    settings object is built once per (current settings, updates): rebuilding Prefect's
    settings costs ~50 ms, as much as a whole stage of the demo night, and the nightly
    flow enters this for every stage subflow."""
    from prefect.context import SettingsContext

    ctx = SettingsContext.get()
    key = (id(ctx.settings), repr(sorted((str(k), v) for k, v in updates.items())))
    if key not in _SETTINGS:
        if len(_SETTINGS) >= 32:  # a few distinct settings per process; never grow without bound
            _SETTINGS.clear()
        # the entry holds the base settings, so no other object can take over its id
        _SETTINGS[key] = (ctx.settings, ctx.settings.copy_with_update(updates=updates))
    return SettingsContext(profile=ctx.profile, settings=_SETTINGS[key][1])


def flow_run_settings() -> Any:
    """Prefect settings for flows started from this process (CLI, demo, benchmarks).

    With no server configured, Prefect runs flows against a temporary server that lives only
    as long as this process. There, and only there, two things are turned off:

    * flow heartbeats: they let a long-lived server mark runs whose process died as crashed;
      a temporary server dies with the process, so nothing acts on them, and each heartbeat
      thread still costs up to 1 s at the end of a flow;
    * the client's CSRF token fetch: the temporary server has CSRF protection off (Prefect's
      default), so each new client (one per task or subflow) paid a round trip for a 422.
    """
    if configured_api_url():
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return settings_context({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False})


def free_port(preferred: int | None = None, host: str = "127.0.0.1", *, fallback: bool = True) -> int:
    """``preferred`` if it can be bound, else (with ``fallback``) any free port the OS gives us."""
    for candidate in ([preferred] if preferred else []) + ([0] if fallback or not preferred else []):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"port {preferred} on {host} is in use" if preferred else "no free port")


@dataclass
class LocalServer:
    """A ``prefect server start`` child process."""

    process: subprocess.Popen
    host: str
    port: int
    home: Path
    log_path: Path
    own_group: bool = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (its process group when it has one), SIGKILL after ``timeout_s``."""
        from dpoflow.tasks.processes import terminate

        terminate(self.process, timeout_s, group=self.own_group)


def start_local_server(home: str | os.PathLike[str], *, port: int | None = None, host: str = "127.0.0.1",
                       ui: bool = True, timeout_s: float = 180.0, env: dict[str, str] | None = None,
                       own_group: bool = True) -> LocalServer:
    """Start ``prefect server start`` on ``host`` (loopback by default) with its SQLite database,
    settings and log under ``home``; return once its API answers /health.

    ``own_group``: run it in a new session (stopping it stops all it spawned); with ``False``
    it stays in the caller's process group, so a Ctrl-C or a kill of that group (a supervisor
    stopping ``dpoflow serve``) takes the server down with the caller, never leaving it orphaned.
    ``port=None`` takes 4200 (Prefect's default, so bookmarks work) when free, else any port;
    ``port=0`` any free port; any other port exactly that one (``OSError`` when it is taken).
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = free_port(4200, host)
    else:
        port = free_port(port or None, host, fallback=False)
    child_env = {k: v for k, v in (env if env is not None else os.environ).items()
                 if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")}
    child_env.setdefault("PREFECT_HOME", str(home))
    child_env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    child_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
           "--ui" if ui else "--no-ui"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=own_group)
    server = LocalServer(proc, host, port, home, log_path, own_group)
    server.wait(timeout_s)
    return server


@contextlib.contextmanager
def ensure_server(home: str | os.PathLike[str] | None = None, port: int | None = None,
                  timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the API URL of a Prefect server that can run schedules.

    A configured ``PREFECT_API_URL`` (environment or profile: a real server or Prefect Cloud)
    is used as is. Otherwise a local server is started under ``home`` (default
    ``~/.prefect/dpoflow-server``), this process (and the flow-run subprocesses it spawns)
    is pointed at it for the duration of the block, and it is stopped on exit.
    """
    url = configured_api_url()
    if url:
        yield url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = Path(home) if home else Path.home() / ".prefect" / "dpoflow-server"
    server = start_local_server(home, port=port, timeout_s=timeout_s, own_group=False)
    print(f"dpoflow: started a local Prefect server (SQLite at {home / 'prefect.db'}, log {server.log_path})\n"
          f"dpoflow: Prefect UI: {server.url}  (API {server.api_url})", flush=True)
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        server.stop()


# --- checking deploy/prefect.yaml without a server ----------------------------------------

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
    Returns the problems found, one string each ("deployment NAME: ...").
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
        if name in seen:
            problems.append(f"{where}: duplicate name")
        seen.add(name)
        try:
            fl = load_flow_from_entrypoint(str(dep.get("entrypoint")), use_placeholder_flow=False)
        except Exception as exc:
            problems.append(f"{where}: entrypoint {dep.get('entrypoint')!r} does not load: {exc}")
            continue
        if not isinstance(fl, Flow):
            problems.append(f"{where}: entrypoint {dep.get('entrypoint')!r} is not a @flow")
            continue
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
        elif name in flow_specs() and pool["name"] != pool_for(name):
            problems.append(f"{where}: runs on pool {pool['name']!r}, expected {pool_for(name)!r}")
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
