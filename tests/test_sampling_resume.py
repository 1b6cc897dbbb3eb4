"""Shard resume after a real crash (SIGKILL of a subprocess mid-stage) and the Prefect flow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from dpoflow.flows.sample import sample, sample_flow
from dpoflow.flows.workspace import Workspace


def _overrides(model) -> list[str]:
    return [f"sample.samplers=[{{model: '{model}', n: 2, max_new_tokens: 24, temperature: [0.9], seed: 3}}]",
            "sample.shard_size=2", "sample.token_budget=100000", "sample.cpu_threads=1"]


def _write_prompts(ws: Workspace) -> str:
    n = 12
    texts = [f"Prompt number {i}: 解释一下第{i}个问题。" for i in range(n)]
    return ws.store.write("prompts", pa.table({"prompt_id": [f"p{i:02d}" for i in range(n)], "prompt": texts})).ref


def _shards(ws: Workspace) -> list[str]:
    return sorted(n for n in ws.store.list() if n.startswith("shard_sample_"))


SCRIPT = textwrap.dedent("""
    import json, sys
    from dpoflow.flows.runner import run_stage
    from dpoflow.flows.workspace import Workspace
    from dpoflow.tasks import sampling

    ws = Workspace.open(sys.argv[1], json.loads(sys.argv[2]))

    def on_shard(label, info):
        print("DONE", label, flush=True)

    def fn(ctx):
        return sampling.sample_stage(ctx, on_shard=on_shard)

    run_stage(ws, "sample", fn, {"prompts": "prompts@latest"}, ws.config.sample)
    print("FINISHED", flush=True)
""")


pytestmark = pytest.mark.usefixtures("restore_torch_threads")  # the stage sets cpu_threads=1 here


def test_rerun_after_sigkill_redoes_only_unfinished_shards_and_matches(tmp_path, tiny_model_dir):
    overrides = _overrides(tiny_model_dir)
    ws = Workspace.open(tmp_path / "crashed", overrides)
    _write_prompts(ws)
    script = tmp_path / "run_sample.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root), json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    done = 0
    try:
        for line in proc.stdout:
            if line.startswith("DONE"):
                done += 1
            if done == 2:  # kill while the third shard is generating
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = _shards(ws)
    assert 2 <= len(finished) < 6
    assert not ws.store.exists("candidates")

    resumed = sample(ws)
    assert resumed.report["shards"] == 6
    assert resumed.report["shards_reused"] == len(finished)
    assert len(_shards(ws)) == 6

    clean = Workspace.open(tmp_path / "clean", overrides)
    _write_prompts(clean)
    straight = sample(clean)
    assert straight.report["shards_reused"] == 0
    a = ws.store.read(resumed.outputs["candidates"])
    b = clean.store.read(straight.outputs["candidates"])
    assert a.num_rows == 12 * 2 - resumed.report["dropped"].get("duplicate_response", 0)
    assert a.equals(b)


def test_flow_runs_shards_as_prefect_tasks_and_reports_progress(prefect_harness, tmp_path, tiny_model_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    overrides = _overrides(tiny_model_dir)
    ws = Workspace.open(tmp_path / "ws", overrides)
    ref = _write_prompts(ws)
    state = sample_flow(prompts=ref, workspace=str(ws.root), overrides=overrides, return_state=True)
    outputs = state.result()
    cands = ws.store.read(outputs["candidates"])
    assert cands.num_rows > 0 and len(_shards(ws)) == 6
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        names = [r.name for r in runs]
        assert sorted(n for n in names if n.startswith("sample-shard-")) == [
            f"sample-shard-sampler0-{k:04d}" for k in range(6)]
        mine = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["sample-progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        assert mine and mine[0].type == "progress" and float(mine[0].data) == 100.0
    # same prompts + config + code: the flow reuses the output
    again = sample_flow(prompts=ref, workspace=str(ws.root), overrides=overrides)
    assert again == outputs
