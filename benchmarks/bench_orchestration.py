"""Orchestration overhead: the demo nightly run through Prefect vs the same stage functions
called directly (no Prefect), on two identical fresh demo workspaces, in one run; then the
time of a no-change rerun through Prefect.

    python benchmarks/bench_orchestration.py [--train-steps 24] [--repeat 3]

Prefect's temporary server is started (and its SQLite migrated) before timing, by a trivial
flow; its start-up time is reported on its own line. Each repeat runs one direct night and one
Prefect night on fresh workspaces, alternating, so that machine noise hits both sides alike;
the table reports medians (and each run). The production tag is not moved, so the rerun sees
unchanged inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

    from dpoflow.flows.demo import _ensure_model, demo_config
    from dpoflow.flows.workspace import Workspace
    from dpoflow.tasks.demo_data import demo_night

    root.mkdir(parents=True)
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(demo_config(root)))
    overrides = [f"train.max_steps={steps}", "train.promote.auto_promote=false"]
    _ensure_model(Workspace.open(root, overrides))
    demo_night(root / "inbox", 1)
    return overrides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-steps", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3, help="direct / Prefect night pairs, alternating")
    args = ap.parse_args()
    from prefect import flow

    from dpoflow.flows.local_server import flow_run_settings
    from dpoflow.flows.nightly import nightly_direct, nightly_flow
    from dpoflow.flows.registry import STAGES, stage_flow

    for name in STAGES:  # import every stage (torch, transformers...) before timing either side
        stage_flow(name)
    base = Path(tempfile.mkdtemp(prefix="bench_orch_"))
    direct: list[float] = []
    orchestrated: list[float] = []
    reruns: list[float] = []
    try:
        t0 = time.perf_counter()
        flow(name="warm-up")(lambda: None)()
        startup = time.perf_counter() - t0
        for i in range(args.repeat):
            ov = make_workspace(base / f"direct{i}", args.train_steps)
            t0 = time.perf_counter()
            nightly_direct(str(base / f"direct{i}"), ov)
            direct.append(time.perf_counter() - t0)

            ov = make_workspace(base / f"prefect{i}", args.train_steps)
            with flow_run_settings():  # as `dpoflow demo` runs it
                t0 = time.perf_counter()
                nightly_flow(workspace=str(base / f"prefect{i}"), overrides=ov)
                orchestrated.append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                nightly_flow(workspace=str(base / f"prefect{i}"), overrides=ov)
                reruns.append(time.perf_counter() - t0)
            print(f"run {i + 1}: direct {direct[-1]:.2f} s, Prefect {orchestrated[-1]:.2f} s, "
                  f"rerun {reruns[-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    d, o, r = (statistics.median(x) for x in (direct, orchestrated, reruns))
    each = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print("\n| measure | seconds (median) | each run |\n|---|---|---|")
    print(f"| temporary Prefect server start (once per process) | {startup:.1f} | |")
    print(f"| demo night, stage functions called directly | {d:.1f} | {each(direct)} |")
    print(f"| demo night, nightly flow through Prefect | {o:.1f} | {each(orchestrated)} |")
    print(f"| overhead ratio (flow / direct) | {o / d:.2f}x | "
          f"{', '.join(f'{b / a:.2f}x' for a, b in zip(direct, orchestrated, strict=True))} |")
    diffs = [b - a for a, b in zip(direct, orchestrated, strict=True)]
    print(f"| overhead (flow - direct, same repeat) | {statistics.median(diffs):.1f} | {each(diffs)} |")
    print(f"| no-change rerun through Prefect | {r:.1f} | {each(reruns)} |")
    print(f"\nload average after the runs: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
