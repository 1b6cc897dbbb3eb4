"""The `ingest` stage: user-behaviour events -> validated `feedback_events` + per-response `signals`.

Why it looks like this: events arrive every day, partly overlapping what came before, with junk
rows, bots and position bias. The stage therefore

1. reads each configured source incrementally (files: only new or changed files; SQL: rows at or
   after the stored watermark, minus a look-back window for late rows), in batches;
2. validates every row and sends bad ones to `quarantine` with a reason (never a silent drop);
3. de-duplicates by ``event_id`` against everything accepted before (exactly-once);
4. filters abuse (rate caps, uniform voters, bursts) over all events so far;
5. aggregates one vote per user per (response, vote group), latest wins, into signals.

Storage mode: each run writes a *full* new version of `feedback_events` (all valid events so
far, prior version + new, deduplicated), so a version is self-contained and abuse found later
can move older events to quarantine. The hot path works on compact numeric arrays (64-bit
hashes of ids, integer codes), streamed batch by batch; raw rows are spooled to an uncompressed
Arrow IPC file in scratch space, never held in memory whole.

Performance shape (benchmarks/README.md, "Feedback ingestion"): pass 1 validates and encodes
batches in two worker threads (Arrow and numpy release the GIL); the main thread spools every
row and files the compact state of the valid ones into hash partitions: event-id hashes by
event id, the rest (user hash, response code, type, ts, value, position) by user, so each
partition holds every row of its keys. The partitions stay in memory up to
`ingest.state_memory_mb` and spill to scratch files past it (tasks/partitions.py), so memory
does not grow with the number of events. Then, two partitions at a time: exactly-once (one
sort per event-id partition, the first occurrence wins) and the abuse filters (per user
partition). Pass 2 encodes the accepted rows into the version's Parquet files from two threads
(`DatasetStore.stage_files`) while a third counts the votes and signals per user partition.

Signal formulas (also in README.md, "Feedback signals"), per response r over
its winning votes v (after dedup and abuse filtering):

    s_v   = w[type_v]                                  (dwell: w_dwell * min(value_v / dwell_full_ms, 1))
    d_v   = 2 ** (-(T - ts_v) / half_life)             (T = as_of, default: newest valid event)
    ipw_v = 1 / max(p[pos_v], p_min)                   (1 when no position is logged)
    e_v   = s_v * d_v * ipw_v
    P = sum(max(e_v, 0)),  N = sum(max(-e_v, 0)),  n = P + N
    positive_share  = P / n
    behaviour_score = (P - N + m * mu0) / (n + m)      (Bayesian average of +-1 votes, m prior votes at mu0)
    wilson_lower    = (p + z^2/2n - z*sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),  p = P / n
    confidence      = 1 - (wilson_upper - wilson_lower)   (narrow interval -> confident)
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from dpoflow.flows.config import Section
from dpoflow.storage.schemas import FEEDBACK_EVENTS, QUARANTINE, SIGNALS, TS
from dpoflow.tasks.partitions import Budget, Partitions, partition_count, release_memory

STAGE = "ingest"
STRING_FIELDS = ["event_id", "user_id", "response_id", "event_type", "session_id", "surface", "variant"]
REQUIRED = ["event_id", "user_id", "response_id", "event_type", "ts"]
FILE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                ".json": "jsonl", ".csv": "csv"}
DEFAULT_WEIGHTS = {"like": 1.0, "dislike": -1.0, "favourite": 2.0, "copy": 0.5, "share": 1.5,
                   "regenerate": -0.5, "report": -3.0, "dwell": 0.5}
# Row status codes in the accumulator (0 = accepted).
OK, INVALID, DUP, DUP_QUARANTINED, RATE_CAP, UNIFORM, BURST = range(7)
ABUSE_REASONS = {RATE_CAP: "abuse: rate cap", UNIFORM: "abuse: uniform voter", BURST: "abuse: burst"}


# --- config ---------------------------------------------------------------------------------

class SourceConfig(Section):
    """One event source. Secrets never live here: SQL URLs are read from the env var `url_env`
    (or, through the flow layer, from the Prefect Secret block `url_secret`)."""

    name: str = Field(..., description="source name: the watermark key and the quarantine `source` label")
    kind: Literal["files", "sql"] = Field("files", description="files (Parquet / JSONL / CSV) or sql")
    path: str | None = Field(None, description="files: a file, a folder, or a glob such as events/*.parquet")
    format: Literal["auto", "parquet", "jsonl", "csv"] = Field("auto", description="files: format (auto = by suffix)")
    url_env: str | None = Field(None, description="sql: NAME of the env var holding the SQLAlchemy URL")
    url_secret: str | None = Field(None, description="sql: NAME of a Prefect Secret block holding the URL "
                                   "(instead of url_env; needs a Prefect server)")
    query: str | None = Field(None, description="sql: a SELECT returning event columns (or use `table`)")
    table: str | None = Field(None, description="sql: a table to read instead of a query")
    watermark_column: str = Field("ts", description="sql: monotone column for incremental reads")
    lookback_s: float = Field(0.0, description="sql: re-read this many seconds before the watermark (late rows); "
                              "event_id dedup makes the overlap harmless")
    chunk_rows: int = Field(50_000, gt=0, description="sql: rows fetched per chunk")
    columns: dict[str, str] = Field(default_factory=dict, description="rename source columns: {source_name: contract_name}")


class AbuseConfig(Section):
    rate_cap_per_day: int = Field(1000, ge=0, description="max events per user per UTC day; over it the user-day is quarantined (0 = off)")
    uniform_min_responses: int = Field(20, ge=0, description="users voting on at least this many responses, always with "
                                       "the same event type, are quarantined (0 = off)")
    uniform_types: list[str] = Field(default_factory=lambda: ["like", "dislike", "favourite", "share", "report"],
                                     description="event types that count as votes for the uniform-voter check")
    burst_max_events: int = Field(60, ge=0, description="more events than this from one user in one burst window is a burst (0 = off)")
    burst_window_s: float = Field(60.0, gt=0, description="burst window length; windows start at multiples of it and at half offsets")


class IngestConfig(Section):
    """Feedback ingestion and aggregation (see the module docstring for the formulas)."""

    sources: list[SourceConfig] = Field(default_factory=list, description="event sources, read in order")
    batch_rows: int = Field(500_000, gt=0, description="rows per processing batch (memory vs speed)")
    state_memory_mb: int = Field(768, gt=0, description="memory for the per-event state (id hashes, codes, "
                                 "times; about 60 bytes an event) before partitions spill to scratch files")
    partition_rows: int = Field(1_000_000, gt=0, description="target events per partition of that state: "
                                "exactly-once, abuse filters and votes work one partition at a time")
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS),
                                            description="event type -> weight; unknown types are quarantined")
    exclusive_groups: list[list[str]] = Field(default_factory=lambda: [["like", "dislike"]],
                                              description="event types that are one vote (latest wins across them)")
    value_required: list[str] = Field(default_factory=lambda: ["dwell"], description="event types that need `value`")
    dwell_full_ms: float = Field(30_000.0, gt=0, description="dwell time that earns the full dwell weight")
    half_life_days: float = Field(30.0, gt=0, description="time-decay half-life of a vote")
    as_of: dt.datetime | None = Field(None, description="reference time for decay (default: newest valid event)")
    future_tolerance_s: float = Field(300.0, ge=0, description="timestamps later than now + this are quarantined")
    candidate_lookback_versions: int = Field(7, ge=0, description="events may answer the candidates of this many "
                                             "earlier `candidates` versions too (feedback on last nights' responses); "
                                             "older ones are orphans")
    propensities: dict[int, float] = Field(default_factory=dict, description="position -> examination propensity "
                                           "(positions past the table use its last entry)")
    estimate_propensities: bool = Field(False, description="estimate propensities from randomised traffic")
    randomised_variant: str = Field("random", description="`variant` value that marks randomised-position traffic")
    min_randomised_events: int = Field(100, ge=1, description="randomised events per position needed to estimate it")
    min_propensity: float = Field(0.05, gt=0, le=1, description="propensity floor (bounds IPW weights at 1/p_min)")
    prior_strength: float = Field(2.0, ge=0, description="m: pseudo-votes in the Bayesian average")
    prior_mean: float = Field(0.0, ge=-1, le=1, description="mu0: prior mean of a vote in [-1, 1]")
    wilson_z: float = Field(1.96, gt=0, description="z of the Wilson interval (1.96 = 95%)")
    abuse: AbuseConfig = Field(default_factory=AbuseConfig, description="bot and abuse filters")


# --- sources --------------------------------------------------------------------------------

class SourceError(ValueError):
    """A source is misconfigured (no path, env var not set, unknown format...)."""


def list_source_files(src: SourceConfig) -> list[Path]:
    """Files of a files-source: a file, every supported file under a folder, or a glob (sorted)."""
    if not src.path:
        raise SourceError(f"source {src.name!r}: `path` is required for kind=files")
    p = Path(src.path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(src.path, recursive=True) if Path(f).is_file()]
    if src.format == "auto":
        files = [f for f in files if f.suffix.lower() in FILE_FORMATS]
    return sorted(f.resolve() for f in files)


def _file_sig(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


def _sql_engine(src: SourceConfig):
    import sqlalchemy as sa

    if not src.url_env:
        raise SourceError(f"source {src.name!r}: `url_env` or `url_secret` (where the URL is kept) is required")
    url = os.environ.get(src.url_env)
    if not url:
        raise SourceError(f"source {src.name!r}: environment variable {src.url_env} is not set")
    return sa.create_engine(url)


def _sql_base(src: SourceConfig) -> str:
    if src.query:
        return src.query.strip().rstrip(";")
    if src.table:
        if not all(part.replace("_", "").isalnum() for part in src.table.split(".")):
            raise SourceError(f"source {src.name!r}: invalid table name {src.table!r}")
        return f"SELECT * FROM {src.table}"
    raise SourceError(f"source {src.name!r}: give `query` or `table` for kind=sql")


def _wm_param(state: dict[str, Any], lookback_s: float) -> Any:
    """The stored watermark as a query parameter (datetimes shifted back by the look-back)."""
    wm = state.get("watermark")
    if wm is None:
        return None
    if state.get("type") == "datetime":
        t = dt.datetime.fromisoformat(wm) - dt.timedelta(seconds=lookback_s)
        return t if state.get("tz") else t.replace(tzinfo=None)
    if state.get("type") == "number":
        return wm - lookback_s if isinstance(wm, int | float) and lookback_s else wm
    if lookback_s:  # ISO text (e.g. SQLite): shift and write back in the same style
        try:
            t = dt.datetime.fromisoformat(str(wm).replace("Z", "+00:00"))
        except ValueError:
            return wm
        sep = "T" if "T" in str(wm) else " "
        return (t - dt.timedelta(seconds=lookback_s)).isoformat(sep=sep)
    return wm


def _wm_state(value: Any) -> dict[str, Any]:
    if isinstance(value, dt.datetime):
        return {"watermark": value.isoformat(), "type": "datetime", "tz": value.tzinfo is not None}
    if isinstance(value, int | float):
        return {"watermark": value, "type": "number"}
    return {"watermark": str(value), "type": "string"}


def source_fingerprint(src: SourceConfig, state: dict[str, Any]) -> Any:
    """What the stage's content key must know about a source, so new events are never skipped."""
    if src.kind == "files":
        return [[str(f), *_file_sig(f)] for f in list_source_files(src)]
    import sqlalchemy as sa

    base = _sql_base(src)
    col = src.watermark_column
    with _sql_engine(src).connect() as conn:
        row = conn.execute(sa.text(f"SELECT COUNT(*), MAX({col}) FROM ({base}) AS src")).one()
    return [int(row[0]), str(row[1]), state.get("watermark")]


