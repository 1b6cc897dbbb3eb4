"""The torchrun worker: ``python -m torch.distributed.run ... -m tasks.training.worker spec.json``.

Joins the process group (NCCL on CUDA, gloo on CPU) with the configured timeout, runs
trainer.train on this rank, and on rank 0 writes ``result.json`` next to the spec.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "DPOFLOW_LAUNCHER_PID"


def watch_launcher(interval_s: float = 1.0) -> None:
    """End the whole training process group when the launching process is gone.

    torchrun runs in its own session (so a hard timeout can kill it as a group); the flow
    process that launched it may itself be killed (SIGKILL, or a cancelled Prefect flow run).
    Each worker then takes the group down instead of training on, orphaned, on the GPU.
    """
    pid = int(os.environ.get(PARENT_ENV, "0") or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logging.getLogger("dpoflow.train").error("launcher %d is gone: stopping the training group", pid)
                os.killpg(os.getpgid(0), signal.SIGKILL)
            except PermissionError:
                pass
            time.sleep(interval_s)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def main(spec_path: str) -> int:
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from dpoflow.tasks.training.config import TrainConfig
    from dpoflow.tasks.training.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(rank)s %(message)s")
    watch_launcher()
    spec = json.loads(Path(spec_path).read_text())
    cfg = TrainConfig.model_validate(spec["config"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    rank = dist.get_rank()
    old = logging.getLogRecordFactory()

    def factory(*a, **k):
        rec = old(*a, **k)
        rec.rank = rank
        return rec

    logging.setLogRecordFactory(factory)
    try:
        ref = pq.read_table(spec["ref_logps"]) if spec.get("ref_logps") else None
        res = train(cfg, pq.read_table(spec["train"]), spec["model_path"], spec["run_dir"], ref_logps=ref,
                    resume=spec.get("resume", True))
        if rank == 0:
            out = {"output_dir": str(res.output_dir), "metrics": res.metrics, "summary": res.summary,
                   "tokenize_stats": res.tokenize_stats}
            tmp = Path(spec_path).with_name("result.json.tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(Path(spec_path).with_name("result.json"))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
