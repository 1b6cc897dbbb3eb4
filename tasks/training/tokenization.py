"""Pairs -> token ids with an exact prompt / completion boundary.

Public API (stable):

    tokenize_pairs(table, tokenizer, cfg) -> TokenizedPairs
        table: a `dpo_train` / `dpo_eval` table (pair_id, prompt, prompt_messages?, chosen, rejected).
        cfg:   TrainConfig (uses max_length, max_prompt_length, truncation_side, chat_template).
    TokenizedPairs: pair_ids, row_index (kept rows of `table`), prompt / chosen / rejected
        (lists of int64 numpy arrays; completions end with EOS unless truncated), pad_id,
        stats (TokenizeStats), chosen_lengths / rejected_lengths / seq_lengths, select(idx).
    TokenizeStats: n_in, n_kept, n_prompt_truncated, n_completion_truncated, n_truncated,
        dropped {reason: n}, affected_share, warning(max_share) -> str | None.

Why separately: the prompt and each completion are tokenized on their own and their ids
concatenated, so no BPE merge crosses the boundary and the labelled tokens are exactly the
completion's (TRL does the same). The prompt is formatted with the tokenizer's chat template
(`prompt_messages` when given, else the plain prompt as one user turn) and ends with the
generation prompt; the completion gets EOS appended so the model learns to stop.

Truncation (per pair, both sides share one prompt): when prompt + longer completion exceeds
`max_length`, the prompt is cut to `max_prompt_length` (default max_length // 2; from the left
by default, keeping the last turn), then completions are cut from the end to fit. Pairs whose two completions are
identical after truncation carry no preference signal and are dropped with a count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class TokenizeStats:
    n_in: int = 0
    n_kept: int = 0
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0
    n_truncated: int = 0  # pairs with any cut (prompt or a completion), kept or not
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def affected_share(self) -> float:
        """Share of the input pairs that were truncated or dropped."""
        hit = self.n_truncated + sum(self.dropped.values())  # a dropped pair counts once (not also as cut)
        return min(1.0, hit / self.n_in) if self.n_in else 0.0

    def as_dict(self) -> dict:
        return {"n_in": self.n_in, "n_kept": self.n_kept, "n_prompt_truncated": self.n_prompt_truncated,
                "n_completion_truncated": self.n_completion_truncated, "n_truncated": self.n_truncated,
                "dropped": dict(self.dropped), "affected_share": self.affected_share}

    def warning(self, max_share: float) -> str | None:
        """A one-line warning when more than `max_share` of the pairs were cut or dropped."""
        share = self.affected_share
        if share <= max_share:
            return None
        drop = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (f"{share:.0%} of {self.n_in} pairs were truncated or dropped (more than max_truncated_share "
                f"{max_share:.0%}): {self.n_prompt_truncated} prompts and {self.n_completion_truncated} pairs' "
                f"completions cut, dropped: {drop}; raise train.max_length / max_prompt_length")


@dataclass
class TokenizedPairs:
    pair_ids: np.ndarray  # str objects, [N]
    row_index: np.ndarray  # int64 [N]: row of the input table
    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    pad_id: int
    stats: TokenizeStats = field(default_factory=TokenizeStats)

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.prompt), np.int64, len(self.prompt))

    @property
    def chosen_lengths(self) -> np.ndarray:
        return np.fromiter((len(c) for c in self.chosen), np.int64, len(self.chosen))

    @property
    def rejected_lengths(self) -> np.ndarray:
        return np.fromiter((len(c) for c in self.rejected), np.int64, len(self.rejected))

    @property
    def seq_lengths(self) -> np.ndarray:
        """Longest row of each pair (prompt + longer completion): the key for length grouping."""
        return self.prompt_lengths + np.maximum(self.chosen_lengths, self.rejected_lengths)

    def select(self, idx: np.ndarray) -> TokenizedPairs:
        idx = np.asarray(idx, dtype=np.int64)
        return TokenizedPairs(self.pair_ids[idx], self.row_index[idx], [self.prompt[i] for i in idx],
                              [self.chosen[i] for i in idx], [self.rejected[i] for i in idx],
                              self.pad_id, self.stats)


def _prompt_texts(table: pa.Table, tokenizer, mode: str) -> tuple[list[str], bool]:
    """Formatted prompt strings, and whether they came from a chat template (specials inside)."""
    prompts = table.column("prompt").to_pylist()
    messages = (table.column("prompt_messages").to_pylist()
                if "prompt_messages" in table.column_names else [None] * len(prompts))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "never":
        if any(m for m in messages):
            raise ValueError("chat_template='never' but some pairs have prompt_messages")
        return prompts, False
    if not has_template:
        if mode == "always" or any(m for m in messages):
            raise ValueError("the tokenizer has no chat template, but the pairs need one "
                             "(chat_template='always' or prompt_messages present)")
        return prompts, False
    convs = [list(m) if m else [{"role": "user", "content": p}] for m, p in zip(messages, prompts, strict=True)]
    texts = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    return list(texts), True


def tokenize_pairs(table: pa.Table, tokenizer, cfg) -> TokenizedPairs:
    """Tokenize prompt / chosen / rejected separately, append EOS, truncate by config."""
    n = table.num_rows
    stats = TokenizeStats(n_in=n)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if n == 0:
        return TokenizedPairs(np.array([], dtype=object), np.zeros(0, np.int64), [], [], [], int(pad), stats)

    texts, templated = _prompt_texts(table, tokenizer, cfg.chat_template)
    p_ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    c_ids = tokenizer(table.column("chosen").to_pylist(), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(table.column("rejected").to_pylist(), add_special_tokens=False)["input_ids"]

    p_len = np.fromiter(map(len, p_ids), np.int64, n)
    c_len = np.fromiter(map(len, c_ids), np.int64, n) + 1  # + EOS
    r_len = np.fromiter(map(len, r_ids), np.int64, n) + 1
    longest = np.maximum(c_len, r_len)
    too_long = p_len + longest > cfg.max_length
    cut_prompt = too_long & (p_len > cfg.prompt_limit)
    p_keep = np.where(cut_prompt, cfg.prompt_limit, p_len)
    room = cfg.max_length - p_keep  # >= 1 because max_prompt_length < max_length
    c_keep, r_keep = np.minimum(c_len, room), np.minimum(r_len, room)
    stats.n_prompt_truncated = int(cut_prompt.sum())
    cut_completion = (c_keep < c_len) | (r_keep < r_len)
    stats.n_completion_truncated = int(cut_completion.sum())

    left = cfg.truncation_side == "left"
    prompt = [np.asarray(ids[len(ids) - k:] if left else ids[:k], np.int64) for ids, k in zip(p_ids, p_keep, strict=True)]
    chosen = [np.asarray((ids + [eos])[:k], np.int64) for ids, k in zip(c_ids, c_keep, strict=True)]
    rejected = [np.asarray((ids + [eos])[:k], np.int64) for ids, k in zip(r_ids, r_keep, strict=True)]

    same = np.fromiter((a.shape == b.shape and bool((a == b).all()) for a, b in zip(chosen, rejected, strict=True)),
                       bool, n)
    keep = np.flatnonzero(~same)
    stats.n_truncated = int(((cut_prompt | cut_completion) & ~same).sum())
    if same.any():
        stats.dropped["identical_completions"] = int(same.sum())
    stats.n_kept = len(keep)
    pair_ids = np.asarray(table.column("pair_id").to_pylist(), dtype=object)
    out = TokenizedPairs(pair_ids, np.arange(n, dtype=np.int64), prompt, chosen, rejected, int(pad), stats)
    return out.select(keep) if len(keep) < n else out
