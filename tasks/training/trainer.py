"""The DPO training loop: one file, top to bottom, in the order things happen.

Public API (stable):

    train(cfg, train_table, model_path, run_dir, *, ref_logps=None, ref_model_path=None,
          resume=True, on_step=None, stop=None, device=None, logger=None) -> TrainResult
        cfg:          TrainConfig
        train_table:  a `dpo_train` table (DPO_SPLIT contract)
        model_path:   local folder of the policy to start from (also the reference by default)
        run_dir:      working folder: checkpoints/, metrics.jsonl, model/ (the final weights)
        ref_logps:    a `ref_logps` table (REF_LOGPS contract); when given the reference model is
                      never loaded. When None and a loss needs it, they are computed first with
                      `ref_model_path or model_path` and the reference model is freed before training.
        resume:       continue from the latest checkpoint in run_dir (same config and data only).
        on_step:      callback(metrics_dict) after every optimizer step (rank 0).
        stop:         a threading.Event; when set, the loop checkpoints and raises TrainingCancelled.
        With cfg.devices x cfg.nnodes > 1 this launches torchrun (tasks.training.distributed).
    TrainResult: output_dir (final model folder, save_pretrained + tokenizer), run_dir,
        metrics (list of per-step dicts), summary (dict), tokenize_stats (dict).
    TrainingError, TrainingCancelled.

Per-step metric keys: step, epoch, loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, grad_norm, lr, tokens_per_s, padding_share,
skipped (1 when a non-finite loss / gradient skipped the update), nan_steps, seconds.

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

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from dpoflow.tasks.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.data import collate, epoch_batches, split_batch
from dpoflow.tasks.training.logprobs import (
    SequenceLogps,
    align_ref_logps,
    autocast_dtype,
    compute_ref_logps,
    load_causal_lm,
)
from dpoflow.tasks.training.losses import LogpBatch, PreferenceLoss
from dpoflow.tasks.training.tokenization import tokenize_pairs

log = logging.getLogger("dpoflow.train")

_ROOT_PREFIX = "model."  # SequenceLogps holds the causal LM as `.model`: FQNs under the FSDP root

# Fields that do not change the trained weights: a resume may change them.
_RUNTIME_FIELDS = {"checkpoint_every", "keep_checkpoints", "max_nan_steps", "log_every", "launch_timeout_s",
                   "dist_timeout_s", "master_addr", "master_port", "node_rank", "eval_batch_size", "eval", "promote",
                   "model"}  # `model` is a reference string; the resolved path is fingerprinted


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, incompatible checkpoint, bad data)."""


class TrainingCancelled(RuntimeError):
    """`stop` was set; a checkpoint was written and a rerun resumes from it."""