@dataclass
class RawBatch:
    table: pa.Table
    source: str  # quarantine label: file path or sql:<name>
    row0: int  # index of the first row within its file / query


def _read_text_file(path: Path, fmt: str) -> tuple[pa.Table, pa.Table]:
    """JSONL / CSV through the import module's tolerant readers (bad lines -> quarantine rows)."""
    from dpoflow.tasks.importing import read_file

    if FILE_FORMATS.get(path.suffix.lower()) != fmt:  # read_file dispatches on the suffix
        raise SourceError(f"{path}: the suffix does not match format {fmt!r}")
    raw, q = read_file(path, "feedback_events")
    q = q.set_column(q.schema.get_field_index("stage"), QUARANTINE.field("stage"),
                     pa.array([STAGE] * q.num_rows, pa.string()))
    return raw, q


def iter_files(src: SourceConfig, state: dict[str, Any], batch_rows: int,
               parse_quarantine: list[pa.Table], new_state: dict[str, Any]) -> Iterator[RawBatch]:
    """New or changed files of a source, in batches; `new_state` gets the files' signatures."""
    seen = dict(state.get("files") or {})
    for f in list_source_files(src):
        sig = _file_sig(f)
        if seen.get(str(f)) == sig:
            continue  # watermark: this exact file content was ingested before
        fmt = src.format if src.format != "auto" else FILE_FORMATS[f.suffix.lower()]
        if fmt == "parquet":
            # plain columns, except the event type: a few distinct values, so its dictionary
            # read is cheaper than the plain one and spares an encode. (Dictionary reads of
            # many-valued columns re-hash every value and cost 3x the decode.)
            md = pq.read_metadata(f)
            et = next((s for s, c in src.columns.items() if c == "event_type"), "event_type")
            pf = pq.ParquetFile(f, pre_buffer=True, metadata=md,
                                read_dictionary=[et] if et in md.schema.names else None)
            row0 = 0
            for b in pf.iter_batches(batch_size=batch_rows):
                yield RawBatch(pa.Table.from_batches([b]), str(f), row0)
                row0 += b.num_rows
        else:
            raw, q = _read_text_file(f, fmt)
            if raw.num_columns == 0 and raw.num_rows:  # rows like {}: keep them countable
                raw = pa.table({"event_id": pa.nulls(raw.num_rows, pa.string())})
            parse_quarantine.append(q)
            for off in range(0, max(raw.num_rows, 1), batch_rows):
                if raw.num_rows:
                    yield RawBatch(raw.slice(off, batch_rows), str(f), off)
        seen[str(f)] = sig
    new_state["files"] = seen


