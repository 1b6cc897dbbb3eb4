"""The `ingest` stage function: sources (+ the prior `feedback_events`) -> feedback_events,
signals and quarantine, in two passes over a spool file (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.storage.schemas import FEEDBACK_EVENTS, QUARANTINE
from dpoflow.storage.store import StagedFiles
from dpoflow.tasks.contract import StageContext, StageResult
from dpoflow.tasks.feedback.accumulate import (
    ABUSE_REASONS,
    DUP,
    DUP_QUARANTINED,
    OK,
    Compact,
    EventAccumulator,
)
from dpoflow.tasks.feedback.config import IngestConfig
from dpoflow.tasks.feedback.sources import (
    STATE_KEY,
    RawBatch,
    expected_rows,
    iter_files,
    iter_sql,
    known_responses,
)
from dpoflow.tasks.feedback.validation import (
    null_mask,
    previously_quarantined,
    quarantine_rows,
    validate,
    without_bad_utf8,
)
from dpoflow.tasks.kernels import hash64, indices
from dpoflow.tasks.partitions import release_memory


@dataclass
class _Unit:
    """One batch, prepared by a worker thread: its rows in spool form, the compact columns of
    its valid ones, and its rejected rows."""

    out: pa.Table
    compact: Compact
    new: bool
    rows_in: int = 0
    quarantine: pa.Table | None = None
    again: int = 0


def _to_spool(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Spool form: plain columns, except `source` (one path per batch) as a dictionary."""
    cols = []
    for f in schema:
        c = t.column(f.name).combine_chunks()
        if f.name == "source":
            c = c if pa.types.is_dictionary(c.type) else pc.dictionary_encode(c)
            c = c.cast(f.type)
        elif pa.types.is_dictionary(c.type):
            c = c.dictionary_decode()
        cols.append(c)
    return pa.Table.from_arrays(cols, schema=schema)


def _prepare_source(acc: EventAccumulator, rb: RawBatch, cfg: IngestConfig, now_us: int, now: dt.datetime,
                    cand: pa.Array | None, columns: dict[str, str], seen_ids: pa.Array,
                    schema: pa.Schema, min_us: int) -> _Unit:
    """Validate one raw batch and prepare it (runs in a worker thread)."""
    try:
        v = validate(rb.table, cfg, now_us, rb.source, cand, columns, min_us)
    except pa.ArrowInvalid:  # text that is no UTF-8: those rows to quarantine, the rest goes on
        table, broken = without_bad_utf8(rb.table)
        if not broken.any():
            raise
        rb = RawBatch(table, rb.source, rb.row0)
        v = validate(table, cfg, now_us, rb.source, cand, columns, min_us)
        v.overrule(broken, "malformed row: invalid UTF-8")
    bad = v.bad
    valid = ~bad
    again = 0
    q = None
    if bad.any():
        if len(seen_ids):
            # invalid rows whose event id was quarantined before: not again
            eid = v.typed.column("event_id").combine_chunks()
            has = ~null_mask(eid)
            h = np.zeros(len(has), np.uint64)
            h[has] = hash64(pc.filter(eid, pa.array(has)))
            seen = has & np.asarray(pc.is_in(pa.array(h), value_set=seen_ids).to_numpy(
                zero_copy_only=False), bool) & bad
            again = int(seen.sum())
            bad = bad & ~seen
        if bad.any():
            idx = np.nonzero(bad)[0]
            q = quarantine_rows(rb.table, idx, v.reason[bad].tolist(), rb.source, idx + rb.row0, now)
    allv = bool(valid.all())
    compact = acc.prepare(v.typed, v.response_codes, None if allv else valid)
    return _Unit(_to_spool(v.typed, schema), compact, True, rb.table.num_rows, q, again)


def _prepare_prior(acc: EventAccumulator, b: pa.RecordBatch, schema: pa.Schema) -> _Unit:
    out = _to_spool(pa.Table.from_batches([b]), schema)
    return _Unit(out, acc.prepare(out), False)


