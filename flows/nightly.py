"""The nightly flow: the whole loop, each stage its own (sub)flow.

    inbox imports -> sample -> (score | ingest) -> pairs -> balance -> ref_logps -> train
    -> evaluate -> promote

Stages pass dataset version strings to each other. Every stage skips itself when its inputs,
config and code are unchanged, so re-running after a failure continues where it stopped and a
no-change rerun costs seconds. Score and ingest run concurrently.
"""

from __future__ import annotations

import contextvars
import functools
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
    post_queue_meanwhile,
    publish_markdown,
    publish_table,
    stage_logger,
    wait_for_artifacts,
)
from dpoflow.flows.workspace import Workspace

TRANSIENT = (OSError, TimeoutError, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """Retry I/O hiccups, a busy Prefect API, store write races and CUDA OOM; never bad data or bad config, and
    never a stage that ran past its own time limit (Prefect's FlowRunTimeoutError is a
    TimeoutError: retrying it would spend that whole limit again)."""
    if type(exc).__name__ == "FlowRunTimeoutError":
        return False
    if isinstance(exc, TRANSIENT):
        return True
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if name == "PrefectHTTPStatusError" and status in (429, 502, 503, 504):
        return True  # the API was busy (a server's SQLite under load answers 503): the stage can run again
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
    server it is alive; their heartbeat threads would only add ~1 s each at exit. The id of
    each stage's run is noted for the night summary (`_STAGE_RUNS`).
    """
    f = _nightly_stage_flow(stage, timeout_s)
    try:
        with settings_context({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            state = f(**params, return_state=True)
    finally:
        wait_for_artifacts()  # a stage that failed before its end may have left posts in flight
    runs = _STAGE_RUNS.get()
    if runs is not None and state.state_details.flow_run_id:
        runs.append((stage, str(state.state_details.flow_run_id)))
    return state.result()  # raises the stage's own exception when it failed (retries look at it)


# Stages whose runs create no further runs through the API while they compute: the reports
# queued so far are posted in the background once their run is Running (`post_queue_meanwhile`).
# The train flow creates its ref_logps subflow first, and posts the queue while it trains.
_POST_WHILE_RUNNING = ("sample", "pairs", "balance")
@functools.lru_cache(maxsize=64)
def _nightly_stage_flow(stage: str, timeout_s: float) -> Any:
    """The stage's flow as the nightly runs it, built once per (stage, timeout): ``with_options``
    rebuilds the flow's parameter schema and validator (~25 ms a stage). Parameters are not
    validated again (Prefect builds a pydantic model per call): the nightly passes its own
    typed values. Its `on_running` hook lets side-by-side stages through their gate and posts
    the report queue in the background."""
    base = stage_flow(stage)
    hook = _arrive_and_post if stage in _POST_WHILE_RUNNING else _arrive_at_gate
    return base.with_options(timeout_seconds=timeout_s, validate_parameters=False,
                             on_running=[*base.on_running_hooks, hook])


def _arrive_at_gate(*args: Any) -> None:
    gate = _GATE.get()
    if gate is not None:
        gate.arrive(*args)


def _arrive_and_post(*args: Any) -> None:
    if _GATE.get() is not None:  # side by side: another run may be being created
        _arrive_at_gate(*args)
    else:
        post_queue_meanwhile()


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
# (stage, flow run id) of each stage subflow of the running night, attempts included
_STAGE_RUNS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("dpoflow_stage_runs",
                                                                                            default=None)


def night_of(timezone: str, start: Any = None) -> str:
    """The night's date: its (scheduled) start, default now, in `timezone` (nightly.timezone)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return (start or datetime.now(ZoneInfo("UTC"))).astimezone(ZoneInfo(timezone)).date().isoformat()


def _this_night(ws: Workspace) -> str:
    """The date of the running night: the flow run's scheduled start inside Prefect, else now."""
    from prefect.runtime import flow_run

    return night_of(ws.config.nightly.timezone, flow_run.scheduled_start_time if flow_run.id else None)


def nightly_run_name() -> str:
    """`nightly-2026-11-29`: the night's date (its scheduled start, in nightly.timezone)."""
    from prefect.runtime import flow_run

    tz = "UTC"
    try:
        from dpoflow.flows.deployments import nightly_schedule

        params = flow_run.parameters or {}
        tz = nightly_schedule(params.get("workspace"), params.get("overrides"))[1]
    except Exception:  # noqa: BLE001 - a name never fails a night
        pass
    return f"nightly-{night_of(tz, flow_run.scheduled_start_time)}"


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
    """The nightly DAG. `call(stage, params)` runs a stage; `call_pair` runs two side by side.

    One night is one cycle: when this night (its date and sample inputs) already promoted a
    model (a rerun after a kill past the tag move), sampling uses the model the night started
    from, so every stage reuses its output and the promotion is not done twice. New prompts
    the same day (a second demo night) are a new cycle, sampled with the new model."""
    from dpoflow.tasks.training.promotion import night_start_production

    cfg = ws.config.nightly
    out: dict[str, Any] = dict(import_inbox(ws, force=force))
    if not ws.store.exists("prompts"):
        raise ValueError("no prompts: import some (dpoflow import prompts FILE) or set nightly.inbox.prompts")
    prompts = out.get("prompts") or str(ws.store.resolve("prompts"))
    served = out.get("served") or _present(ws, "served")
    # the night: its date and what it samples (new prompts the same day start a new cycle)
    night = " ".join([_this_night(ws), str(ws.store.resolve(prompts)), str(ws.store.resolve(served)) if served else ""]
                     ).strip()
    if cfg.sample:
        started_from = night_start_production(ws.registry, night)
        pin = {"production": started_from} if started_from else {}
        out.update(call("sample", {"prompts": prompts, "served": served, **pin, **common}))
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
                                      "promote": True, "night": night, **common})  # only the nightly promotes
    return out


