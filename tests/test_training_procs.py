"""Real processes: resume after SIGKILL equals an uninterrupted run; 2-process gloo equals 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.distributed import launch
from dpoflow.tasks.training.trainer import train
from tests.builders import pairs_table

RUNNER = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO)
import pyarrow.parquet as pq
from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.distributed import launch
from dpoflow.tasks.training.trainer import train
torch.set_num_threads(1)
cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
train(cfg, pq.read_table(sys.argv[2]), sys.argv[3], sys.argv[4])
"""


def _run(cfg: TrainConfig, data, model_dir, run_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, cfg.model_dump_json(), str(data), str(model_dir),
                             str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pairs_table(24), data)
    cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=30, checkpoint_every=3, warmup_steps=2, seed=7)

    full = _run(cfg, data, tiny_model_dir, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-2000:]

    killed = _run(cfg, data, tiny_model_dir, tmp_path / "killed")
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("step-*/meta.json")) and time.monotonic() < deadline:
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()
    done = [json.loads(p.read_text())["step"] for p in ckpts.glob("step-*/meta.json")]
    assert max(done) < cfg.max_steps

    resumed = _run(cfg, data, tiny_model_dir, tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert b"resumed from" in resumed.stderr.read()

    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    full_loss = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final"]["loss"] == pytest.approx(full_loss[-1], rel=1e-6)


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tiny_model_dir, tmp_path):
    table = pairs_table(16)
    base = dict(lr=1e-3, max_steps=3, warmup_steps=0, checkpoint_every=2, rpo_alpha=0.2, launch_timeout_s=300,
                packing=False)  # padded rows: the same float sums however pairs are split
    one = train(TrainConfig(batch_size=4, devices=1, **base), table, tiny_model_dir, tmp_path / "one")
    two = launch(TrainConfig(batch_size=2, devices=2, **base), table, tiny_model_dir, tmp_path / "two")
    assert (tmp_path / "two" / "launch" / "torchrun.log").exists()
    assert len(two.metrics) == 3
    for m1, m2 in zip(one.metrics, two.metrics, strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4)
        assert m1["rewards/margins"] == pytest.approx(m2["rewards/margins"], rel=1e-3, abs=1e-6)
    a = load_file(str(one.output_dir / "model.safetensors"))
    b = load_file(str(two.output_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((a[k] - w0[k]).abs().max()) for k in a) > 1e-4


def test_worker_watchdog_starts_before_torch_is_imported():
    """A launcher killed while its worker is still importing torch leaves no worker behind: the
    worker module imports only the standard library, and main() starts the watchdog first."""
    import ast
    from pathlib import Path

    from dpoflow.tasks.training import worker

    tree = ast.parse(Path(worker.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in top for a in n.names}
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    first = main.body[0]
    assert isinstance(first, ast.Expr) and first.value.func.id == "watch_launcher"

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    env = {**os.environ, worker.PARENT_ENV: str(launcher.pid)}
    proc = subprocess.Popen([sys.executable, "-m", "dpoflow.tasks.training.worker", "/nonexistent/spec.json"],
                            env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert proc.wait(timeout=60) == -signal.SIGKILL  # stopped by its watchdog, not by the missing spec