def oldest_accepted_us(cfg: IngestConfig, now: dt.datetime) -> int:
    """The start of the timestamp window (UTC us): `min_ts`, else `max_event_age_days` before
    as_of (or before the ingest time when as_of is not set). Older events are `stale ts`."""
    def utc(t: dt.datetime) -> dt.datetime:  # naive config times are UTC, like naive event times
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)

    if cfg.min_ts is not None:
        return int(utc(cfg.min_ts).timestamp() * 1e6)
    ref = min(utc(cfg.as_of), now) if cfg.as_of else now
    return int((ref - dt.timedelta(days=cfg.max_event_age_days)).timestamp() * 1e6)


def ingest(ctx: StageContext) -> StageResult:
    """Stage function: sources (+ prior `feedback_events`) -> feedback_events, signals, quarantine.

    Pass 1 streams batches through two worker threads (validate, hash, encode: Arrow and numpy
    release the GIL) and files them in order into the partitioned state, spooling every row to
    an Arrow IPC file. Exactly-once and the abuse filters then give every spooled row a status;
    pass 2 writes the spool's accepted rows as staged Parquet files from two threads while a
    third computes votes and signals."""
    cfg: IngestConfig = ctx.config
    store = ctx.store
    now = dt.datetime.now(dt.UTC)
    now_us = int(now.timestamp() * 1e6)
    min_us = oldest_accepted_us(cfg, now)
    state_all = store.get_state(STATE_KEY, {}) or {}
    cand = known_responses(store, ctx.inputs.get("candidates"), ctx.inputs.get("served"),
                           cfg.candidate_lookback_versions)
    if cand is None:
        ctx.logger.warning("ingest: neither `served` nor `candidates` exists: the orphan check is off")
    prior_n = store.info(ctx.inputs["feedback_events"]).rows if ctx.has("feedback_events") else 0
    acc = EventAccumulator(cfg, ctx.scratch, prior_n + expected_rows(cfg, state_all))
    if cand is not None:
        acc.preload(cand)
    seen_raw, seen_ids, acc.blocked = previously_quarantined(store)
    seen_ids_arr = pa.array(seen_ids)
    spool_path = ctx.scratch / f"spool-{uuid.uuid4().hex}.arrow"
    # the spool holds `source` as an int32 code into `labels` (one path per batch, not a copy
    # per row; IPC files allow no per-batch dictionaries)
    work_schema = pa.schema([f.with_nullable(True) if f.name != "source" else
                             pa.field("source", pa.dictionary(pa.int32(), pa.string()), True)
                             for f in FEEDBACK_EVENTS])
    spool_schema = pa.schema([f.with_nullable(True) if f.name != "source" else pa.field("source", pa.int32(), True)
                              for f in FEEDBACK_EVENTS])
    label_code: dict[str | None, int] = {}
    lens: list[int] = []
    quarantine: list[pa.Table] = []
    counts: Counter = Counter()
    tally = Counter()  # rows_in, prior_rows, again_ids
    new_state: dict[str, Any] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with pa.OSFile(str(spool_path), "wb") as sink, pa.ipc.new_file(sink, spool_schema) as spool, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest") as pool:
            pending: deque[Future] = deque()

            def drain(limit: int) -> None:
                while len(pending) > limit:
                    u: _Unit = pending.popleft().result()
                    tally["rows_in"] += u.rows_in
                    tally["again_ids"] += u.again
                    if u.quarantine is not None:
                        quarantine.append(u.quarantine)
                    acc.merge(u.compact, u.new)  # row numbers = spool rows: both count every row
                    if u.out.num_rows:
                        src = u.out.column("source").combine_chunks()
                        m = [label_code.setdefault(x, len(label_code)) for x in src.dictionary.to_pylist()]
                        m.append(label_code.setdefault(None, len(label_code)))  # null sources (prior rows)
                        codes = np.array(m, np.int32)[indices(src, len(m) - 1)]
                        i = u.out.schema.get_field_index("source")
                        out = u.out.set_column(i, spool_schema.field("source"), pa.array(codes))
                        for b in out.to_batches():
                            spool.write_batch(b)
                            lens.append(b.num_rows)

            if ctx.has("feedback_events"):
                for b in store.read_batches(ctx.inputs["feedback_events"], batch_size=cfg.batch_rows):
                    tally["prior_rows"] += b.num_rows
                    pending.append(pool.submit(_prepare_prior, acc, b, work_schema))
                    drain(1)
            for src in cfg.sources:
                st = dict(state_all.get(src.name) or {})
                ns: dict[str, Any] = {}
                parse_q: list[pa.Table] = []
                it = iter_files(src, st, cfg.batch_rows, parse_q, ns) if src.kind == "files" else iter_sql(src, st, ns)
                rows_read = 0
                for rb in it:
                    rows_read += rb.table.num_rows
                    pending.append(pool.submit(_prepare_source, acc, rb, cfg, now_us, now, cand, src.columns,
                                               seen_ids_arr, work_schema, min_us))
                    drain(1)  # two batches in the workers, one being read: bounded memory
                drain(0)
                if src.kind == "sql":
                    ns["rows_last_run"] = rows_read  # sizes the next run's state partitions
                for q in parse_q:
                    tally["rows_in"] += q.num_rows
                    reasons = ["malformed row: invalid JSON" if r.startswith("invalid JSON") else
                               "malformed row: CSV" if "CSV" in r else f"malformed row: {r}"
                               for r in q.column("reason").to_pylist()]
                    q = q.set_column(q.schema.get_field_index("reason"), QUARANTINE.field("reason"),
                                     pa.array(reasons, pa.string()))
                    quarantine.append(q)
                new_state[src.name] = ns
            drain(0)
        t1, c1 = time.perf_counter(), time.process_time()
        release_memory()  # pass 1's batches
        outcome = acc.abuse(now_us)
        release_memory()  # the event-id partitions
        status = outcome.status  # per spooled row: OK, INVALID, DUP, DUP_QUARANTINED or abuse
        if len(status) != sum(lens):  # both count every row of every batch, in the same order
            raise RuntimeError(f"ingest: {len(status)} row verdicts for {sum(lens)} spooled rows")
        prior = tally["prior_rows"]  # the prior version's rows come first
        sig_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-signals")
        sig_future = sig_pool.submit(acc.signals, outcome)  # runs while the events are written
        sig_pool.shutdown(wait=False)
        t3 = time.perf_counter()
        t2, c2 = time.perf_counter(), time.process_time()
        labels = pa.array(list(label_code), pa.string())
        quarantine.append(_abuse_quarantine(spool_path, lens, status, labels, now))
        q = pa.concat_tables(quarantine) if quarantine else quarantine_rows(pa.table({}), np.zeros(0, int), [], "", None, now)
        for r, c in Counter(q.column("reason").to_pylist()).items():
            counts[r] += c
        # rows quarantined by an earlier run and seen again are not quarantined twice
        again = np.array([r in seen_raw for r in q.column("raw").to_pylist()], bool) if seen_raw else \
            np.zeros(q.num_rows, bool)
        if again.any():
            q = q.filter(pa.array(~again))
        accepted_new = int((status[prior:] == OK).sum())
        dropped = {"duplicate event_id": acc.dropped[DUP],
                   "already quarantined": acc.dropped[DUP_QUARANTINED] + int(again.sum()) + tally["again_ids"]}
        moved = {ABUSE_REASONS[k]: int((status[:prior] == k).sum()) for k in ABUSE_REASONS}
        report = {
            "rows_in": tally["rows_in"], "prior_events": tally["prior_rows"], "accepted": accepted_new,
            "events_total": int((status == OK).sum()), "quarantined": dict(counts),
            "dropped": {k: v for k, v in dropped.items() if v},
            "moved_from_prior_to_quarantine": {k: v for k, v in moved.items() if v},
            "signals": None,
            "propensities": {str(k): v for k, v in outcome.propensities.items()},
            "as_of": outcome.as_of.isoformat() if outcome.as_of else None, "watermarks": new_state,
            "seconds": {"read_validate": round(t1 - t0, 3), "abuse": round(t2 - t1, 3),
                        "quarantine": round(time.perf_counter() - t3, 3)},
            "cpu_seconds": {"read_validate": round(c1 - c0, 3), "abuse": round(c2 - c1, 3)},
            "state": {"partitions": acc.by_id.k, "spilled_mb": round(acc.budget.spilled_bytes / 2**20, 1)},
        }
        ctx.logger.info("ingest: %s rows in, %s accepted, quarantined %s, dropped %s", tally["rows_in"], accepted_new,
                        dict(counts), report["dropped"])
        # pass 2: two threads encode the accepted rows into the version's Parquet files (every
        # other spool batch each) while the signals thread works
        t4 = time.perf_counter()
        nb = len(lens)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-write") as ex:
            parts = [ex.submit(store.stage_files, "feedback_events",
                               _kept_batches(spool_path, lens, status, labels, range(i, nb, 2))) for i in range(2)]
            actions = tuple(a for f in parts for a in f.result().actions)
        t5 = time.perf_counter()
        signals = sig_future.result()
        report["signals"] = signals.num_rows
        report["seconds"].update(write_events=round(t5 - t4, 3), signals_wait=round(time.perf_counter() - t5, 3))
        meta = {"watermarks": new_state, "as_of": report["as_of"], "propensities": report["propensities"]}
        return StageResult(outputs={"feedback_events": StagedFiles("feedback_events", actions), "signals": signals},
                           quarantine=q, report=report, metadata={"feedback_events": meta, "signals": meta})
    finally:
        spool_path.unlink(missing_ok=True)
        acc.close()


