"""The `train`, `evaluate` and `promote` stage functions (trainer -> eval -> promote).

Public API:

    train_key_config(cfg) / eval_key_config(cfg)   what each step's content key covers.
    ref_in_trainer(cfg, policy, reference) -> bool   whether training computes dpo_train's
        reference log-probs itself (then the flow runs no ref_logps stage for dpo_train).
    make_train_stage(cfg, policy, reference) -> fn  roles: train (dpo_train), train_ref (ref_logps,
        optional for reference-free losses and when ref_in_trainer). Runs the trainer in this
        process for one local device (train.in_process, the default: one interpreter, one model
        load), else as a separate process group with a hard timeout (tasks.training.distributed.launch:
        killed with its children on timeout, error or cancellation), registers the checkpoint as `candidate` with its lineage, draws
        the training curves; output `train_runs` (one row; its summary holds the phase timings,
        the truncated / dropped share and warnings).
    make_eval_stage(cfg, baseline) -> fn   roles: train_run, eval (dpo_eval), eval_ref; output
        `model_evals` (one row) + the markdown report.
    make_promote_stage(cfg) -> fn          roles: train_run, model_eval (optional); output
        `promotions` (one row); moves `production` only when the gate passes.

Why three steps and not one: each has its own content key, so changing a promotion threshold
re-runs only the gate, and changing the eval settings does not retrain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from dpoflow.tasks.contract import StageContext, StageResult
from dpoflow.tasks.training.ref_logps import ModelRef, model_path

# Settings that do not change the trained weights (left out of the train step's content key).
RUNTIME_FIELDS = {"checkpoint_every", "keep_checkpoints", "max_nan_steps", "log_every", "launch_timeout_s",
                  "dist_timeout_s", "master_addr", "master_port", "node_rank", "eval_batch_size", "eval",
                  "promote", "max_truncated_share", "report_to", "in_process"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def train_key_config(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}


def eval_key_config(cfg: Any) -> dict[str, Any]:
    """Eval metrics depend on the objective (β, loss) and tokenization, and on the eval section."""
    d = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    d["eval"] = cfg.eval.model_dump(mode="json")
    return d


def _row(table: pa.Table) -> dict[str, Any]:
    if table.num_rows != 1:
        raise ValueError(f"expected one row, got {table.num_rows}")
    return table.to_pylist()[0]


def ref_in_trainer(cfg: Any, policy: ModelRef, reference: ModelRef) -> bool:
    """Whether the training process computes dpo_train's reference log-probs itself (then no
    ref_logps stage runs for it): the reference is the starting policy, one process trains, and
    train.ref_logps_in_trainer is on. Saves a second model load and the stage's start-up."""
    return bool(cfg.needs_reference and cfg.ref_logps_in_trainer and cfg.world_size == 1
                and reference.version == policy.version)


def in_process(cfg: Any) -> bool:
    """Whether the train stage trains inside this process: asked for (the default), one process,
    launched here (a Kubeflow TrainJob or torchrun for several devices never is)."""
    return bool(cfg.in_process and cfg.world_size == 1 and getattr(cfg, "launcher", "local") == "local")


