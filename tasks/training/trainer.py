"""The DPO training loop: named steps, in the order things happen.

Public API (stable):

    train(cfg, train_table, model_path, run_dir, *, ref_logps=None, ref_model_path=None,
          resume=True, on_step=None, stop=None, device=None, logger=None, phases=None) -> TrainResult
        cfg:          TrainConfig
        train_table:  a `dpo_train` table (DPO_SPLIT contract)
        model_path:   local folder of the policy to start from (also the reference by default)
        run_dir:      working folder: checkpoints/, metrics.jsonl, model/ (the final weights)
        ref_logps:    a `ref_logps` table (REF_LOGPS contract); when given the reference model is
                      never loaded. When None and a loss needs it, they are computed first: with the
                      policy already loaded here when `ref_model_path` is None (one model load, no
                      separate process), else with `ref_model_path`, freed before training.
        resume:       continue from the latest checkpoint in run_dir (same config and data only).
        on_step:      callback(metrics_dict) after every optimizer step (rank 0).
        stop:         a threading.Event; when set, the loop checkpoints and raises TrainingCancelled.
        phases:       a results.Phases to add this run's phase timings to (the worker passes the
                      process start-up it measured); the summary holds them under "phases".
        With cfg.devices x cfg.nnodes > 1 this launches torchrun (tasks.training.distributed).
    TrainResult, TrainingError, TrainingCancelled (from tasks.training.results).
    StepTotals: the named per-step sums (loss, rewards, accuracy, log-probs, tokens) and the
        metrics row built from them.

Per-step metric keys: step, total_steps, epoch, loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, grad_norm, lr, tokens_per_s,
padding_share, skipped (1 when a non-finite loss / gradient skipped the update), nan_steps, seconds.

Normalisation: each micro-batch's loss is Σ pair_losses / (pairs in the whole optimizer step)
(+ α·NLL / chosen tokens of the whole step), scaled by the process count because DDP and FSDP
average gradients. So the gradient of a step does not depend on how its pairs are split into
micro-batches or processes.

Strategies with several processes: ``ddp`` replicates the model; ``fsdp`` (FSDP2
``fully_shard``) shards every transformer block and the root, so each process holds 1/N of the
weights, gradients and AdamW state. Checkpoints and the final model are gathered to rank 0 as
full tensors, in the same layout as a single-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from dpoflow.tasks.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.data import Batch, epoch_batches, make_batch, split_batch
from dpoflow.tasks.training.logprobs import (
    SequenceLogps,
    align_ref_logps,
    autocast_dtype,
    compute_ref_logps,
    load_causal_lm,
)
from dpoflow.tasks.training.losses import LogpBatch, LossTerms, PreferenceLoss
from dpoflow.tasks.training.results import Phases, TrainingCancelled, TrainingError, TrainResult
from dpoflow.tasks.training.tokenization import TokenizedPairs, tokenize_pairs

__all__ = ["StepTotals", "TrainResult", "TrainingCancelled", "TrainingError", "lr_lambda", "train"]

log = logging.getLogger("dpoflow.train")

_ROOT_PREFIX = "model."  # SequenceLogps holds the causal LM as `.model`: FQNs under the FSDP root

# Fields that do not change the trained weights: a resume may change them.
_RUNTIME_FIELDS = {"checkpoint_every", "keep_checkpoints", "max_nan_steps", "log_every", "launch_timeout_s",
                   "dist_timeout_s", "master_addr", "master_port", "node_rank", "eval_batch_size", "eval", "promote",
                   "max_truncated_share", "report_to", "ref_logps_in_trainer", "in_process",
                   "model"}  # `model` is a reference string; the resolved path is fingerprinted


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine / linear decay to min_lr_ratio, or constant."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def _fingerprint(cfg: TrainConfig, model_path: str, pair_ids: np.ndarray, world: int) -> str:
    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RUNTIME_FIELDS}
    h = hashlib.sha256(json.dumps([conf, str(model_path), world], sort_keys=True).encode())
    h.update("\n".join(map(str, pair_ids)).encode())
    return h.hexdigest()[:16]


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(np_state["state"]["pos"]),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": s["numpy_key"].numpy().astype(np.uint32), "pos": s["numpy_pos"]},
                         "has_gauss": 0, "gauss": 0.0})
    random.setstate((3, tuple(int(x) for x in s["python"].tolist()), None))


def _apply_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TrainingError("lora=true needs the `peft` package (pip install 'dpoflow[gpu]')") from exc
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


# --- the named metrics record -------------------------------------------------------------------


@dataclass
class StepTotals:
    """Sums over one optimizer step's micro-batches (and, after `all_sum`, over processes)."""

    loss: float = 0.0
    chosen_rewards: float = 0.0
    rejected_rewards: float = 0.0
    correct: float = 0.0  # pairs whose chosen reward beats the rejected one
    chosen_logps: float = 0.0
    rejected_logps: float = 0.0
    real_tokens: float = 0.0
    slots: float = 0.0  # token positions computed (real + padding)
    non_finite: float = 0.0  # processes that saw a non-finite loss

    def add(self, loss: torch.Tensor, terms: LossTerms, lb: LogpBatch, batch: Batch) -> None:
        self.loss += loss.item()
        self.chosen_rewards += terms.chosen_rewards.sum().item()
        self.rejected_rewards += terms.rejected_rewards.sum().item()
        self.correct += (terms.chosen_rewards > terms.rejected_rewards).sum().item()
        self.chosen_logps += lb.chosen_logps.detach().sum().item()
        self.rejected_logps += lb.rejected_logps.detach().sum().item()
        self.real_tokens += batch.real_tokens
        self.slots += batch.slots

    def all_sum(self, device: torch.device, world: int) -> StepTotals:
        self.non_finite = float(not math.isfinite(self.loss))
        if world == 1:
            return self
        t = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return StepTotals(*t.tolist())

    def row(self, *, step: int, total_steps: int, steps_per_epoch: int, n_pairs: float, grad_norm: float,
            lr: float, skipped: bool, nan_steps: int, seconds: float) -> dict[str, Any]:
        return {"step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch, "loss": self.loss,
                "rewards/chosen": self.chosen_rewards / n_pairs, "rewards/rejected": self.rejected_rewards / n_pairs,
                "rewards/margins": (self.chosen_rewards - self.rejected_rewards) / n_pairs,
                "rewards/accuracies": self.correct / n_pairs, "logps/chosen": self.chosen_logps / n_pairs,
                "logps/rejected": self.rejected_logps / n_pairs, "grad_norm": grad_norm, "lr": lr,
                "tokens_per_s": self.real_tokens / seconds, "padding_share": 1 - self.real_tokens / self.slots,
                "skipped": int(skipped), "nan_steps": nan_steps, "seconds": seconds}


