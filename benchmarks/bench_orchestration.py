"""Orchestration overhead: the demo nightly run through Prefect vs the same stage functions
called directly (no Prefect), on two identical fresh demo workspaces, in one run; then the
time of a no-change rerun through Prefect.

    python benchmarks/bench_orchestration.py [--train-steps 24]

Prefect's temporary server is started (and its SQLite migrated) before timing, by a trivial
flow; its start-up time is reported on its own line. The production tag is not moved, so the
rerun sees unchanged inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_workspace(root: Path, steps: int) -> list[str]:
    import yaml

    from flows.demo import _ensure_model, demo_config
    from flows.workspace import Workspace
    from tasks.demo_data import demo_night

    root.mkdir(parents=True)
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(demo_config(root)))
    overrides = [f"train.max_steps={steps}", "train.promote.auto_promote=false"]
    _ensure_model(Workspace.open(root, overrides))
    demo_night(root / "inbox", 1)
    return overrides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-steps", type=int, default=24)
    args = ap.parse_args()
    from prefect import flow

    from flows.nightly import nightly_direct, nightly_flow
    from flows.stages import STAGES, stage_flow

    for name in STAGES:  # import every stage (torch, transformers...) before timing either side
        stage_flow(name)
    base = Path(tempfile.mkdtemp(prefix="bench_orch_"))
    try:
        t0 = time.perf_counter()
        flow(name="warm-up")(lambda: None)()
        startup = time.perf_counter() - t0

        ov = make_workspace(base / "direct", args.train_steps)
        t0 = time.perf_counter()
        nightly_direct(str(base / "direct"), ov)
        direct = time.perf_counter() - t0

        ov = make_workspace(base / "prefect", args.train_steps)
        t0 = time.perf_counter()
        nightly_flow(workspace=str(base / "prefect"), overrides=ov)
        orchestrated = time.perf_counter() - t0

        t0 = time.perf_counter()
        nightly_flow(workspace=str(base / "prefect"), overrides=ov)
        rerun = time.perf_counter() - t0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| measure | seconds |\n|---|---|")
    print(f"| temporary Prefect server start (once per process) | {startup:.1f} |")
    print(f"| demo night, stage functions called directly | {direct:.1f} |")
    print(f"| demo night, nightly flow through Prefect | {orchestrated:.1f} |")
    print(f"| overhead ratio (flow / direct) | {orchestrated / direct:.2f}x |")
    print(f"| no-change rerun through Prefect | {rerun:.1f} |")


if __name__ == "__main__":
    main()
