"""The training process: ``python -m dpoflow.tasks.training.worker spec.json``, run directly for
one device (no torchrun agent) or by torchrun, one per rank, for several.

Joins the process group when torchrun started it (NCCL on CUDA, gloo on CPU) with the
configured timeout, runs trainer.train on this rank, and on rank 0 writes ``result.json`` next
to the spec. A failure writes ``error-<rank>.json`` (the exception's one-line message), so the
launcher reports the cause instead of torchrun's ``ChildFailedError``.

Only the standard library is imported at module level: the parent-death watchdog is running
before torch and transformers are imported (seconds), so a launcher killed during start-up
leaves no worker behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "DPOFLOW_LAUNCHER_PID"  # the launcher's pid, watched by the watchdog
RESULT = "result.json"  # what rank 0 writes in the work folder when training ends


def error_file(work: Path, rank: int) -> Path:
    return work / f"error-{rank}.json"


def watch_launcher(interval_s: float = 0.5) -> None:
    """End the whole training process group when the launching process is gone.

    The training process runs in its own session (so a hard timeout can kill it as a group);
    the flow process that launched it may itself be killed (SIGKILL, or a cancelled Prefect
    flow run). Each worker then takes the group down instead of training on, orphaned, on the GPU.
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


def _rank_logging(rank: int) -> None:
    old = logging.getLogRecordFactory()

    def factory(*a, **k):
        rec = old(*a, **k)
        rec.rank = rank
        return rec

    logging.setLogRecordFactory(factory)


def main(spec_path: str) -> int:
    watch_launcher()  # first: nothing heavy has been imported yet
    t0 = time.perf_counter()
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from dpoflow.tasks.training.config import TrainConfig
    from dpoflow.tasks.training.results import Phases
    from dpoflow.tasks.training.trainer import train

    phases = Phases({"worker_imports": time.perf_counter() - t0})
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent
    cfg = TrainConfig.model_validate(spec["config"])
    grouped = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if grouped:
        import datetime

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    rank = dist.get_rank() if grouped else 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(rank)s %(message)s")
    _rank_logging(rank)
    try:
        ref = pq.read_table(spec["ref_logps"]) if spec.get("ref_logps") else None
        res = train(cfg, pq.read_table(spec["train"]), spec["model_path"], spec["run_dir"], ref_logps=ref,
                    resume=spec.get("resume", True), phases=phases)
        if rank == 0:
            out = {"output_dir": str(res.output_dir), "metrics": res.metrics, "summary": res.summary,
                   "tokenize_stats": res.tokenize_stats}
            tmp = work / (RESULT + ".tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(work / RESULT)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        error_file(work, rank).write_text(json.dumps({"type": type(exc).__name__, "message": first}))
        raise
    finally:
        if grouped:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