# --- the run's parts ----------------------------------------------------------------------------


@dataclass
class _Progress:
    step: int = 0
    nan_steps: int = 0
    metrics: list[dict] = field(default_factory=list)


@dataclass
class _Model:
    """The policy as trained: the bare model, its (possibly DDP / FSDP) wrapper and the optimizer."""

    model: torch.nn.Module
    policy: torch.nn.Module
    named: list[tuple[str, torch.nn.Parameter]]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    amp: torch.dtype | None
    fsdp: bool

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]


@dataclass
class Checkpointer:
    """Writes and restores checkpoints of one run (weights, optimizer, schedule, loss state, RNG,
    progress); with FSDP, saving and restoring are collectives that every rank calls."""

    run_dir: Path
    fingerprint: str
    keep: int
    steps_per_epoch: int
    rank: int
    world: int
    m: _Model
    loss_fn: PreferenceLoss

    def save(self, progress: _Progress) -> None:
        # FSDP: gathering the full weights / optimizer state is a collective (every rank calls it);
        # only rank 0 receives the tensors and writes them, in the same layout as single-process / DDP.
        m = self.m
        m_state = _full_state(m.policy, {n for n, _ in m.named}) if m.fsdp else dict(m.named)
        o_state = None
        if m.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            o_state = get_optimizer_state_dict(m.policy, m.opt, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True))
        if self.rank == 0:
            step = progress.step
            meta = {"step": step, "nan_steps": progress.nan_steps, "metrics": progress.metrics,
                    "fingerprint": self.fingerprint, "epoch": step // self.steps_per_epoch,
                    "batch_in_epoch": step % self.steps_per_epoch}
            t_state = {"scheduler": m.sched.state_dict(), "loss": self.loss_fn.state_dict(), "rng": _rng_state()}
            save_checkpoint(self.run_dir, step, m_state, o_state if m.fsdp else m.opt.state_dict(), t_state, meta,
                            keep=self.keep)
        if self.world > 1:
            dist.barrier()

    def restore(self) -> tuple[Path, _Progress] | None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return None
        m = self.m
        m_state, o_state, t_state, meta = load_checkpoint(ckpt)
        if meta["fingerprint"] != self.fingerprint:
            raise TrainingError(f"checkpoint {ckpt} was made with another config, model or data; "
                                "use a new run folder or resume=False")
        _load_model_state(m.model, m_state, m.named, m.policy if m.fsdp else None)
        if m.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(m.policy, m.opt, o_state, options=StateDictOptions(full_state_dict=True))
        else:
            m.opt.load_state_dict(o_state)
        m.sched.load_state_dict(t_state["scheduler"])
        self.loss_fn.load_state_dict(t_state["loss"])
        _set_rng_state(t_state["rng"])
        return ckpt, _Progress(meta["step"], meta["nan_steps"], meta["metrics"])


