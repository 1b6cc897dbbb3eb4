"""Sequence log-probs of completions, without ever materialising full-vocabulary logits.

Public API (stable):

    load_causal_lm(path, device="cpu", dtype=None) -> (model, tokenizer)   local folder only.
    SequenceLogps(model, chunk=1024, varlen=None)   nn.Module: forward(batch: data.Batch) -> [2B]
        summed completion log-probs (0..B-1 chosen, B..2B-1 rejected), padded or packed batches.
        Wrap this module (not the bare model) in DDP / FSDP so gradient sync hooks run.
    block_causal_mask(segment, impl="sdpa", dtype) -> [R, 1, L, L]   attention inside each packed sequence.
    linear_logp(hidden, weight, bias, targets, chunk) -> [T]   log softmax(hidden @ Wᵀ + b)[target],
        computed chunk by chunk in forward and recomputed chunk by chunk in backward.
    compute_ref_logps(model, tokenized, batch_size, device="cpu", chunk=1024, precision="auto", packing=False)
        -> RefLogps(chosen_logp, rejected_logp, chosen_tokens, rejected_tokens)  numpy, aligned
        with `tokenized`; runs under torch.inference_mode, longest batches first.
    ref_logps_table(tokenized, ref, model_version) -> pa.Table   in the REF_LOGPS contract.
    align_ref_logps(tokenized, table) -> (ref_chosen, ref_rejected) float64 arrays; errors if a
        pair is missing or its token counts differ (stored with another tokenization).

Why: one forward runs the decoder over chosen and rejected rows together; only the hidden
states at completion positions go through the lm head, and the log-softmax runs in chunks of
`chunk` tokens inside a custom autograd function that keeps just the hidden states and
recomputes each chunk's logits in backward. Peak extra memory is chunk x vocab floats instead
of batch x length x vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from dpoflow.tasks.training.data import Batch, make_batch


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   allow_pickle_weights: bool = False):
    """A local causal LM + tokenizer (never a hub download: `local_files_only`; safetensors only
    unless `allow_pickle_weights`, see storage.registry.check_weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpoflow.storage.registry import check_weights

    check_weights(path, allow_pickle=allow_pickle_weights)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32,
                                                 use_safetensors=None if allow_pickle_weights else True)
    return model.to(device), tok


class _LinearLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        with torch.autocast(h.device.type, enabled=False):
            cd = h.dtype
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            acc = torch.promote_types(torch.float32, cd)  # fp32 log-softmax (fp64 in gradcheck)
            out = torch.empty(h.shape[0], dtype=acc, device=h.device)
            for s in range(0, h.shape[0], chunk):
                logits = F.linear(h[s:s + chunk], w, b).to(acc)
                out[s:s + chunk] = (logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
                                    - torch.logsumexp(logits, dim=-1))
        ctx.chunk = chunk
        ctx.save_for_backward(h, weight, bias, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):
            cd = h.dtype
            acc = torch.promote_types(torch.float32, cd)
            w = weight.to(cd)
            b = bias.to(cd) if bias is not None else None
            gh = torch.empty_like(h) if need_h else None
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
            for s in range(0, h.shape[0], chunk):
                hs, g = h[s:s + chunk], grad_out[s:s + chunk].to(acc)
                # d logp[t] / d logits = onehot(target) - softmax(logits)
                gl = torch.softmax(F.linear(hs, w, b).to(acc), dim=-1).mul_(-g[:, None])
                gl.scatter_add_(1, targets[s:s + chunk, None], g[:, None])
                if need_h:
                    gh[s:s + chunk] = gl.to(cd) @ w
                if need_w:
                    gw.addmm_(gl.t(), hs.to(acc))
                if need_b:
                    gb += gl.sum(0)
        return (gh, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None)


