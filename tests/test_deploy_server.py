"""End to end against a real Prefect server: `dpoflow serve` with no server configured starts
`prefect server start` (SQLite, loopback, free port), serves the deployments; a client process
triggers the `import` deployment with parameters through the API, waits for it and reads the
run's artifacts back. Every process runs with its own Prefect env (no clash with the session's
test harness) and is killed with its process group at the end."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from dpoflow.flows.deployments import flow_specs
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks.processes import terminate

CLIENT = textwrap.dedent("""
    import json, sys, time
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    params, expected = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 90
        for name in expected:  # serve registers its deployments one by one after its banner
            while True:
                try:
                    client.read_deployment_by_name(name)
                    break
                except ObjectNotFound:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        served = {}
        for d in client.read_deployments():
            flow = client.read_flow(d.flow_id)
            served[f"{flow.name}/{d.name}"] = [
                {"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                for s in d.schedules]
        run = run_deployment("import/import", parameters=params, timeout=150, poll_interval=1)
        run = client.read_flow_run(run.id)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        gcl = client.read_global_concurrency_limit_by_name("gpu")
    print("RESULT " + json.dumps({
        "served": served, "id": str(run.id), "state": run.state.type.value,
        "message": run.state.message, "parameters": run.parameters,
        "artifacts": [{"key": a.key, "type": a.type, "data": a.data} for a in arts],
        "gpu_limit": gcl.limit,
    }, default=str))
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # pick the run up within a second
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            pytest.fail(f"dpoflow serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {pattern!r} after {timeout_s}s:\n{log.read_text()[-4000:]}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to serve alone (what a supervisor such as systemd's KillMode=mixed does): it
    pauses its schedules and stops the server it started; then SIGKILL what is left of its
    group. (A SIGTERM to the whole group would stop the server while serve still talks to it.)"""
    terminate(proc, 45, group=False)
    deadline = time.monotonic() + 15  # the leader is gone; give the rest of the group a moment
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_trigger_run_and_read_artifacts_on_a_real_server(tmp_path):
    ws_dir = tmp_path / "ws"
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What is 2+2?", "reference": "4"}\n'
                    '{"prompt": "中国的首都是哪里？", "reference": "北京"}\n'
                    '{"prompt": "Say hi in English and 中文", "category": "chat"}\n', encoding="utf-8")
    env = _env(tmp_path)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "dpoflow.flows.cli", "serve", "--workspace", str(ws_dir), "--port", "0",
             "--server-home", str(tmp_path / "server"), "--cron", "0 2 * * *", "--timezone", "Europe/Berlin"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    ui_url = None
    try:
        ui_url = _wait_for(r"Prefect UI: (http://127\.0\.0\.1:\d+)", log, serve, 150).group(1)
        _wait_for(r"dpoflow serve: \d+ deployment", log, serve, 150)
        assert _healthy(ui_url)
        params = {"name": "prompts", "path": str(data), "workspace": str(ws_dir)}
        argv = [sys.executable, "-c", CLIENT, json.dumps(params), json.dumps(sorted(_expected()))]
        client = subprocess.run(argv, env={
            **env, "PREFECT_API_URL": f"{ui_url}/api"}, capture_output=True, text=True, timeout=200)
        assert client.returncode == 0, f"{client.stderr[-4000:]}\n--- serve log:\n{log.read_text()[-4000:]}"
        result = json.loads(client.stdout.split("RESULT ", 1)[1])
        try:
            _check(result, params, ws_dir)
        except AssertionError as exc:  # say what serve saw (e.g. a flow module that failed to import)
            raise AssertionError(f"{exc}\n--- serve log:\n{log.read_text()[-4000:]}") from exc
    finally:
        _kill_group(serve)
    with pytest.raises(ProcessLookupError):
        os.killpg(serve.pid, 0)  # serve and the server it started are gone
    assert ui_url is None or not _healthy(ui_url)
    assert "Pausing all deployments" in log.read_text()  # shut down gracefully, not killed


def _expected() -> set[str]:
    """Every flow of this checkout whose module can be found is served as ``<flow>/<flow>``."""
    return {f"{n}/{n}" for n, spec in flow_specs().items()
            if importlib.util.find_spec(spec.partition(":")[0])}


def _check(result: dict, params: dict, ws_dir: Path) -> None:
    """What the triggered run must show: completed with our parameters, its table artifact,
    the dataset it wrote, and the deployments `serve` registered."""
    assert result["state"] == "COMPLETED", result["message"]
    assert result["parameters"] == params
    # every flow of this checkout is served; only nightly has a schedule, the one asked for
    expected = _expected()
    assert set(result["served"]) == expected and "import/import" in expected
    assert all(not s for n, s in result["served"].items() if n != "nightly/nightly")
    if "nightly/nightly" in expected:
        assert result["served"]["nightly/nightly"] == [
            {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}]
    assert result["gpu_limit"] == 1  # serve creates the GPU guard's limit

    (report,) = [a for a in result["artifacts"] if a["key"] == "import-prompts-report"]
    assert report["type"] == "table"
    rows = json.loads(report["data"]) if isinstance(report["data"], str) else report["data"]
    assert {"stage": "import:prompts", "what": "out: prompts", "rows": 3} in rows

    # the data landed in the workspace, stamped with the run that wrote it
    info = Workspace.open(ws_dir).store.info("prompts")
    assert info.rows == 3 and info.flow_run_id == result["id"]
