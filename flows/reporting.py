"""Reporting to Prefect: run loggers, table / markdown / progress artifacts, batched posting.

Everything here is a no-op outside a Prefect flow run, so the stages and the runner can call
it unconditionally, and the core (`tasks/`) never needs to know Prefect exists.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type hints only: the runner imports this module
    from dpoflow.flows.runner import StageRun

log = logging.getLogger("dpoflow")


def flow_run_id() -> str | None:
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    except Exception:  # outside a flow run
        return None


def stage_logger(stage: str) -> logging.Logger:
    if flow_run_id():
        from prefect.logging import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    return logging.getLogger(f"dpoflow.{stage}")


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if not flow_run_id() or not rows:
        return
    from prefect.artifacts import TableArtifact

    _publish("table", key, TableArtifact(table=rows).format(_sync=True), description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if not flow_run_id():
        return
    _publish("markdown", key, markdown, description)


class _ArtifactPoster:
    """Posts run-report artifacts through one long-lived API client on one worker thread.

    Prefect's ``create_table_artifact`` opens a new client per call (a CSRF round trip each),
    and a nightly run publishes ~25 artifacts at ~25 ms per post: a fifth of Prefect's whole
    overhead on the demo night, whose stages take tenths of a second. Inside
    :func:`batched_artifacts` (the nightly flow) artifacts are queued instead and posted
    (a) in the background while the run waits on long work that writes nothing else to the API
    (the training process, :func:`artifacts_posted_meanwhile`), (b) at a stage boundary once
    the oldest one has waited ``max_delay_s`` (:func:`post_overdue_artifacts`), so the UI of a
    long night lags by one stage at most, and (c) when the block ends. Background posts never
    overlap the creation of runs: the temporary server's SQLite answers concurrent writes with
    503s, which the client retries only after 2 s.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._clients: dict[str | None, Any] = {}  # touched by the worker thread only
        self._lock = threading.Lock()
        self._queue: list[tuple[float, contextvars.Context, Callable[[Any], Any]]] = []
        self._inflight: list[Any] = []

    def _submit(self, ctx: contextvars.Context, call: Callable[[Any], Any]) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dpoflow-artifacts")
        return self._pool.submit(ctx.run, self._send, call)  # ctx: the flow's settings (API URL)

    def _send(self, call: Callable[[Any], Any]) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        if url not in self._clients:
            client = get_client(sync_client=True)
            client.__enter__()
            self._clients[url] = client
        return call(self._clients[url])

    def call_soon(self, call: Callable[[Any], Any]) -> Any:
        """Run ``call(client)`` on the worker thread now; returns its future."""
        with self._lock:
            fut = self._submit(contextvars.copy_context(), call)
            done = [f for f in self._inflight if f.done()]
            self._inflight = [f for f in self._inflight if not f.done()] + [fut]
        _await(*done)  # finished background posts: their errors are logged, not dropped
        return fut

    def post(self, request: Any) -> None:
        """Create an artifact: queued inside `batched_artifacts`, else posted now."""
        self.post_call(lambda client: client.create_artifact(request))

    def post_call(self, call: Callable[[Any], Any]) -> None:
        """Run ``call(client)``: queued inside `batched_artifacts`, else now."""
        if _BATCH.get():
            with self._lock:
                self._queue.append((time.monotonic(), contextvars.copy_context(), call))
            return
        _await(self.call_soon(call))

    def start(self, older_than_s: float | None = None) -> None:
        """Hand the queue to the worker (only if its oldest entry is older than `older_than_s`)."""
        with self._lock:
            if not self._queue or (older_than_s is not None and time.monotonic() - self._queue[0][0] < older_than_s):
                return
            queued, self._queue = self._queue, []
            self._inflight += [self._submit(ctx, call) for _, ctx, call in queued]

    def wait(self) -> None:
        with self._lock:
            inflight, self._inflight = self._inflight, []
        _await(*inflight)


