"""FSDP (FSDP2 fully_shard) on CPU with two gloo processes: same result as one process, and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpoflow.tasks.training.checkpoint import load_checkpoint
from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.distributed import launch
from dpoflow.tasks.training.trainer import train
from tests.builders import pairs_table

BASE = dict(lr=1e-3, max_steps=3, warmup_steps=0, checkpoint_every=2, rpo_alpha=0.2, launch_timeout_s=300,
            packing=False)  # padded rows: the same float sums however pairs are split


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


@pytest.mark.slow
def test_fsdp_two_process_gloo_equals_one_process_and_resumes(tiny_model_dir, tmp_path):
    table = pairs_table(16)
    one = train(TrainConfig(batch_size=4, devices=1, **BASE), table, tiny_model_dir, tmp_path / "one")
    # same global batch (4 pairs), split over 2 sharded processes x 2 accumulated micro-batches
    fcfg = TrainConfig(batch_size=1, grad_accum=2, devices=2, strategy="fsdp", **BASE)
    two = launch(fcfg, table, tiny_model_dir, tmp_path / "two")
    assert len(two.metrics) == 3
    assert "fsdp: sharded 2 LlamaDecoderLayer blocks and the root over 2 cpu processes" in (
        tmp_path / "two" / "launch" / "torchrun.log").read_text()
    for m1, m2 in zip(one.metrics, two.metrics, strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4)
        assert m1["rewards/margins"] == pytest.approx(m2["rewards/margins"], rel=1e-3, abs=1e-6)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    a, b = _weights(one.output_dir), _weights(two.output_dir)
    _assert_close(a, b)
    w0 = _weights(tiny_model_dir)
    assert max(float((a[k] - w0[k]).abs().max()) for k in a) > 1e-4  # training moved the weights
    # the final model is a plain save_pretrained folder, loadable without torch.distributed
    assert (two.output_dir / "config.json").exists() and (two.output_dir / "tokenizer.json").exists()

    # checkpoints hold full (gathered) tensors in the single-process layout, optimizer state included
    m1, o1, _, meta1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "step-00000002")
    m2, o2, _, meta2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "step-00000002")
    assert meta2["step"] == 2
    _assert_close(m1, m2)
    exp_avg_sq = [s["exp_avg_sq"] for s in o2["state"].values()]
    assert len(exp_avg_sq) == len(m2)
    assert sorted(t.numel() for t in exp_avg_sq) == sorted(t.numel() for t in m2.values())  # unsharded

    # resume: a run folder holding only the step-2 checkpoint finishes with the same weights
    res_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-00000002",
                    res_dir / "checkpoints" / "step-00000002")
    resumed = launch(fcfg, table, tiny_model_dir, res_dir)
    assert "resumed from" in (res_dir / "launch" / "torchrun.log").read_text()
    new_rows = [json.loads(line) for line in (res_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new_rows] == [3]  # only the step after the checkpoint was run
    assert new_rows[0]["loss"] == pytest.approx(two.metrics[-1]["loss"], rel=1e-6)
    _assert_close(_weights(resumed.output_dir), b, atol=1e-7)
