"""Slow: two "nodes" on loopback. Two torchrun agents (node ranks 0 and 1, one gloo process each)
meet through the PET_* variables a launcher such as Kubeflow Trainer sets (no node flags on the
command line) and train to the same weights as one node running two processes with the same
global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.distributed import torchrun_command
from tests.builders import pairs_table

BASE = dict(loss="simpo", lr=1e-3, max_steps=3, warmup_steps=0, checkpoint_every=0, batch_size=2, packing=False,
            seed=3)  # reference-free: both layouts train from the same inputs alone


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(run_dir: Path, cfg: TrainConfig, data: Path, model: Path) -> Path:
    work = run_dir / "launch"
    work.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "model_path": str(model),
                                "run_dir": str(run_dir), "train": str(data), "resume": False, "ref_logps": None}))
    return spec


def _node(cfg: TrainConfig, spec: Path, pet: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = torchrun_command(cfg, spec, 1, env=pet)
    assert not any(a.startswith(("--nnodes", "--node_rank", "--master", "--nproc")) for a in cmd)
    env = {**os.environ, **pet, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _layout(nnodes: int, nproc: int, rank: int, port: int) -> dict[str, str]:
    return {"PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        for p, log in zip(procs, logs, strict=True):
            assert p.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    res = json.loads((run_dir / "launch" / "result.json").read_text())
    return load_file(str(Path(res["output_dir"]) / "model.safetensors"))


@pytest.mark.slow
def test_two_nodes_on_loopback_train_like_one_node(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pairs_table(16), data)

    one = TrainConfig(devices=2, nnodes=1, **BASE)
    spec = _spec(tmp_path / "one", one, data, tiny_model_dir)
    _finish([_node(one, spec, _layout(1, 2, 0, _port()), tmp_path / "one.log")], [tmp_path / "one.log"])

    two = TrainConfig(devices=1, nnodes=2, **BASE)
    spec = _spec(tmp_path / "two", two, data, tiny_model_dir)  # one run folder: the shared volume
    port = _port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    _finish([_node(two, spec, _layout(2, 1, r, port), logs[r]) for r in (0, 1)], logs)

    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((a[k] - w0[k]).abs().max()) for k in a) > 1e-4  # it did train