def _await(*futures: Any) -> None:
    for f in futures:
        try:
            f.result(120)
        except Exception as exc:  # noqa: BLE001 - a report must never fail the run
            log.warning("dpoflow: a run artifact could not be published: %s", exc)


_POSTER = _ArtifactPoster()
_BATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("dpoflow_batch_artifacts", default=False)


def _publish(kind: str, key: str, data: str, description: str) -> None:
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.utilities.context import get_task_and_flow_run_ids

    task_run_id, run_id = get_task_and_flow_run_ids()
    _POSTER.post(ArtifactCreate(type=kind, key=artifact_key(key), description=description, data=data,
                                flow_run_id=run_id, task_run_id=task_run_id))


def progress_reporter(key: str, description: str, *, background: bool = False, every_s: float = 2.0,
                      clock: Callable[[], float] = time.monotonic) -> Callable[[float], None] | None:
    """A Prefect progress artifact for the current run (None outside one), written through the
    artifact thread's client, off the critical path: the run waits only for the 100% update
    (so the stage's run shows it when it returns), with ``background=True`` not even for that.
    A shard's task run is created through Prefect's event stream, not by an API write that
    these could race (a 503 and a 2 s retry on the temporary server). Updates come at most
    every `every_s` seconds, only when the percentage moved, and always at 100%."""
    if not flow_run_id():
        return None
    from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
    from prefect.utilities.context import get_task_and_flow_run_ids

    task_run_id, run_id = get_task_and_flow_run_ids()
    created: list[Any] = []

    def create(client: Any) -> None:
        created.append(client.create_artifact(ArtifactCreate(
            type="progress", key=artifact_key(key), description=description, data=0.0,
            flow_run_id=run_id, task_run_id=task_run_id)).id)

    def update(client: Any, pct: float) -> None:
        if created:
            client.update_artifact(created[0], ArtifactUpdate(data=pct))

    def run(fn: Callable[[Any], Any], wait: bool) -> None:
        fut = _POSTER.call_soon(fn)  # one worker thread: the posts before this one are done when it is
        if wait:
            _await(fut)

    run(create, wait=False)
    last, sent = [clock()], [0.0]

    def report(fraction: float) -> None:
        now = clock()
        pct = round(100.0 * min(max(fraction, 0.0), 1.0), 2)
        if pct == sent[0] or (pct < 100.0 and now - last[0] < every_s):
            return
        last[0], sent[0] = now, pct
        # the end is waited for (unless `background`): the run shows 100% once the stage returns
        run(lambda c: update(c, pct), wait=not background and pct >= 100.0)

    return report


# --- images that render anywhere: embedded as data URIs -----------------------------------------

def data_uri(path: str | Path, max_bytes: int = 2_000_000) -> str | None:
    """A PNG / JPEG / SVG file as a ``data:`` URI (None if missing or larger than `max_bytes`):
    a path on the worker's disk shows as a broken image in the UI on any other machine."""
    import base64
    import mimetypes

    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > max_bytes:
            return None
        data = p.read_bytes()
    except OSError:
        return None
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def embed_images(markdown: str, base: str | Path | None = None) -> str:
    """Replace every ``![alt](local file)`` in `markdown` by the image's data URI (relative
    paths against `base`); a file that cannot be read becomes a note instead of a broken image."""
    import re

    def swap(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2).strip()
        if target.startswith(("data:", "http://", "https://")):
            return m.group(0)
        path = Path(target) if Path(target).is_absolute() or base is None else Path(base) / target
        uri = data_uri(path)
        return f"![{alt}]({uri})" if uri else f"*({alt}: image not readable here: `{target}`)*"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", swap, markdown)


# --- live training progress: a progress bar, a markdown card and a terminal line -------------

def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def last_metrics_row(path: Path) -> dict[str, Any] | None:
    """The last complete row of a metrics.jsonl the trainer appends to (None before the first)."""
    import json
    import os

    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row half written
        if isinstance(row, dict) and row.get("step"):
            return row
    return None


