"""The nightly flow end to end on the demo workspace, restarts after a kill, and the config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpoflow.flows.config import ConfigError, load_config
from dpoflow.flows.workspace import Workspace

# Small enough for CI's 2 cores; the production tag is not moved, so a rerun sees no change.
FAST = ["sample.samplers=[{model: models@production, n: 2, max_new_tokens: 12, seed: 0}]",
        "train.max_steps=4", "train.batch_size=4", "train.eval.n_prompts=2", "train.eval.max_new_tokens=8",
        "train.promote.auto_promote=false", "train.checkpoint_every=0"]


def _demo_workspace(root: Path, night: int = 1) -> Workspace:
    from dpoflow.flows.demo import _ensure_model, demo_config
    from dpoflow.tasks.demo_data import demo_night

    root.mkdir(parents=True, exist_ok=True)
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(demo_config(root)))
    ws = Workspace.open(root, FAST)
    _ensure_model(ws)
    demo_night(root / "inbox", night)
    return ws


def _versions(ws: Workspace) -> dict[str, int]:
    return {n: ws.store.latest(n) for n in ws.store.list()}


@pytest.mark.slow
def test_nightly_end_to_end_then_skip(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    from dpoflow.flows.nightly import nightly_flow

    ws = _demo_workspace(tmp_path / "ws")
    state = nightly_flow(workspace=str(ws.root), overrides=FAST, return_state=True)
    out = state.result()
    # in the Prefect UI each stage is its own flow run under the night, with its report
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        runs = {client.read_flow(r.flow_id).name: r for r in children}
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in children])))
    assert set(runs) == {"sample", "score", "ingest", "pairs", "balance", "train"} and len(children) == 6
    assert all(r.state.is_completed() for r in children)
    score, ingest = runs["score"], runs["ingest"]
    assert score.start_time < ingest.end_time and ingest.start_time < score.end_time, "ran side by side"
    assert {"sample-report", "score-report", "ingest-report", "pairs-report", "balance-report",
            "train-report", "sample-progress", "train-progress"} <= {a.key for a in arts}
    assert all(float(a.data) == 100.0 for a in arts if a.type == "progress")
    for name in ("prompts", "served", "candidates", "scores", "feedback_events", "signals", "judgements",
                 "pairs", "dpo_train", "dpo_eval"):
        assert ws.store.exists(name), name
    # lineage: dpo_train <- pairs <- (candidates, scores, signals, judgements) <- prompts
    train = ws.store.info(out["dpo_train"])
    assert train.parents == [out["pairs"]]
    pairs_parents = set(ws.store.info(out["pairs"]).parents)
    assert {out["candidates"], out["scores"], out["signals"]} <= pairs_parents
    assert out["prompts"] in ws.store.info(out["candidates"]).parents
    assert out["train"]["model_version"] and out["train"]["decision"] is not None
    assert ws.registry.version_of("models@production") != out["train"]["model_version"]  # not auto-promoted
    before = _versions(ws)
    t0 = time.perf_counter()
    again = nightly_flow(workspace=str(ws.root), overrides=FAST)
    rerun_s = time.perf_counter() - t0
    assert _versions(ws) == before, "a rerun with unchanged inputs must write nothing"
    assert again["train"]["model_version"] == out["train"]["model_version"]
    assert {k: v for k, v in again.items() if k != "train"} == {k: v for k, v in out.items() if k != "train"}
    assert rerun_s < 60


def test_stage_retries_only_after_transient_errors():
    from dpoflow.flows.nightly import with_retries

    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("disk hiccup")
        return "ok"

    assert with_retries(flaky, 2, 5.0, "score", sleep=slept.append) == "ok"
    assert len(calls) == 3 and slept == [5.0, 10.0]  # the delay doubles
    calls.clear()
    with pytest.raises(OSError):
        with_retries(flaky, 1, 5.0, "score", sleep=slept.append)  # retries used up
    assert len(calls) == 2

    def bad_config() -> None:
        calls.append(1)
        raise ValueError("unknown loss 'dpo2'")

    calls.clear()
    with pytest.raises(ValueError):
        with_retries(bad_config, 3, 1.0, "train", sleep=slept.append)
    assert len(calls) == 1

    from prefect.flow_engine import FlowRunTimeoutError

    def too_slow() -> None:  # the stage ran past its own limit: not a hiccup
        calls.append(1)
        raise FlowRunTimeoutError("Flow run exceeded timeout of 86400.0 second(s)")

    calls.clear()
    with pytest.raises(TimeoutError):
        with_retries(too_slow, 3, 1.0, "train", sleep=slept.append)
    assert len(calls) == 1  # never retried


NIGHTLY = """
import sys
from dpoflow.flows.nightly import nightly_flow
nightly_flow(workspace=sys.argv[1], overrides=sys.argv[2:])
"""


@pytest.mark.slow
def test_killed_run_restarts_without_redoing_finished_stages(tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    ws = _demo_workspace(tmp_path / "ws")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", NIGHTLY, str(ws.root), *FAST], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    # kill once score and ingest are fully done (their outputs recorded): pairs has started
    while time.time() < deadline and not ws.store.exists("pairs"):
        assert proc.poll() is None, "the nightly run ended before it could be killed"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _versions(ws)
    assert "candidates" in done and "signals" in done
    from dpoflow.flows.nightly import nightly_flow

    out = nightly_flow(workspace=str(ws.root), overrides=FAST)
    after = _versions(ws)
    for name in ("prompts", "served", "candidates", "signals", "feedback_events"):
        assert after[name] == done[name], f"{name} was redone"
    assert ws.store.exists("dpo_train") and out["train"]["model_version"]
    events = ws.store.read("feedback_events", columns=["event_id"]).column(0).to_pylist()
    assert len(events) == len(set(events)), "duplicate events after the restart"


# The gate passes on any evidence, so the night promotes; the child dies right after the tag move.
PROMOTING = [*FAST, "train.promote.auto_promote=true", "train.promote.min_reward_accuracy=null",
             "train.promote.max_reward_accuracy_drop=null", "train.promote.min_reward_margin=null",
             "train.promote.min_win_rate=null", "train.promote.max_flagged_increase=null"]
NIGHT_KILLED_AFTER_TAG_MOVE = """
import os, signal, sys
from dpoflow.storage.store import DatasetStore
from dpoflow.flows.nightly import nightly_direct
write_json = DatasetStore._write_json
def killing(self, path, obj):
    write_json(self, path, obj)
    if sys.argv[1] == "kill" and str(path).endswith("model_tags.json") and obj.get("production") != sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
