"""Production nights end to end on a real `prefect server start` (a subprocess on a free loopback
port, never 4200, with its own PREFECT_HOME and SQLite; stopped by PID), both documented routes:

* deploy/prefect.yaml through `dpoflow deploy apply` (work pools) and one process worker;
* `dpoflow serve` against the same kind of server, beside the workers' deployments.

Each test runs a nightly deployment run, kills the process running it during the train stage
(the run must end Crashed or Failed with a message), reruns it to completion without redoing
the finished stages, reads the night summary and the training curves back through the API
(image embedded), checks the schedule's timezone and reruns one stage with pinned inputs through
`dpoflow run STAGE --deployment`. Every process gets a clean Prefect environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dpoflow.flows.local_server import start_local_server
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks.processes import terminate

DATA_STAGES = ("sample", "score", "ingest", "pairs", "balance")
FAST = {"sample": {"samplers": [{"model": "models@production", "n": 2, "max_new_tokens": 12, "seed": 0}],
                   "shard_size": 8},
        "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 0, "log_every": 2,
                  "eval": {"n_prompts": 2, "max_new_tokens": 8}, "promote": {"auto_promote": False}}}


def _workspace(root: Path) -> Workspace:
    from dpoflow.flows.demo import _ensure_model, demo_config
    from dpoflow.tasks.demo_data import demo_night

    cfg = demo_config(root)
    cfg["sample"].update(FAST["sample"])
    cfg["train"].update({k: v for k, v in FAST["train"].items() if k not in ("eval", "promote")})
    cfg["train"]["eval"].update(FAST["train"]["eval"])
    cfg["train"]["promote"] = FAST["train"]["promote"]
    cfg["nightly"].update(cron="30 1 * * *", timezone="Europe/Berlin", retries=2, retry_delay_s=2)
    root.mkdir(parents=True)
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(cfg))
    ws = Workspace.open(root)
    _ensure_model(ws)
    demo_night(root / "inbox", 1)
    return ws


def _env(tmp_path: Path, ws: Workspace, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DPOFLOW_WORKSPACE=str(ws.root), PYTHONUNBUFFERED="1", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_WORKER_PREFETCH_SECONDS="2",
               PREFECT_CLIENT_MAX_RETRIES="10")  # SQLite answers 503 when busy (CI: 2 shared cores)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def _server(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_DATABASE_TIMEOUT"] = "60"  # wait for SQLite's lock rather than answer 503
    server = start_local_server(tmp_path / "server", port=0, timeout_s=240, env=env)
    try:
        assert server.port != 4200
        with urllib.request.urlopen(f"{server.url}/ui-settings", timeout=10) as r:
            assert json.load(r)["api_url"] == server.api_url  # the UI calls this port, not :4200
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None


def _client(env: dict[str, str]):
    """A sync client of the test's server (temporarily pointed there in this process)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def cm():
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
            yield c
    return cm()


