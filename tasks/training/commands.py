"""The command lines that start training processes: one worker, or torchrun over several.

Kept apart from the launcher (`distributed.py`) so that other launchers (Kubeflow Trainer)
build the same commands without importing it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def worker_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "dpoflow.tasks.training.worker", str(spec_path)]


def torchrun_command(cfg, spec_path: Path, port: int, env=None) -> list[str]:
    """torchrun reads PET_<FLAG> for a flag it is not given: where a launcher set them (Kubeflow
    Trainer's torch-distributed runtime, a batch scheduler) the node layout is theirs, so only
    the flags without a PET_* variable in `env` (default: os.environ) are passed."""
    env = os.environ if env is None else env
    flags = {"nproc_per_node": cfg.devices, "nnodes": cfg.nnodes, "node_rank": cfg.node_rank,
             "master_addr": cfg.master_addr, "master_port": port}
    return [sys.executable, "-m", "torch.distributed.run",
            *(f"--{k}={v}" for k, v in flags.items() if not env.get(f"PET_{k.upper()}")),
            "-m", "dpoflow.tasks.training.worker", str(spec_path)]