def linear_logp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log_softmax(hidden @ weightᵀ + bias)[targets] per row, in fp32, chunked (see module doc)."""
    return _LinearLogp.apply(hidden, weight, bias, targets, int(chunk))


def _causal_lm(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


class SequenceLogps(nn.Module):
    """Summed completion log-probs of every row of a :class:`Batch` in one forward pass."""

    def __init__(self, model: nn.Module, chunk: int = 1024, varlen: bool | None = None):
        super().__init__()
        self.model = model
        self.chunk = chunk
        # packed rows: True = position_ids only (flash-attention's varlen path; other attention
        # implementations infer the same block mask from them), False = an explicit block mask,
        # None = varlen exactly when the model runs flash-attention.
        self.varlen = varlen
        cfg = getattr(_causal_lm(model), "config", None)
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise NotImplementedError(f"models with {attr} are not supported by the chunked lm head")

    def forward(self, batch: Batch) -> torch.Tensor:
        lm = _causal_lm(self.model)
        decoder = lm.get_decoder()
        if batch.packed:
            impl = getattr(lm.config, "_attn_implementation", None) or "sdpa"
            varlen = impl.startswith("flash") if self.varlen is None else self.varlen
            mask = None if varlen else block_causal_mask(batch.segment, impl, decoder.dtype)
            out = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                          use_cache=False)
        else:
            out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        h = hs.reshape(-1, hs.shape[-1]).index_select(0, batch.target_pos)
        head = lm.get_output_embeddings()
        tok_logp = linear_logp(h, head.weight, getattr(head, "bias", None), batch.target_ids, self.chunk)
        return torch.zeros(2 * batch.n_pairs, dtype=tok_logp.dtype, device=tok_logp.device).index_add(
            0, batch.target_row, tok_logp)


def block_causal_mask(segment: torch.Tensor, impl: str = "sdpa", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[R, 1, L, L] attention mask of packed rows: a token sees the earlier tokens of its own
    sequence only. Boolean (True = attend) for sdpa; additive (0 / dtype min) for eager. Padding
    tokens (segment -1) see themselves, so no softmax row is empty.

    With flash-attention, transformers builds the varlen boundaries from the restarting
    position_ids instead, and no L x L mask exists (see SequenceLogps.forward).
    """
    n = segment.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment.device).tril_()
    same = segment[:, :, None] == segment[:, None, :]
    allowed = (same & causal) | torch.eye(n, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (when supported) for precision auto/bf16; None = plain fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class RefLogps:
    chosen_logp: np.ndarray  # float64 [N]
    rejected_logp: np.ndarray
    chosen_tokens: np.ndarray  # int32 [N]
    rejected_tokens: np.ndarray


def compute_ref_logps(model: nn.Module, tokenized, batch_size: int, device: str | torch.device = "cpu",
                      chunk: int = 1024, precision: str = "auto", packing: bool = False,
                      row_factor: float = 2.0) -> RefLogps:
    """Reference log-probs for every tokenized pair, in length-sorted batches, no autograd."""
    device = torch.device(device)
    n = len(tokenized)
    chosen, rejected = np.zeros(n), np.zeros(n)
    seq = SequenceLogps(model, chunk).to(device).eval()
    order = np.argsort(-tokenized.seq_lengths, kind="stable")
    amp = autocast_dtype(precision, device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            lp = seq(make_batch(tokenized, idx, packing, row_factor).to(device)).double().cpu().numpy()
            chosen[idx], rejected[idx] = lp[: len(idx)], lp[len(idx):]
    return RefLogps(chosen, rejected, tokenized.chosen_lengths.astype(np.int32),
                    tokenized.rejected_lengths.astype(np.int32))


def ref_logps_table(tokenized, ref: RefLogps, model_version: str) -> pa.Table:
    """The stored form (REF_LOGPS contract), keyed by pair_id."""
    n = len(tokenized)
    return pa.table({
        "pair_id": pa.array(list(tokenized.pair_ids), pa.string()),
        "ref_chosen_logp": pa.array(ref.chosen_logp, pa.float64()),
        "ref_rejected_logp": pa.array(ref.rejected_logp, pa.float64()),
        "chosen_tokens": pa.array(ref.chosen_tokens, pa.int32()),
        "rejected_tokens": pa.array(ref.rejected_tokens, pa.int32()),
        "ref_model_version": pa.array([model_version] * n, pa.string()),
    })


def align_ref_logps(tokenized, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Stored reference log-probs in `tokenized` order, checked against its token counts."""
    ids = table.column("pair_id").to_numpy(zero_copy_only=False).astype(object)
    pos = {pid: i for i, pid in enumerate(ids)}
    if len(pos) != len(ids):
        raise ValueError("ref_logps has duplicate pair_id rows")
    where = np.fromiter((pos.get(p, -1) for p in tokenized.pair_ids), np.int64, len(tokenized))
    missing = int((where < 0).sum())
    if missing:
        raise ValueError(f"ref_logps lacks {missing} of {len(tokenized)} training pairs "
                         "(computed for another dpo_train version?); recompute ref_logps")
    ct = table.column("chosen_tokens").to_numpy()[where]
    rt = table.column("rejected_tokens").to_numpy()[where]
    bad = (ct != tokenized.chosen_lengths) | (rt != tokenized.rejected_lengths)
    if bad.any():
        raise ValueError(f"ref_logps token counts differ for {int(bad.sum())} pairs: they were computed with "
                         "another tokenizer or truncation setting; recompute ref_logps")
    return (table.column("ref_chosen_logp").to_numpy()[where].astype(np.float64),
            table.column("ref_rejected_logp").to_numpy()[where].astype(np.float64))