DatasetStore._write_json = killing
nightly_direct(sys.argv[3], sys.argv[4:])
"""


def _night(mode: str, ws: Workspace) -> subprocess.CompletedProcess:
    prod = ws.registry.version_of("models@production")
    return subprocess.run([sys.executable, "-c", NIGHT_KILLED_AFTER_TAG_MOVE, mode, prod, str(ws.root), *PROMOTING],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_night_killed_after_the_tag_move_reruns_to_the_same_night(tmp_path):
    """Killed right after `production` moved, the rerun of that night samples with the model
    the night started from, so it reuses every stage, promotes nothing a second time, and
    writes only what the killed night had left: the promote stage's output. (Compared once
    with an uninterrupted night on a copy of the workspace: the same datasets, models, tags
    and promotion record.)"""
    ws = _demo_workspace(tmp_path / "ws")
    start = ws.registry.version_of("models@production")
    killed = _night("kill", ws)
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed at the tag move
    ws = Workspace.open(ws.root)
    (rec,) = ws.registry.promotions_log()
    new = ws.registry.version_of("models@production")
    assert rec["previous"] == start != new == rec["model_version"], "the kill came after the move"
    before, models = _versions(ws), ws.registry.list()
    assert "promotions" not in before  # ... and before the promote stage wrote its output
    rerun = _night("run", ws)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ws = Workspace.open(ws.root)
    assert _versions(ws) == {**before, "promotions": 0}, "the rerun redid a stage (sampled with the new model?)"
    assert ws.registry.list() == models and ws.registry.promotions_log() == [rec]
    assert ws.store.read("promotions").to_pylist()[0]["production"] == new


def test_config_errors_name_key_and_line(tmp_path):
    p = tmp_path / "dpoflow.yaml"
    p.write_text("storage:\n  root: null\ntrain:\n  beta: 0.2\n  betta: 0.3\n")
    with pytest.raises(ConfigError, match=r"dpoflow.yaml:5: train.betta: unknown key"):
        load_config(p)
    p.write_text("sample:\n  token_budget: lots\n")
    with pytest.raises(ConfigError, match=r"dpoflow.yaml:2: sample.token_budget"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"nosuchsection: unknown key"):
        load_config(None, ["nosuchsection.x=1"])


def test_config_precedence_file_env_overrides(tmp_path):
    p = tmp_path / "dpoflow.yaml"
    p.write_text("train:\n  beta: 0.2\n  lr: 0.001\n")
    cfg = load_config(p, ["train.lr=0.5"], env={"DPOFLOW__TRAIN__BETA": "0.3"})
    assert cfg.train.beta == 0.3 and cfg.train.lr == 0.5
    assert load_config(p, env={}).train.beta == 0.2


def test_config_show_has_no_secrets(tmp_path, monkeypatch):
    from dpoflow.flows.cli import main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    monkeypatch.setenv("EVENTS_DB_URL", "postgresql://u:hunter2@db/x")
    (tmp_path / "dpoflow.yaml").write_text(
        "storage:\n  root: s3://bucket/x\ningest:\n  sources:\n    - {name: db, kind: sql, url_env: EVENTS_DB_URL, table: ev}\n")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["config", "show", "--workspace", str(tmp_path)]) == 0
    text = buf.getvalue()
    assert "EVENTS_DB_URL" in text and "hunter2" not in text and "very-secret-key" not in text


def test_readme_documents_every_config_key():
    from dpoflow.flows.config import reference_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "README config reference is stale: run `python -m flows.config`"
