"""Batched text generation with transformers: the engine of the `sample` stage (and of
generation-based evaluation).

Why it is shaped this way:

* **Batches by token budget over length-sorted prompts.** Sorting keeps padding small;
  the budget (rows x (prompt + new tokens)) bounds memory whatever the prompt lengths.
  Candidates of a prompt come from ``num_return_sequences``, so the prompt is encoded once.
* **Per-row counter-based sampling.** `generate` draws from one global RNG for the whole
  batch, so a candidate would depend on which other prompts shared its batch (batch size,
  shard boundaries, an OOM retry at half size...). Instead a logits processor draws each
  row's token from a uniform number hashed from (row seed, step): a candidate depends only
  on its prompt, its seed and its index. Reruns, resumed shards, different token budgets
  and the naive one-by-one loop all give the same text (up to float noise of padding).
* **CUDA out-of-memory** splits the batch in halves and retries, and remembers the smaller
  size; a single row that does not fit fails with a message that says what to lower.

Nothing here imports Prefect; vLLM is imported only by :func:`generate_vllm`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dpoflow.generation")

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of one generation call (one grid point of a sampler)."""

    n: int = 1
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    """One generated response."""

    text: str
    n_tokens: int  # generated tokens, the end-of-sequence token excluded
    finish_reason: str  # eos | length


@dataclass
class PromptResult:
    """The result for one prompt: its candidates, or why it was skipped."""

    n_prompt_tokens: int = 0
    generations: list[Generation] = field(default_factory=list)
    skipped: str | None = None  # reason, when no generation was attempted
    truncated: bool = False


@dataclass
class GenStats:
    """Throughput counters (tokens include the end-of-sequence token)."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    oom_splits: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class GenerationOOM(RuntimeError):
    """A single prompt's batch does not fit in device memory even alone."""


# --- devices and models ----------------------------------------------------------------------

def pick_device(device: str = "auto") -> str:  # the one device rule: sampling, ref_logps, training, eval
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is visible")
    return device


def load_model(path_or_id: str, *, device: str = "cpu", trust_remote_code: bool = False,
               local_only: bool = True, allow_pickle_weights: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) for generation: bf16 on CUDA, fp32 on CPU, eval mode.

    `local_only` keeps loading from ever touching a model hub (a local folder or the cache).
    Only safetensors weights load unless `allow_pickle_weights` (see storage.registry.check_weights).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpoflow.storage.registry import check_weights

    check_weights(path_or_id, allow_pickle=allow_pickle_weights)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kw)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, use_safetensors=None if allow_pickle_weights
                                                 else True, **kw)
    model.to(device)
    model.eval()
    return model, tokenizer


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model accepts (config first, tokenizer as a fallback)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10**7 else 2048


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return sorted(ids)


# --- prompt encoding ---------------------------------------------------------------------------

def render_prompts(tokenizer: Any, prompts: Sequence[str | list[dict] | None], use_chat_template: bool = True
                   ) -> tuple[list[str], bool]:
    """Prompts as model input text; chat messages (and plain text, as one user turn) go
    through the tokenizer's chat template when it has one. Returns (texts, templated)."""
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    out: list[str] = []
    for p in prompts:
        if p is None:
            out.append("")
            continue
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else [
            {"role": m["role"], "content": m["content"]} for m in p]
        if templated:
            out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        elif isinstance(p, str):
            out.append(p)
        else:  # no template: a plain transcript ending with the assistant cue
            out.append("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: ")
    return out, templated


def encode(tokenizer: Any, texts: list[str], templated: bool) -> list[list[int]]:
    """Token ids of each text (one fast batched tokenizer call); a template already holds
    its special tokens, so none are added again."""
    enc = tokenizer(texts, add_special_tokens=not templated, padding=False, truncation=False)
    return [list(x) for x in enc["input_ids"]]


def prepare_prompts(tokenizer: Any, prompts: Sequence[str | list[dict] | None], max_new_tokens: int, context: int,
                    max_prompt_tokens: int | None = None, too_long: str = "skip", use_chat_template: bool = True
                    ) -> tuple[list[list[int]], list[PromptResult], list[int]]:
    """Encode prompts and apply the length policy: (token ids, results with skips filled in,
    indices of prompts to generate for). Shared by every backend so they skip alike."""
    if too_long not in ("skip", "truncate"):
        raise ValueError(f"too_long must be 'skip' or 'truncate', not {too_long!r}")
    texts, templated = render_prompts(tokenizer, prompts, use_chat_template)
    ids = encode(tokenizer, texts, templated)
    limit = context - max_new_tokens
    if max_prompt_tokens is not None:
        limit = min(limit, max_prompt_tokens)
    results = [PromptResult(n_prompt_tokens=len(x)) for x in ids]
    todo: list[int] = []
    for i, (p, x) in enumerate(zip(prompts, ids, strict=True)):
        empty = p is None or (isinstance(p, str) and not p.strip()) or (
            not isinstance(p, str) and not any((m.get("content") or "").strip() for m in p))
        if empty:
            results[i].skipped = "empty_prompt"
        elif limit < 1:
            results[i].skipped = "max_new_tokens_exceeds_context"
        elif len(x) > limit:
            if too_long == "truncate":
                ids[i] = x[-limit:]
                results[i].truncated = True
                results[i].n_prompt_tokens = limit
                todo.append(i)
            else:
                results[i].skipped = "prompt_too_long"
        else:
            todo.append(i)
    return ids, results, todo