def _from_spool(b: pa.RecordBatch, labels: pa.Array, schema: pa.Schema) -> pa.RecordBatch:
    """A spooled batch back in contract form (`source` codes -> the label strings)."""
    i = b.schema.get_field_index("source")
    cols = list(b.columns)
    cols[i] = pa.DictionaryArray.from_arrays(cols[i], labels).dictionary_decode()
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _kept_batches(path: Path, lens: list[int], status: np.ndarray, labels: pa.Array,
                  which: range, step: int = 1 << 18) -> Iterator[pa.RecordBatch]:
    """Second pass over the spool: the rows of batches `which` whose status is OK, in contract
    form. Each batch is read through its own memory map (page-cache pages, mapped 16 at a time
    per fault, instead of fresh anonymous memory that faults page by page) and unmapped when
    done, so the mapped pages never add up in this process's memory."""
    offs = np.r_[0, np.cumsum(lens)].astype(np.int64)
    schema = pa.schema([f.with_nullable(True) for f in FEEDBACK_EVENTS])
    for i in which:
        batch = _spool_batch(path, i)
        if batch is not None:
            for s in range(0, batch.num_rows, step):  # slices: the writer threads hold little each
                b = batch.slice(s, step)
                m = status[offs[i] + s:offs[i] + s + b.num_rows] == OK
                if not m.all():
                    b = b.filter(pa.array(m))
                if b.num_rows:
                    yield _from_spool(b, labels, schema)
        batch = None