def _dpoflow(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpoflow.flows.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


_FLOW_NAMES: dict = {}


def _children(client, run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    for r in runs:
        if r.flow_id not in _FLOW_NAMES:
            _FLOW_NAMES[r.flow_id] = client.read_flow(r.flow_id).name
    return {_FLOW_NAMES[r.flow_id]: r for r in sorted(runs, key=lambda r: r.created)}  # the last attempt wins


def _wait_final(client, run_id, timeout_s: float, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fr = client.read_flow_run(run_id)
        if fr.state and fr.state.is_final():
            return fr
        time.sleep(1)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"flow run {run_id} not finished after {timeout_s}s: {fr.state}\n{tail}")


def _flow_run_pids(run_id) -> list[int]:
    """Processes executing this flow run (Prefect starts them with PREFECT__FLOW_RUN_ID)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
    return pids


def _kill_during_train(client, run_id, timeout_s: float, log: Path) -> None:
    """SIGKILL the process running the night once its train stage runs (the data stages are done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        train = _children(client, run_id).get("train")
        if train is not None and train.state and train.state.is_running():
            pids = _flow_run_pids(run_id)
            assert pids, "no process runs the night"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return
        fr = client.read_flow_run(run_id)
        if fr.state and fr.state.is_final():
            pytest.fail(f"the night ended before its train stage ran: {fr.state}\n{log.read_text()[-4000:]}")
        time.sleep(1)
    pytest.fail(f"no running train stage after {timeout_s}s\n{log.read_text(errors='replace')[-4000:]}")


def _killed_night(client, deployment: str, log: Path) -> dict:
    """A nightly run of `deployment`, SIGKILLed during its train stage: it must end Crashed or
    Failed with a message. Returns its finished stage runs."""
    dep = client.read_deployment_by_name(deployment)
    (sched,) = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("30 1 * * *", "Europe/Berlin")  # from the config
    run = client.create_flow_run_from_deployment(dep.id)
    _kill_during_train(client, run.id, 600, log)
    crashed = _wait_final(client, run.id, 180, log)
    assert crashed.state.type.value in ("CRASHED", "FAILED") and crashed.state.message, crashed.state
    assert "-9" in crashed.state.message or "SIGKILL" in crashed.state.message, crashed.state.message
    done = {n: r for n, r in _children(client, run.id).items() if r.state.is_completed()}
    assert set(DATA_STAGES) <= set(done), done
    return done


def _finished_night(client, deployment: str, ws: Workspace, before: dict, logs: list[Path]) -> None:
    """The rerun completes; a stage whose inputs are those of its finished run before is reused,
    not redone; the night summary and the training curves read back through the API."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from dpoflow.flows.reporting import stage_runs

    run = client.create_flow_run_from_deployment(client.read_deployment_by_name(deployment).id)
    fr = _wait_final(client, run.id, 900, logs[0])
    tails = "\n".join(f.read_text(errors="replace")[-3000:] for f in logs)
    assert fr.state.is_completed(), f"{fr.state}\n{tails}"
    assert fr.name.startswith("nightly-20") and any(t.startswith("model:") for t in fr.tags), (fr.name, fr.tags)
    children = _children(client, fr.id)
    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[fr.id, *[c.id for c in children.values()]])))
    by_key = {a.key: a for a in arts}
    summary = by_key["night-summary"].data
    reused = set()
    for stage in DATA_STAGES:
        (old,) = [r for r in stage_runs(ws.store, str(before[stage].id)) if r["stage"] == stage]
        (new,) = [r for r in stage_runs(ws.store, str(children[stage].id)) if r["stage"] == stage]
        if new["inputs"] == old["inputs"]:  # finished before the kill, same inputs: never redone
            assert new["skipped"] and new["outputs"] == old["outputs"], (stage, old, new)
        if new["skipped"] and new["outputs"] == old["outputs"]:
            reused.add(stage)
        (row,) = [line for line in summary.splitlines() if line.startswith(f"| {stage} | ")]
        assert row.endswith("| yes (unchanged) |" if new["skipped"] else "| no |"), row
        assert f"/runs/flow-run/{children[stage].id}" in row
    assert {"sample", "score", "ingest"} <= reused
    (train_row,) = [line for line in summary.splitlines() if line.startswith("| train | ")]
    assert "dpo_train@" in train_row and "train_runs@" in train_row
    assert "## Model" in summary and "promotion: **not promoted**" in summary
    curves = by_key["train-curves-image"].data
    assert "data:image/png;base64," in curves and "](/" not in curves  # embedded, no worker path
    assert "train-live" in by_key and "step 6 of 6" in by_key["train-live"].data
    assert children["pairs"].name.startswith("pairs <- candidates@")


def _rerun_stage(env: dict[str, str], ws: Workspace, stage: str, route: str, pinned: list[str]) -> None:
    """`dpoflow run STAGE --deployment ROUTE` with pinned inputs: waits, exit 0, outputs printed."""
    args = [a for ref in pinned for a in ("--input", ref)]
    r = _dpoflow(env, "run", stage, "--deployment", route, *args, "--json", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = json.loads(r.stdout)
    (step,) = [s for s in res["stages"] if s["stage"] == stage]
    assert res["state"] == "COMPLETED" and set(pinned) <= set(step["inputs"].values())
    assert f"{stage}/{route}" in r.stderr
    out = "candidates" if stage == "sample" else stage
    assert step["outputs"][out] == f"{out}@{ws.store.latest(out)}"
    assert res["name"].startswith(f"{stage} <- ")


def _deployments(client) -> dict:
    return {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_both_routes_on_a_real_server_crash_rerun_and_ui(tmp_path):
    """prefect.yaml + a process worker, and `dpoflow serve` beside it, on one real server."""
    ws = _workspace(tmp_path / "ws")
    with _server(tmp_path) as server:
        env = _env(tmp_path, ws, server.api_url)
        r = _dpoflow(env, "deploy", "apply", "--workspace", str(ws.root), "--json", timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert json.loads(r.stdout)["timezone"] == "Europe/Berlin"
        worker_log, serve_log = tmp_path / "worker.log", tmp_path / "serve.log"
        with open(worker_log, "wb") as out:  # one process worker, on the GPU pool (nightly, sample, train)
            worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "dpoflow-gpu",
                                       "--type", "process"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        with open(serve_log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "dpoflow.flows.cli", "serve", "--no-server",
                                      "--workspace", str(ws.root)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            with _client(env) as client:
                deadline = time.monotonic() + 300
                while len([n for n in _deployments(client) if n.endswith("/serve")]) < 8:
                    assert serve.poll() is None and time.monotonic() < deadline, serve_log.read_text()[-4000:]
                    time.sleep(1)
                assert f"UI {server.url}" in serve_log.read_text()
                deps = _deployments(client)
                served = {n for n in deps if n.endswith("/serve")}
                workers = {n for n in deps if n.endswith("/workers")}
                assert len(workers) == 8 and served | workers == set(deps)
                assert all(deps[n].work_pool_name for n in workers) and not any(deps[n].work_pool_name for n in served)

                # night 1 on the workers, killed; night 2 through serve, killed; night 3 on the workers
                done = _killed_night(client, "nightly/workers", worker_log)
                _killed_night(client, "nightly/serve", serve_log)
                _finished_night(client, "nightly/workers", ws, done, [worker_log, serve_log])
                deps = _deployments(client)  # the night's versions are offered in both routes' run forms
                for route in ("workers", "serve"):
                    listed = deps[f"pairs/{route}"].parameter_openapi_schema["properties"]["candidates"]["anyOf"][0]
                    assert f"candidates@{ws.store.latest('candidates')}" in listed["enum"], (route, listed)

                pinned = [f"prompts@{ws.store.latest('prompts')}", f"served@{ws.store.latest('served')}"]
                _rerun_stage(env, ws, "sample", "workers", pinned)
                _rerun_stage(env, ws, "pairs", "serve", [f"candidates@{ws.store.latest('candidates')}"])
        finally:
            terminate(worker, 20, group=True)
            terminate(serve, 45, group=False)  # SIGTERM: serve pauses what it served and exits
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGKILL)
        assert "Pausing all deployments" in serve_log.read_text()
        with _client(env) as client:
            deps = _deployments(client)
        assert all(d.paused for n, d in deps.items() if n.endswith("/serve"))
        assert not any(d.paused for n, d in deps.items() if n.endswith("/workers"))  # left alone
        assert deps["nightly/workers"].schedules[0].active

        # a work pool's deployment under serve's name is never taken over
        from dpoflow.flows.prefect_yaml import REPO_PREFECT_YAML, apply_prefect_yaml

        raw = yaml.safe_load(REPO_PREFECT_YAML.read_text())
        (imp,) = [d for d in raw["deployments"] if d["entrypoint"].endswith(":import_flow")]
        imp = json.loads(json.dumps(imp))
        imp["name"] = "serve"
        raw.pop("definitions")
        raw["deployments"] = [imp]
        bad = tmp_path / "prefect.yaml"
        bad.write_text(yaml.safe_dump(raw))
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            apply_prefect_yaml(bad, cron="0 2 * * *", timezone="UTC")
        finally:
            os.environ.pop("PREFECT_API_URL") if old is None else os.environ.update(PREFECT_API_URL=old)
        r = _dpoflow(env, "serve", "--no-server", "--only", "import", "--workspace", str(ws.root), timeout=200)
        assert r.returncode == 2 and "not serving import/serve (work pool dpoflow-cpu)" in r.stderr, r.stderr