# --- sampling ----------------------------------------------------------------------------------

def row_seed(seed: int, key: str, index: int) -> int:
    """31-bit seed of one candidate: a hash of (sampler seed, prompt key, candidate index)."""
    h = hashlib.blake2b(f"{seed}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def _uniform(seeds: Any, step: int) -> Any:
    """A uniform number in (0, 1) per row from (row seed, step): a 32-bit integer hash in
    int64 tensor ops (products stay below 2**63), so it is the same on every device."""
    import torch

    x = (seeds ^ (((step + 1) * 0x9E3779B1) & _M32)) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (x >> 16) ^ x
    return (x.to(torch.float64) + 0.5) / 4294967296.0


def _make_row_sampler(seeds: Any, prompt_len: int, p: GenParams):
    """A logits processor that picks each row's next token itself (temperature, top-k,
    top-p, then inverse-CDF with the row's own uniform) and returns scores where only that
    token is finite, so the draw of `generate` itself can only take it."""
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            step = input_ids.shape[1] - prompt_len
            logits = scores.float()
            if p.temperature <= 0:
                choice = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / p.temperature, dim=-1)
                sp, si = probs.sort(dim=-1, descending=True, stable=True)
                if p.top_k and p.top_k > 0 and p.top_k < sp.shape[-1]:
                    sp[:, p.top_k:] = 0.0
                if p.top_p < 1.0:
                    before = sp.cumsum(-1) - sp  # mass of the more likely tokens
                    sp = sp.masked_fill(before >= p.top_p, 0.0)
                cdf = sp.double().cumsum(-1)
                u = _uniform(seeds.to(cdf.device), step).unsqueeze(1) * cdf[:, -1:]
                pos = torch.searchsorted(cdf, u).clamp_(max=sp.shape[-1] - 1)
                choice = si.gather(1, pos).squeeze(1)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, choice.unsqueeze(1), 0.0)
            return out

    return RowSampler()


# --- batching ----------------------------------------------------------------------------------

