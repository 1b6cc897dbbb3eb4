"""Batching: length-grouped, deterministic global batches and the padded chosen+rejected tensors.

Public API (stable):

    epoch_batches(lengths, global_batch, *, seed, epoch, group=True, group_size_mult=16, order="shuffled")
        -> list[np.ndarray]   the optimizer steps of one epoch, each an array of pair indices.
        Deterministic in (seed, epoch), so a resumed run replays the same order; the random tail
        of fewer than `global_batch` pairs is left out of this epoch (it is in the next one's draw).
        order="sequential": consecutive rows in table order, no grouping (the same every epoch).
    split_batch(indices, lengths, n_parts) -> list[np.ndarray]
        a global batch cut into n_parts (= processes x accumulation) contiguous, length-sorted parts.
    collate(tok: TokenizedPairs, indices) -> Batch
        rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.
    collate_packed(tok, indices, capacity=1.0) -> Batch
        the same 2B sequences packed into rows of up to `capacity` x the longest one, with
        position_ids restarting per sequence and a segment id per token (padding-free batches).
    make_batch(tok, indices, packing, row_factor) -> Batch   one of the two, by config (train.packing,
        train.packing_row_factor: packed rows hold up to that many times the longest sequence).
    pack_rows(lengths, capacity) -> list[list[int]]   first-fit-decreasing bin packing.
    best_packing(lengths, max_capacity) -> list[list[int]]   the fewest-slots FFD over a few capacities.
    Batch: input_ids, attention_mask (None when packed), labels (-100 outside the completion),
        target_pos / target_ids / target_row (flat positions of the hidden states that predict each
        completion token, and the sequence each belongs to), n_tokens [2B], n_pairs, padding_share,
        real_tokens, slots; packed: position_ids, segment.

Why length grouping and packing: padded tokens are pure waste in the forward. Pairs of similar
length share a batch, and packing fills the gaps that remain (chosen and rejected differ in
length even within a pair); we report the padding share per step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from dpoflow.tasks.training.tokenization import TokenizedPairs


def epoch_batches(lengths: np.ndarray, global_batch: int, *, seed: int, epoch: int, group: bool = True,
                  group_size_mult: int = 16, order: str = "shuffled") -> list[np.ndarray]:
    n = len(lengths)
    if n < global_batch:
        raise ValueError(f"{n} training pairs are fewer than one global batch ({global_batch} = batch_size x "
                         "grad_accum x processes); lower batch_size or grad_accum")
    if order == "sequential":  # the table's row order, every epoch the same (TRL without shuffling)
        return list(np.arange(n - n % global_batch, dtype=np.int64).reshape(-1, global_batch))
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)[: n - n % global_batch]
    if group:
        window = global_batch * group_size_mult
        parts = []
        for s in range(0, len(perm), window):
            chunk = perm[s:s + window]
            parts.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
        perm = np.concatenate(parts)
    batches = perm.reshape(-1, global_batch)
    order = rng.permutation(len(batches)) if group else np.arange(len(batches))
    return [batches[i] for i in order]


def split_batch(indices: np.ndarray, lengths: np.ndarray, n_parts: int) -> list[np.ndarray]:
    if len(indices) % n_parts:
        raise ValueError(f"global batch of {len(indices)} does not split into {n_parts} equal parts")
    srt = indices[np.argsort(-lengths[indices], kind="stable")]
    return list(srt.reshape(n_parts, -1))


@dataclass
class Batch:
    """Padded: one sequence per row. Packed: several sequences per row, told apart by `segment`
    (-1 = padding) and restarting `position_ids`; then `attention_mask` is None."""

    input_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, L] (padded) or None (packed)
    labels: torch.Tensor  # [R, L], -100 where not a completion token
    target_pos: torch.Tensor  # [T] flat index (row * L + col - 1) of the predicting hidden state
    target_ids: torch.Tensor  # [T]
    target_row: torch.Tensor  # [T] sequence 0..2B-1 of each target (chosen 0..B-1, rejected B..2B-1)
    n_tokens: torch.Tensor  # [2B] completion tokens per sequence (float)
    n_pairs: int
    real_tokens: int
    padding_share: float
    position_ids: torch.Tensor | None = None  # [R, L] packed only: position within each sequence
    segment: torch.Tensor | None = None  # [R, L] packed only: sequence index within the row, -1 = pad

    @property
    def slots(self) -> int:
        """Token positions the forward computes (real tokens + padding)."""
        return self.input_ids.numel()

    @property
    def packed(self) -> bool:
        return self.segment is not None

    def to(self, device) -> Batch:
        moved = {f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), torch.Tensor)
                          else v) for f in fields(self)}
        return Batch(**moved)


def make_batch(tok: TokenizedPairs, indices: np.ndarray, packing: bool = False, row_factor: float = 2.0) -> Batch:
    """The micro-batch of these pairs, padded (`collate`) or packed (`collate_packed`, rows up to
    `row_factor` x the longest sequence)."""
    if not packing:
        return collate(tok, indices)
    return collate_packed(tok, indices, capacity=row_factor)


def best_packing(lengths: np.ndarray, max_capacity: int, tries: int = 8) -> list[list[int]]:
    """The first-fit-decreasing packing with the fewest slots (rows x longest row) over a few
    capacities between the longest sequence and `max_capacity`: one fixed capacity often
    leaves a last, nearly empty row, or rows that just miss one more sequence."""
    longest = int(lengths.max())
    best, best_slots = None, None
    for cap in np.unique(np.linspace(longest, max(longest, max_capacity), tries).astype(np.int64)):
        rows = pack_rows(lengths, int(cap))
        slots = len(rows) * max(int(lengths[r].sum()) for r in rows)
        if best_slots is None or slots < best_slots:
            best, best_slots = rows, slots
    return best


def collate(tok: TokenizedPairs, indices: np.ndarray) -> Batch:
    """Right-padded [prompt+chosen ; prompt+rejected] rows with completion-only labels."""
    idx = np.asarray(indices, dtype=np.int64)
    b = len(idx)
    prompts = [tok.prompt[i] for i in idx]
    comps = [tok.chosen[i] for i in idx] + [tok.rejected[i] for i in idx]
    p_len = np.array([len(p) for p in prompts] * 2, np.int64)
    c_len = np.array([len(c) for c in comps], np.int64)
    total = p_len + c_len
    width = int(total.max())
    ids = np.full((2 * b, width), tok.pad_id, np.int64)
    labels = np.full((2 * b, width), -100, np.int64)
    mask = np.arange(width)[None, :] < total[:, None]
    for r in range(2 * b):
        p = prompts[r % b]
        ids[r, : len(p)] = p
        ids[r, len(p): total[r]] = comps[r]
        labels[r, len(p): total[r]] = comps[r]
    rows, cols = np.nonzero(labels != -100)
    if (cols == 0).any():
        raise ValueError("a completion token at position 0 has no prompt token to be predicted from")
    real = int(total.sum())
    return Batch(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
        labels=torch.from_numpy(labels), target_pos=torch.from_numpy(rows * width + cols - 1),
        target_ids=torch.from_numpy(ids[rows, cols]), target_row=torch.from_numpy(rows),
        n_tokens=torch.from_numpy(c_len.astype(np.float64)), n_pairs=b, real_tokens=real,
        padding_share=1.0 - real / float(ids.size),
    )


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's total <= capacity."""
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:  # a micro-batch has 2 x batch_size sequences: a short loop
        n = int(lengths[i])
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(capacity - n)
    return rows


