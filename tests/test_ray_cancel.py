"""Slow: cancelling a `sample.runner=ray` flow run as the UI does, on a real `prefect server start`.

The sample deployment runs under `dpoflow serve` (the cheaper documented route: no work pool,
no `prefect deploy`) against a server on a free loopback port with its own PREFECT_HOME. Once
one shard is committed and the next runs on the run's private Ray cluster (1 CPU: one worker,
so several shards are still to come; small object store, no dashboard, RAY_AUTH_MODE=disabled),
the run is set to Cancelling through the client, the call the UI's Cancel button makes. The run
must end Cancelled (it ended Crashed while Ray's SIGTERM handler replaced Prefect's), no task
run of it may stay Running or Pending, no process of the run (the flow-run process, Ray's GCS,
raylet and workers, found by PID + start time) may survive, and the rerun completes, reusing
the committed shards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

pytest.importorskip("prefect_ray")
psutil = pytest.importorskip("psutil")

from dpoflow.flows.sample import sample  # noqa: E402
from dpoflow.flows.workspace import Workspace  # noqa: E402
from dpoflow.tasks.processes import terminate  # noqa: E402
from tests.test_deploy_server import _client, _flow_run_pids, _server, _wait_final  # noqa: E402
from tests.test_ray_sigterm import _busy_shard_worker, _survivors, _tree  # noqa: E402


def _task_runs(client, run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _run_tree(run_id) -> dict[int, tuple[float, str]]:
    """The processes of the flow run (its process, found by environment) and all they started."""
    tree: dict[int, tuple[float, str]] = {}
    for pid in _flow_run_pids(run_id):
        tree |= _tree(pid)
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            tree[pid] = (p.create_time(), " ".join(p.cmdline())[:100])
    return tree


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cancel_from_the_ui_stops_the_ray_shards_and_the_rerun_reuses_committed(tmp_path, tiny_model_dir,
                                                                                 restore_torch_threads):
    root = tmp_path / "ws"
    n = 8
    store = Workspace.open(root).store
    store.write("prompts", pa.table({
        "prompt_id": [f"c{i}" for i in range(n)], "prompt": [f"Explain rule {i} in one line." for i in range(n)]}))
    sets = [f"sample.samplers=[{{model: '{tiny_model_dir}', n: 4, max_new_tokens: 96, temperature: [1.0], seed: 5}}]",
            "sample.shard_size=1", "sample.cpu_threads=1"]
    # one Ray worker: shards run one after the other, so the cancel lands while several are left
    ray_sets = ["sample.runner=ray", "ray.num_cpus=1", "ray.object_store_mb=100", "ray.dashboard=false"]

    def committed() -> list[str]:
        return sorted(x for x in store.list() if x.startswith("shard_sample_"))

    with _server(tmp_path) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
        env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_URL=server.api_url, PREFECT_RUNNER_POLL_FREQUENCY="1", PYTHONUNBUFFERED="1",
                   PREFECT_CLIENT_MAX_RETRIES="10", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "dpoflow.flows.cli", "serve", "--no-server",
                                      "--no-schedule", "--only", "sample", "--workspace", str(root)],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        tree: dict[int, tuple[float, str]] = {}
        try:
            with _client(env) as client:
                deadline = time.monotonic() + 180
                while True:
                    assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                    with contextlib.suppress(Exception):
                        dep = client.read_deployment_by_name("sample/serve")
                        break
                    time.sleep(0.5)
                run = client.create_flow_run_from_deployment(dep.id, parameters={"overrides": sets + ray_sets})

                deadline = time.monotonic() + 300
                while True:  # one shard committed and another one running on a Ray worker
                    assert time.monotonic() < deadline, f"no shard ran\n{log.read_text()[-4000:]}"
                    state = client.read_flow_run(run.id).state
                    assert not state.is_final(), f"{state}\n{log.read_text()[-4000:]}"
                    tree |= _run_tree(run.id)
                    running = [r for r in _task_runs(client, run.id) if r.state and r.state.is_running()]
                    if committed() and running and _busy_shard_worker(tree):
                        break
                    time.sleep(0.2)
                tree |= _run_tree(run.id)
                before = committed()
                assert 1 <= len(before) < n

                from prefect.states import Cancelling

                client.set_flow_run_state(run.id, Cancelling(message="cancelled from the UI"))  # what Cancel does
                final = _wait_final(client, run.id, 120, log)
                assert final.state.is_cancelled(), f"{final.state}\n{log.read_text()[-4000:]}"
                # serve forces Cancelled after killing the process: the engine itself must not have crashed
                history = [st.type.value for st in client.read_flow_run_states(run.id)]
                assert "CRASHED" not in history, history

                deadline = time.monotonic() + 30  # the last task-run states arrive as events
                while True:
                    stuck = [(r.name, r.state.name) for r in _task_runs(client, run.id)
                             if r.state and (r.state.is_running() or r.state.is_pending())]
                    if not stuck or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert not stuck, f"task runs left behind: {stuck}\n{log.read_text()[-4000:]}"
                shards = [r for r in _task_runs(client, run.id) if r.name.startswith("sample-shard-")]
                assert {r.state.type.value for r in shards} <= {"COMPLETED", "CANCELLED"}, [r.state for r in shards]

                deadline = time.monotonic() + 30
                while (left := _survivors(tree)) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert not left, f"orphans after cancelling: {left}\n{log.read_text()[-4000:]}"
                assert any("raylet" in c for _, c in tree.values())  # the snapshot did see the Ray cluster
                assert serve.poll() is None  # serve itself keeps serving
        finally:
            terminate(serve, 30, group=True)

    done = committed()
    assert set(before) <= set(done) and all(store.latest(x) == 0 for x in done)  # none rewritten
    # the rerun (inline: shard keys do not depend on the runner) reuses every committed shard
    rerun = sample(Workspace.open(root, sets))
    assert rerun.report["shards"] == n and rerun.report["shards_reused"] == len(done)
    assert len(committed()) == n and all(store.latest(x) == 0 for x in committed())
