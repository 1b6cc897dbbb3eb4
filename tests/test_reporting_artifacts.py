"""Artifacts that render on any machine: images embedded as data URIs, and the live training
progress (artifact card + progress bar + terminal line) read from the trainer's metrics.jsonl."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

from dpoflow.flows import reporting
from dpoflow.tasks.training.evaluation import plot_training_curves

HISTORY = [{"step": s, "total_steps": 24, "loss": 0.69 - 0.01 * s, "rewards/accuracies": 0.5 + 0.01 * s,
            "rewards/margins": 0.02 * s, "tokens_per_s": 1500.0} for s in range(4, 25, 4)]


def _png(tmp_path: Path) -> Path:
    return plot_training_curves(HISTORY, tmp_path / "art" / "curves.png")


def test_embed_images_inlines_local_files_and_leaves_links_alone(tmp_path):
    png = _png(tmp_path)
    md = (f"# r\n\n![abs]({png})\n![rel](curves.png)\n![gone](/no/such/file.png)\n"
          "![web](https://example.org/x.png)\n")
    out = reporting.embed_images(md, png.parent)
    uris = [line.split("(", 1)[1].rstrip(")") for line in out.splitlines() if line.startswith("![abs]")
            or line.startswith("![rel]")]
    assert len(uris) == 2
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1]) == png.read_bytes()  # the image itself, not a path
    assert str(png) not in out and "/no/such/file.png" in out and "![gone]" not in out  # no broken image
    assert "![web](https://example.org/x.png)" in out


def _metrics(root: Path, rows: list[dict]) -> Path:
    path = root / "run-a" / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')  # a row half written
    return path


def test_training_progress_line_reads_the_newest_metrics_row(tmp_path):
    old = _metrics(tmp_path / "train", HISTORY[:1])
    os.utime(old, (1, 1))  # an earlier run's file is not this run's progress
    ticks = iter([100.0, 130.0])
    out = io.StringIO()
    cb = reporting.training_progress(tmp_path / "train", stream=out, clock=lambda: next(ticks))
    (tmp_path / "train" / "run-b").mkdir()
    (tmp_path / "train" / "run-b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HISTORY[:3]))
    cb(0.5)
    line = out.getvalue().strip()
    # step 12 of 24 after 30 s -> 30 s to go; loss / accuracy / margin / tokens per second of that row
    assert line.startswith("train [##########..........] step 12/24 loss 0.5700 acc 0.62 margin 0.240 1500 tok/s")
    assert line.endswith("ETA 0:00:30")


def test_live_progress_artifacts_in_a_flow_run(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    @flow
    def fake_training() -> str:
        cb = reporting.training_progress(tmp_path / "train", stream=io.StringIO())
        _metrics(tmp_path / "train", HISTORY[:3])
        cb(0.5)
        _metrics(tmp_path / "train", HISTORY)
        cb(1.0)
        reporting._POSTER.wait()
        reporting.publish_markdown("train-curves-image", reporting.embed_images(f"![c]({_png(tmp_path)})"), "c")
        return reporting.flow_run_id()

    run_id = fake_training()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert float(by_key["train-progress"].data) == 100.0
    live = by_key["train-live"].data  # one card, updated in place to the last row
    assert len([a for a in arts if a.key == "train-live"]) == 1
    assert "step 24 of 24" in live and "| 24 | 0.4500 | 0.740 |" in live
    assert "data:image/png;base64," in by_key["train-curves-image"].data


def test_live_artifacts_are_updated_at_most_every_few_seconds(tmp_path, prefect_harness, monkeypatch):
    """An in-process trainer reports every step; the API sees one update per `every_s` and the end."""
    from prefect import flow

    posts: list[int] = []
    call_soon = reporting._POSTER.call_soon
    monkeypatch.setattr(reporting._POSTER, "call_soon", lambda fn: posts.append(1) or call_soon(fn))
    ticks = iter([0.0, 0.0, 0.5, 1.0, 4.9, 5.0, 5.1, 5.2])

    @flow
    def fake_training() -> None:
        cb = reporting.training_progress(tmp_path / "train", stream=io.StringIO(), clock=lambda: next(ticks))
        _metrics(tmp_path / "train", HISTORY[:3])
        posts.clear()  # the progress artifact's creation
        for fraction in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):  # at 0.0, 0.5, 1.0, 4.9, 5.0, 5.1 s
            cb(fraction)
        assert len(posts) == 2 * 2  # bar + card at 0.0 s and at 5.0 s
        cb(1.0)  # the end is always posted
        assert len(posts) == 3 * 2
        reporting._POSTER.wait()

    fake_training()


def test_progress_bars_wait_on_the_api_at_most_every_few_seconds(prefect_harness, monkeypatch):
    """Many small shards: a progress update per shard would wait on the API after each one."""
    from prefect import flow

    posts: list[int] = []
    call_soon = reporting._POSTER.call_soon
    monkeypatch.setattr(reporting._POSTER, "call_soon", lambda fn: posts.append(1) or call_soon(fn))
    ticks = iter([0.0, 0.5, 1.0, 2.5, 3.0, 3.1])

    @flow
    def many_shards() -> str:
        bar = reporting.progress_reporter("shards-progress", "shards done", clock=lambda: next(ticks))
        for fraction in (0.2, 0.4, 0.6, 0.8, 1.0):  # at 0.5, 1.0, 2.5, 3.0, 3.1 s
            bar(fraction)
        return reporting.flow_run_id()

    run_id = many_shards()
    assert len(posts) == 1 + 2  # created, then 60% at 2.5 s and the end
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert float(art.data) == 100.0


def test_report_to_tensorboard_streams_every_metrics_row(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            reporting.training_progress(tmp_path / "train", report_to="tensorboard")
        pytest.skip("tensorboard is not installed: only the error is checked")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = reporting.training_progress(tmp_path / "train", stream=io.StringIO(), report_to="tensorboard",
                                     tracking_dir=tmp_path / "tb")
    path = _metrics(tmp_path / "train", HISTORY[:2])
    cb(0.3)
    path.write_text("".join(json.dumps(r) + "\n" for r in HISTORY))  # the trainer appended more rows
    cb(1.0)
    (run_dir,) = (tmp_path / "tb").iterdir()
    assert run_dir.name == "run-a"  # one TensorBoard run per training run folder
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in HISTORY]  # each row once, none skipped
    assert abs(loss[-1].value - HISTORY[-1]["loss"]) < 1e-6
    assert "train/rewards/accuracies" in acc.Tags()["scalars"]


def test_report_to_a_missing_tracker_fails_before_training(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed")
    with pytest.raises(ValueError, match=r"train.report_to=mlflow needs the mlflow package \(pip install mlflow\)"):
        reporting.training_progress(tmp_path / "train", report_to="mlflow")