def _spool_batch(path: Path, i: int) -> pa.RecordBatch:
    """Batch `i` of the spool, zero-copy over a memory map that lives as long as the batch."""
    with pa.memory_map(str(path)) as mm:
        return pa.ipc.open_file(mm).get_batch(i)


def _abuse_quarantine(path: Path, lens: list[int], status: np.ndarray, labels: pa.Array,
                      now: dt.datetime) -> pa.Table:
    """Quarantine rows for events flagged as abuse (new or moved from the prior version); only
    the spool batches holding such rows are read."""
    parts = []
    flagged = np.isin(status, list(ABUSE_REASONS))
    if flagged.any():
        offs = np.r_[0, np.cumsum(lens)].astype(np.int64)
        for i in range(len(lens)):
            idx = np.nonzero(flagged[offs[i]:offs[i + 1]])[0]
            if len(idx):
                b = _from_spool(_spool_batch(path, i).take(pa.array(idx)), labels,
                                pa.schema([f.with_nullable(True) for f in FEEDBACK_EVENTS]))
                st = status[offs[i]:offs[i + 1]][idx]
                t = pa.Table.from_batches([b]).drop_columns(["source"])
                srcs = b.column(b.schema.get_field_index("source")).to_pylist()
                parts.append(quarantine_rows(t, np.arange(len(idx)), [ABUSE_REASONS[int(s)] for s in st],
                                             [s or "feedback_events" for s in srcs], None, now))
    return pa.concat_tables(parts) if parts else quarantine_rows(pa.table({}), np.zeros(0, int), [], "", None, now)