# --- the steps of train() -----------------------------------------------------------------------


def _pick_device(device: str | torch.device | None, local_rank: int, cfg: TrainConfig) -> torch.device:
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    return device


def _tokenize(cfg: TrainConfig, table: pa.Table, tokenizer, logger: logging.Logger) -> tuple[TokenizedPairs, list[str]]:
    """Token ids of the trainable pairs, and warnings (too many pairs truncated or dropped)."""
    tok = tokenize_pairs(table, tokenizer, cfg)
    if len(tok) == 0:
        raise TrainingError(f"no trainable pairs (tokenization: {tok.stats.as_dict()})")
    warns = [w for w in [tok.stats.warning(cfg.max_truncated_share)] if w]
    for w in warns:
        logger.warning("%s", w)
    cfg.check_pairs(len(tok), "dpo_train after tokenization")
    return tok, warns


def _reference(cfg: TrainConfig, tok: TokenizedPairs, model: torch.nn.Module, ref_logps: pa.Table | None,
               ref_model_path, device: torch.device, logger: logging.Logger) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs aligned with `tok`: stored ones, or computed now (with the policy's own
    weights when the reference is the starting policy, so the model is loaded once)."""
    if ref_logps is not None:
        try:
            c, r = align_ref_logps(tok, ref_logps)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
    else:
        logger.info("computing reference log-probs for %d pairs (no stored ref_logps given)", len(tok))
        ref_model = load_causal_lm(ref_model_path, device=device)[0] if ref_model_path else model.to(device)
        ref = compute_ref_logps(ref_model, tok, cfg.eval_batch_size, device, cfg.logit_chunk, cfg.precision,
                                packing=cfg.packing, row_factor=cfg.packing_row_factor)
        del ref_model
        c, r = ref.chosen_logp, ref.rejected_logp
    return torch.from_numpy(c), torch.from_numpy(r)


def _build(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int,
           total_steps: int) -> _Model:
    """Model in training mode (checkpointing, LoRA, DDP / FSDP as configured), AdamW, schedule."""
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = _apply_lora(model, cfg)
    fsdp = world > 1 and cfg.strategy == "fsdp"
    amp = autocast_dtype(cfg.precision, device)
    if not fsdp:  # FSDP moves each block to the device as it shards it (never the whole model at once)
        model.to(device)
    model.train()
    policy: torch.nn.Module = SequenceLogps(model, cfg.logit_chunk)
    if world > 1:
        policy = _wrap_parallel(policy, cfg, device, amp)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            fused=device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return _Model(model, policy, named, opt, sched, amp, fsdp)


def _step_batches(cfg: TrainConfig, lengths: np.ndarray, steps_per_epoch: int) -> Callable[[int], np.ndarray]:
    """step -> the pair indices of that optimizer step (one epoch's order cached at a time)."""
    cache: dict[int, list[np.ndarray]] = {}

    def batch_of(step: int) -> np.ndarray:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(lengths, cfg.global_batch, seed=cfg.seed, epoch=epoch,
                                         group=cfg.length_grouping, group_size_mult=cfg.group_size_mult,
                                         order=cfg.data_order)
        return cache[epoch][pos]

    return batch_of


def _one_step(cfg: TrainConfig, m: _Model, loss_fn: PreferenceLoss, tok: TokenizedPairs,
              ref: tuple[torch.Tensor, torch.Tensor] | None, gidx: np.ndarray, device: torch.device,
              rank: int, world: int) -> tuple[StepTotals, float]:
    """Forward / backward over this process's micro-batches of one global batch; the summed
    metrics of every process and the gradient norm. The optimizer step is the caller's."""
    lengths = tok.seq_lengths
    parts = split_batch(gidx, lengths, world * cfg.grad_accum)[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
    n_pairs, n_ctok = float(len(gidx)), float(tok.chosen_lengths[gidx].sum())
    totals = StepTotals()
    for i, idx in enumerate(parts):
        batch = make_batch(tok, idx, cfg.packing, cfg.packing_row_factor).to(device)
        sync = world == 1 or i == len(parts) - 1
        if m.fsdp:  # reduce-scatter gradients only after the step's last micro-batch
            m.policy.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or m.fsdp else m.policy.no_sync()):
            with torch.autocast(device.type, dtype=m.amp or torch.float32, enabled=m.amp is not None):
                logps = m.policy(batch)
            b = len(idx)
            lb = LogpBatch(logps[:b], logps[b:], batch.n_tokens[:b].float(), batch.n_tokens[b:].float(),
                           ref[0][idx].to(device).float() if ref is not None else None,
                           ref[1][idx].to(device).float() if ref is not None else None)
            terms = loss_fn.terms(lb)
            loss = loss_fn.reduce(terms, n_pairs, n_ctok)
            (loss * world).backward()
        totals.add(loss, terms, lb, batch)
    totals = totals.all_sum(device, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(m.params, cfg.max_grad_norm or float("inf"))
    if m.fsdp and hasattr(grad_norm, "full_tensor"):  # a DTensor: the norm over all shards (same on every rank)
        grad_norm = grad_norm.full_tensor()
    return totals, float(grad_norm)


def _apply_update(cfg: TrainConfig, m: _Model, totals: StepTotals, grad_norm: float, progress: _Progress,
                  logger: logging.Logger) -> bool:
    """The optimizer step, or a skipped one when the loss or gradient is not finite; True if skipped."""
    bad = totals.non_finite > 0 or not math.isfinite(totals.loss) or not math.isfinite(grad_norm)
    if bad:
        progress.nan_steps += 1
        logger.warning("non-finite loss or gradient at step %d: update skipped (%d so far)", progress.step,
                       progress.nan_steps)
        if progress.nan_steps > cfg.max_nan_steps:
            raise TrainingError(f"{progress.nan_steps} steps had a non-finite loss or gradient "
                                f"(max_nan_steps={cfg.max_nan_steps}); aborting. Lower lr, check the "
                                "data and the reference log-probs, or use precision=fp32")
    else:
        m.opt.step()
    with warnings.catch_warnings():  # a skipped update still advances the schedule
        warnings.simplefilter("ignore", UserWarning)
        m.sched.step()
    m.opt.zero_grad(set_to_none=True)
    return bad


def _save_final(cfg: TrainConfig, m: _Model, tokenizer, model_path, out: Path, rank: int, world: int) -> None:
    model = m.model
    if m.fsdp:  # gather the full weights to rank 0 (collective), load them into a CPU copy of the model
        full = _full_state(m.policy, None)
        if rank == 0:
            model = load_causal_lm(model_path, device="cpu")[0]
            if cfg.lora:
                model = _apply_lora(model, cfg)
            model.load_state_dict(full, strict=True)
            del full
    if rank == 0:
        final = model.merge_and_unload() if cfg.lora else model
        final.config.use_cache = True
        final.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    if world > 1:
        dist.barrier()


def train(cfg: TrainConfig, train_table: pa.Table, model_path: str | os.PathLike[str],
          run_dir: str | os.PathLike[str], *, ref_logps: pa.Table | None = None,
          ref_model_path: str | os.PathLike[str] | None = None, resume: bool = True,
          on_step: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          device: str | torch.device | None = None, logger: logging.Logger | None = None,
          phases: Phases | None = None) -> TrainResult:
    """Train the policy with the configured preference loss; see the module docstring."""
    logger = logger or log
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise TrainingError(f"{cfg.world_size} processes are configured: start them with "
                            "dpoflow.tasks.training.distributed.launch (this process runs one rank)")
    phases = phases or Phases()
    rank, world, local_rank = _dist_info()
    if world != cfg.world_size:
        raise TrainingError(f"process group has {world} processes, config asks for {cfg.world_size}")
    device = _pick_device(device, local_rank, cfg)

    with phases("load_model"):
        model, tokenizer = load_causal_lm(model_path, device="cpu")
    with phases("tokenize"):
        tok, warns = _tokenize(cfg, train_table, tokenizer, logger)
    loss_fn = PreferenceLoss.from_config(cfg)
    ref = None
    if loss_fn.needs_reference:
        with phases("ref_logps"):
            ref = _reference(cfg, tok, model, ref_logps, ref_model_path, device, logger)
    steps_per_epoch = len(tok) // cfg.global_batch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    with phases("setup"):
        m = _build(cfg, model, device, world, total_steps)
        del model
        ckpt = Checkpointer(run_dir, _fingerprint(cfg, str(model_path), tok.pair_ids, world), cfg.keep_checkpoints,
                            steps_per_epoch, rank, world, m, loss_fn)
        restored = ckpt.restore() if resume else None
    progress = _Progress()
    if restored is not None:
        path, progress = restored
        logger.info("resumed from %s (step %d of %d)", path, progress.step, total_steps)

    batch_of = _step_batches(cfg, tok.seq_lengths, steps_per_epoch)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if rank == 0 else None
    logger.info("training %d pairs: %d steps of %d pairs (%d per micro-batch, %d accumulation, %d processes)",
                len(tok), total_steps, cfg.global_batch, cfg.batch_size, cfg.grad_accum, world)
    try:
        with phases("loop"):
            while progress.step < total_steps:
                if stop is not None and stop.is_set():
                    ckpt.save(progress)
                    raise TrainingCancelled(f"stopped at step {progress.step}; rerun to resume")
                t0 = time.perf_counter()
                gidx = batch_of(progress.step)
                totals, grad_norm = _one_step(cfg, m, loss_fn, tok, ref, gidx, device, rank, world)
                lr = m.sched.get_last_lr()[0]
                skipped = _apply_update(cfg, m, totals, grad_norm, progress, logger)
                progress.step += 1
                row = totals.row(step=progress.step, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                 n_pairs=float(len(gidx)), grad_norm=grad_norm, lr=lr, skipped=skipped,
                                 nan_steps=progress.nan_steps, seconds=time.perf_counter() - t0)
                progress.metrics.append(row)
                if rank == 0:
                    _report_step(cfg, row, metrics_file, on_step, logger)
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.step < total_steps:
                    ckpt.save(progress)
    finally:
        if metrics_file is not None:
            metrics_file.close()

    out = run_dir / "model"
    with phases("save"):
        _save_final(cfg, m, tokenizer, model_path, out, rank, world)
    summary = _summary(cfg, progress, len(tok), warns, phases, ref_source=_ref_source(loss_fn, ref_logps))
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps({**summary, "tokenize": tok.stats.as_dict()}))
    return TrainResult(output_dir=out, run_dir=run_dir, metrics=progress.metrics, summary=summary,
                       tokenize_stats=tok.stats.as_dict())


def _report_step(cfg: TrainConfig, row: dict, metrics_file, on_step, logger: logging.Logger) -> None:
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    if on_step is not None:
        on_step(row)
    step, total = row["step"], row["total_steps"]
    if step % cfg.log_every == 0 or step == total:
        logger.info("step %d/%d loss %.4f acc %.3f margin %.4f lr %.2e %.0f tok/s", step, total, row["loss"],
                    row["rewards/accuracies"], row["rewards/margins"], row["lr"], row["tokens_per_s"])


def _ref_source(loss_fn: PreferenceLoss, ref_logps: pa.Table | None) -> str:
    if not loss_fn.needs_reference:
        return "none (reference-free loss)"
    return "stored" if ref_logps is not None else "computed in the trainer"


def _summary(cfg: TrainConfig, progress: _Progress, n_pairs: int, warns: list[str], phases: Phases,
             ref_source: str) -> dict[str, Any]:
    metrics = progress.metrics
    done = [m for m in metrics if not m["skipped"]]
    timed = metrics[1:] or metrics  # the first step pays one-off warm-up costs
    seconds = sum(m["seconds"] for m in timed)
    return {"steps": progress.step, "nan_steps": progress.nan_steps, "pairs": n_pairs,
            "global_batch": cfg.global_batch,
            "tokens_per_s": (sum(m["tokens_per_s"] * m["seconds"] for m in timed) / seconds) if seconds else 0.0,
            "padding_share": float(np.mean([m["padding_share"] for m in metrics])) if metrics else 0.0,
            "final": metrics[-1] if metrics else {}, "last_good": done[-1] if done else {},
            "warnings": warns, "ref_logps": ref_source,
            "phases": {k: round(v, 3) for k, v in phases.seconds.items()}}


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], named,
                      fsdp_root: torch.nn.Module | None = None) -> None:
    names = {n for n, _ in named}
    if set(state) != names:
        raise TrainingError("checkpoint weights do not match the model's trainable parameters")
    if fsdp_root is not None:  # every rank holds the full tensors; each keeps its own shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(fsdp_root, {_ROOT_PREFIX + n: t for n, t in state.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for n, p in named:
            p.copy_(state[n].to(p.device, p.dtype))