def plan_batches(lengths: Sequence[int], n: int, max_new_tokens: int, token_budget: int,
                 max_batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches: sorted by length (longest first, so a budget
    problem shows at once), each batch's rows x (longest prompt + new tokens) within budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and ((len(cur) + 1) * n * (m + max_new_tokens) > token_budget or len(cur) + 1 > max_batch_size):
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


def _pad_left(seqs: list[list[int]], pad_id: int, device: str):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict] | None],
    params: GenParams,
    *,
    keys: Sequence[str] | None = None,
    device: str | None = None,
    token_budget: int = 16384,
    max_batch_size: int = 256,
    max_prompt_tokens: int | None = None,
    too_long: str = "skip",
    use_chat_template: bool = True,
    stats: GenStats | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    before_generate: Callable[[int], None] | None = None,
) -> list[PromptResult]:
    """Generate `params.n` responses for each prompt, batched; one PromptResult per prompt.

    prompts: plain strings or chat message lists ({"role", "content"}).
    keys: a stable key per prompt (e.g. prompt_id) that seeds its candidates; defaults to
        the prompt's position. Same key + seed + params -> same responses, in any batch.
    max_prompt_tokens: longest accepted prompt (default: context length - max_new_tokens);
        longer prompts are skipped with a reason (`too_long="skip"`) or keep their last
        tokens (`too_long="truncate"`). Empty prompts are skipped.
    token_budget / max_batch_size: bound rows x (prompt + new tokens) of one batch.
    on_batch(prompts_done, tokens_generated): progress callback after each batch.
    before_generate(rows): called before each `generate` call with its row count; raising a
        CUDA out-of-memory error there exercises the halving path (fault injection).
    """
    import torch

    stats = stats if stats is not None else GenStats()
    device = device or str(next(model.parameters()).device)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts):
        raise ValueError("keys and prompts must have the same length")
    ids, results, todo = prepare_prompts(tokenizer, prompts, params.max_new_tokens, context_length(model, tokenizer),
                                         max_prompt_tokens, too_long, use_chat_template)
    if not todo:
        return results

    from transformers import GenerationConfig, LogitsProcessorList

    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    if pad_id is None:
        pad_id = eos[0] if eos else 0
    gen_cfg = GenerationConfig(
        # do_sample with neutral warpers: the row sampler leaves one finite logit per row, so
        # the multinomial draw is forced (greedy would refuse num_return_sequences > 1).
        max_new_tokens=params.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        num_beams=1,
        num_return_sequences=params.n, repetition_penalty=params.repetition_penalty,
        pad_token_id=pad_id, eos_token_id=eos or None,
    )
    eos_t = torch.tensor(eos or [-1], dtype=torch.long)
    budget = [token_budget]  # shrinks after an out-of-memory split
    done = [0]

    def run(batch: list[int]) -> None:
        need = len(batch) * params.n * (max(len(ids[i]) for i in batch) + params.max_new_tokens)
        if need > budget[0] and len(batch) > 1:  # budget shrank after an OOM: split before trying
            half = len(batch) // 2
            run(batch[:half])
            run(batch[half:])
            return
        seqs = [ids[i] for i in batch]
        input_ids, mask = _pad_left(seqs, pad_id, device)
        seeds = torch.tensor([row_seed(params.seed, keys[i], j) for i in batch for j in range(params.n)],
                             dtype=torch.long)
        sampler = _make_row_sampler(seeds, input_ids.shape[1], params)
        t0 = time.perf_counter()
        try:
            if before_generate is not None:
                before_generate(len(batch))
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg,
                                     logits_processor=LogitsProcessorList([sampler]))
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise GenerationOOM(
                    f"out of memory generating {params.n} x {params.max_new_tokens} new tokens for one "
                    f"prompt of {len(seqs[0])} tokens on {device}; lower sample.token_budget, n, "
                    "max_new_tokens or max_prompt_tokens, or use a larger device") from exc
            stats.oom_splits += 1
            budget[0] = max(1, min(budget[0], need) // 2)
            log.warning("out of memory on a batch of %d prompts: retrying in halves", len(batch))
            half = len(batch) // 2
            run(batch[:half])
            run(batch[half:])
            return
        stats.seconds += time.perf_counter() - t0
        stats.batches += 1
        new = out[:, input_ids.shape[1]:].cpu()
        is_eos = torch.isin(new, eos_t)
        has_eos = is_eos.any(1)
        first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, new.shape[1], dtype=torch.long))
        stats.generated_tokens += int((first + has_eos.long()).sum())
        stats.prompt_tokens += sum(len(s) for s in seqs) * params.n
        texts_out = tokenizer.batch_decode([new[r, : int(first[r])].tolist() for r in range(new.shape[0])],
                                           skip_special_tokens=True)
        # byte-level tokens decode to valid text; a character cut by the length limit decodes to a
        # trailing U+FFFD that is the limit's, not the model's: dropped (others stay, and the
        # rules flag them as broken bytes)
        texts_out = [t if bool(has_eos[r]) else t.rstrip("\ufffd") for r, t in enumerate(texts_out)]
        for b, i in enumerate(batch):
            for j in range(params.n):
                r = b * params.n + j
                results[i].generations.append(Generation(
                    text=texts_out[r], n_tokens=int(first[r]),
                    finish_reason="eos" if bool(has_eos[r]) else "length"))
        done[0] += len(batch)
        if on_batch is not None:
            on_batch(done[0], stats.generated_tokens)

    for batch in plan_batches([len(ids[i]) for i in todo], params.n, params.max_new_tokens,
                              token_budget, max_batch_size):
        run([todo[k] for k in batch])
    return results


# --- optional vLLM backend -------------------------------------------------------------------------

def vllm_available() -> bool:
    """vLLM is used only when installed and a GPU is present (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_vllm(llm: Any, tokenizer: Any, prompts: Sequence[str | list[dict] | None], params: GenParams, *,
                  keys: Sequence[str] | None = None, max_prompt_tokens: int | None = None,
                  too_long: str = "skip", use_chat_template: bool = True, context: int | None = None,
                  stats: GenStats | None = None) -> list[PromptResult]:
    """The same contract as :func:`generate_responses` on a `vllm.LLM` (continuous batching);
    each prompt gets its own sampling seed so results do not depend on batch composition."""
    from vllm import SamplingParams, TokensPrompt

    stats = stats if stats is not None else GenStats()
    keys = list(keys) if keys is not None else [str(i) for i in range(len(prompts))]
    if context is None:
        context = int(getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", 2048))
    ids, results, todo = prepare_prompts(tokenizer, prompts, params.max_new_tokens, context, max_prompt_tokens,
                                         too_long, use_chat_template)
    if not todo:
        return results
    sps = [SamplingParams(
        n=params.n, temperature=max(params.temperature, 0.0), top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty, seed=row_seed(params.seed, keys[i], 0))
        for i in todo]
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in todo], sps, use_tqdm=False)
    stats.seconds += time.perf_counter() - t0
    for i, o in zip(todo, outs, strict=True):
        for c in o.outputs:
            stats.generated_tokens += len(c.token_ids)
            results[i].generations.append(Generation(
                text=c.text, n_tokens=len(c.token_ids) - (1 if c.finish_reason == "stop" else 0),
                finish_reason="eos" if c.finish_reason == "stop" else "length"))
    stats.batches += 1
    return results


def load_vllm(path: str, *, trust_remote_code: bool = False, seed: int = 0) -> Any:
    from vllm import LLM

    return LLM(model=path, dtype="bfloat16", trust_remote_code=trust_remote_code, seed=seed)


