"""Slow: the sample flow with `sample.runner=ray` on a private local Ray cluster (2 CPUs, small
object store, no dashboard). Every shard is a Prefect task run on a Ray worker; the candidates
equal the inline run's; workers are reused; a rerun reuses every shard; a dead address is one
line of error, never a silent local cluster."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

pytest.importorskip("prefect_ray")

from dpoflow.flows.ray_runner import RayConfig, RayUnavailable, check_address, shard_options  # noqa: E402
from dpoflow.flows.sample import sample, sample_flow  # noqa: E402
from dpoflow.flows.workspace import Workspace  # noqa: E402

RAY = ["sample.runner=ray", "ray.num_cpus=2", "ray.object_store_mb=100", "ray.dashboard=false"]


@pytest.fixture(autouse=True)
def local_ray_env(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _workspace(root, model) -> tuple[Workspace, list[str]]:
    overrides = [f"sample.samplers=[{{model: '{model}', n: 2, max_new_tokens: 10, temperature: [1.0], seed: 11}}]",
                 "sample.shard_size=2", "sample.cpu_threads=1"]
    ws = Workspace.open(root, overrides)
    ws.store.write("prompts", pa.table({"prompt_id": [f"r{i}" for i in range(6)],
                                        "prompt": [f"用一句话解释第{i}条规则。 Rule {i}." for i in range(6)]}))
    return ws, overrides


def _shard_runs(run_id, n: int, wait_s: float = 60.0) -> list:
    """The flow run's shard task runs, once `n` of them are final (states reach the server as
    events, a moment after the workers send them)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            runs = [r for r in runs if r.name.startswith("sample-shard-")]
            if (len(runs) >= n and all(r.state and r.state.is_final() for r in runs)) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


@pytest.mark.slow
def test_ray_runner_matches_inline_and_reuses_workers_and_shards(prefect_harness, tmp_path, tiny_model_dir):
    inline_ws, overrides = _workspace(tmp_path / "inline", tiny_model_dir)
    inline = inline_ws.store.read(sample(inline_ws).outputs["candidates"]).sort_by("candidate_id")

    ws, _ = _workspace(tmp_path / "ray", tiny_model_dir)
    state = sample_flow(workspace=str(ws.root), overrides=overrides + RAY, return_state=True)
    on_ray = ws.store.read(state.result()["candidates"]).sort_by("candidate_id")
    assert on_ray.select(["candidate_id", "response"]).equals(inline.select(["candidate_id", "response"]))

    shard_names = sorted(n for n in ws.store.list() if n.startswith("shard_sample_"))
    runs = _shard_runs(state.state_details.flow_run_id, 3)
    assert sorted(r.name for r in runs) == [f"sample-shard-sampler0-{k:04d}" for k in range(3)]
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3 and len(shard_names) == 3
    pids = {ws.store.info(n).extra["pid"] for n in shard_names}
    assert len(pids) <= 2  # two CPU slots: workers (and their loaded model) are reused across shards
    assert not _ray_children()  # the private cluster stopped with the run: no orphans

    # a changed merge setting reruns the stage: every shard is reused, on Ray too
    again = sample_flow(workspace=str(ws.root), overrides=overrides + RAY + ["sample.dedup=false"],
                        return_state=True)
    assert again.is_completed()
    runs = _shard_runs(again.state_details.flow_run_id, 3)
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3
    assert sorted(n for n in ws.store.list() if n.startswith("shard_sample_")) == shard_names
    assert all(ws.store.latest(n) == 0 for n in shard_names)  # none committed twice


def test_dead_address_is_one_line_and_never_local(unused_tcp_port):
    cfg = RayConfig(address=f"127.0.0.1:{unused_tcp_port}", connect_timeout_s=2)
    with pytest.raises(RayUnavailable, match="unreachable") as err:
        check_address(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="ray.address"):
        RayConfig(address="localhost")  # no port: neither local nor a cluster address
    assert shard_options(RayConfig(gpus_per_shard=1)) == {"num_cpus": 1.0, "max_retries": 1, "num_gpus": 1.0,
                                                          "max_calls": 0}


def test_vllm_on_ray_is_one_engine_per_whole_gpu_and_devices_name_their_setting():
    from dpoflow.flows.ray_runner import check_vllm, worker_device
    from dpoflow.tasks.sampling import ModelSpec, SampleConfig
    from dpoflow.tasks.shards import ShardSpec

    def spec(backend: str) -> ShardSpec:
        cfg = SampleConfig(samplers=[{"model": "m", "backend": "transformers"}, {"model": "m", "backend": backend}])
        return ShardSpec("sampler1-0000", "shard_sample_k", "/store", (), "prompts@0", ("p",), (0,), 1,
                         cfg.model_dump(mode="json"), ModelSpec("m", "m", "m", True), "cuda")

    for gpus in (0.0, 0.5, 1.5):  # a CPU worker, two engines on one GPU, a GPU and a half
        with pytest.raises(ValueError, match="whole number of GPUs"):
            check_vllm([spec("vllm")], RayConfig(gpus_per_shard=gpus))
    check_vllm([spec("vllm")], RayConfig(gpus_per_shard=1))
    check_vllm([spec("transformers")], RayConfig())  # the CPU twin needs no GPU
    assert worker_device("auto", RayConfig(gpus_per_shard=1), "score.reward.device") == "cuda"
    with pytest.raises(ValueError, match="score.reward.device=cuda needs ray.gpus_per_shard > 0 with score.runner"):
        worker_device("cuda", RayConfig(), "score.reward.device")


def _ray_children(wait_s: float = 20.0) -> list[str]:
    """Ray processes (raylet, GCS, workers) still below this process after `wait_s`."""
    import time

    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "ray::" in cmd or "/ray/" in cmd:  # raylet, GCS, workers (renamed ray::...), monitors
                left.append(cmd[:80])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