def _full_state(policy: torch.nn.Module, names: set[str] | None) -> dict[str, torch.Tensor]:
    """FSDP: the unsharded weights on rank 0's CPU (empty dict elsewhere), keyed like model.named_parameters.

    A collective: every rank must call it. `names` filters (None = everything, frozen and tied too).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    n = len(_ROOT_PREFIX)
    return {k[n:]: v for k, v in sd.items() if k.startswith(_ROOT_PREFIX) and (names is None or k[n:] in names)}


def _wrap_parallel(policy: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   amp: torch.dtype | None) -> torch.nn.Module:
    if cfg.strategy == "fsdp":
        return _shard(policy, device, amp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)


def _shard(policy: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, lm head).

    The root is the SequenceLogps wrapper, not the bare model, because its forward calls the
    decoder and the lm head separately: the root's hooks must gather the embedding / head for
    the whole forward. Mixed precision follows autocast: bf16 compute with fp32 gradient
    reduction on CUDA, plain fp32 on CPU; the sharded master weights stay fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dpoflow.tasks.training.logprobs import _causal_lm

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    lm = _causal_lm(policy.model)
    block_types = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in policy.modules() if type(m).__name__ in block_types]
    if not blocks:
        layers = getattr(lm.get_decoder(), "layers", None)
        blocks = list(layers) if layers is not None else []
    if not blocks:
        raise TrainingError(f"strategy=fsdp: cannot find the transformer blocks of {type(lm).__name__} "
                            "(no _no_split_modules, no decoder.layers); use strategy=ddp")
    kind = type(blocks[0]).__name__  # before fully_shard renames the class to FSDP<name>
    for block in reversed(blocks):  # innermost first, so nested blocks are sharded before their parents
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    log.info("fsdp: sharded %d %s blocks and the root over %d %s processes (mixed precision: %s)", len(blocks),
             kind, dist.get_world_size(), device.type, amp or "off, fp32")
    return policy
