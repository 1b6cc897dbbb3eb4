"""Checkpoints that a SIGKILL cannot corrupt, and that load without unpickling code.

Public API (stable):

    save_checkpoint(run_dir, step, model_state, optim_state, trainer_state, meta, keep=2) -> Path
    latest_checkpoint(run_dir) -> Path | None
    load_checkpoint(path) -> (model_state, optim_state, trainer_state, meta)

Layout of ``<run_dir>/checkpoints/step-00000010/``: ``model.safetensors`` (trainable weights),
``optimizer.pt`` and ``trainer_state.pt`` (tensors and plain containers only, read back with
``torch.load(weights_only=True)``: scheduler, RNG states, loss state), ``meta.json`` (step, data
position, metrics so far, fingerprint). A checkpoint is written to a temporary folder and
renamed into place, so a run killed mid-write leaves the previous checkpoint as the latest.

With strategy=fsdp the trainer gathers full (unsharded) weights and the full optimizer state
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``) to
rank 0 before calling ``save_checkpoint``, so the files have the same layout as a single-process
run (optimizer state keyed by parameter name instead of index); on resume every rank reads the
full tensors and keeps its own shard (``set_model_state_dict`` / ``set_optimizer_state_dict``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "step-"


def _ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    root = _ckpt_root(Path(run_dir))
    if not root.exists():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "meta.json").exists())
    return done[-1] if done else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict, trainer_state: dict, meta: dict, keep: int = 2) -> Path:
    root = _ckpt_root(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict, dict, dict, dict]:
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors"))
    optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    meta = json.loads((path / "meta.json").read_text())
    return model_state, optim_state, trainer_state, meta