@dataclass
class TrainResult:
    output_dir: Path
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    tokenize_stats: dict = field(default_factory=dict)


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


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: TrainConfig, train_table: pa.Table, model_path: str | os.PathLike[str],
          run_dir: str | os.PathLike[str], *, ref_logps: pa.Table | None = None,
          ref_model_path: str | os.PathLike[str] | None = None, resume: bool = True,
          on_step: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          device: str | torch.device | None = None, logger: logging.Logger | None = None) -> TrainResult:
    """Train the policy with the configured preference loss; see the module docstring."""
    logger = logger or log
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        from dpoflow.tasks.training.distributed import launch

        return launch(cfg, train_table, model_path, run_dir, ref_logps=ref_logps, ref_model_path=ref_model_path,
                      resume=resume, stop=stop, logger=logger)

    rank, world, local_rank = _dist_info()
    if world != cfg.world_size:
        raise TrainingError(f"process group has {world} processes, config asks for {cfg.world_size}")
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

    # 1. data: tokenize, reference log-probs --------------------------------------------------
    model, tokenizer = load_causal_lm(model_path, device="cpu")
    tok = tokenize_pairs(train_table, tokenizer, cfg)
    if len(tok) == 0:
        raise TrainingError(f"no trainable pairs (tokenization: {tok.stats.as_dict()})")
    loss_fn = PreferenceLoss.from_config(cfg)
    ref_c = ref_r = None
    if loss_fn.needs_reference:
        if ref_logps is None:
            logger.info("computing reference log-probs for %d pairs (no stored ref_logps given)", len(tok))
            ref_model = load_causal_lm(ref_model_path, device=device)[0] if ref_model_path else model.to(device)
            ref = compute_ref_logps(ref_model, tok, cfg.eval_batch_size, device, cfg.logit_chunk, cfg.precision)
            del ref_model
            ref_c, ref_r = ref.chosen_logp, ref.rejected_logp
        else:
            ref_c, ref_r = align_ref_logps(tok, ref_logps)
        ref_c, ref_r = torch.from_numpy(ref_c), torch.from_numpy(ref_r)
    lengths = tok.seq_lengths
    chosen_len = tok.chosen_lengths
    steps_per_epoch = len(tok) // cfg.global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(tok)} pairs are fewer than one global batch of {cfg.global_batch} "
                            "(batch_size x grad_accum x processes)")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # 2. model, optimizer, schedule ------------------------------------------------------------
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

    # 3. resume ---------------------------------------------------------------------------------
    fingerprint = _fingerprint(cfg, str(model_path), tok.pair_ids, world)
    step, nan_steps, metrics = 0, 0, []
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        m_state, o_state, t_state, meta = load_checkpoint(ckpt)
        if meta["fingerprint"] != fingerprint:
            raise TrainingError(f"checkpoint {ckpt} was made with another config, model or data; "
                                "use a new run folder or resume=False")
        _load_model_state(model, m_state, named, policy if fsdp else None)
        if fsdp:
            set_optimizer_state_dict(policy, opt, o_state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(o_state)
        sched.load_state_dict(t_state["scheduler"])
        loss_fn.load_state_dict(t_state["loss"])
        _set_rng_state(t_state["rng"])
        step, nan_steps, metrics = meta["step"], meta["nan_steps"], meta["metrics"]
        logger.info("resumed from %s (step %d of %d)", ckpt, step, total_steps)

    def checkpoint() -> None:
        # FSDP: gathering the full weights / optimizer state is a collective (every rank calls it);
        # only rank 0 receives the tensors and writes them, in the same layout as single-process / DDP.
        m_state = _full_state(policy, {n for n, _ in named}) if fsdp else {n: p for n, p in named}
        o_state = (get_optimizer_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
                   if fsdp else None)
        if rank == 0:
            meta = {"step": step, "nan_steps": nan_steps, "metrics": metrics, "fingerprint": fingerprint,
                    "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch}
            t_state = {"scheduler": sched.state_dict(), "loss": loss_fn.state_dict(), "rng": _rng_state()}
            save_checkpoint(run_dir, step, m_state, o_state if fsdp else opt.state_dict(), t_state, meta,
                            keep=cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    # 4. the loop -------------------------------------------------------------------------------
    epoch_cache: dict[int, list[np.ndarray]] = {}
    n_parts = world * cfg.grad_accum
    metrics_file = (run_dir / "metrics.jsonl").open("a") if rank == 0 else None
    logger.info("training %d pairs: %d steps of %d pairs (%d per micro-batch, %d accumulation, %d processes)",
                len(tok), total_steps, cfg.global_batch, cfg.batch_size, cfg.grad_accum, world)
    try:
        while step < total_steps:
            if stop is not None and stop.is_set():
                checkpoint()
                raise TrainingCancelled(f"stopped at step {step}; rerun to resume")
            t0 = time.perf_counter()
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(lengths, cfg.global_batch, seed=cfg.seed, epoch=epoch,
                                                    group=cfg.length_grouping, group_size_mult=cfg.group_size_mult)}
            gidx = epoch_cache[epoch][pos]
            parts = split_batch(gidx, lengths, n_parts)[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
            n_pairs, n_ctok = float(len(gidx)), float(chosen_len[gidx].sum())
            # sums over this process's micro-batches: loss, rewards c/r, accuracy, logps c/r, tokens, slots
            acc = np.zeros(9)
            for i, idx in enumerate(parts):
                batch = collate(tok, idx).to(device)
                sync = world == 1 or i == len(parts) - 1
                if fsdp:  # reduce-scatter gradients only after the step's last micro-batch
                    policy.set_requires_gradient_sync(sync)
                with (contextlib.nullcontext() if sync or fsdp else policy.no_sync()):
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        logps = policy(batch)
                    b = len(idx)
                    lb = LogpBatch(logps[:b], logps[b:], batch.n_tokens[:b].float(), batch.n_tokens[b:].float(),
                                   ref_c[idx].to(device).float() if ref_c is not None else None,
                                   ref_r[idx].to(device).float() if ref_r is not None else None)
                    terms = loss_fn.terms(lb)
                    loss = loss_fn.reduce(terms, n_pairs, n_ctok)
                    (loss * world).backward()
                acc += [loss.item(), terms.chosen_rewards.sum().item(), terms.rejected_rewards.sum().item(),
                        (terms.chosen_rewards > terms.rejected_rewards).sum().item(),
                        lb.chosen_logps.detach().sum().item(), lb.rejected_logps.detach().sum().item(),
                        batch.real_tokens, batch.input_ids.numel(), 0.0]
            acc[8] = float(not math.isfinite(acc[0]))
            tot = _all_sum(acc.tolist(), device, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards (same on every rank)
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            bad = tot[8] > 0 or not math.isfinite(tot[0]) or not math.isfinite(grad_norm)
            lr = sched.get_last_lr()[0]
            if bad:
                nan_steps += 1
                logger.warning("non-finite loss or gradient at step %d: update skipped (%d so far)", step, nan_steps)
                if nan_steps > cfg.max_nan_steps:
                    raise TrainingError(f"{nan_steps} steps had a non-finite loss or gradient "
                                        f"(max_nan_steps={cfg.max_nan_steps}); aborting. Lower lr, check the "
                                        "data and the reference log-probs, or use precision=fp32")
            else:
                opt.step()
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch, "loss": tot[0],
                   "rewards/chosen": tot[1] / n_pairs, "rewards/rejected": tot[2] / n_pairs,
                   "rewards/margins": (tot[1] - tot[2]) / n_pairs, "rewards/accuracies": tot[3] / n_pairs,
                   "logps/chosen": tot[4] / n_pairs, "logps/rejected": tot[5] / n_pairs,
                   "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tot[6] / dt, "padding_share": 1 - tot[6] / tot[7],
                   "skipped": int(bad), "nan_steps": nan_steps, "seconds": dt}
            metrics.append(row)
            if rank == 0:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if on_step is not None:
                    on_step(row)
                if step % cfg.log_every == 0 or step == total_steps:
                    logger.info("step %d/%d loss %.4f acc %.3f margin %.4f lr %.2e %.0f tok/s", step, total_steps,
                                row["loss"], row["rewards/accuracies"], row["rewards/margins"], lr,
                                row["tokens_per_s"])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
    finally:
        if metrics_file is not None:
            metrics_file.close()

    # 5. final weights ----------------------------------------------------------------------------
    out = run_dir / "model"
    if fsdp:  # gather the full weights to rank 0 (collective), load them into a CPU copy of the model
        full = _full_state(policy, None)
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
    done = [m for m in metrics if not m["skipped"]]
    summary = {"steps": step, "nan_steps": nan_steps, "pairs": len(tok), "global_batch": cfg.global_batch,
               "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in metrics])) if metrics else 0.0,
               "padding_share": float(np.mean([m["padding_share"] for m in metrics])) if metrics else 0.0,
               "final": metrics[-1] if metrics else {}, "last_good": done[-1] if done else {}}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps({**summary, "tokenize": tok.stats.as_dict()}))
    return TrainResult(output_dir=out, run_dir=run_dir, metrics=metrics, summary=summary,
                       tokenize_stats=tok.stats.as_dict())


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], named,
                      fsdp_root: torch.nn.Module | None = None) -> None:
    names = {n for n, _ in named}
    if set(state) != names:
        raise TrainingError("checkpoint weights do not match the model's trainable parameters")
    if fsdp_root is not None:  # every rank holds the full tensors; each keeps its own shard
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
