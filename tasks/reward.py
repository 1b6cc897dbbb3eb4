"""Reward models: any `AutoModelForSequenceClassification` scoring (prompt, response) pairs.

Why: a learned reward ranks candidates where there is no reference and no user signal.
Inputs are sorted by length and scored in padded batches (right padding, so position ids
match an unpadded run and batching does not change the score), on CUDA when available
unless the config says otherwise. A local path never touches the network; a hub id is
loaded only when the config names one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from pydantic import Field

from dpoflow.tasks.contract import Section


class RewardConfig(Section):
    model: str | None = Field(None, description="local path or hub id of a sequence-classification reward model; null = no reward")
    batch_size: int = Field(16, ge=1, description="pairs per forward pass")
    max_length: int = Field(1024, ge=8, description="truncate prompt + response to this many tokens (prompt side first)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    label: int | None = Field(None, description="logit index to use; null: the only logit (num_labels=1) or the last class's log-odds")
    use_chat_template: bool = Field(True, description="format prompt + response with the tokenizer's chat template when it has one")
    shard_size: int = Field(1024, ge=1, description="candidates per reward shard: the unit scored on one Ray worker "
                            "(score.runner=ray), committed once and reused by a rerun; inline runs batch the same way")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_device(name: str) -> str:
    """The device `name` means in this process (auto -> cuda when a GPU is visible)."""
    return str(_device(name))


@lru_cache(maxsize=2)
def _load(model: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev = _device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "right"
    tok.truncation_side = "left"  # keep the response (end of the text) when truncating
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch_dtype).to(dev).eval()
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tok.pad_token_id
    return tok, net, dev


def format_pairs(tok, prompts: list[str], responses: list[str], use_chat_template: bool) -> list[str]:
    """One text per pair: the chat template when the tokenizer has one, else prompt + newline + response."""
    if use_chat_template and getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                        tokenize=False) for p, r in zip(prompts, responses, strict=True)]
    return [f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)]


def score_rewards(prompts: list[str | None], responses: list[str | None], cfg: RewardConfig) -> np.ndarray:
    """Reward per pair (float64); NaN where the response is null. Needs cfg.model."""
    import torch

    if not cfg.model:
        raise ValueError("reward.model is not set")
    tok, net, dev = _load(cfg.model, cfg.device, cfg.dtype)
    n = len(responses)
    out = np.full(n, np.nan)
    idx = [i for i in range(n) if responses[i] is not None]
    texts = format_pairs(tok, [prompts[i] or "" for i in idx], [responses[i] for i in idx], cfg.use_chat_template)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
    with torch.inference_mode():
        for start in range(0, len(order), cfg.batch_size):
            sel = order[start:start + cfg.batch_size]
            enc = tok([texts[j] for j in sel], return_tensors="pt", padding=True, truncation=True,
                      max_length=cfg.max_length, add_special_tokens=False)
            logits = net(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
            if cfg.label is not None:
                vals = logits[:, cfg.label]
            elif logits.shape[-1] == 1:
                vals = logits[:, 0]
            else:  # log-odds of the last class ("good") against the others
                vals = logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)
            for j, v in zip(sel, vals.cpu().numpy().astype(np.float64), strict=True):
                out[idx[j]] = v
    return out
