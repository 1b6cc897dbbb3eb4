"""The `score` stage flow: candidates (+ prompts for references) -> scores.

The reward model's shards run in this process (`score.runner: inline`) or, with
`score.runner: ray`, each as a Prefect task run on a Ray worker (flows/ray_runner.py, the
same `ray` section as sampling); the worker commits its shard's rewards, so a rerun reuses
finished shards and the scores are the same either way.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dpoflow.flows.reporting import publish_table
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import scoring


@task(name="reward-shard", task_run_name="reward-shard-{label}", cache_policy=NO_CACHE, persist_result=False)
def reward_shard_task(label: str, spec: scoring.RewardShardSpec) -> dict:
    """One reward shard, from its spec: the worker commits its rewards, so Prefect need not
    keep results (the returned dict is a few counters and the dataset ref)."""
    return scoring.run_reward_spec(spec)


def score_stage_for(ws: Workspace, *, force: bool = False):
    """The stage function for `score.runner`: reward shards on Ray, or here."""
    cfg = ws.config.score
    if cfg.runner == "ray" and cfg.reward.model:
        from dpoflow.flows import ray_runner

        task_ = reward_shard_task.with_options(retries=ws.config.ray.retries)
        device = ray_runner.worker_device(cfg.reward.device, ws.config.ray, setting="score.reward.device")
        return scoring.make_score_stage(ray_runner.ray_shard_runner(ws.config.ray, task_), device=device,
                                        reuse_shards=not force)
    return scoring.make_score_stage(reuse_shards=not force)


def run_score(ws: Workspace, candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
              *, force: bool = False) -> StageRun:
    """Run the stage (CLI / tests / flows); `prompts` is skipped when that dataset does not exist."""
    if prompts and prompts.split("@", 1)[0] and not ws.store.exists(prompts.split("@", 1)[0]):
        prompts = None
    return run_stage(ws, "score", score_stage_for(ws, force=force), {"candidates": candidates, "prompts": prompts},
                     ws.config.score, force=force)


@flow(name="score")
def score_flow(candidates: str = "candidates@latest", prompts: str | None = "prompts@latest",
               workspace: str | None = None, overrides: list[str] | None = None,
               force: bool = False) -> dict[str, str]:
    """Score candidates: BLEU / ROUGE against prompt references, rule flags, reward, auto_score."""
    ws = Workspace.open(workspace, overrides)
    run = run_score(ws, candidates, prompts, force=force)
    flagged = (run.report or {}).get("flagged") or {}
    publish_table("score-flags", [{"flag": k, "rows": v} for k, v in flagged.items()], "score: flagged candidates")
    return run.outputs