def iter_sql(src: SourceConfig, state: dict[str, Any], new_state: dict[str, Any]) -> Iterator[RawBatch]:
    """Rows at or after the watermark (minus look-back), fetched in chunks of `chunk_rows`."""
    import sqlalchemy as sa

    base, col = _sql_base(src), src.watermark_column
    wm = _wm_param(state, src.lookback_s)
    sql = f"SELECT * FROM ({base}) AS src" + (f" WHERE {col} >= :wm" if wm is not None else "") + f" ORDER BY {col}"
    label = f"sql:{src.name}"
    top = None
    row0 = 0
    with _sql_engine(src).connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=src.chunk_rows).execute(
            sa.text(sql), {"wm": wm} if wm is not None else {})
        keys = list(result.keys())
        for chunk in result.partitions(src.chunk_rows):
            cols = list(zip(*chunk, strict=True)) if chunk else [[] for _ in keys]
            arrays = {}
            for k, vals in zip(keys, cols, strict=True):
                try:
                    arrays[k] = pa.array(list(vals))
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    arrays[k] = pa.array([None if v is None else str(v) for v in vals], pa.string())
            t = pa.table(arrays)
            if col in keys:
                vals = [v for v in cols[keys.index(col)] if v is not None]
                if vals:
                    m = max(vals)
                    top = m if top is None or m > top else top
            yield RawBatch(t, label, row0)
            row0 += len(chunk)
    if top is not None:
        new_state.update(_wm_state(top))
    else:
        new_state.update({k: v for k, v in state.items()})


# --- validation -----------------------------------------------------------------------------

def _to_string(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any scalar column as trimmed text; empty / whitespace-only strings become null (missing)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        dictionary = _to_string(arr.dictionary)
        return pa.DictionaryArray.from_arrays(arr.indices, dictionary)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        if pa.types.is_floating(arr.type):  # 12.0 -> "12" (ids read from CSV / SQL as numbers)
            f = arr.to_numpy(zero_copy_only=False)
            integral = np.isfinite(f) & (np.floor(np.nan_to_num(f)) == np.nan_to_num(f))
            if integral.all() or arr.null_count == len(arr):
                arr = pc.cast(arr, pa.int64(), safe=False)
        try:
            arr = pc.cast(arr, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            arr = pa.array([None if v is None else json.dumps(v, default=str) for v in arr.to_pylist()], pa.string())
    trimmed = pc.utf8_trim_whitespace(arr) if _may_need_trim(arr) else arr
    empty = pc.equal(pc.binary_length(trimmed), 0)
    if not pc.any(empty).as_py():  # the usual case: no copy through if_else
        return trimmed
    return pc.if_else(empty, pa.scalar(None, pa.string()), trimmed)


_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # what utf8_trim_whitespace strips
_ASCII_SPACE[0x80:] = True  # a non-ASCII byte may start or end a Unicode space: trim to be sure


def _may_need_trim(arr: pa.Array) -> bool:
    """Whether any string of a plain string array starts or ends with a (possible) space:
    a look at two bytes a row, so the usual clean column skips the trim's copy."""
    if not pa.types.is_string(arr.type) or len(arr) == 0:
        return True
    offs = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4)
    if arr.buffers()[2] is None or offs[-1] == offs[0]:
        return False
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    full = offs[1:] > offs[:-1]
    first, last = offs[:-1][full], offs[1:][full] - 1
    return bool(_ASCII_SPACE[data[first]].any() or _ASCII_SPACE[data[last]].any())


def _null_np(arr: pa.Array) -> np.ndarray:
    """Null mask; for dictionary arrays a null *dictionary value* counts as null too."""
    if pa.types.is_dictionary(arr.type):
        dnull = _null_np(arr.dictionary)
        idx = arr.indices
        out = _null_np(idx)
        if dnull.any():
            i = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False).astype(np.int64)
            out |= dnull[i]
        return out
    if arr.null_count == 0:
        return np.zeros(len(arr), bool)
    return np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), bool)


def _epoch_to_us(x: np.ndarray) -> np.ndarray:
    """Epoch numbers in s / ms / us / ns (by magnitude) -> microseconds."""
    a = np.abs(x)
    scale = np.where(a >= 1e17, 1e-3, np.where(a >= 1e14, 1.0, np.where(a >= 1e11, 1e3, 1e6)))
    return x * scale


