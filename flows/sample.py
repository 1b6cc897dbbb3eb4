"""The `sample` stage flow: prompts (+ served responses) -> candidates.

Each shard runs as a Prefect task (visible in the UI, one per sampler x chunk of prompts);
its output is committed to the store when it finishes, so after a crash the rerun of this
flow skips the finished shards (see tasks.sampling). Progress goes to a Prefect progress
artifact; the tqdm bar shows on interactive terminals.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dpoflow.flows.reporting import flow_run_id, progress_reporter
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import sampling


@task(name="sample-shard", task_run_name="sample-shard-{label}", cache_policy=NO_CACHE, persist_result=False)
def sample_shard_task(label: str, work: Callable[[], dict]) -> dict:
    """One shard: its finished output is a store dataset, so Prefect need not keep results."""
    return work()


def _prefect_runner(label: str, work: Callable[[], dict]) -> dict:
    return sample_shard_task(label, work)


def sample(ws: Workspace, prompts: str = "prompts@latest", served: str | None = None, *,
           force: bool = False, shard_runner: Callable | None = None) -> StageRun:
    """Run the stage (with or without Prefect); unchanged inputs/config/code/models reuse the
    output. The key covers the model each sampler resolves to now, so promoting a new
    production model resamples even though the config still says `models@production`.
    Inside a flow run (the `sample` or `nightly` flow) each shard is a Prefect task."""
    if shard_runner is None and flow_run_id():
        shard_runner = _prefect_runner
    from dpoflow.flows.gpu_slots import gpu_slot
    from dpoflow.tasks.generation import pick_device

    # The GPU slot is held only while sampling really runs (never alongside training).
    return run_stage(ws, "sample", sampling.make_sample_stage(
        shard_runner, reuse_shards=not force,
        progress=lambda: progress_reporter("sample-progress", "sample: prompts done")), {"prompts": prompts, "served": served},
                     ws.config.sample, force=force,
                     key_extra={"models": sampling.model_keys(ws.config.sample, ws.registry)}, hold=lambda: gpu_slot(device=pick_device(ws.config.sample.device)))


@flow(name="sample")
def sample_flow(prompts: str = "prompts@latest", served: str | None = None, workspace: str | None = None,
                overrides: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Sample candidate responses for `prompts` (and add `served` responses, when given)."""
    ws = Workspace.open(workspace, overrides)
    return sample(ws, prompts, served, force=force).outputs