def progress_card(row: dict[str, Any], elapsed_s: float, fraction: float) -> dict[str, Any]:
    """What the live training progress shows: step, loss, reward accuracy and margin, tokens/s, ETA."""
    def num(k: str) -> float | None:
        v = row.get(k)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    eta = elapsed_s * (1 - fraction) / fraction if fraction > 0 else None
    return {"step": int(row.get("step") or 0), "total_steps": row.get("total_steps"), "loss": num("loss"),
            "reward_accuracy": num("rewards/accuracies"), "reward_margin": num("rewards/margins"),
            "tokens_per_s": num("tokens_per_s"), "eta_s": round(eta, 1) if eta is not None else None,
            "elapsed_s": round(elapsed_s, 1), "fraction": round(fraction, 4)}


def progress_line(card: dict[str, Any]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    width = 20
    done = int(round(width * card["fraction"]))
    return (f"train [{'#' * done}{'.' * (width - done)}] step {card['step']}/{card['total_steps'] or '?'} "
            f"loss {f(card['loss'], '.4f')} acc {f(card['reward_accuracy'], '.2f')} "
            f"margin {f(card['reward_margin'], '.3f')} {f(card['tokens_per_s'], '.0f')} tok/s "
            f"ETA {_fmt_s(card['eta_s']) if card['eta_s'] is not None else '-'}")


def progress_markdown(card: dict[str, Any]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return "\n".join([
        f"# Training: step {card['step']} of {card['total_steps'] or '?'} ({100 * card['fraction']:.0f}%)", "",
        "| step | loss | reward accuracy | reward margin | tokens/s | elapsed | ETA |",
        "|---|---|---|---|---|---|---|",
        f"| {card['step']} | {f(card['loss'], '.4f')} | {f(card['reward_accuracy'], '.3f')} | "
        f"{f(card['reward_margin'], '.4f')} | {f(card['tokens_per_s'], '.0f')} | {_fmt_s(card['elapsed_s'])} | "
        f"{_fmt_s(card['eta_s']) if card['eta_s'] is not None else '-'} |"])


def training_progress(metrics_root: str | Path, *, stream: Any = None,
                      clock: Callable[[], float] = time.monotonic, report_to: str = "none",
                      tracking_dir: str | Path | None = None, every_s: float = 5.0) -> Callable[[float], None]:
    """A callback for the training launcher's `on_progress(fraction)`: reads the newest row of
    the metrics.jsonl under `metrics_root` (the trainer writes one per logged step) and shows
    it as a progress artifact, a markdown card updated in place (`train-live`) and a line on
    the terminal (redrawn in place on a tty). Outside a flow run only the terminal line.
    `report_to` (tensorboard / mlflow) also streams every new row to that tracker (TensorBoard
    event files under `tracking_dir`/<run>); a missing package is a ValueError here, before
    any training step. The artifacts are updated at most every `every_s` seconds (and at the
    end): an in-process trainer reports every step, and each update costs the API server CPU
    that the training shares on a small machine."""
    import importlib.util

    from dpoflow.flows.tracking import TRACKERS, Tracker, read_rows

    if report_to != "none" and (report_to not in TRACKERS or importlib.util.find_spec(report_to) is None):
        Tracker(report_to, tracking_dir or metrics_root, "check")  # raises the one-line reason
    tracker: list[Tracker] = []
    root, t0, started = Path(metrics_root), clock(), time.time()
    stream = stream or sys.stderr
    bar = progress_reporter("train-progress", "train: optimizer steps done", background=True, every_s=0.0)
    card_id: list[Any] = []
    run_ids = None
    if flow_run_id():
        from prefect.utilities.context import get_task_and_flow_run_ids

        run_ids = get_task_and_flow_run_ids()

    def newest() -> Path | None:
        files = [p for p in root.glob("*/metrics.jsonl") if p.stat().st_mtime >= started - 5]  # this run's
        return max(files, key=lambda p: p.stat().st_mtime, default=None)

    def post(md: str) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        def send(client: Any) -> None:
            if card_id:
                client.update_artifact(card_id[0], ArtifactUpdate(data=md))
            else:
                card_id.append(client.create_artifact(ArtifactCreate(
                    type="markdown", key="train-live", description="training progress (live)", data=md,
                    flow_run_id=run_ids[1], task_run_id=run_ids[0])).id)

        _POSTER.call_soon(send)  # in the background: the run only waits on the trainer meanwhile

    def track(path: Path, done: bool) -> None:
        if not tracker:
            tracker.append(Tracker(report_to, tracking_dir or root / "tracking", path.parent.name))
        tracker[0].log(read_rows(path))
        if done:
            tracker.pop().close()

    posted = [float("-inf")]

    def on_progress(fraction: float) -> None:
        now = clock()
        due = fraction >= 1.0 or now - posted[0] >= every_s
        if due:
            posted[0] = now
        path = newest()
        row = last_metrics_row(path) if path else None
        if bar is not None and due:
            bar(fraction)
        if report_to != "none" and path is not None:
            track(path, fraction >= 1.0)
        if row is None:
            return
        card = progress_card(row, now - t0, fraction)
        tty = getattr(stream, "isatty", lambda: False)()
        print(("\r" if tty else "") + progress_line(card), end="" if tty and fraction < 1 else "\n",
              file=stream, flush=True)
        if run_ids is not None and due:
            post(progress_markdown(card))

    return on_progress


@contextlib.contextmanager
def batched_artifacts() -> Iterator[None]:
    """Queue the run artifacts published inside the block (subflows included: Prefect runs
    them in copies of this context); all are posted when it ends."""
    token = _BATCH.set(True)
    try:
        yield
    finally:
        _BATCH.reset(token)
        _POSTER.start()
        _POSTER.wait()


def post_overdue_artifacts(max_delay_s: float) -> None:
    """At a stage boundary: post the queue now if its oldest artifact waited `max_delay_s`."""
    _POSTER.start(older_than_s=max_delay_s)
    _POSTER.wait()


def wait_for_artifacts() -> None:
    """Wait for the posts handed to the worker thread (their errors are logged)."""
    _POSTER.wait()


def post_queue_meanwhile(*_: Any) -> None:
    """Hand the queue to the worker thread without waiting: a stage flow's `on_running` hook in
    the nightly, so the previous stages' reports are posted while this stage computes, after
    its run was created (never racing that); the stage's end (`stage_finished`) waits for them."""
    _POSTER.start()


@contextlib.contextmanager
def artifacts_posted_meanwhile() -> Iterator[None]:
    """Post the queue in the background during the block, which must write nothing else to
    the Prefect API (e.g. waiting on the training process); wait for the posts at its end."""
    _POSTER.start()
    try:
        yield
    finally:
        _POSTER.wait()


# --- what each flow run did, recorded in the store (read back by `dpoflow run --deployment`) ---

def run_record_key(run_id: str) -> str:
    return f"flow_run_{run_id}"


def record_stage_run(store: Any, run: StageRun, inputs: dict[str, str], rows_out: dict[str, int],
                     run_id: str | None = None) -> dict[str, Any] | None:
    """Append what a stage run read, wrote (or reused) to its flow run's record in the store.

    Why the store: a flow's return value lives only in the process that ran it (the worker's),
    and outputs reused by a skipped stage carry no commit of this run. The steps of one flow
    run are sequential, so a read-modify-write of its own record has no other writer."""
    run_id = run_id or flow_run_id()
    if not run_id:
        return None
    rec = {"stage": run.stage, "inputs": dict(inputs), "outputs": dict(run.outputs), "skipped": run.skipped,
           "seconds": round(run.seconds, 3), "rows": dict(rows_out)}
    steps = [s for s in store.get_state(run_record_key(run_id), []) or [] if s.get("stage") != run.stage]
    store.set_state(run_record_key(run_id), steps + [rec])
    return rec


def stage_finished(store: Any, run: StageRun, inputs: dict[str, str], rows_out: dict[str, int]) -> None:
    """Called by the runner after every stage run (also a skipped one): record it under the
    flow run's id and make the flow run say what it read and wrote (name and tags)."""
    run_id = flow_run_id()
    if not run_id:
        return
    record_stage_run(store, run, inputs, rows_out, run_id)
    label_flow_run(run.stage, inputs, run.outputs)
    _POSTER.wait()  # reports posted while the stage ran (`post_queue_meanwhile`) end before its run does
    if run.stage == "train":  # evaluation and the gate follow as task runs (no run created through the API):
        _POSTER.start()       # the queue is posted meanwhile; their own ends wait for it


_LABELS: dict[str, set[str]] = {}  # flow run id -> tags this process gave it (a flow runs several stages)


def run_name(stage: str, inputs: dict[str, str]) -> str:
    """`pairs <- candidates@12,scores@12`: what a stage run read, as its flow run's name."""
    return f"{stage} <- {','.join(sorted(inputs.values())) or 'nothing'}"


def version_tags(inputs: dict[str, str], outputs: dict[str, str]) -> set[str]:
    return {f"in:{r}" for r in inputs.values()} | {f"out:{r}" for k, r in outputs.items() if k != "quarantine"}


def label_flow_run(stage: str | None, inputs: dict[str, str], outputs: dict[str, str],
                   extra_tags: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Rename the current flow run after `stage` (only the stage its flow is named after: the
    train flow's evaluate / promote steps keep `train`'s name) and add version tags."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    fr = ctx.flow_run
    added = _LABELS.setdefault(str(fr.id), set())
    added |= version_tags(inputs, outputs) | set(extra_tags)
    if len(_LABELS) > 256:  # long-lived worker processes: forget old runs
        _LABELS.pop(next(iter(_LABELS)))
    tags = sorted(set(fr.tags or []) | added)
    name = run_name(stage, inputs) if stage and ctx.flow is not None and ctx.flow.name == stage else None
    rid = str(fr.id)
    with _LABEL_LOCK:
        queued = rid in _PENDING_LABELS
        _PENDING_LABELS[rid] = (name or (_PENDING_LABELS.get(rid) or (None,))[0], tags)
    if queued:
        return  # the PATCH already queued for this run sends the newest name and tags

    def send(client: Any) -> None:
        with _LABEL_LOCK:
            new_name, new_tags = _PENDING_LABELS.pop(rid)
        client.update_flow_run(fr.id, name=new_name, tags=new_tags)  # a failure is logged; the next step labels again

    _POSTER.post_call(send)


# One PATCH per flow run and batch: the runner labels a run after each of its steps (the train
# flow runs four, the nightly's imports several), and only the newest name and tags matter.
_LABEL_LOCK = threading.Lock()
_PENDING_LABELS: dict[str, tuple[str | None, list[str]]] = {}  # flow run id -> (name, tags) queued, not sent


def stage_runs(store: Any, run_id: str) -> list[dict[str, Any]]:
    """The stage runs a flow run recorded; for runs that recorded nothing, the versions whose
    commit names this flow run (the lineage every write carries)."""
    steps = store.get_state(run_record_key(run_id), None)
    if steps:
        return list(steps)
    found: dict[str, list[dict[str, Any]]] = {}
    for name in store.list():
        for info in store.log(name)[:5]:  # newest first: a run writes among the last versions
            if info.flow_run_id == run_id:
                rec = found.setdefault(info.stage or "?", [{"stage": info.stage, "inputs": {}, "outputs": {},
                                                             "skipped": False, "seconds": None, "rows": {}}])[0]
                rec["outputs"][name] = info.ref
                rec["rows"][name] = info.rows
                rec["inputs"].update({p.split("@")[0]: p for p in info.parents})
    return [r[0] for r in found.values()]