def make_train_stage(cfg: Any, policy: ModelRef, reference: ModelRef,
                     progress: Callable[[], Callable[[float], None] | None] | None = None) -> Callable:
    """The train stage function; `progress()` (called when training really starts) may give a
    callback that receives the share of optimizer steps done."""

    def train_stage(ctx: StageContext) -> StageResult:
        from dpoflow.tasks.training.distributed import launch
        from dpoflow.tasks.training.evaluation import plot_training_curves
        from dpoflow.tasks.training.promotion import register_candidate

        table = ctx.read("train")
        ref = ctx.read("train_ref") if ctx.has("train_ref") else None
        if cfg.needs_reference and ref is None and not ref_in_trainer(cfg, policy, reference):
            raise ValueError(f"loss {cfg.loss_names} needs stored reference log-probs (role train_ref)")
        run_id = hashlib.sha256(json.dumps([ctx.inputs, train_key_config(cfg), policy.version],
                                           sort_keys=True).encode()).hexdigest()[:16]
        run_dir = ctx.scratch / run_id
        path = model_path(ctx.registry, policy)
        ctx.logger.info("train: %s from %s (run folder %s)", ctx.inputs["train"], policy.version, run_dir)
        if in_process(cfg):
            res = _train_in_process(cfg, table, path, run_dir, ref, ctx, progress() if progress else None)
        else:
            # A child process group (one worker, or torchrun for several devices): a hard timeout and
            # a cancelled flow run kill every trainer process, and a rerun resumes from checkpoints.
            res = launch(cfg, table, path, run_dir, ref_logps=ref, resume=True, logger=ctx.logger,
                         on_progress=progress() if progress else None)
        curves = plot_training_curves(res.metrics, ctx.artifacts / f"{run_id}-curves.png")
        summary = {**res.summary, "tokenize": res.tokenize_stats}
        parents = [ctx.inputs["train"]] + ([ctx.inputs["train_ref"]] if ctx.has("train_ref") else [])
        parents.append(policy.lineage)
        if reference.version != policy.version:
            parents.append(reference.lineage)
        metrics = {k: v for k, v in (res.summary.get("last_good") or {}).items() if isinstance(v, int | float)}
        metrics.update({"steps": res.summary.get("steps"), "nan_steps": res.summary.get("nan_steps")})
        version = register_candidate(
            ctx.registry, res.output_dir, parents=parents, metrics=metrics,
            config={"train": cfg.model_dump(mode="json"), "run_id": run_id, "ref_model": reference.version},
            note=f"DPO ({'+'.join(cfg.loss_names)}, beta={cfg.beta}) on {ctx.inputs['train']}")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the registry holds the result now
        (ctx.artifacts / f"{run_id}-metrics.jsonl").write_text(
            "\n".join(json.dumps(m) for m in res.metrics) + "\n")
        row = {"run_id": [run_id], "model_version": [version], "parent_model": [policy.lineage],
               "ref_model": [reference.lineage], "train_data": [ctx.inputs["train"]],
               "ref_logps": [ctx.inputs.get("train_ref")], "steps": [int(res.summary.get("steps") or 0)],
               "summary": [json.dumps(summary, default=float)], "curves": [str(curves) if curves else None],
               "created_at": [_now()]}
        report = {"model_version": version, "steps": res.summary.get("steps"),
                  "nan_steps": res.summary.get("nan_steps"), "dropped": res.tokenize_stats.get("dropped", {}),
                  "truncated_or_dropped_share": res.tokenize_stats.get("affected_share"),
                  "warnings": res.summary.get("warnings", []), "ref_logps": res.summary.get("ref_logps"),
                  "phases_s": res.summary.get("phases", {})}
        for w in res.summary.get("warnings", []):
            ctx.logger.warning("train: %s", w)
        return StageResult(outputs={"train_runs": pa.table(row)}, report=report)

    return train_stage


def _train_in_process(cfg: Any, table: pa.Table, path, run_dir, ref: pa.Table | None, ctx: StageContext,
                      on_progress: Callable[[float], None] | None):
    """train.in_process: the trainer in this process (no second interpreter importing torch and
    loading the model). launch_timeout_s stops it at the next step boundary, with a checkpoint.
    Phases: `imports` (torch, transformers, the trainer) and `launch_total` (imports to the saved
    model), as the worker reports `worker_imports` and the launcher `launch_total`. CPU threads
    as the worker gets them (OMP_NUM_THREADS, else every core), restored afterwards: a sample
    stage earlier in the same process may have left torch at one thread."""
    import os
    import threading
    import time

    t0 = time.perf_counter()
    import torch

    from dpoflow.tasks.training.results import Phases, TrainingCancelled, TrainingError
    from dpoflow.tasks.training.trainer import train

    phases = Phases({"imports": time.perf_counter() - t0})
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))
    stop = threading.Event()
    timer = threading.Timer(cfg.launch_timeout_s, stop.set)
    timer.daemon = True
    timer.start()
    on_step = (lambda row: on_progress(row["step"] / row["total_steps"])) if on_progress else None
    try:
        res = train(cfg, table, path, run_dir, ref_logps=ref, resume=True, logger=ctx.logger, stop=stop,
                    on_step=on_step, phases=phases)
    except TrainingCancelled:
        raise TrainingError(f"training exceeded launch_timeout_s={cfg.launch_timeout_s}; stopped at a "
                            "checkpoint, a rerun resumes") from None
    finally:
        timer.cancel()
        torch.set_num_threads(threads_before)
        _release_memory()
    res.summary.setdefault("phases", {})["launch_total"] = round(time.perf_counter() - t0, 3)
    return res


