"""Where events come from, and how far each source was read (its watermark).

Files sources: a file, a folder or a glob; a file is read again only when its size or
modification time changed (the watermark is the file's signature). SQL sources: rows at or
after the stored watermark, minus a look-back window for late rows, fetched in chunks.
Everything is yielded as `RawBatch`es of raw values; typing and checks are `validate`'s job.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpoflow.storage.schemas import QUARANTINE
from dpoflow.tasks.feedback.config import FILE_FORMATS, STAGE, IngestConfig, SourceConfig

STATE_KEY = "ingest.watermarks"


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


def file_sig(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


def _sql_url(src: SourceConfig) -> str:
    if not src.url_env:
        raise SourceError(f"source {src.name!r}: `url_env` or `url_secret` (where the URL is kept) is required")
    url = os.environ.get(src.url_env)
    if not url:
        raise SourceError(f"source {src.name!r}: environment variable {src.url_env} is not set")
    return url


def _sql_engine(src: SourceConfig):
    import sqlalchemy as sa

    url = _sql_url(src)
    try:
        return sa.create_engine(url)
    except Exception as exc:  # noqa: BLE001 - any driver error: re-raised masked, below
        raise sql_error(src, url, exc) from None


def sql_error(src: SourceConfig, url: str, exc: BaseException) -> SourceError:
    """A one-line error for a failed SQL source that never holds the password: the URL is
    shown as parsed with the password masked, and every fragment of the raw URL's user-info
    part is blanked out of the driver's message (a password with an unencoded ``@`` is parsed
    into the host name, which drivers then quote)."""
    secrets: list[str] = []
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo = rest[:rest.rindex("@")]
        secrets = [userinfo] + [p for p in re.split(r"[:@/]", userinfo) if len(p) >= 3]
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL is shown by its scheme only
        shown = f"{scheme}://***"
    for part in sorted(secrets, key=len, reverse=True):
        shown = shown.replace(part, "***")
    msg = " ".join(str(exc).split()) or type(exc).__name__
    for part in sorted(secrets, key=len, reverse=True):
        msg = msg.replace(part, "***")
    return SourceError(f"source {src.name!r} ({shown}): {type(exc).__name__}: {msg[:300]}")


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
        return [[str(f), *file_sig(f)] for f in list_source_files(src)]
    import sqlalchemy as sa

    base = _sql_base(src)
    col = src.watermark_column
    try:
        with _sql_engine(src).connect() as conn:
            row = conn.execute(sa.text(f"SELECT COUNT(*), MAX({col}) FROM ({base}) AS src")).one()
    except sa.exc.SQLAlchemyError as exc:
        raise sql_error(src, _sql_url(src), exc) from None
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
        sig = file_sig(f)
        if seen.get(str(f)) == sig:
            continue  # watermark: this exact file content was ingested before
        fmt = src.format if src.format != "auto" else FILE_FORMATS[f.suffix.lower()]
        if fmt == "parquet":
            # plain columns, except the event type: a few distinct values, so its dictionary
            # read is cheaper than the plain one and spares an encode. (Dictionary reads of
            # many-valued columns re-hash every value and cost 3x the decode.)
            row0 = 0
            try:
                md = pq.read_metadata(f)
                et = next((s for s, c in src.columns.items() if c == "event_type"), "event_type")
                pf = pq.ParquetFile(f, pre_buffer=True, metadata=md,
                                    read_dictionary=[et] if et in md.schema.names else None)
                batches = pf.iter_batches(batch_size=batch_rows)
                for b in batches:
                    yield RawBatch(pa.Table.from_batches([b]), str(f), row0)
                    row0 += b.num_rows
            except (pa.ArrowException, OSError) as exc:  # an empty, garbage or truncated file: one row
                parse_quarantine.append(_unreadable(f, exc, row0))
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


def _unreadable(f: Path, exc: BaseException, row0: int) -> pa.Table:
    """One quarantine row for a file (or its rest, from row `row0` on) that cannot be read."""
    detail = " ".join(str(exc).split())[:160] or type(exc).__name__
    return pa.table({
        "source": [str(f)], "stage": [STAGE], "dataset": ["feedback_events"], "reason": ["unreadable Parquet file"],
        "raw": [f"{f}: {detail}"], "row_index": pa.array([row0], pa.int64()),
        "quarantined_at": pa.array([dt.datetime.now(dt.UTC)], QUARANTINE.field("quarantined_at").type),
    }, schema=QUARANTINE)


def iter_sql(src: SourceConfig, state: dict[str, Any], new_state: dict[str, Any]) -> Iterator[RawBatch]:
    """Rows at or after the watermark (minus look-back), fetched in chunks of `chunk_rows`.
    Driver errors become a one-line SourceError without the password."""
    import sqlalchemy as sa

    try:
        yield from _iter_sql(src, state, new_state)
    except sa.exc.SQLAlchemyError as exc:
        raise sql_error(src, _sql_url(src), exc) from None


def _iter_sql(src: SourceConfig, state: dict[str, Any], new_state: dict[str, Any]) -> Iterator[RawBatch]:
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
                except (pa.ArrowException, OverflowError, TypeError, ValueError):
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


TEXT_BYTES_PER_ROW = 64  # a low guess for one JSONL / CSV event: more partitions, not fewer


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


def known_responses(store: Any, candidates: str | None, served: str | None, lookback: int) -> pa.Array | None:
    """The response ids events may answer: the served responses and the candidates of the
    pinned version and `lookback` earlier ones. None when neither dataset exists (then there
    is nothing to check against and the orphan check is off)."""
    parts = []
    if candidates:
        parts.append(known_candidates(store, candidates, lookback))
    if served:
        parts.append(store.read(served, columns=["response_id"]).column("response_id").combine_chunks())
    if not parts:
        return None
    return pc.unique(pa.concat_arrays([p.cast(pa.string()) for p in parts]))


def expected_rows(cfg: IngestConfig, state_all: dict[str, Any]) -> int:
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
                if seen.get(str(f)) == file_sig(f):
                    continue
                fmt = src.format if src.format != "auto" else FILE_FORMATS.get(f.suffix.lower())
                n += pq.ParquetFile(f).metadata.num_rows if fmt == "parquet" else \
                    f.stat().st_size // TEXT_BYTES_PER_ROW
        except (OSError, SourceError, pa.ArrowInvalid):
            continue  # only a size hint: the read itself reports unreadable files with a reason
    return n
