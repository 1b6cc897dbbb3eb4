"""Slow: SIGTERM to `dpoflow run sample --set sample.runner=ray` while shards run on its
private local Ray cluster (2 CPUs, small object store, no dashboard, RAY_AUTH_MODE=disabled).
Every process the command started (Prefect's temporary server, the Ray head's GCS and raylet,
the workers) is gone after it exits, found by PID (a snapshot of its process tree, with start
times) and by session; the rerun completes and reuses every shard committed before the exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

pytest.importorskip("prefect_ray")
psutil = pytest.importorskip("psutil")

from dpoflow.flows.sample import sample  # noqa: E402
from dpoflow.flows.workspace import Workspace  # noqa: E402


def _tree(pid: int) -> dict[int, tuple[float, str]]:
    """pid -> (start time, command) of `pid`'s descendants now."""
    out = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[p.pid] = (p.create_time(), " ".join(p.cmdline())[:100])
    return out


def _survivors(tree: dict[int, tuple[float, str]], session: int | None = None) -> list[str]:
    """What is still alive of `tree` (same PID and start time: not a reused PID), and any
    process still in the command's `session` (when given)."""
    left = []
    for p in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            known = tree.get(p.pid)
            if (known and known[0] == p.info["create_time"]) or (session and os.getsid(p.pid) == session):
                left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]}")
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return left


def _busy_shard_worker(tree: dict[int, tuple[float, str]]) -> bool:
    return any(cmd.startswith("ray::sample-shard") for _, cmd in tree.values())


@pytest.mark.slow
def test_sigterm_mid_shard_leaves_no_orphans_and_the_rerun_completes(tmp_path, tiny_model_dir,
                                                                     restore_torch_threads):
    root = tmp_path / "ws"
    n = 8
    Workspace.open(root).store.write("prompts", pa.table({
        "prompt_id": [f"t{i}" for i in range(n)], "prompt": [f"Explain rule {i} in one line." for i in range(n)]}))
    sets = [f"sample.samplers=[{{model: '{tiny_model_dir}', n: 4, max_new_tokens: 48, temperature: [1.0], seed: 3}}]",
            "sample.shard_size=1", "sample.cpu_threads=1", "sample.runner=ray", "ray.num_cpus=2",
            "ray.object_store_mb=100", "ray.dashboard=false"]
    cmd = [sys.executable, "-m", "dpoflow", "--workspace", str(root), "run", "sample"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    store = Workspace.open(root).store

    def committed() -> list[str]:
        return sorted(x for x in store.list() if x.startswith("shard_sample_"))

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    tree: dict[int, tuple[float, str]] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # one shard committed and another one running
            assert proc.poll() is None, proc.stderr.read()
            tree.update(_tree(proc.pid))
            if committed() and _busy_shard_worker(_tree(proc.pid)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no shard was committed while another one ran")
        tree.update(_tree(proc.pid))
        before = committed()
        assert 1 <= len(before) < n
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        assert rc > 0, f"the command died of signal {-rc} instead of exiting (its atexit cleanup skipped)"
        deadline = time.monotonic() + 30
        while (left := _survivors(tree, proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"orphans after SIGTERM: {left}; the command's stderr ends: {proc.stderr.read()[-3000:]}"
        assert any("raylet" in c for _, c in tree.values())  # the snapshot did see the Ray cluster
    finally:
        for pid in _tree(proc.pid) | {proc.pid: (0.0, "")}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)

    done = committed()
    assert set(before) <= set(done) and all(store.latest(x) == 0 for x in done)  # none rewritten
    # the rerun (here, inline: shard keys do not depend on the runner) reuses every committed shard
    rerun = sample(Workspace.open(root, [*sets[:3], "sample.runner=inline"]))
    assert rerun.report["shards"] == n and rerun.report["shards_reused"] == len(done)
    assert len(committed()) == n and all(store.latest(x) == 0 for x in committed())
    cands = store.read(rerun.outputs["candidates"])
    assert sorted(set(cands.column("prompt_id").to_pylist())) == [f"t{i}" for i in range(n)]
