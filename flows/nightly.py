"""The nightly flow: the whole loop, each stage its own (sub)flow.

    inbox imports -> sample -> (score | ingest) -> pairs -> balance -> ref_logps -> train
    -> evaluate -> promote

Stages pass dataset version strings to each other. Every stage skips itself when its inputs,
config and code are unchanged, so re-running after a failure continues where it stopped and a
no-change rerun costs seconds. Score and ingest run concurrently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.tasks import exponential_backoff

from flows.stage import publish_markdown, publish_table
from flows.stages import stage_flow
from flows.workspace import Workspace

TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups, store write races and CUDA OOM; never bad data or bad config."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception as exc:  # noqa: BLE001
        name = type(exc).__name__
        return name in ("ConcurrentWriteError", "OutOfMemoryError") or "out of memory" in str(exc).lower()
    return False


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=_transient)
def run_stage_task(stage: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one stage flow as a subflow (a task, so independent stages can run side by side).

    Subflows run inside the nightly flow's process, whose own heartbeat already tells the
    server it is alive; their heartbeat threads would only add ~1 s each at exit.
    """
    f = stage_flow(stage).with_options(timeout_seconds=timeout_s)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return f(**params)


def _present(ws: Workspace, name: str) -> str | None:
    return f"{name}@latest" if ws.store.exists(name) else None


def import_inbox(ws: Workspace, force: bool = False) -> dict[str, str]:
    """Import configured inbox files (a no-op for files already imported unchanged)."""
    from flows.importing import import_dataset

    inbox = ws.config.nightly.inbox
    out: dict[str, str] = {}
    for name in ("prompts", "served", "pairs"):
        path = getattr(inbox, name)
        if path and Path(path).exists():
            run = import_dataset(ws, name, path, force=force)
            out[name] = run.outputs[name]
    if inbox.annotations and Path(inbox.annotations).exists():
        from flows.cli_feedback import import_annotations

        res = import_annotations(ws, inbox.annotations, force=force)
        out["annotations"] = res["annotations"]
        if res.get("judgements"):
            out["judgements"] = res["judgements"]
    return out


def _direct(ws: Workspace, stage: str, p: dict[str, Any]) -> dict[str, Any]:
    """A stage without Prefect: the same stage functions the flows call."""
    force = p.get("force", False)
    if stage == "sample":
        from flows.sample import sample

        return sample(ws, p["prompts"], p.get("served"), force=force).outputs
    if stage == "score":
        from flows.score import run_score

        return run_score(ws, p["candidates"], p.get("prompts"), force=force).outputs
    if stage == "ingest":
        from flows.ingest import run_ingest

        return run_ingest(ws, p["candidates"], force=force).outputs
    if stage == "pairs":
        from flows.pairs import run_pairs

        keys = ("candidates", "prompts", "scores", "signals", "judgements", "pairs_import")
        return run_pairs(ws, *(p.get(k) or None for k in keys), force=force).outputs
    if stage == "balance":
        from flows.balance import run_balance

        return run_balance(ws, p["pairs"], force=force).outputs
    if stage == "train":
        from flows.train import train_pipeline

        return train_pipeline(ws, p["dpo_train"], p.get("dpo_eval"), force=force).to_dict()
    raise KeyError(stage)


def run_pipeline(ws: Workspace, call: Callable[[str, dict[str, Any]], Any],
                 call_pair: Callable[[tuple[str, dict], tuple[str, dict]], tuple[Any, Any]],
                 common: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """The nightly DAG. `call(stage, params)` runs a stage; `call_pair` runs two side by side."""
    cfg = ws.config.nightly
    out: dict[str, Any] = dict(import_inbox(ws, force=force))
    if not ws.store.exists("prompts"):
        raise ValueError("no prompts: import some (dpoflow import prompts FILE) or set nightly.inbox.prompts")
    prompts = out.get("prompts") or str(ws.store.resolve("prompts"))
    if cfg.sample:
        served = out.get("served") or _present(ws, "served")
        out.update(call("sample", {"prompts": prompts, "served": served, **common}))
    candidates = out.get("candidates") or _present(ws, "candidates")
    if candidates is None:
        raise ValueError("no candidates: enable nightly.sample or import served responses")
    scored, ingested = call_pair(("score", {"candidates": candidates, "prompts": prompts, **common}),
                                 ("ingest", {"candidates": candidates, **common}))
    out.update(scored)
    out.update(ingested)
    p = call("pairs", {
        "candidates": candidates, "prompts": prompts, "scores": out.get("scores") or "",
        "signals": out.get("signals") or _present(ws, "signals") or "",
        "judgements": out.get("judgements") or _present(ws, "judgements") or "",
        "pairs_import": out.get("pairs"), **common})
    out.update(p)
    b = call("balance", {"pairs": p["pairs"], **common})
    out.update(b)
    if cfg.train:
        out["train"] = call("train", {"dpo_train": b["dpo_train"], "dpo_eval": b.get("dpo_eval"), **common})
    return out


def nightly_direct(workspace: str | None = None, overrides: list[str] | None = None,
                   force: bool = False) -> dict[str, Any]:
    """The same DAG without Prefect, one stage after another (benchmarks, debugging)."""
    ws = Workspace.open(workspace, overrides)
    return run_pipeline(ws, lambda s, p: _direct(ws, s, p),
                        lambda a, b: (_direct(ws, *a), _direct(ws, *b)), {"force": force}, force)


@flow(name="nightly", log_prints=True)
def nightly_flow(workspace: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Import -> sample -> score + ingest -> pairs -> balance -> train / evaluate / promote."""
    t0 = time.perf_counter()
    ws = Workspace.open(workspace, overrides)
    cfg = ws.config.nightly
    stage = run_stage_task.with_options(retries=cfg.retries,
                                        retry_delay_seconds=exponential_backoff(cfg.retry_delay_s))

    def call(name: str, params: dict[str, Any]) -> Any:
        timeout = cfg.train_timeout_s if name == "train" else cfg.stage_timeout_s
        return stage(name, params, timeout)

    def call_pair(a: tuple[str, dict], b: tuple[str, dict]) -> tuple[Any, Any]:
        fa = stage.submit(a[0], a[1], cfg.stage_timeout_s)
        fb = stage.submit(b[0], b[1], cfg.stage_timeout_s)
        return fa.result(), fb.result()

    common = {"workspace": str(ws.root), "overrides": overrides, "force": force}
    out = run_pipeline(ws, call, call_pair, common, force)
    _report(ws, out, time.perf_counter() - t0)
    return out


def _report(ws: Workspace, out: dict[str, Any], seconds: float) -> None:
    """Lineage of this run's outputs as a markdown artifact, plus a one-table summary."""
    refs = [v for k, v in out.items() if isinstance(v, str) and "@" in v and k != "quarantine"]
    lines = [f"# Nightly run ({seconds:.1f} s)", "", "## Outputs and their lineage", ""]
    for ref in refs:
        info = ws.store.info(ref)
        lines.append(f"- `{ref}` ({info.rows} rows, stage `{info.stage}`) <- "
                     + (", ".join(f"`{p}`" for p in info.parents) or "external file"))
    train = out.get("train") or {}
    if train:
        lines += ["", "## Training", "", "```", *[f"{k}: {v}" for k, v in train.items() if not isinstance(v, dict)], "```"]
    publish_markdown("nightly-lineage", "\n".join(lines), "lineage of this run's outputs")
    publish_table("nightly-outputs", [{"dataset": r.split("@")[0], "version": r, "rows": ws.store.info(r).rows}
                                      for r in refs], "datasets written or reused by this run")
