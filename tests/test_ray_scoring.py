"""Slow: Ray in the score stage and Ray failures, on one private local Ray cluster for the
module (2 CPUs, small object store, no dashboard; `address: local` finds it started).

* `score.runner=ray`: every reward shard is a Prefect task run on a Ray worker; the scores
  equal the inline run's exactly; a rerun reuses every committed reward shard.
* A Ray worker killed (SIGKILL) in the middle of a sample shard: the shard runs again, the
  flow completes, and no shard dataset is committed twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("prefect_ray")

from dpoflow.flows.score import run_score, score_flow  # noqa: E402
from dpoflow.flows.workspace import Workspace  # noqa: E402

RAY = ["ray.num_cpus=2", "ray.object_store_mb=100", "ray.dashboard=false"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One private local cluster for the module: the runner joins a Ray it finds started and
    leaves it running, so the tests here pay the start-up once."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _candidates(n: int) -> pa.Table:
    return pa.table({
        "candidate_id": [f"c{i:02d}" for i in range(n)], "prompt_id": [f"p{i % 3}" for i in range(n)],
        "prompt": [f"用一句话解释第{i % 3}条规则。" for i in range(n)],
        "response": [f"Rule {i} means: " + "keep it short. " * (i % 4) for i in range(n)],
        "origin": ["sampled"] * n, "model_version": ["m0"] * n, "dup_count": pa.array([1] * n, pa.int32()),
    })


def _task_runs(run_id, prefix: str, n: int, wait_s: float = 60.0) -> list:
    """The flow run's task runs named `prefix*`, once `n` of them are final (states reach the
    server as events, a moment after the workers send them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            runs = [r for r in runs if r.name.startswith(prefix)]
            if (len(runs) >= n and all(r.state and r.state.is_final() for r in runs)) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


@pytest.mark.slow
def test_reward_shards_on_ray_match_inline_and_are_reused(ray_cluster, prefect_harness, tmp_path,
                                                          tiny_classifier_dir):
    overrides = [f"score.reward.model={tiny_classifier_dir}", "score.reward.shard_size=3",
                 "score.reward.batch_size=2", "score.reward.device=auto"]
    cands = _candidates(8)
    inline_ws = Workspace.open(tmp_path / "inline", overrides)
    inline_ws.store.write("candidates", cands)
    inline = inline_ws.store.read(run_score(inline_ws).outputs["scores"]).sort_by("candidate_id")

    ws = Workspace.open(tmp_path / "ray", overrides)
    ws.store.write("candidates", cands)
    state = score_flow(workspace=str(ws.root), overrides=overrides + ["score.runner=ray"] + RAY, return_state=True)
    on_ray = ws.store.read(state.result()["scores"]).sort_by("candidate_id")
    assert on_ray.equals(inline)  # rewards (and everything else) bit for bit
    rewards = on_ray.column("reward").to_numpy(zero_copy_only=False)
    assert np.isfinite(rewards).all() and len(set(rewards.tolist())) > 1

    runs = _task_runs(state.state_details.flow_run_id, "reward-shard-", 3)
    assert sorted(r.name for r in runs) == [f"reward-shard-reward-{k:04d}" for k in range(3)]
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3
    shards = sorted(n for n in ws.store.list() if n.startswith("shard_reward_"))
    assert len(shards) == 3 and all(ws.store.info(n).extra["pid"] != os.getpid() for n in shards)

    # a changed metric setting reruns the stage: every reward shard is reused, none rewritten
    again = run_score(Workspace.open(ws.root, overrides + ["score.runner=ray", "score.use_stemmer=true"] + RAY))
    assert again.report["reward_shards_reused"] == 3
    assert all(ws.store.latest(n) == 0 for n in shards)


def _busy_workers(task_name: str) -> list:
    """Ray worker processes below this one that are running `task_name` now (a worker's
    process title is ray::<task name> while it runs a task, ray::IDLE between tasks)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] == [f"ray::{task_name}"]:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _running_task_run(prefix: str) -> bool:
    """Whether the server shows a task run named `prefix*` as Running (its worker is past
    the task run's creation, inside the shard)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        return bool(client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=prefix), state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING]))), limit=1))


def _kill_a_busy_worker_during(run, task_name: str = "sample-shard", once_running: bool = False
                               ) -> tuple[object, list[int]]:
    """`run()` while a thread SIGKILLs the first Ray worker seen running `task_name` (with
    `once_running`: only once the server shows its task run Running)."""
    killed: list[int] = []

    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if once_running and not _running_task_run(task_name):
                time.sleep(0.05)
                continue
            for p in _busy_workers(task_name):
                os.kill(p.pid, signal.SIGKILL)  # the worker dies with its shard half done
                killed.append(p.pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    out = run()
    killer.join(5)
    assert killed, "no worker was seen running a shard"
    return out, killed


def _sampling(tiny_model_dir, retries: int, max_new_tokens: int = 48) -> list[str]:
    return [f"sample.samplers=[{{model: '{tiny_model_dir}', n: 4, max_new_tokens: {max_new_tokens}, "
            "temperature: [1.0], "
            "seed: 5}]", "sample.shard_size=2", "sample.cpu_threads=1", "sample.runner=ray",
            f"ray.retries={retries}", *RAY]


def _prompts_ws(root, overrides: list[str], n: int) -> Workspace:
    ws = Workspace.open(root, overrides)
    ws.store.write("prompts", pa.table({"prompt_id": [f"k{i}" for i in range(n)],
                                        "prompt": [f"Explain rule {i} in one line." for i in range(n)]}))
    return ws


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_and_commits_once(ray_cluster, prefect_harness, tmp_path,
                                                              tiny_model_dir):
    from dpoflow.flows.sample import sample_flow

    overrides = _sampling(tiny_model_dir, retries=1)
    ws = _prompts_ws(tmp_path / "ws", overrides, 8)
    state, killed = _kill_a_busy_worker_during(
        lambda: sample_flow(workspace=str(ws.root), overrides=overrides, return_state=True))
    assert state.is_completed(), state.message
    shards = sorted(n for n in ws.store.list() if n.startswith("shard_sample_"))
    assert len(shards) == 4
    assert all(ws.store.latest(n) == 0 for n in shards)  # each committed exactly once
    candidates = ws.store.read(state.result()["candidates"])
    assert sorted(set(candidates.column("prompt_id").to_pylist())) == [f"k{i}" for i in range(8)]
    runs = _task_runs(state.state_details.flow_run_id, "sample-shard-", 4)
    assert sorted(r.name for r in runs) == [f"sample-shard-sampler0-{k:04d}" for k in range(4)]
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 4  # the retried one too: none left Running

    # without retries the run fails, and the dead worker's task run ends Crashed, not Running
    overrides = _sampling(tiny_model_dir, retries=0, max_new_tokens=160)
    ws = _prompts_ws(tmp_path / "no-retries", overrides, 2)
    state, _ = _kill_a_busy_worker_during(
        lambda: sample_flow(workspace=str(ws.root), overrides=overrides, return_state=True), once_running=True)
    assert state.is_failed() and "WorkerCrashedError" in state.message
    runs = _task_runs(state.state_details.flow_run_id, "sample-shard-", 1)
    assert [r.state.type.value for r in runs] == ["CRASHED"]
    assert not [n for n in ws.store.list() if n.startswith("shard_sample_")]