def _release_memory() -> None:
    """The model, optimizer and activations are garbage once train() returns; give their pages
    (and cached CUDA blocks) back before the rest of the flow runs in this process."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def make_eval_stage(cfg: Any, baseline: ModelRef | None) -> Callable:
    def eval_stage(ctx: StageContext) -> StageResult:
        from dpoflow.tasks.training.evaluation import eval_report_markdown, evaluate_model
        from dpoflow.tasks.training.ref_logps import resolve_model

        run = _row(ctx.read("train_run"))
        reg = ctx.registry
        new_dir = model_path(reg, resolve_model(reg, f"models@{run['model_version']}"))
        base_dir = None
        if baseline is not None and baseline.version != run["model_version"]:
            base_dir = model_path(reg, baseline)
        reward_path = None
        if cfg.eval.scorer == "reward_model" and cfg.eval.reward_model:
            reward_path = model_path(reg, resolve_model(reg, cfg.eval.reward_model))
        pairs = ctx.read("eval")
        ref = ctx.read("eval_ref") if ctx.has("eval_ref") else None
        res = evaluate_model(new_dir, pairs, ref, cfg, cfg.eval, baseline_dir=base_dir,
                             reward_model_path=reward_path)
        m = res.metrics
        md = eval_report_markdown(run["model_version"], train_data=run["train_data"], eval_data=ctx.inputs["eval"],
                                  baseline=baseline.version if base_dir else None, metrics=m,
                                  generation=res.generation, train_summary=_train_summary(run),
                                  curves=run.get("curves"))
        report_path = ctx.artifacts / f"{run['model_version']}-eval.md"
        report_path.write_text(md)
        row = {"model_version": [run["model_version"]], "baseline_model": [baseline.version if base_dir else None],
               "eval_data": [ctx.inputs["eval"]], "n_pairs": [int(m.get("n_pairs", 0))],
               "reward_accuracy": [m.get("reward_accuracy")], "reward_margin": [m.get("reward_margin")],
               "eval_loss": [m.get("eval_loss")], "win_rate": [m.get("win_rate")],
               "metrics": [json.dumps({"metrics": m, "generation": res.generation}, default=float)],
               "report": [str(report_path)], "created_at": [_now()]}
        schema = pa.schema([("reward_accuracy", pa.float64()), ("reward_margin", pa.float64()),
                            ("eval_loss", pa.float64()), ("win_rate", pa.float64())])
        table = pa.table({k: pa.array(v, schema.field(k).type) if k in schema.names else v for k, v in row.items()})
        return StageResult(outputs={"model_evals": table},
                           report={k: m.get(k) for k in ("n_pairs", "reward_accuracy", "reward_margin",
                                                         "eval_loss", "win_rate")})

    return eval_stage


def _train_summary(run: dict[str, Any]) -> dict[str, Any]:
    s = json.loads(run["summary"] or "{}")
    last = s.get("last_good") or {}
    out = {"steps": s.get("steps"), "nan_steps": s.get("nan_steps"), "pairs": s.get("pairs"),
           "global_batch": s.get("global_batch"), "tokens_per_s": s.get("tokens_per_s"),
           "padding_share": s.get("padding_share")}
    out.update({f"final {k}": last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")})
    return out


def gate_metrics(run: dict[str, Any], model_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The flat numbers the promotion gate reads (eval metrics + training health)."""
    s = json.loads(run["summary"] or "{}")
    m: dict[str, Any] = {"nan_steps": s.get("nan_steps")}
    if model_eval is not None:
        both = json.loads(model_eval["metrics"] or "{}")
        stored, gen = both.get("metrics") or {}, both.get("generation") or {}
        m.update({k: stored.get(k) for k in ("reward_accuracy", "reward_margin", "eval_loss", "win_rate",
                                            "win_rate_skipped", "baseline_reward_accuracy")})
        m.update({k: gen.get(k) for k in ("wins", "ties", "losses", "n_compared", "flagged_share",
                                         "baseline_flagged_share")})
    return m


def make_promote_stage(cfg: Any, allow_promote: bool = True, night: str | None = None) -> Callable:
    """`allow_promote` False: a manual run not asked to promote records the decision only;
    `night` (the nightly's id) goes into a promotion's record."""

    def promote_stage(ctx: StageContext) -> StageResult:
        from dpoflow.tasks.training.promotion import decide_and_apply

        run = _row(ctx.read("train_run"))
        model_eval = _row(ctx.read("model_eval")) if ctx.has("model_eval") else None
        decision = decide_and_apply(ctx.registry, run["model_version"], gate_metrics(run, model_eval),
                                    cfg.promote, allow_promote=allow_promote, night=night)
        ctx.logger.info("promote %s: %s", run["model_version"], "; ".join(decision.reasons))
        row = {"model_version": [decision.model_version], "passed": [decision.passed],
               "promoted": [decision.promoted], "previous_production": [decision.previous_production],
               "production": [decision.production], "reasons": [decision.reasons],
               "thresholds": [cfg.promote.model_dump_json()], "created_at": [_now()]}
        return StageResult(outputs={"promotions": pa.table(row)}, report=decision.to_dict())

    return promote_stage

