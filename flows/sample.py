"""The `sample` stage flow: prompts (+ served responses) -> candidates.

Each shard runs as a Prefect task (visible in the UI, one per sampler x chunk of prompts),
in this process or, with `sample.runner: ray`, on a Ray cluster (flows/ray_runner.py); its
output is committed to the store by the worker when it finishes, so after a crash the rerun of this
flow skips the finished shards (see tasks.sampling). Progress goes to a Prefect progress
artifact; the tqdm bar shows on interactive terminals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dpoflow.flows.reporting import flow_run_id, progress_reporter
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import sampling
from dpoflow.tasks.sampling import run_shard_spec
from dpoflow.tasks.shards import ShardRunner, ShardSpec


@task(name="sample-shard", task_run_name="sample-shard-{label}", cache_policy=NO_CACHE, persist_result=False)
def sample_shard_task(label: str, spec: ShardSpec, on_batch: Callable[[int], None] | None = None) -> dict:
    """One shard, from its spec: the worker commits its output dataset, so Prefect need not
    keep results (the returned dict is a few counters and the dataset ref)."""
    return run_shard_spec(spec, on_batch=on_batch)


def prefect_shard_runner(specs: Sequence[ShardSpec], on_batch: Callable[[int], None]
                         ) -> Iterator[tuple[ShardSpec, dict]]:
    """Each shard a Prefect task in this process, one after the other (the model stays loaded)."""
    for spec in specs:
        yield spec, sample_shard_task(spec.label, spec, on_batch)


def shard_runner_for(ws: Workspace) -> tuple[ShardRunner | None, str | None]:
    """(runner, worker device) for `sample.runner`: Ray runs shards as task runs on the
    cluster; inline runs them here (as Prefect tasks inside a flow run)."""
    cfg = ws.config.sample
    if cfg.runner == "ray":
        from dpoflow.flows import ray_runner

        task = sample_shard_task.with_options(retries=ws.config.ray.retries)
        return ray_runner.ray_shard_runner(ws.config.ray, task), ray_runner.worker_device(cfg.device, ws.config.ray)
    return (prefect_shard_runner if flow_run_id() else None), None


def sample(ws: Workspace, prompts: str = "prompts@latest", served: str | None = None, *,
           force: bool = False, shard_runner: ShardRunner | None = None, production: str | None = None) -> StageRun:
    """Run the stage (with or without Prefect); unchanged inputs/config/code/models reuse the
    output. The key covers the model each sampler resolves to now, so promoting a new
    production model resamples even though the config still says `models@production`.
    Inside a flow run (the `sample` or `nightly` flow) each shard is a Prefect task; with
    `sample.runner: ray` each shard is a task run on a Ray worker. `production` pins the model
    ``models@production`` means (the nightly's rerun of a night that already promoted)."""
    from dpoflow.flows.gpu_slots import gpu_slot
    from dpoflow.tasks.generation import pick_device

    device = None
    if shard_runner is None:
        shard_runner, device = shard_runner_for(ws)
    # The GPU slot is held only while sampling really runs here (never alongside training);
    # shards on Ray take the cluster's GPUs, not this host's.
    here = "cpu" if device is not None else pick_device(ws.config.sample.device)
    stage = sampling.make_sample_stage(
        shard_runner, reuse_shards=not force, device=device,
        progress=lambda: progress_reporter("sample-progress", "sample: prompts done"))
    registry = ws.registry.with_tags({"production": production}) if production else ws.registry
    return run_stage(ws, "sample", stage, {"prompts": prompts, "served": served}, ws.config.sample, force=force,
                     key_extra={"models": sampling.model_keys(ws.config.sample, registry)},
                     hold=lambda: gpu_slot(device=here), registry=registry)


@flow(name="sample")
def sample_flow(prompts: str = "prompts@latest", served: str | None = None, workspace: str | None = None,
                overrides: list[str] | None = None, force: bool = False,
                production: str | None = None) -> dict[str, str]:
    """Sample candidate responses for `prompts` (and add `served` responses, when given);
    `production` pins the model version `models@production` stands for."""
    ws = Workspace.open(workspace, overrides)
    return sample(ws, prompts, served, force=force, production=production).outputs