def parse_ts(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Timestamps from Arrow timestamps (naive = UTC), epoch numbers or ISO-8601 text -> UTC us.

    Unparseable values become null; the caller tells them apart from missing ones."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_timestamp(arr.type):
        if arr.type.tz is None:
            arr = pc.assume_timezone(arr, "UTC")
        return pc.cast(arr, TS)
    if pa.types.is_date(arr.type):
        return pc.cast(pc.cast(arr, pa.timestamp("us")), TS)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        us = _epoch_to_us(x)
        ok = np.isfinite(us) & (np.abs(us) < 2**62)
        ints = np.where(ok, us, 0).astype(np.int64)
        mask = ~ok | _null_np(arr)
        return pa.array(ints, TS, mask=mask)
    import pandas as pd

    text = _to_string(arr)
    s = pd.Series(text.to_pylist(), dtype=object)
    num = pd.to_numeric(s, errors="coerce")
    out = pd.to_datetime(s.where(num.isna()), errors="coerce", utc=True, format="ISO8601")
    res = pa.array(out, type=TS, from_pandas=True)
    if num.notna().any():
        from_num = parse_ts(pa.array(num.to_numpy(dtype=float), pa.float64(), mask=num.isna().to_numpy()))
        res = pc.coalesce(res, from_num)
    return res


def _parse_number(col: pa.ChunkedArray | pa.Array, typ: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Numbers (or numeric text) -> `typ`; second value: rows that had a value but not a valid one."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    present = ~_null_np(arr)
    if pa.types.is_integer(arr.type) and pa.types.is_integer(typ):  # the usual case: no float round trip
        x = (pc.fill_null(arr, 0) if arr.null_count else arr).to_numpy().astype(np.int64, copy=False)
        good = present & (x >= 0) & (x < 2**31)  # positions are 0- or 1-based ranks
        return pa.array(x.astype(np.int32), typ, mask=~good), present & ~good
    if pa.types.is_floating(arr.type) and pa.types.is_floating(typ):
        x = arr.to_numpy(zero_copy_only=False)
        good = np.isfinite(x)
        if (good == present).all():  # every value present is a finite number: keep the column
            return arr.cast(typ), np.zeros(len(arr), bool)
    if pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    else:
        import pandas as pd

        text = _to_string(arr)
        x = pd.to_numeric(pd.Series(text.to_pylist(), dtype=object), errors="coerce").to_numpy(dtype=float)
    good = np.isfinite(x)
    if pa.types.is_integer(typ):
        good &= (np.floor(np.nan_to_num(x)) == np.nan_to_num(x)) & (np.abs(np.nan_to_num(x)) < 2**31)
        good &= np.nan_to_num(x) >= 0  # positions are 0- or 1-based ranks
        out = pa.array(np.where(good, x, 0).astype(np.int32), typ, mask=~good)
    else:
        out = pa.array(np.where(good, x, 0.0), typ, mask=~good)
    return out, present & ~good


@dataclass
class Validated:
    typed: pa.Table  # FEEDBACK_EVENTS columns (all nullable), same rows as the raw batch
    code: np.ndarray  # int16 per row: 0 = valid, else an index into `names`
    names: list[str | None]
    response_codes: np.ndarray | None = None  # int32 index of response_id in the candidate ids, -1 = none

    @property
    def bad(self) -> np.ndarray:
        return self.code != 0

    @property
    def reason(self) -> np.ndarray:
        """Object array: None = valid, else the quarantine reason."""
        return np.array(self.names, dtype=object)[self.code]


def validate(raw: pa.Table, cfg: IngestConfig, now_us: int, source: str,
             candidate_ids: pa.Array | None, columns: dict[str, str] | None = None) -> Validated:
    """Type and check one raw batch; every row gets exactly one verdict (valid or one reason).

    Order of checks (the first failing one is the reason): missing field, unknown event type,
    unparseable timestamp, malformed field (value / position), missing value for types that
    need one, future timestamp, orphan (response id matches no candidate)."""
    if columns:
        raw = raw.rename_columns([columns.get(c, c) for c in raw.column_names])
    n = raw.num_rows
    code = np.zeros(n, np.int16)
    names: list[str | None] = [None]

    def mark(mask: np.ndarray, why: str) -> None:
        if not mask.any():
            return
        sel = mask & (code == 0)
        if sel.any():
            names.append(why)
            code[sel] = len(names) - 1

    cols: dict[str, pa.Array] = {}
    for name in STRING_FIELDS:
        cols[name] = _to_string(raw.column(name)) if name in raw.column_names else pa.nulls(n, pa.string())
    if "ts" in raw.column_names:
        ts_in = raw.column("ts")
        ts_in = ts_in.combine_chunks() if isinstance(ts_in, pa.ChunkedArray) else ts_in
        ts_present = ~_null_np(ts_in)
        if pa.types.is_string(ts_in.type) or pa.types.is_large_string(ts_in.type):
            ts_present &= ~_null_np(_to_string(ts_in))
        ts = parse_ts(ts_in)
    else:
        ts_present = np.zeros(n, bool)
        ts = pa.nulls(n, TS)
    for name in REQUIRED:
        miss = ~ts_present if name == "ts" else _null_np(cols[name])
        mark(miss, f"missing field: {name}")
    # event types: normalise case; checked on the (small) dictionary of distinct values
    et = cols["event_type"]
    et_d = et if pa.types.is_dictionary(et.type) else pc.dictionary_encode(et)
    norm_dict = pc.utf8_lower(et_d.dictionary)
    known = pc.is_in(norm_dict, value_set=pa.array(list(cfg.event_weights), pa.string()))
    known_np = np.asarray(known.to_numpy(zero_copy_only=False), bool)
    idx = et_d.indices.to_numpy(zero_copy_only=False)
    idx_valid = ~_null_np(et_d.indices)
    row_known = np.zeros(n, bool)
    row_known[idx_valid] = known_np[idx[idx_valid].astype(np.int64)]
    mark(idx_valid & ~row_known, "unknown event type")
    cols["event_type"] = pa.DictionaryArray.from_arrays(et_d.indices, norm_dict)
    mark(ts_present & _null_np(ts), "unparseable timestamp")
    for name, typ in (("value", pa.float64()), ("position", pa.int32())):
        if name in raw.column_names:
            cols[name], bad = _parse_number(raw.column(name), typ)
            mark(bad, f"malformed field: {name}")
        else:
            cols[name] = pa.nulls(n, typ)
    if cfg.value_required:
        need = pc.is_in(norm_dict, value_set=pa.array(cfg.value_required, pa.string()))
        need_np = np.asarray(need.to_numpy(zero_copy_only=False), bool)
        row_need = np.zeros(n, bool)
        row_need[idx_valid] = need_np[idx[idx_valid].astype(np.int64)]
        mark(row_need & _null_np(cols["value"]), "missing field: value")
    ts_us = ts.cast(pa.int64()).to_numpy(zero_copy_only=False) if ts.null_count == 0 else \
        pc.fill_null(ts.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    mark(ts_us > now_us + int(cfg.future_tolerance_s * 1e6), "future timestamp")
    if candidate_ids is not None:
        # the candidate index doubles as the response code (see EventAccumulator.preload)
        r = cols["response_id"]
        if pa.types.is_dictionary(r.type):
            di = pc.fill_null(pc.index_in(r.dictionary, value_set=candidate_ids), -1).to_numpy().astype(np.int32)
            rcodes = np.append(di, np.int32(-1))[_indices(r, len(di))]
        else:
            rcodes = pc.fill_null(pc.index_in(r, value_set=candidate_ids), -1).to_numpy().astype(np.int32)
        mark(~_null_np(r) & (rcodes < 0), "orphan")
    else:
        rcodes = None
    cols["ts"] = ts
    # one path per batch: a dictionary column, not n copies of the path
    cols["source"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([source], pa.string()))
    typed = pa.table({f.name: cols[f.name] for f in FEEDBACK_EVENTS})
    return Validated(typed, code, names, rcodes)


def quarantine_rows(raw: pa.Table, idx: np.ndarray, reasons: list[str], source: str | list[str],
                    row_index: np.ndarray | None, now: dt.datetime) -> pa.Table:
    """Rejected rows as QUARANTINE rows; `raw` is the row as JSON (sorted keys, so re-runs match)."""
    rows = raw.take(pa.array(idx, pa.int64())).to_pylist() if len(idx) else []
    raws = [json.dumps(r, sort_keys=True, ensure_ascii=False, default=str) for r in rows]
    k = len(raws)
    srcs = source if isinstance(source, list) else [source] * k
    return pa.table({
        "source": pa.array(srcs, pa.string()), "stage": pa.array([STAGE] * k, pa.string()),
        "dataset": pa.array(["feedback_events"] * k, pa.string()), "reason": pa.array(reasons, pa.string()),
        "raw": pa.array(raws, pa.string()),
        "row_index": pa.array(row_index if row_index is not None else [None] * k, pa.int64()),
        "quarantined_at": pa.array([now] * k, TS),
    }, schema=QUARANTINE)


# --- hashing and codes ----------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised): spreads every input bit over the 64-bit hash."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))  # a new array, then in place: fewer temporaries
        h *= _M1
        h ^= h >> np.uint64(27)
        h *= _M2
        h ^= h >> np.uint64(31)
        return h


_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)  # the low k bytes


def hash64(arr: pa.Array) -> np.ndarray:
    """64-bit hash of each string (vectorised over the Arrow buffers, no per-row Python).

    Each string is read as little-endian 8-byte words (the last one zero-padded) and folded
    with splitmix64; the length is mixed in first, so "a" and "a\\0" differ. A word is fetched
    for every row at once through an unaligned sliding-window view of the data buffer (the 8
    bytes starting at each byte offset), so the cost is one gather per word, whatever the
    lengths. Collisions: about n^2 / 2^65 (1e-6 for 10M ids)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        return hash64(arr.dictionary)[_indices(arr)]  # null entries hash like the first value: callers mask them
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    offs = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    lo, hi = int(offs[0]), int(offs[-1])
    lens = np.diff(offs)
    h = _mix(lens.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    if hi == lo:
        return h
    buf = np.zeros(hi - lo + 8, np.uint8)  # 8 spare zero bytes: every window stays inside
    buf[:hi - lo] = np.frombuffer(arr.buffers()[2], np.uint8, hi - lo, lo)
    window = np.lib.stride_tricks.as_strided(np.frombuffer(buf, np.uint64, 1), (hi - lo + 1,), (1,))
    start = (offs[:-1] - lo).astype(np.int64)
    for j in range(int((lens.max() + 7) // 8)):
        rem = lens - 8 * j  # bytes of the row left from word j on
        rows = None if rem.min() > 0 else np.flatnonzero(rem > 0)  # rows with a word j
        s, r = (start, rem) if rows is None else (start[rows], rem[rows])
        w = window[s + 8 * j] if j else window[s]  # rem > 0: the window starts inside the row
        if r.min() < 8:  # a last, partial word: keep its own bytes only
            w &= _BYTE_MASKS[np.minimum(r, 8)]
        if rows is None:
            h = _mix(h ^ w)
        else:
            h[rows] = _mix(h[rows] ^ w)
    return h


class Codes:
    """A growing string -> dense int32 code map keyed by 64-bit string hashes.

    Looked up per batch on the batch's distinct values only, with a binary search over the
    sorted known hashes: no hash table is rebuilt per batch, and the hashing itself is
    stateless, so worker threads do it in parallel."""

    def __init__(self) -> None:
        self.chunks: list[pa.Array] = []
        self._index = (np.zeros(0, np.uint64), np.zeros(0, np.int32))  # sorted hashes, their codes
        self.size = 0

    @property
    def known(self) -> pa.Array:
        """The known values, in code order."""
        if len(self.chunks) != 1:
            self.chunks = [pa.concat_arrays(self.chunks) if self.chunks else pa.array([], pa.string())]
        return self.chunks[0]

    @property
    def values(self) -> list[str]:
        return self.known.to_pylist()

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """The current (sorted hashes, codes); replaced, never mutated, so a worker thread may
        look up against it while `resolve` adds values."""
        return self._index

    def preload(self, values: pa.Array) -> None:
        """Codes 0..n-1 for the distinct `values`, in their order (before any other value)."""
        if self.size:
            raise ValueError("preload before any other value")
        values = values.cast(pa.string()) if values.type != pa.string() else values
        dh = hash64(values)
        o = np.argsort(dh)
        self._index = (dh[o], o.astype(np.int32))
        self.chunks, self.size = [values], len(values)

    @staticmethod
    def find(index: tuple[np.ndarray, np.ndarray], dh: np.ndarray) -> np.ndarray:
        """Codes of hashes `dh` in `index`, -1 where unknown (queries sorted first: the binary
        searches then walk memory in order, about 2x faster)."""
        keys, kcodes = index
        codes = np.full(len(dh), -1, np.int32)
        if len(keys) and len(dh):
            o = np.argsort(dh)
            q = dh[o]
            at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            hit = keys[at] == q
            codes[o[hit]] = kcodes[at[hit]]
        return codes

    def resolve(self, dvals: pa.Array, dh: np.ndarray, pre: np.ndarray | None = None) -> np.ndarray:
        """Codes of dictionary values `dvals` (hashes `dh`); `pre`: codes found earlier against
        an older index (-1 = not found). Unseen values get new codes."""
        codes = self.find(self._index, dh) if pre is None else pre.copy()
        miss = codes < 0
        if miss.any() and pre is not None:
            codes[miss] = self.find(self._index, dh[miss])
            miss = codes < 0
        if miss.any():
            # a trimmed dictionary can hold the same value twice: one code per distinct hash
            mi = np.nonzero(miss)[0]
            o = np.argsort(dh[mi], kind="stable")
            sm = dh[mi][o]
            first = np.ones(len(sm), bool)
            first[1:] = sm[1:] != sm[:-1]
            fresh = sm[first]
            new_codes = self.size + np.arange(len(fresh), dtype=np.int32)
            codes[mi[o]] = new_codes[np.cumsum(first) - 1]
            vals = dvals.take(pa.array(mi[o][first]))
            self.chunks.append(vals.cast(pa.string()) if vals.type != pa.string() else vals)
            self.size += len(fresh)
            keys, kcodes = self._index
            keys = np.concatenate([keys, fresh])
            kc = np.concatenate([kcodes, new_codes])
            order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
            self._index = (keys[order], kc[order])
        return codes

    def encode(self, arr: pa.Array) -> np.ndarray:
        """Codes of every value of `arr`."""
        d = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
        return self.resolve(d.dictionary, hash64(d.dictionary))[_indices(d)]


def _indices(d: pa.DictionaryArray, null_to: int = 0) -> np.ndarray:
    """Dictionary indices as int64 (null entries -> `null_to`)."""
    i = d.indices
    return (pc.fill_null(i, null_to) if i.null_count else i).to_numpy().astype(np.int64)


def _dict_parts(arr: pa.Array, codes: Codes) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
    """Dictionary-encode, hash the distinct values, and look them up in a snapshot of `codes`
    (in the worker thread; `merge` resolves only what the snapshot did not know)."""
    d = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
    dh = hash64(d.dictionary)
    return _indices(d), d.dictionary, dh, Codes.find(codes.index(), dh)


def _is_in(values: np.ndarray, value_set: np.ndarray) -> np.ndarray:
    """Membership of numeric `values` in `value_set` (Arrow's hash table; zero-copy in)."""
    if not len(value_set) or not len(values):
        return np.zeros(len(values), bool)
    return np.asarray(pc.is_in(pa.array(values), value_set=pa.array(value_set)).to_numpy(zero_copy_only=False), bool)


def _rows_sharing_a_key(keys: np.ndarray, sorted_keys: np.ndarray | None = None) -> np.ndarray:
    """Indices of the rows whose key occurs more than once (usually few): one sort finds the
    repeated keys (pass `sorted_keys` when the caller has sorted already), a hash lookup their
    rows, so only those few rows need ordering."""
    s = np.sort(keys) if sorted_keys is None else sorted_keys
    rep = s[1:][s[1:] == s[:-1]]
    return np.flatnonzero(_is_in(keys, rep)) if len(rep) else np.zeros(0, np.int64)


def _repeats(h: np.ndarray) -> np.ndarray:
    """True where an earlier element has the same value (first occurrences are not repeats)."""
    out = np.zeros(len(h), bool)
    m = _rows_sharing_a_key(h)
    if len(m):
        o = np.argsort(h[m], kind="stable")  # stable: arrival order within equal values
        hm = h[m][o]
        out[m[o[1:][hm[1:] == hm[:-1]]]] = True
    return out


def _dense_codes(h: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense int32 codes of 64-bit keys (Arrow's hash table) and how many distinct keys."""
    d = pc.dictionary_encode(pa.array(h))
    return d.indices.to_numpy().astype(np.int32, copy=False), len(d.dictionary)


# --- accumulation and aggregation -----------------------------------------------------------

def _group_counts(keys: np.ndarray) -> np.ndarray:
    """For each row, how many rows share its key (sort-based: faster than np.unique's hashing)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(keys)
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    cnt = np.diff(np.r_[starts, n])
    out = np.empty(n, np.int64)
    out[order] = np.repeat(cnt, cnt)
    return out


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + adjacent compare)."""
    if len(keys) == 0:
        return keys
    s = np.sort(keys)
    return s[np.r_[True, s[1:] != s[:-1]]]


def wilson_interval(p: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion p observed over n (n may be fractional evidence)."""
    n = np.asarray(n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, centre - half, 0.0)
    hi = np.where(n > 0, centre + half, 1.0)
    return np.clip(lo, 0, 1), np.clip(hi, 0, 1)


@dataclass
class Outcome:
    status: np.ndarray  # per merged row (arrival order): OK, INVALID, DUP, DUP_QUARANTINED or an abuse code
    signals: pa.Table | None
    propensities: dict[int, float]
    as_of: dt.datetime | None
    counts: dict[str, int] = field(default_factory=dict)


# The per-event state, filed twice: event-id hashes partitioned by event id for exactly-once,
# and the rest partitioned by user for the abuse filters and the votes (every event of a user
# is in one partition). `row` numbers every row merged (valid or not) in arrival order and
# links the two; `uh` is the user id's hash.
_BY_ID = {"row": np.int64, "eh": np.uint64, "new": np.bool_}
_BY_USER = {"row": np.int64, "uh": np.uint64, "resp": np.int32, "etype": np.int8, "ts": np.int64,
            "value": np.float64, "pos": np.int32, "rand": np.bool_}


@dataclass
class Compact:
    """One batch's valid rows as compact columns, already split into partitions (by event id
    and by user). Built without shared state, so worker threads prepare batches in parallel;
    `merge` then takes them in arrival order."""

    n_rows: int  # rows of the batch, valid or not (row numbers count them all)
    by_id: list[tuple[int, dict[str, np.ndarray]]]  # (partition, _BY_ID columns but `new`); `row` within the batch
    by_user: list[tuple[int, dict[str, np.ndarray]]]  # (partition, _BY_USER columns)
    resp_dict: tuple[pa.Array, np.ndarray, np.ndarray] | None = None  # `resp` = indices into this dictionary


class EventAccumulator:
    """The compact state (hashes, codes, ts, value, position) of every valid event of the run,
    hash-partitioned and spilled to scratch files past `state_memory_mb` (tasks/partitions.py).

    `merge` only files batches away; `abuse` then decides exactly-once per event-id partition
    (the first occurrence wins) and runs the abuse filters per user partition, and `signals`
    counts the votes per user partition; partitions are worked on by two threads."""

    def __init__(self, cfg: IngestConfig, scratch: Path | None = None, expected_rows: int = 0) -> None:
        self.cfg = cfg
        self.types = list(cfg.event_weights)
        self.type_code = {t: i for i, t in enumerate(self.types)}
        self.weights = np.array([cfg.event_weights[t] for t in self.types], float)
        self.vote_group = np.arange(len(self.types))  # type code -> vote group (exclusive groups share one)
        for gi, grp in enumerate(cfg.exclusive_groups):
            for t in grp:
                if t in self.type_code:
                    self.vote_group[self.type_code[t]] = len(self.types) + gi
        self.responses = Codes()
        self.blocked: np.ndarray = np.zeros(0, np.uint64)  # hashes of event ids quarantined as abuse before
        self.dropped = Counter()  # new rows dropped as duplicates: DUP / DUP_QUARANTINED
        self.candidates = 0
        self.n_rows = 0
        self.budget = Budget(cfg.state_memory_mb << 20, scratch)
        k = partition_count(expected_rows, cfg.partition_rows)
        self.by_id = Partitions(k, _BY_ID, self.budget)
        self.by_user = Partitions(k, _BY_USER, self.budget)
        self._fin: tuple[np.ndarray, int, dict[int, float]] | None = None

    def close(self) -> None:
        """Remove spill files (also done when the state is consumed)."""
        self.budget.close()

    def preload(self, candidate_ids: pa.Array) -> None:
        """Response codes = index in `candidate_ids` (distinct), as `validate` computes them
        for its orphan check: batches then need no response encoding of their own."""
        self.responses.preload(candidate_ids)
        self.candidates = len(candidate_ids)

    def prepare(self, typed: pa.Table, response_codes: np.ndarray | None = None,
                valid: np.ndarray | None = None) -> Compact:
        """Compact columns of typed rows (FEEDBACK_EVENTS columns), only the `valid` ones (the
        Arrow columns are not filtered: that would copy every string). Thread-safe: reads no
        state that `merge` changes."""
        n = typed.num_rows
        rows = None if valid is None or valid.all() else np.flatnonzero(valid)  # the split takes these
        et = typed.column("event_type").combine_chunks()
        et = et if pa.types.is_dictionary(et.type) else pc.dictionary_encode(et)
        dcodes = np.array([self.type_code.get(v, -1) for v in et.dictionary.to_pylist()] + [-1], np.int8)
        var = typed.column("variant")
        uh = hash64(typed.column("user_id"))
        cols = {
            "uh": uh, "etype": dcodes[_indices(et, len(dcodes) - 1)],  # invalid rows too (the split drops them)
            "ts": pc.fill_null(typed.column("ts").combine_chunks().cast(pa.int64()), 0).to_numpy(),
            "value": pc.fill_null(typed.column("value"), np.nan).to_numpy().astype(np.float64, copy=False),
            "pos": pc.fill_null(typed.column("position"), -1).to_numpy().astype(np.int32, copy=False),
            "rand": (np.asarray(pc.fill_null(pc.equal(var, self.cfg.randomised_variant), False).to_numpy(), bool)
                     if var.null_count < len(var) else np.zeros(n, bool)),
        }
        resp_dict = None
        if response_codes is not None and self.candidates:
            cols["resp"] = response_codes
        else:
            idx, d, dh, pre = _dict_parts(typed.column("response_id").combine_chunks(), self.responses)
            cols["resp"], resp_dict = idx, (d, dh, pre)
        eh = hash64(typed.column("event_id"))
        return Compact(n, self.by_id.split(eh, {"eh": eh}, rows, index="row"),
                       self.by_user.split(uh, cols, rows, index="row"), resp_dict)

    def merge(self, c: Compact, new: bool) -> None:
        """File a prepared batch away (in arrival order: row numbers follow the merges)."""
        codes = self.responses.resolve(*c.resp_dict) if c.resp_dict is not None else None
        for p, cols in c.by_id:
            self.by_id.append(p, {**cols, "row": cols["row"] + self.n_rows, "new": np.full(len(cols["row"]), new)})
        for p, cols in c.by_user:
            resp = cols["resp"] if codes is None else codes[cols["resp"]]
            self.by_user.append(p, {**cols, "row": cols["row"] + self.n_rows, "resp": resp.astype(np.int32, copy=False)})
        self.n_rows += c.n_rows

    def add(self, typed: pa.Table, new: bool) -> None:
        """prepare + merge of valid, typed rows."""
        self.merge(self.prepare(typed), new)

    def finish(self) -> Outcome:
        """Exactly-once, abuse filters, votes and signals; `status` is per merged row."""
        out = self.abuse()
        out.signals = self.signals(out)
        return out

    @staticmethod
    def _each(fn: Any, k: int) -> Iterator[Any]:
        """fn(p) for every partition, two at a time (numpy and Arrow release the GIL); results
        come in partition order, with few of them waiting at once."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-state") as ex:
            pending: deque[Future] = deque(ex.submit(fn, p) for p in range(min(k, 3)))
            for p in range(3, k + 3):
                yield pending.popleft().result()
                if p < k:
                    pending.append(ex.submit(fn, p))

    def abuse(self) -> Outcome:
        """Exactly-once and the abuse filters: everything the `feedback_events` output needs
        (`signals` is left None: `signals()` computes it, e.g. in a thread while the events
        are written)."""
        cfg = self.cfg
        status = np.full(self.n_rows, INVALID, np.int8)
        for dup, blocked in self._each(lambda p: self._dedup(p, status), self.by_id.k):
            self.dropped[DUP] += dup
            self.dropped[DUP_QUARANTINED] += blocked
        parts = list(self._each(lambda p: self._abuse(p, status), self.by_user.k))
        top_ts = max((t for _, t in parts if t is not None), default=None)
        counts = [c for c, _ in parts if len(c)]
        rand_counts = np.zeros(max((len(c) for c in counts), default=0), np.int64)
        for c in counts:
            rand_counts[:len(c)] += c
        props = self._propensities(rand_counts)
        as_of_us = int(cfg.as_of.timestamp() * 1e6) if cfg.as_of else (top_ts if top_ts is not None else 0)
        as_of = dt.datetime.fromtimestamp(as_of_us / 1e6, dt.UTC) if top_ts is not None or cfg.as_of else None
        self._fin = (status, as_of_us, props)
        return Outcome(status, None, props, as_of)

    def _dedup(self, p: int, status: np.ndarray) -> tuple[int, int]:
        """Exactly-once within event-id partition p (which holds every row of its ids): the
        first occurrence wins; a new event whose id was quarantined as abuse before is dropped
        ("already quarantined"). Sets the status of the partition's rows; returns the new rows
        dropped as duplicates and as already quarantined."""
        c = self.by_id.take(p)
        eh, new = c["eh"], c["new"]
        dup = _repeats(eh)
        blocked = ~dup & new & _is_in(eh, self.blocked) if len(self.blocked) else np.zeros(len(eh), bool)
        status[c["row"]] = np.where(dup, DUP, np.where(blocked, DUP_QUARANTINED, OK)).astype(np.int8)
        return int((dup & new).sum()), int(blocked.sum())

    def _abuse(self, p: int, status: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The abuse filters over user partition p, which holds every valid event of its users
        (prior + new; duplicates too, which the status set by exactly-once leaves out). Returns
        the live randomised positive events per position (for propensities) and the newest live
        timestamp."""
        cfg, ab = self.cfg, self.cfg.abuse
        c = self.by_user.read(p)
        n = len(c["row"])
        if n == 0:
            return np.zeros(0, np.int64), None
        user, nu = _dense_codes(c["uh"])
        resp, etype, ts = c["resp"], c["etype"], c["ts"]
        st = np.zeros(n, np.int8)
        kept = status[c["row"]] == OK  # past exactly-once
        live = kept.copy()
        if ab.rate_cap_per_day:
            # only users with more events in total than the daily cap can break it
            heavy = live & (np.bincount(user[live], minlength=nu)[user] > ab.rate_cap_per_day)
            if heavy.any():
                day = ts[heavy] // 86_400_000_000
                key = user[heavy] * np.int64(day.max() - day.min() + 1) + (day - day.min())
                st[np.nonzero(heavy)[0][_group_counts(key) > ab.rate_cap_per_day]] = RATE_CAP
                live = kept & (st == OK)
        if ab.uniform_min_responses:
            codes = [self.type_code[t] for t in ab.uniform_types if t in self.type_code]
            vote = live & np.isin(etype, codes)
            vote &= np.bincount(user[vote], minlength=nu)[user] >= ab.uniform_min_responses
            if vote.any():
                T = len(self.types)
                has_type = np.bincount(user[vote].astype(np.int64) * T + etype[vote],
                                       minlength=nu * T).reshape(nu, T) > 0
                one_type = has_type.sum(axis=1) == 1
                vote &= one_type[user]  # distinct responses are only counted for single-type voters (few)
                R = max(self.responses.size, 1)
                pairs = _distinct(user[vote] * np.int64(R) + resp[vote])
                bad_users = one_type & (np.bincount(pairs // R, minlength=nu) >= ab.uniform_min_responses)
                st[live & bad_users[user]] = UNIFORM
                live = kept & (st == OK)
        if ab.burst_max_events:
            cand = live & (np.bincount(user[live], minlength=nu)[user] > ab.burst_max_events)
            if cand.any():
                w = int(ab.burst_window_s * 1e6)
                t0 = ts[cand].min()
                flag = np.zeros(n, bool)
                for off in (0, w // 2):
                    b = (ts[cand] - t0 + off) // w
                    key = user[cand] * np.int64(b.max() + 1) + b
                    flag[np.nonzero(cand)[0][_group_counts(key) > ab.burst_max_events]] = True
                st[flag] = BURST
                live = kept & (st == OK)
        flagged = kept & ~live
        if flagged.any():
            status[c["row"][flagged]] = st[flagged]
        counts = np.zeros(0, np.int64)
        if cfg.estimate_propensities:
            pos_types = [self.type_code[t] for t, w in cfg.event_weights.items() if w > 0]
            m = live & c["rand"] & (c["pos"] >= 0) & np.isin(etype, pos_types)
            if m.any():
                counts = np.bincount(c["pos"][m])
        return counts, (int(ts[live].max()) if live.any() else None)

    def _propensities(self, counts: np.ndarray) -> dict[int, float]:
        """Configured table, or p_k = c_k / max c from randomised traffic (positive events only).

        With randomised positions every response is equally likely at every position, so the
        positive-event count at position k is proportional to its examination propensity."""
        cfg = self.cfg
        props = {int(k): float(v) for k, v in cfg.propensities.items()}
        if cfg.estimate_propensities and len(counts):
            ok = counts >= cfg.min_randomised_events
            if ok.any():
                top = counts[ok].max()
                props.update({int(k): float(counts[k] / top) for k in np.nonzero(ok)[0]})
        return dict(sorted(props.items()))

    def signals(self, outcome: Outcome) -> pa.Table:
        """One vote per user per (response, vote group), then the per-response signals: the
        per-partition sums are added up in partition order (the same result on every run)."""
        cfg = self.cfg
        status, as_of_us, props = self._fin
        self._fin = None
        R = self.responses.size
        ipw = None
        if props:
            top = max(props)
            ipw = np.array([props.get(k, np.nan) for k in range(top + 1)], float)
            # positions missing inside the table take the nearest configured position above them
            for k in range(top - 1, -1, -1):
                if np.isnan(ipw[k]):
                    ipw[k] = ipw[k + 1]
            ipw = 1.0 / np.maximum(np.nan_to_num(ipw, nan=1.0), cfg.min_propensity)  # ipw per position
        P, N = np.zeros(R), np.zeros(R)
        n_users, n_events = np.zeros(R, np.int64), np.zeros(R, np.int64)
        last = np.full(R, np.iinfo(np.int64).min)
        for part in self._each(lambda p: self._votes(p, status, as_of_us, ipw), self.by_user.k):
            if part is not None:
                P += part[0]
                N += part[1]
                n_users += part[2]
                n_events += part[3]
                np.maximum(last, part[4], out=last)
        self.budget.close()
        keep = np.nonzero(n_events > 0)[0]
        P, N = P[keep], N[keep]
        n = P + N
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(n > 0, P / n, np.nan)
        lo, hi = wilson_interval(np.nan_to_num(share), n, cfg.wilson_z)
        m = cfg.prior_strength
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(n + m > 0, (P - N + m * cfg.prior_mean) / (n + m), cfg.prior_mean)
        ids = self.responses.known.take(pa.array(keep, pa.int64())) if R else pa.nulls(0, pa.string())
        return pa.table({
            "candidate_id": ids, "behaviour_score": score, "confidence": np.where(n > 0, 1 - (hi - lo), 0.0),
            "positive_share": pa.array(share, pa.float64(), from_pandas=True),
            "wilson_lower": lo, "n_users": n_users[keep], "n_events": n_events[keep],
            "last_ts": pa.array(last[keep], pa.int64()).cast(TS),
        }, schema=SIGNALS)

    def _votes(self, p: int, status: np.ndarray, as_of_us: int, ipw: np.ndarray | None) -> tuple | None:
        """User partition p's live events -> one vote per user per (response, vote group)
        (latest ts wins, then latest arrival) -> per-response sums (P, N, n_users, n_events,
        newest ts). Users do not span partitions, so the sums add up across partitions."""
        cfg = self.cfg
        c = self.by_user.take(p)
        live = status[c["row"]] == OK
        if not live.all():
            c = {k: v[live] for k, v in c.items()}
        if not len(c["row"]):
            return None
        row, resp, etype, ts = c["row"], c["resp"], c["etype"], c["ts"]
        user, _ = _dense_codes(c["uh"])
        G = len(self.types) + len(cfg.exclusive_groups)
        R = max(self.responses.size, 1)
        vkey = (user.astype(np.int64) * R + resp) * G + self.vote_group[etype]
        sk = np.sort(vkey)  # the one sort: repeated votes and the distinct (user, response) pairs
        sub = _rows_sharing_a_key(vkey, sk)
        pk = sk // G
        del sk
        pk = pk[np.r_[True, pk[1:] != pk[:-1]]]
        n_users = np.bincount(pk % R, minlength=R)
        del pk
        winner = np.ones(len(row), bool)
        if len(sub):
            order = np.lexsort((row[sub], ts[sub], vkey[sub]))
            ks = vkey[sub][order]
            last_of = np.ones(len(sub), bool)
            last_of[:-1] = ks[1:] != ks[:-1]
            winner[sub] = False
            winner[sub[order[last_of]]] = True
        del vkey
        v = np.flatnonzero(winner)
        et = etype[v]
        s = self.weights[et]
        dwell = self.type_code.get("dwell", -1)
        if dwell >= 0:
            dw = et == dwell
            if dw.any():
                s[dw] *= np.clip(np.nan_to_num(c["value"][v[dw]]) / cfg.dwell_full_ms, 0, 1)
        age = np.maximum(as_of_us - ts[v], 0) / 1e6 / 86400.0
        e = s * np.exp(age * (-np.log(2) / cfg.half_life_days))  # 2 ** (-age / half_life); exp is SIMD
        if ipw is not None:
            pv = c["pos"][v]
            has = pv >= 0
            e[has] *= ipw[np.minimum(pv[has], len(ipw) - 1)]
        r = resp[v]
        last = np.full(R, np.iinfo(np.int64).min)
        np.maximum.at(last, resp, ts)
        return (np.bincount(r, np.maximum(e, 0), minlength=R), np.bincount(r, np.maximum(-e, 0), minlength=R),
                n_users, np.bincount(resp, minlength=R), last)


# --- the stage ------------------------------------------------------------------------------

STATE_KEY = "ingest.watermarks"


def previously_quarantined(store: Any) -> tuple[set[str], np.ndarray, np.ndarray]:
    """What this stage quarantined before, so re-ingesting it adds nothing: raw rows, hashes of
    all quarantined event ids, and hashes of the event ids quarantined as abuse.

    Only abuse blocks a *valid* event from coming back: an orphan re-sent after its candidate
    arrived is accepted."""
    empty = np.zeros(0, np.uint64)
    if not store.exists("quarantine"):
        return set(), empty, empty
    q = store.read("quarantine", columns=["stage", "raw", "reason"], filter=pc.field("stage") == STAGE)
    raws = q.column("raw").to_pylist()
    ids, abuse = [], []
    for r, why in zip(raws, q.column("reason").to_pylist(), strict=True):
        try:
            obj = json.loads(r)
        except ValueError:
            continue
        eid = obj.get("event_id") if isinstance(obj, dict) else None
        if eid is not None and str(eid).strip():
            ids.append(str(eid).strip())
            if why.startswith("abuse"):
                abuse.append(str(eid).strip())
    def h(xs: list[str]) -> np.ndarray:
        return hash64(pa.array(xs, pa.string())) if xs else empty

    return set(raws), h(ids), h(abuse)


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
                    schema: pa.Schema) -> _Unit:
    """Validate one raw batch and prepare it (runs in a worker thread)."""
    v = validate(rb.table, cfg, now_us, rb.source, cand, columns)
    bad = v.bad
    valid = ~bad
    again = 0
    q = None
    if bad.any():
        if len(seen_ids):
            # invalid rows whose event id was quarantined before: not again
            eid = v.typed.column("event_id").combine_chunks()
            has = ~_null_np(eid)
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


_TEXT_BYTES_PER_ROW = 64  # a low guess for one JSONL / CSV event: more partitions, not fewer


def known_candidates(store: Any, ref: str, lookback: int) -> pa.Array:
    """Distinct candidate ids of `candidates` version `ref` and the `lookback` versions before it:
    users answer responses served or sampled on earlier nights too. Versions removed by gc are
    skipped. Versions are immutable, so a pinned input gives the same set (until gc removes one
    of those versions)."""
    r = store.resolve(ref)
    removed = store.collected(r.name)
    parts = [store.read(f"{r.name}@{v}", columns=["candidate_id"]).column("candidate_id")
             for v in range(max(0, r.version - lookback), r.version + 1) if v not in removed]
    return pc.unique(pa.chunked_array([c for p in parts for c in p.chunks], pa.string()).combine_chunks())


def _expected_rows(cfg: IngestConfig, state_all: dict[str, Any]) -> int:
    """How many rows this run will read, to size the state partitions: Parquet footers, JSONL /
    CSV sizes, and for SQL the rows the source gave last time (nightly volumes are alike).
    Files ingested before are not counted."""
    n = 0
    for src in cfg.sources:
        state = state_all.get(src.name) or {}
        if src.kind != "files":
            n += int(state.get("rows_last_run", 0))
            continue
        seen = state.get("files") or {}
        try:
            for f in list_source_files(src):
                if seen.get(str(f)) == _file_sig(f):
                    continue
                fmt = src.format if src.format != "auto" else FILE_FORMATS.get(f.suffix.lower())
                n += pq.ParquetFile(f).metadata.num_rows if fmt == "parquet" else \
                    f.stat().st_size // _TEXT_BYTES_PER_ROW
        except (OSError, SourceError, pa.ArrowInvalid):
            continue  # only a size hint: the read itself reports unreadable files with a reason
    return n


def ingest(ctx: Any) -> Any:
    """Stage function: sources (+ prior `feedback_events`) -> feedback_events, signals, quarantine.

    Pass 1 streams batches through two worker threads (validate, hash, encode: Arrow and numpy
    release the GIL) and files them in order into the partitioned state, spooling every row to
    an Arrow IPC file. Exactly-once and the abuse filters then give every spooled row a status;
    pass 2 writes the spool's accepted rows as staged Parquet files from two threads while a
    third computes votes and signals."""
    from dpoflow.flows.stage import StageResult
    from dpoflow.storage.store import StagedFiles

    cfg: IngestConfig = ctx.config
    store = ctx.workspace.store
    now = dt.datetime.now(dt.UTC)
    now_us = int(now.timestamp() * 1e6)
    state_all = store.get_state(STATE_KEY, {}) or {}
    cand = None
    if ctx.has("candidates"):
        cand = known_candidates(store, ctx.inputs["candidates"], cfg.candidate_lookback_versions)
    else:
        ctx.logger.warning("ingest: no candidates dataset: the orphan check is off")
    prior_n = store.info(ctx.inputs["feedback_events"]).rows if ctx.has("feedback_events") else 0
    acc = EventAccumulator(cfg, ctx.scratch, prior_n + _expected_rows(cfg, state_all))
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
                        codes = np.array(m, np.int32)[_indices(src, len(m) - 1)]
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
                                               seen_ids_arr, work_schema))
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
        outcome = acc.abuse()
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


def signal_formulas_markdown() -> str:
    """The formulas as markdown (README / benchmarks copy)."""
    return (__doc__ or "").split("Signal formulas", 1)[-1]
