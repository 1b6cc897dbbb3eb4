"""The nightly flow: the whole loop, each stage its own (sub)flow.

    inbox imports -> sample -> (score | ingest) -> pairs -> balance -> ref_logps -> train
    -> evaluate -> promote

Stages pass dataset version strings to each other. Every stage skips itself when its inputs,
config and code are unchanged, so re-running after a failure continues where it stopped and a
no-change rerun costs seconds. Score and ingest run concurrently.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

from dpoflow.flows.local_server import settings_context
from dpoflow.flows.registry import run_direct, stage_flow
from dpoflow.flows.reporting import (
    batched_artifacts,
    post_overdue_artifacts,
    publish_markdown,
    publish_table,
    stage_logger,
)
from dpoflow.flows.workspace import Workspace

TRANSIENT = (OSError, TimeoutError, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """Retry I/O hiccups, store write races and CUDA OOM; never bad data or bad config, and
    never a stage that ran past its own time limit (Prefect's FlowRunTimeoutError is a
    TimeoutError: retrying it would spend that whole limit again)."""
    if type(exc).__name__ == "FlowRunTimeoutError":
        return False
    if isinstance(exc, TRANSIENT):
        return True
    name = type(exc).__name__
    return name in ("ConcurrentWriteError", "ConflictError", "OutOfMemoryError") or "out of memory" in str(exc).lower()


def with_retries(fn: Callable[[], Any], retries: int, delay_s: float, what: str,
                 sleep: Callable[[float], None] = time.sleep) -> Any:
    """``fn()``, called again after a transient error up to ``retries`` times (delay doubling)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == retries or not is_transient(exc):
                raise
            wait = delay_s * 2 ** attempt
            stage_logger(what).warning("%s failed (%s: %s); retry %d of %d in %.0f s",
                                       what, type(exc).__name__, exc, attempt + 1, retries, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def run_stage_flow(stage: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one stage flow as a subflow of the calling flow.

    Subflows run inside the nightly flow's process, whose own heartbeat already tells the
    server it is alive; their heartbeat threads would only add ~1 s each at exit.
    """
    f = stage_flow(stage).with_options(timeout_seconds=timeout_s)
    gate = _GATE.get()
    if gate is not None:
        f = f.with_options(on_running=[gate.arrive])
    with settings_context({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return f(**params)


class _StaggeredStart:
    """Start side-by-side stage subflows one after another, then let them run together.

    Prefect's temporary server keeps its state in SQLite, which answers two runs created at
    the same moment with a 503 that the client retries only after 2 s (+2.2 s measured on the
    demo night). So the next subflow is created only once the previous one is running, and
    each running one waits (in its on_running hook) until all of them run.
    """

    def __init__(self, n: int, wait_s: float = 60.0) -> None:
        self.n, self.wait_s = n, wait_s
        self.running = 0
        self._cond = threading.Condition()

    def arrive(self, *_: Any) -> None:
        with self._cond:
            self.running += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self.running >= self.n, self.wait_s):
                stage_logger("nightly").info("%d of %d parallel stages running after %.0f s; going on",
                         self.running, self.n, self.wait_s)

    def wait_until(self, k: int, future: Future) -> None:
        """Wait until `k` subflows run; a future that ended before running releases the rest."""
        with self._cond:
            while self.running < k and not future.done():
                self._cond.wait(0.05)
            if self.running < k:
                self.running = self.n
                self._cond.notify_all()


_GATE: contextvars.ContextVar[_StaggeredStart | None] = contextvars.ContextVar("dpoflow_gate", default=None)


def _present(ws: Workspace, name: str) -> str | None:
    return f"{name}@latest" if ws.store.exists(name) else None


def import_inbox(ws: Workspace, force: bool = False) -> dict[str, str]:
    """Import configured inbox files (a no-op for files already imported unchanged)."""
    from dpoflow.flows.importing import import_dataset

    inbox = ws.config.nightly.inbox
    out: dict[str, str] = {}
    for name in ("prompts", "served", "pairs", "feedback_events"):
        path = getattr(inbox, name)
        if path and Path(path).exists():
            run = import_dataset(ws, name, path, force=force)
            if name in run.outputs:  # a file without a valid row writes no version
                out[name] = run.outputs[name]
    if inbox.annotations and Path(inbox.annotations).exists():
        from dpoflow.flows.importing import import_annotations

        res = import_annotations(ws, inbox.annotations, force=force)
        out["annotations"] = res["annotations"]
        if res.get("judgements"):
            out["judgements"] = res["judgements"]
    return out


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
        out["train"] = call("train", {"dpo_train": b["dpo_train"], "dpo_eval": b.get("dpo_eval"),
                                      "promote": True, **common})  # only the nightly auto-promotes
    return out


def nightly_direct(workspace: str | None = None, overrides: list[str] | None = None,
                   force: bool = False) -> dict[str, Any]:
    """The same DAG without Prefect, one stage after another (benchmarks, debugging)."""
    ws = Workspace.open(workspace, overrides)
    return run_pipeline(ws, lambda s, p: run_direct(ws, s, p),
                        lambda a, b: (run_direct(ws, *a), run_direct(ws, *b)), {"force": force}, force)


@flow(name="nightly", log_prints=True)
def nightly_flow(workspace: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Import -> sample -> score + ingest -> pairs -> balance -> train / evaluate / promote."""
    t0 = time.perf_counter()
    ws = Workspace.open(workspace, overrides)
    cfg = ws.config.nightly

    def run(name: str, params: dict[str, Any]) -> Any:
        timeout = cfg.train_timeout_s if name == "train" else cfg.stage_timeout_s
        return with_retries(lambda: run_stage_flow(name, params, timeout), cfg.retries, cfg.retry_delay_s, name)

    def call(name: str, params: dict[str, Any]) -> Any:
        post_overdue_artifacts(cfg.report_delay_s)
        return run(name, params)

    def call_pair(a: tuple[str, dict], b: tuple[str, dict]) -> tuple[Any, Any]:
        post_overdue_artifacts(cfg.report_delay_s)
        gate = _StaggeredStart(2)
        token = _GATE.set(gate)  # each thread runs in a copy of this context (the flow run's)
        try:
            with ThreadPoolExecutor(2, thread_name_prefix="dpoflow-stage") as pool:
                fa = pool.submit(contextvars.copy_context().run, run, *a)
                gate.wait_until(1, fa)
                fb = pool.submit(contextvars.copy_context().run, run, *b)
                gate.wait_until(2, fb)
                return fa.result(), fb.result()
        finally:
            _GATE.reset(token)

    common = {"workspace": str(ws.root), "overrides": overrides, "force": force}
    with batched_artifacts():  # stage reports are posted in batches (see flows.stage)
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
