"""Training core on the real tiny model: tokens, masking, log-probs, accumulation, learning, NaN."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from dpoflow.storage.schemas import conform
from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.data import collate, epoch_batches, split_batch
from dpoflow.tasks.training.logprobs import (
    SequenceLogps,
    align_ref_logps,
    compute_ref_logps,
    load_causal_lm,
    ref_logps_table,
)
from dpoflow.tasks.training.tokenization import tokenize_pairs
from dpoflow.tasks.training.trainer import TrainingError, train
from tests.builders import pairs_table


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def test_token_boundary_and_masking(tiny):
    _, tok = tiny
    table = pa.table({"pair_id": ["a", "b"], "prompt": ["Say hello", "你好"],
                      "chosen": ["hello world", "你好！"], "rejected": ["bye", "再见"]})
    tp = tokenize_pairs(table, tok, TrainConfig())
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "Say hello"}], add_generation_prompt=True,
                                          tokenize=False)
    assert tp.prompt[0].tolist() == tok(prompt_text, add_special_tokens=False)["input_ids"]
    # the completion is tokenized on its own, EOS appended: no merge across the boundary
    assert tp.chosen[0].tolist() == tok("hello world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(tp.rejected[1]) == "再见<|end|>"
    b = collate(tp, np.array([0, 1]))
    assert b.input_ids.shape[0] == 4  # chosen rows then rejected rows
    for r, (p, c) in enumerate([(tp.prompt[0], tp.chosen[0]), (tp.prompt[1], tp.chosen[1]),
                                (tp.prompt[0], tp.rejected[0]), (tp.prompt[1], tp.rejected[1])]):
        lab, ids, mask = b.labels[r].tolist(), b.input_ids[r].tolist(), b.attention_mask[r].tolist()
        n = len(p) + len(c)
        assert ids[:n] == p.tolist() + c.tolist()
        assert lab[:len(p)] == [-100] * len(p)  # prompt never labelled
        assert lab[len(p):n] == c.tolist()  # completion (with EOS) labelled
        assert lab[n:] == [-100] * (len(lab) - n) and mask[n:] == [0] * (len(lab) - n)  # padding
        assert mask[:n] == [1] * n
    assert b.n_tokens.tolist() == [len(tp.chosen[0]), len(tp.chosen[1]), len(tp.rejected[0]), len(tp.rejected[1])]
    assert 0 < b.padding_share < 1


def test_chat_messages_and_truncation(tiny):
    _, tok = tiny
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "long " * 40 + "END"}]
    table = pa.table({"pair_id": ["a", "b", "c"], "prompt": ["x", "short", "same"],
                      "prompt_messages": pa.array([msgs, None, None], pa.list_(pa.struct(
                          [("role", pa.string()), ("content", pa.string())]))),
                      "chosen": ["fine answer " * 30, "ok", "identical"],
                      "rejected": ["bad", "no", "identical"]})
    cfg = TrainConfig(max_length=48, max_prompt_length=20)
    tp = tokenize_pairs(table, tok, cfg)
    assert tp.stats.dropped == {"identical_completions": 1}
    assert tp.stats.n_prompt_truncated == 1 and tp.stats.n_completion_truncated == 1
    assert list(tp.pair_ids) == ["a", "b"]
    assert len(tp.prompt[0]) == 20
    assert tok.decode(tp.prompt[0]).endswith("END<|end|>\n<|assistant|>\n")  # left cut keeps the last turn
    assert len(tp.prompt[0]) + len(tp.chosen[0]) == 48 and tp.chosen[0][-1] != tok.eos_token_id
    assert tp.rejected[0][-1] == tok.eos_token_id
    right = tokenize_pairs(table, tok, cfg.model_copy(update={"truncation_side": "right"}))
    assert tok.decode(right.prompt[0]).startswith("<|system|>\nbe brief")
    with pytest.raises(ValueError, match="prompt_messages"):
        tokenize_pairs(table, tok, cfg.model_copy(update={"chat_template": "never"}))


def test_chunked_logps_equal_full_logits(tiny):
    model, tok = tiny
    tp = tokenize_pairs(pairs_table(6), tok, TrainConfig())
    b = collate(tp, np.arange(6))
    model.zero_grad()
    lp = SequenceLogps(model, chunk=7)(b)
    lp.sum().backward()
    g_chunk = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    lab = b.labels[:, 1:]
    full = (logits.log_softmax(-1).gather(2, lab.clamp(min=0)[..., None]).squeeze(-1) * (lab != -100)).sum(1)
    full.sum().backward()
    torch.testing.assert_close(lp, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_chunk, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-5)
    model.zero_grad()


def test_ref_logps_table_and_alignment(tiny):
    model, tok = tiny
    tp = tokenize_pairs(pairs_table(10), tok, TrainConfig())
    ref = compute_ref_logps(model, tp, batch_size=3)
    with torch.inference_mode():
        direct = SequenceLogps(model)(collate(tp, np.arange(10))).double().numpy()
    np.testing.assert_allclose(ref.chosen_logp, direct[:10], rtol=1e-5)
    np.testing.assert_allclose(ref.rejected_logp, direct[10:], rtol=1e-5)
    table = conform("ref_logps", ref_logps_table(tp, ref, "tiny@1"))
    shuffled = table.take(np.random.default_rng(0).permutation(10))
    c, r = align_ref_logps(tp, shuffled)
    np.testing.assert_array_equal(c, ref.chosen_logp)
    with pytest.raises(ValueError, match="lacks 1 of 10"):
        align_ref_logps(tp, table.slice(1))
    other = tokenize_pairs(pairs_table(10), tok, TrainConfig(max_length=12, max_prompt_length=8))
    with pytest.raises(ValueError, match="token counts differ"):
        align_ref_logps(other, table)


def test_length_grouped_batches_are_deterministic_and_cover():
    lengths = np.random.default_rng(1).integers(5, 200, 103)
    a = epoch_batches(lengths, 8, seed=3, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(lengths, 8, seed=3, epoch=0)]
    assert len(a) == 12 and len(np.unique(np.concatenate(a))) == 96
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(lengths, 8, seed=3, epoch=1)]
    spread_grouped = np.mean([np.ptp(lengths[b]) for b in a])
    spread_random = np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths, 8, seed=3, epoch=0, group=False)])
    assert spread_grouped < spread_random / 3
    parts = split_batch(a[0], lengths, 4)
    assert sorted(np.concatenate(parts).tolist()) == sorted(a[0].tolist())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_batches(lengths[:5], 8, seed=0, epoch=0)


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.output_dir / "model.safetensors"))


def test_accumulation_invariance(tiny_model_dir, tmp_path):
    table = pairs_table(16)
    base = dict(lr=1e-3, max_steps=2, warmup_steps=0, checkpoint_every=0, rpo_alpha=0.3, max_grad_norm=None)
    a = train(TrainConfig(batch_size=8, grad_accum=1, **base), table, tiny_model_dir, tmp_path / "a")
    b = train(TrainConfig(batch_size=1, grad_accum=8, **base), table, tiny_model_dir, tmp_path / "b")
    for k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
        assert a.metrics[0][k] == pytest.approx(b.metrics[0][k], rel=1e-4, abs=1e-6), k
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert 0 <= b.metrics[0]["padding_share"] < 1 and 0 <= a.metrics[0]["padding_share"] < 1
    # the update really moved the weights (the comparison is not vacuous)
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((wa[k] - w0[k]).abs().max()) for k in wa) > 1e-4


def test_dpo_learns_separable_preferences(tiny_model_dir, tmp_path):
    table = pairs_table(32)
    model, tok = load_causal_lm(tiny_model_dir)
    tp = tokenize_pairs(table, tok, TrainConfig())
    ref = compute_ref_logps(model, tp, batch_size=16)
    ref_table = ref_logps_table(tp, ref, "tiny")
    cfg = TrainConfig(lr=1e-3, batch_size=8, max_steps=24, beta=0.1, warmup_steps=2, checkpoint_every=0)
    res = train(cfg, table, tiny_model_dir, tmp_path / "run", ref_logps=ref_table,
                ref_model_path=tmp_path / "never-loaded")  # stored ref logps: the ref model is not read
    trained, _ = load_causal_lm(res.output_dir)
    after = compute_ref_logps(trained, tp, batch_size=16)
    acc = np.mean((after.chosen_logp - ref.chosen_logp) > (after.rejected_logp - ref.rejected_logp))
    assert acc > 0.9
    assert res.metrics[0]["rewards/accuracies"] < 0.9  # it was learned, not there from the start
    assert res.metrics[-1]["loss"] < res.metrics[0]["loss"]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "tokens_per_s", "padding_share", "skipped"}
    assert keys <= set(res.metrics[-1])
    assert res.summary["steps"] == 24 and (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 24
    from dpoflow.tasks.training.distributed import training_progress  # the progress artifact's reading

    assert res.metrics[5]["total_steps"] == 24 and training_progress(tmp_path / "run" / "metrics.jsonl") == 1.0


def test_non_finite_steps_are_skipped_then_abort(tiny_model_dir, tmp_path):
    model, tok = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    bad = tmp_path / "nan_model"
    model.save_pretrained(bad)
    tok.save_pretrained(bad)
    table = pairs_table(16)
    ref = ref_logps_table(tokenize_pairs(table, tok, TrainConfig()),
                          compute_ref_logps(load_causal_lm(tiny_model_dir)[0],
                                            tokenize_pairs(table, tok, TrainConfig()), 16), "tiny")
    with pytest.raises(TrainingError, match="non-finite"):
        train(TrainConfig(batch_size=4, max_steps=10, max_nan_steps=2, checkpoint_every=0), table, bad,
              tmp_path / "run", ref_logps=ref)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # two skipped steps recorded before the third aborted


def test_lora_and_simpo_reference_free(tiny_model_dir, tmp_path):
    cfg = TrainConfig(loss="simpo", beta=2.0, simpo_gamma=0.5, lora=True, lora_r=4, lr=1e-2, batch_size=4,
                      max_steps=3, checkpoint_every=0, gradient_checkpointing=True)
    res = train(cfg, pairs_table(8), tiny_model_dir, tmp_path / "run", ref_model_path=tmp_path / "none")
    merged, _ = load_causal_lm(res.output_dir)
    base, _ = load_causal_lm(tiny_model_dir)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(merged.parameters(), base.parameters(), strict=True))
    assert diff > 0  # adapters trained and merged into a plain transformers model
    assert all(np.isfinite(m["loss"]) for m in res.metrics)
