"""Padding-free batches: packed rows give the padded computation's log-probs and losses, with
far less padding; data order for step-by-step comparison with other trainers."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.data import (
    collate,
    collate_packed,
    epoch_batches,
    make_batch,
    pack_rows,
    split_batch,
)
from dpoflow.tasks.training.logprobs import (
    SequenceLogps,
    block_causal_mask,
    compute_ref_logps,
    load_causal_lm,
)
from dpoflow.tasks.training.tokenization import tokenize_pairs
from dpoflow.tasks.training.trainer import train

WORDS = ["the answer", "is clear", "and short", "关于天气", "这是一个", "有帮助的回答", "python lists", "are ordered",
         "binary search", "halves the range", "北京是中国的首都", "drink water"]


def varied_pairs(n: int, seed: int = 0) -> pa.Table:
    """Pairs whose prompt and completion lengths vary a lot (1-12 phrases), English and Chinese."""
    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))

    rows = [{"pair_id": f"p{i:03d}", "prompt": f"Q{i}: " + text(1, 6), "chosen": text(1, 13),
             "rejected": text(1, 13)} for i in range(n)]
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tokenized(tiny):
    return tokenize_pairs(varied_pairs(48), tiny[1], TrainConfig(max_length=96))


def test_pack_rows_is_a_partition_within_capacity():
    lengths = np.array([5, 9, 3, 9, 1, 7, 2, 8])
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(lengths[r].sum() <= 10 for r in rows)
    assert len(rows) == int(np.ceil(lengths.sum() / 10))  # this set packs perfectly: 46 tokens in 5 rows


def test_packed_rows_keep_sequences_apart(tokenized):
    idx = np.arange(8)
    b = collate_packed(tokenized, idx, capacity=2.0)
    assert b.attention_mask is None and b.input_ids.shape[0] < 16
    seg, pos = b.segment.numpy(), b.position_ids.numpy()
    # every sequence's tokens appear once, in order, with positions 0..n-1
    for r in range(seg.shape[0]):
        for k in set(seg[r][seg[r] >= 0].tolist()):
            assert (pos[r][seg[r] == k] == np.arange((seg[r] == k).sum())).all()
    assert b.real_tokens == int((seg >= 0).sum())
    mask = block_causal_mask(b.segment)[:, 0]
    r, q = np.argwhere(seg >= 0)[5]
    allowed = mask[r, q].numpy()
    assert (allowed == ((seg[r] == seg[r, q]) & (np.arange(seg.shape[1]) <= q))).all()


@pytest.mark.parametrize("varlen", [False, True], ids=["block-mask", "position-ids-only"])
def test_packed_log_probs_equal_padded(tiny, tokenized, varlen):
    """Per-sequence log-probs of packed rows equal the padded computation to 1e-5; varlen=True
    feeds the decoder exactly what the flash-attention varlen path gets on CUDA (position_ids,
    no mask), so this CPU test is the twin of that path."""
    # float64: a summed log-prob near -260 has an fp32 spacing of 3e-5, so 1e-5 is only
    # meaningful above fp32; in fp32 the two agree to its rounding (rtol 1e-6).
    model = copy.deepcopy(tiny[0]).double()
    for m, tol in ((model, dict(atol=1e-5, rtol=0)), (tiny[0], dict(atol=1e-4, rtol=1e-6))):
        seq = SequenceLogps(m, chunk=64, varlen=varlen)
        for idx in (np.arange(8), np.arange(8, 24), np.array([3, 40, 17])):
            with torch.no_grad():
                padded = seq(collate(tokenized, idx))
                for factor in (1.0, 2.0, 4.0):
                    packed = seq(make_batch(tokenized, idx, packing=True, row_factor=factor))
                    torch.testing.assert_close(packed.double(), padded.double(), **tol)


def test_packed_gradients_equal_padded(tiny, tokenized):
    model, _ = tiny
    seq = SequenceLogps(model, chunk=64)
    idx = np.arange(6)
    grads = []
    for batch in (collate(tokenized, idx), make_batch(tokenized, idx, packing=True)):
        model.zero_grad()
        (seq(batch) * torch.linspace(-1, 1, 12)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_packing_cuts_padding_to_ten_percent(tokenized):
    """Length-grouped micro-batches as the trainer builds them: padded rows still waste a lot
    (chosen and rejected differ in length within a pair); packed rows waste <= 10%."""
    lengths = tokenized.seq_lengths
    padded = packed = slots_p = slots_k = 0
    for gidx in epoch_batches(lengths, 16, seed=0, epoch=0):
        for idx in split_batch(gidx, lengths, 2):
            a, b = collate(tokenized, idx), make_batch(tokenized, idx, packing=True, row_factor=2.0)
            assert a.real_tokens == b.real_tokens
            padded += a.slots - a.real_tokens
            slots_p += a.slots
            packed += b.slots - b.real_tokens
            slots_k += b.slots
    assert packed / slots_k <= 0.10 < padded / slots_p


def test_reference_log_probs_packed_equal_padded(tiny, tokenized):
    model, _ = tiny
    a = compute_ref_logps(model, tokenized, 8, chunk=64, packing=False)
    b = compute_ref_logps(model, tokenized, 8, chunk=64, packing=True)
    np.testing.assert_allclose(b.chosen_logp, a.chosen_logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.rejected_logp, a.rejected_logp, atol=1e-5, rtol=0)


def test_training_with_packing_tracks_padded_training(tiny_model_dir, tmp_path):
    table = varied_pairs(24)
    base = dict(lr=1e-3, max_steps=3, warmup_steps=0, batch_size=4, grad_accum=2, checkpoint_every=0,
                max_length=96, logit_chunk=64)
    a = train(TrainConfig(packing=False, **base), table, tiny_model_dir, tmp_path / "padded")
    b = train(TrainConfig(packing=True, **base), table, tiny_model_dir, tmp_path / "packed")
    for x, y in zip(a.metrics, b.metrics, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], abs=1e-4)
        assert y["padding_share"] < x["padding_share"]
    assert b.summary["padding_share"] <= 0.10


def test_sequential_data_order_walks_the_table():
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])
    batches = epoch_batches(lengths, 3, seed=7, epoch=2, order="sequential")
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    shuffled = epoch_batches(lengths, 3, seed=7, epoch=2)
    assert [b.tolist() for b in shuffled] != [b.tolist() for b in batches]