def collate_packed(tok: TokenizedPairs, indices: np.ndarray, capacity: float = 1.0) -> Batch:
    """Padding-free micro-batch: the 2B sequences (prompt+chosen, then prompt+rejected) packed
    into rows of up to `capacity` x the longest sequence (see `best_packing`), `position_ids`
    restarting at 0 for each; the rows are cut to the longest packed row.

    Why: padded rows spend up to a third of the forward on padding. A packed row computes
    the same per-sequence log-probs as long as attention stays inside each sequence (a
    block-diagonal causal mask, built in logprobs.SequenceLogps, or flash-attention's varlen
    path from the position ids on CUDA).
    """
    idx = np.asarray(indices, dtype=np.int64)
    b = len(idx)
    prompts = [tok.prompt[i] for i in idx] * 2
    comps = [tok.chosen[i] for i in idx] + [tok.rejected[i] for i in idx]
    p_len = np.array([len(p) for p in prompts], np.int64)
    c_len = np.array([len(c) for c in comps], np.int64)
    total = p_len + c_len
    if (p_len == 0).any():
        raise ValueError("a completion token at position 0 has no prompt token to be predicted from")
    rows = best_packing(total, int(capacity * total.max()))
    width = max(int(total[m].sum()) for m in rows)
    ids = np.full((len(rows), width), tok.pad_id, np.int64)
    labels = np.full((len(rows), width), -100, np.int64)
    pos = np.zeros((len(rows), width), np.int64)
    seg = np.full((len(rows), width), -1, np.int64)
    seq_of = np.full((len(rows), width), -1, np.int64)
    for r, members in enumerate(rows):
        at = 0
        for k, s in enumerate(members):
            n, pl = int(total[s]), int(p_len[s])
            ids[r, at:at + pl] = prompts[s]
            ids[r, at + pl:at + n] = comps[s]
            labels[r, at + pl:at + n] = comps[s]
            pos[r, at:at + n] = np.arange(n)
            seg[r, at:at + n] = k
            seq_of[r, at:at + n] = s
            at += n
        pos[r, at:] = np.arange(width - at)  # padding tail: its own segment (never attended to by real tokens)
    rr, cc = np.nonzero(labels != -100)
    real = int(total.sum())
    return Batch(
        input_ids=torch.from_numpy(ids), attention_mask=None, labels=torch.from_numpy(labels),
        target_pos=torch.from_numpy(rr * width + cc - 1), target_ids=torch.from_numpy(ids[rr, cc]),
        target_row=torch.from_numpy(seq_of[rr, cc]), n_tokens=torch.from_numpy(c_len.astype(np.float64)),
        n_pairs=b, real_tokens=real, padding_share=1.0 - real / float(ids.size),
        position_ids=torch.from_numpy(pos), segment=torch.from_numpy(seg))
