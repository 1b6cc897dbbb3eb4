"""The training steps without Prefect: reference log-probs -> DPO training -> evaluation -> promotion.

Four kinds of steps, each a versioned stage with its own content key: ``ref_logps`` (dpo_train's
and dpo_eval's), ``train``, ``evaluate`` and ``promote``. A rerun with unchanged inputs reuses
every step; a β sweep reuses the stored reference log-probs; a changed promotion threshold
re-runs only the gate. ``dpoflow train`` and ``dpoflow run train`` call ``train_pipeline``
directly; ``flows.train`` wraps the same steps in Prefect runs. This module never imports
Prefect, so the direct path does not pay its ~2-4 s import (see benchmarks, issue 18).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dpoflow.flows.reporting import (
    artifacts_posted_meanwhile,
    training_progress,
)
from dpoflow.flows.runner import StageRun, run_stage
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks.training import promotion, ref_logps, stage


def optional_ref(ws: Workspace, ref: str | None) -> str | None:
    """``dpo_eval@latest`` when no dpo_eval exists yet means "no eval set"; any other missing
    ref is an error (a pinned version the user asked for must exist)."""
    if not ref:
        return None
    name, _, sel = ref.partition("@")
    if sel in ("", "latest") and not ws.store.exists(name):
        return None
    return str(ws.store.resolve(ref))


def ref_logps_for(ws: Workspace, pairs_ref: str, cfg: Any, *, model: ref_logps.ModelRef | None = None,
                  force: bool = False, hold: Callable[[], Any] | None = None) -> StageRun:
    """Compute (or reuse) the stored reference log-probs of one pairs version: the content key
    covers the pairs version, the reference model version, tokenization and precision."""
    model = model or ref_logps.resolve_model(ws.registry, cfg.ref_model or cfg.model)
    return run_stage(ws, "ref_logps", ref_logps.make_ref_logps_stage(cfg, model), {"pairs": pairs_ref},
                     ref_logps.ref_key_config(cfg), force=force, hold=hold,
                     key_extra={"ref_model": model.version})


def ref_logps_step(ws: Workspace, pairs: str, *, force: bool = False,
                   model: ref_logps.ModelRef | None = None) -> StageRun:
    """Reference log-probs of one pairs version (reused when stored for the same reference)."""
    from dpoflow.flows.gpu_slots import gpu_slot
    from dpoflow.tasks.generation import pick_device

    return ref_logps_for(ws, pairs, ws.config.train, model=model, force=force,
                         hold=lambda: gpu_slot(device=pick_device()))


def ref_logps_steps(ws: Workspace, pairs: list[str], *, force: bool = False,
                    model: ref_logps.ModelRef | None = None) -> list[StageRun]:
    """Reference log-probs of several pairs versions (the train and the eval set), in order,
    under `model` (default: the configured reference as the registry resolves it now)."""
    return [ref_logps_step(ws, p, force=force, model=model) for p in pairs]


@contextlib.contextmanager
def _while_training(devices: int) -> Iterator[None]:
    """Hold the GPUs; the run only waits on the training process meanwhile, so queued report
    artifacts are posted then (see flows.reporting.batched_artifacts)."""
    from dpoflow.flows.gpu_slots import gpu_slot
    from dpoflow.tasks.training.distributed import child_device  # no torch import in this process

    with gpu_slot(occupy=devices, device=child_device()), artifacts_posted_meanwhile():
        yield


@dataclass
class TrainOutcome:
    outputs: dict[str, str] = field(default_factory=dict)
    model_version: str | None = None
    decision: dict[str, Any] | None = None
    eval_metrics: dict[str, Any] | None = None
    skipped: dict[str, bool] = field(default_factory=dict)
    report_path: str | None = None
    curves_path: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "model_version": self.model_version, "decision": self.decision,
                "eval": self.eval_metrics, "skipped": self.skipped, "report": self.report_path,
                "curves": self.curves_path, "warnings": self.warnings}


def _direct(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return fn(*args, **kw)


def train_pipeline(ws: Workspace, dpo_train: str = "dpo_train@latest", dpo_eval: str | None = "dpo_eval@latest",
                   *, force: bool = False, promote: bool = False, night: str | None = None,
                   runner: Callable[..., Any] = _direct) -> TrainOutcome:
    """ref_logps (train, eval) -> train -> evaluate -> promote, as versioned stages.

    The promote step always runs the gate and records its decision; only with `promote`
    (the nightly, or a manual run asked to) may it move `production`. A cycle on a dpo_train
    version starts from the production model it started from the first time (see
    promotion.cycle_production), so a rerun after its promotion reuses every step. `night`
    (the nightly's id: its date and sample inputs) is recorded with a promotion.

    `runner(name, fn, *args)` runs each step (directly, or as a Prefect subflow / task)."""
    cfg = ws.config.train
    out = TrainOutcome()
    train_ref = str(ws.store.resolve(dpo_train))
    eval_ref = optional_ref(ws, dpo_eval)

    policy = ref_logps.resolve_model(ws.registry, promotion.cycle_model_ref(ws.registry, cfg.model, train_ref))
    reference = ref_logps.resolve_model(ws.registry, promotion.cycle_model_ref(ws.registry, cfg.ref_model, train_ref)
                                        ) if cfg.ref_model else policy
    inputs: dict[str, str | None] = {"train": train_ref, "train_ref": None}
    cfg.check_pairs(ws.store.info(train_ref).rows, train_ref)  # before any reference log-probs
    eval_ref_logps = None
    if cfg.needs_reference:
        in_trainer = stage.ref_in_trainer(cfg, policy, reference)  # the training process computes them
        sets = ([] if in_trainer else [train_ref]) + ([eval_ref] if eval_ref and cfg.eval.enabled else [])
        # the cycle's reference (the model the cycle started from), not where the tag is now
        runs = runner("ref_logps", ref_logps_steps, ws, sets, force=force, model=reference) if sets else []
        if not in_trainer:
            inputs["train_ref"] = out.outputs["ref_logps"] = runs[0].outputs["ref_logps"]
            out.skipped["ref_logps"] = runs[0].skipped
        if eval_ref and cfg.eval.enabled:
            eval_ref_logps = out.outputs["eval_ref_logps"] = runs[-1].outputs["ref_logps"]
            out.skipped["eval_ref_logps"] = runs[-1].skipped

    def train_step() -> StageRun:
        # live step / loss / reward accuracy / tokens/s / ETA from the trainer's metrics.jsonl, as
        # artifacts (in the background: the run only waits on the training process) and a terminal line
        progress = lambda: training_progress(ws.scratch / "train", report_to=cfg.report_to,  # noqa: E731
                                             tracking_dir=ws.artifacts / "train" / cfg.report_to)
        return run_stage(ws, "train", stage.make_train_stage(cfg, policy, reference, progress), inputs,
                         stage.train_key_config(cfg), force=force,
                         key_extra={"policy": policy.version, "ref_model": reference.version},
                         hold=lambda: _while_training(cfg.devices))

    t = runner("train", train_step)
    out.outputs["train_runs"] = t.outputs["train_runs"]
    out.skipped["train"] = t.skipped
    run = stage._row(ws.store.read(t.outputs["train_runs"]))
    out.model_version = run["model_version"]
    out.curves_path = run.get("curves")
    out.warnings = json.loads(run.get("summary") or "{}").get("warnings", [])

    eval_run = None
    if eval_ref and cfg.eval.enabled:
        prod = promotion.cycle_production(ws.registry, train_ref)
        baseline = ref_logps.resolve_model(ws.registry, f"models@{prod}") if prod else None
        if baseline is not None and baseline.version == out.model_version:
            baseline = None

        def eval_step() -> StageRun:
            from dpoflow.flows.gpu_slots import gpu_slot
            from dpoflow.tasks.generation import pick_device

            return run_stage(ws, "evaluate", stage.make_eval_stage(cfg, baseline),
                             {"train_run": t.outputs["train_runs"], "eval": eval_ref, "eval_ref": eval_ref_logps},
                             stage.eval_key_config(cfg), force=force,
                             key_extra={"baseline": baseline.version if baseline else None},
                             hold=lambda: gpu_slot(device=pick_device()))

        eval_run = runner("evaluate", eval_step)
        out.outputs["model_evals"] = eval_run.outputs["model_evals"]
        out.skipped["evaluate"] = eval_run.skipped
        row = stage._row(ws.store.read(eval_run.outputs["model_evals"]))
        out.eval_metrics = json.loads(row["metrics"]).get("metrics")
        out.report_path = row.get("report")

    # the gate always decides and records; `promote` says whether it may move production
    def promote_step() -> StageRun:
        return run_stage(ws, "promote", stage.make_promote_stage(cfg, allow_promote=promote, night=night),
                         {"train_run": t.outputs["train_runs"],
                          "model_eval": eval_run.outputs["model_evals"] if eval_run else None},
                         cfg.promote, force=force,
                         key_extra={"production": promotion.cycle_production(ws.registry, train_ref),
                                    "allow_promote": promote})

    p = runner("promote", promote_step)
    out.outputs["promotions"] = p.outputs["promotions"]
    out.skipped["promote"] = p.skipped
    row = stage._row(ws.store.read(p.outputs["promotions"]))
    out.decision = {k: row[k] for k in ("model_version", "passed", "promoted", "previous_production",
                                        "production", "reasons")}
    return out