def nightly_direct(workspace: str | None = None, overrides: list[str] | None = None,
                   force: bool = False) -> dict[str, Any]:
    """The same DAG without Prefect, one stage after another (benchmarks, debugging)."""
    ws = Workspace.open(workspace, overrides)
    return run_pipeline(ws, lambda s, p: run_direct(ws, s, p),
                        lambda a, b: (run_direct(ws, *a), run_direct(ws, *b)), {"force": force}, force)


@flow(name="nightly", flow_run_name=nightly_run_name, log_prints=True)
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
        if name not in _POST_WHILE_RUNNING:  # those post the queue once their run is Running
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
    token = _STAGE_RUNS.set([])
    try:
        with batched_artifacts():  # stage reports are posted in batches (see flows.reporting)
            out = run_pipeline(ws, call, call_pair, common, force)
            _report(ws, out, _STAGE_RUNS.get() or [], time.perf_counter() - t0)
        from dpoflow.flows.version_choices import refresh_after_run

        refresh_after_run(ws.store, str(ws.root))  # tonight's versions in tomorrow's custom-run forms
    finally:
        _STAGE_RUNS.reset(token)
    return out


def night_summary(ws: Workspace, out: dict[str, Any], stage_runs: list[tuple[str, str]], seconds: float,
                  run_id: str | None = None) -> str:
    """The night on one page: each stage's run (link), inputs -> outputs, rows, seconds,
    skipped or not, the model trained and the promotion decision."""
    from dpoflow.flows.local_server import flow_run_url
    from dpoflow.flows.reporting import stage_runs as recorded

    def link(rid: str, text: str) -> str:
        url = flow_run_url(rid)
        return f"[{text}]({url})" if url else f"{text} (`{rid[:8]}`)"

    lines = [f"# Night summary ({seconds:.1f} s)", "",
             "| stage | run | inputs | outputs | rows | seconds | skipped |", "|---|---|---|---|---|---|---|"]
    runs = ([("import", run_id)] if run_id else []) + list(stage_runs)
    for name, rid in runs:
        for step in recorded(ws.store, rid):
            if name == "import" and not step["stage"].startswith("import"):
                continue
            rows = ", ".join(f"{k}: {v}" for k, v in step["rows"].items()) or "-"
            lines.append(f"| {step['stage']} | {link(rid, name)} | {', '.join(step['inputs'].values()) or '-'} | "
                         f"{', '.join(v for k, v in step['outputs'].items() if k != 'quarantine') or '-'} | {rows} | "
                         f"{step['seconds'] if step.get('seconds') is not None else '-'} | "
                         f"{'yes (unchanged)' if step['skipped'] else 'no'} |")
    train = out.get("train") or {}
    if train:
        d = train.get("decision") or {}
        verdict = "promoted to production" if d.get("promoted") else "not promoted"
        lines += ["", "## Model", "", f"- trained: `{train.get('model_version')}` from `{out.get('dpo_train')}`"
                  + (" (reused)" if (train.get("skipped") or {}).get("train") else ""),
                  f"- promotion: **{verdict}** (gate passed: {d.get('passed')}; production before: "
                  f"`{d.get('previous_production')}`, now: `{d.get('production')}`)"]
        lines += [f"  - {r}" for r in d.get("reasons") or []]
        ev = train.get("eval") or {}
        if ev:
            lines.append("- eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in ev.items() if not isinstance(v, dict | list)))
    else:
        lines += ["", "## Model", "", "- no training this night (nightly.train is off)"]
    return "\n".join(lines)


def _report(ws: Workspace, out: dict[str, Any], stage_runs: list[tuple[str, str]], seconds: float) -> None:
    """The night summary (markdown), the datasets it wrote or reused (table), and the night's
    run tagged with its output versions and the model it trained."""
    from dpoflow.flows.reporting import flow_run_id, label_flow_run

    refs = {k: v for k, v in out.items() if isinstance(v, str) and "@" in v and k != "quarantine"}
    publish_markdown("night-summary", night_summary(ws, out, stage_runs, seconds, flow_run_id()),
                     "each stage's run, inputs -> outputs, rows, seconds, skipped; model and promotion")
    publish_table("nightly-outputs", [{"dataset": r.split("@")[0], "version": r, "rows": ws.store.info(r).rows}
                                      for r in refs.values()], "datasets written or reused by this run")
    train = out.get("train") or {}
    models = {f"model:{train['model_version']}"} if train.get("model_version") else set()
    if (train.get("decision") or {}).get("promoted"):
        models.add("promoted")
    label_flow_run(None, {}, refs, models)
