"""Training in a child process group that we own and can always stop: one worker process for one
device, `torchrun` for several.

Public API (stable):

    launch(cfg, train_table, model_path, run_dir, *, ref_logps=None, ref_model_path=None,
           resume=True, stop=None, logger=None, on_progress=None) -> TrainResult
        Called by the train stage, and by trainer.train when cfg.devices x cfg.nnodes > 1. The
        inputs are written to ``run_dir/launch/``. One process (world size 1): ``python -m
        dpoflow.tasks.training.worker spec.json`` in its own session, no torchrun agent; missing
        reference log-probs are computed by that process with the policy it has loaded anyway.
        Several: ``python -m torch.distributed.run ... -m dpoflow.tasks.training.worker
        spec.json``; reference log-probs are computed here first when needed and not given (so
        each worker holds only the policy). cfg.strategy picks DDP (a model
        copy per process) or FSDP (FSDP2 ``fully_shard`` of each transformer block, then the root:
        each process holds 1/N of the weights, gradients and optimizer state; bf16 compute with
        fp32 reduction on CUDA, fp32 on CPU). NCCL on CUDA, gloo on CPU; both strategies run on
        CPU for tests. With FSDP, checkpoints and the final model are gathered to full tensors on
        rank 0 (same files as a single-process run), so resume works across both.
    torchrun_command(cfg, spec_path, port) -> list[str]
    worker_command(spec_path) -> list[str]
    child_device() -> "cuda" | "cpu"   what the training process will use, without importing torch.

A failed worker leaves ``error-<rank>.json`` with its exception's first line; the TrainingError
raised here starts with that line (not with torchrun's ChildFailedError), the log path after it.

The child gets a hard wall-clock limit (cfg.launch_timeout_s); on timeout, on `stop` being
set, or on any exception here (KeyboardInterrupt, Prefect cancellation) the whole process
group is terminated, then killed, so no orphan workers keep a GPU. Rank 0 writes the final
model and ``launch/result.json``; checkpoints let a rerun resume.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpoflow.tasks.processes import terminate
from dpoflow.tasks.training.commands import torchrun_command, worker_command
from dpoflow.tasks.training.results import TrainingCancelled, TrainingError, TrainResult
from dpoflow.tasks.training.worker import RESULT

log = logging.getLogger("dpoflow.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_device() -> str:
    """"cuda" when the training process will see a GPU, else "cpu", without importing torch here.

    Why: the launching (flow) process only needs to know whether to take a GPU slot; importing
    torch for `torch.cuda.is_available()` cost it seconds and ~180 MB of RSS for a process that
    never computes. Without torch loaded, a GPU counts as visible when NVIDIA device nodes (or
    WSL's /dev/dxg) exist and CUDA_VISIBLE_DEVICES does not hide them all; a CPU-only torch
    build on a GPU machine then takes a slot it did not need, which is harmless.
    """
    if "torch" in sys.modules:
        return "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return "cpu"
    return "cuda" if any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/dxg")) else "cpu"


PROGRESS_EVERY_S = 5.0  # how often the launcher reads rank 0's metrics for `on_progress`


def training_progress(metrics_path: Path) -> float | None:
    """Share of optimizer steps done, from the last row rank 0 appended to metrics.jsonl (a row
    has `step` and the trainer's `total_steps`)."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None  # not written yet, or a row half written
    if not row or not row.get("step") or not row.get("total_steps"):
        return None
    return min(1.0, row["step"] / row["total_steps"])


def launch(cfg, train_table: pa.Table, model_path, run_dir, *, ref_logps: pa.Table | None = None,
           ref_model_path=None, resume: bool = True, stop: threading.Event | None = None,
           logger: logging.Logger | None = None, on_progress: Callable[[float], None] | None = None):
    t_start = time.perf_counter()
    logger = logger or log
    run_dir = Path(run_dir)
    work = run_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    grouped = cfg.world_size > 1
    if ref_logps is None and cfg.needs_reference and (grouped or ref_model_path is not None):
        ref_logps = _reference(cfg, train_table, ref_model_path or model_path)
    pq.write_table(train_table, work / "train.parquet")
    if ref_logps is not None:
        pq.write_table(ref_logps, work / "ref_logps.parquet")
    for old in [work / RESULT, *work.glob("error-*.json")]:
        old.unlink(missing_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "model_path": str(model_path), "run_dir": str(run_dir),
            "train": str(work / "train.parquet"), "resume": resume,
            "ref_logps": str(work / "ref_logps.parquet") if ref_logps is not None else None}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    if getattr(cfg, "launcher", "local") == "kubeflow":  # torchrun on the nodes of a Kubeflow TrainJob
        from dpoflow.tasks.training.kubeflow import launched_result, run_trainjob

        run_trainjob(cfg, spec_path, run_dir, model_path=model_path, logger=logger, stop=stop)
        return launched_result(work / RESULT, run_dir, t_start, on_progress)
    cmd = torchrun_command(cfg, spec_path, cfg.master_port or _free_port()) if grouped else worker_command(spec_path)
    logger.info("launching %s", " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, cfg.devices))))
    env["DPOFLOW_LAUNCHER_PID"] = str(os.getpid())  # workers stop if this process dies
    log_path = work / ("torchrun.log" if grouped else "worker.log")
    deadline = time.monotonic() + cfg.launch_timeout_s
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        last_check, reported = time.monotonic(), None
        try:
            while proc.poll() is None:
                if on_progress is not None and time.monotonic() - last_check > PROGRESS_EVERY_S:
                    last_check = time.monotonic()
                    done = training_progress(run_dir / "metrics.jsonl")
                    if done is not None and done != reported:
                        on_progress(reported := done)
                if stop is not None and stop.is_set():
                    terminate(proc)
                    raise TrainingCancelled("training cancelled; rerun to resume from the last checkpoint")
                if time.monotonic() > deadline:
                    terminate(proc)
                    raise TrainingError(f"training exceeded launch_timeout_s={cfg.launch_timeout_s}; killed")
                time.sleep(0.2)
        except BaseException:
            terminate(proc)
            raise
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        logger.error("training process failed (exit code %d); last lines of %s:\n%s", proc.returncode, log_path, tail)
        raise TrainingError(_failure(work, log_path, proc.returncode))
    if on_progress is not None:
        on_progress(1.0)
    res = json.loads((work / RESULT).read_text())
    summary = res["summary"]
    summary.setdefault("phases", {})["launch_total"] = round(time.perf_counter() - t_start, 3)
    return TrainResult(output_dir=Path(res["output_dir"]), run_dir=run_dir, metrics=res["metrics"],
                       summary=summary, tokenize_stats=res["tokenize_stats"])


def _failure(work: Path, log_path: Path, code: int) -> str:
    """One line: the worker's own cause (from error-<rank>.json), the exit code and the log."""
    causes = []
    for f in sorted(work.glob("error-*.json")):
        try:
            e = json.loads(f.read_text())
            causes.append(e["message"] if e["type"] == "TrainingError" else f"{e['type']}: {e['message']}")
        except (OSError, ValueError, KeyError):
            continue
    head = causes[0] if causes else "the training process failed"
    return f"{head} (exit code {code}; log {log_path})"


def _reference(cfg, train_table: pa.Table, ref_path) -> pa.Table:
    """Reference log-probs in this process, so each worker holds only the policy."""
    import torch

    from dpoflow.tasks.generation import pick_device
    from dpoflow.tasks.training.logprobs import compute_ref_logps, load_causal_lm, ref_logps_table
    from dpoflow.tasks.training.tokenization import tokenize_pairs

    device = pick_device()
    model, tok = load_causal_lm(ref_path, device=device)
    pairs = tokenize_pairs(train_table, tok, cfg)
    ref = compute_ref_logps(model, pairs, cfg.eval_batch_size, device, cfg.logit_chunk, cfg.precision)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return ref_logps_table(pairs, ref, str(ref_path))
