"""Batching: length-grouped, deterministic global batches and the padded chosen+rejected tensors.

Public API (stable):

    epoch_batches(lengths, global_batch, *, seed, epoch, group=True, group_size_mult=16)
        -> list[np.ndarray]   the optimizer steps of one epoch, each an array of pair indices.
        Deterministic in (seed, epoch), so a resumed run replays the same order; the random tail
        of fewer than `global_batch` pairs is left out of this epoch (it is in the next one's draw).
    split_batch(indices, lengths, n_parts) -> list[np.ndarray]
        a global batch cut into n_parts (= processes x accumulation) contiguous, length-sorted parts.
    collate(tok: TokenizedPairs, indices) -> Batch
        rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.
    Batch: input_ids, attention_mask, labels (-100 outside the completion), target_pos / target_ids /
        target_row (flat positions of the hidden states that predict each completion token),
        n_tokens [2B], n_pairs, padding_share, real_tokens.

Why length grouping: pairs of similar length share a batch, so padded tokens (pure waste in
the forward) stay a small share; we report that share per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpoflow.tasks.training.tokenization import TokenizedPairs


def epoch_batches(lengths: np.ndarray, global_batch: int, *, seed: int, epoch: int, group: bool = True,
                  group_size_mult: int = 16) -> list[np.ndarray]:
    n = len(lengths)
    if n < global_batch:
        raise ValueError(f"{n} training pairs are fewer than one global batch ({global_batch} = batch_size x "
                         "grad_accum x processes); lower batch_size or grad_accum")
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
    input_ids: torch.Tensor  # [2B, L]
    attention_mask: torch.Tensor  # [2B, L]
    labels: torch.Tensor  # [2B, L], -100 where not a completion token
    target_pos: torch.Tensor  # [T] flat index (row * L + col - 1) of the predicting hidden state
    target_ids: torch.Tensor  # [T]
    target_row: torch.Tensor  # [T] row 0..2B-1 of each target
    n_tokens: torch.Tensor  # [2B] completion tokens per row (float)
    n_pairs: int
    real_tokens: int
    padding_share: float

    def to(self, device) -> Batch:
        mv = {k: getattr(self, k).to(device, non_blocking=True)
              for k in ("input_ids", "attention_mask", "labels", "target_pos", "target_ids", "target_row",
                        "n_tokens")}
        return Batch(**mv, n_pairs=self.n_pairs, real_tokens=self.real_tokens, padding_share=self.padding_share)


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
