"""Typing and checking raw event rows: every row gets exactly one verdict, valid or one reason.

Raw values arrive as whatever the source gave (Arrow timestamps, epoch numbers, ISO text,
numbers for ids); `validate` types them to the FEEDBACK_EVENTS contract column by column and
gives each bad row the first reason that applies. Rejected rows become QUARANTINE rows here
too, so every door (files, SQL, `dpoflow import feedback_events`) words them the same way.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.storage.schemas import FEEDBACK_EVENTS, QUARANTINE, TS
from dpoflow.tasks.feedback.config import REQUIRED, STAGE, STRING_FIELDS, IngestConfig
from dpoflow.tasks.kernels import hash64, indices


def to_string(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any scalar column as trimmed text; empty / whitespace-only strings become null (missing)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        dictionary = to_string(arr.dictionary)
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
    trimmed = pc.utf8_trim_whitespace(arr) if may_need_trim(arr) else arr
    empty = pc.equal(pc.binary_length(trimmed), 0)
    if not pc.any(empty).as_py():  # the usual case: no copy through if_else
        return trimmed
    return pc.if_else(empty, pa.scalar(None, pa.string()), trimmed)


_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # what utf8_trim_whitespace strips
_ASCII_SPACE[0x80:] = True  # a non-ASCII byte may start or end a Unicode space: trim to be sure


def may_need_trim(arr: pa.Array) -> bool:
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


def null_mask(arr: pa.Array) -> np.ndarray:
    """Null mask; for dictionary arrays a null *dictionary value* counts as null too."""
    if pa.types.is_dictionary(arr.type):
        dnull = null_mask(arr.dictionary)
        idx = arr.indices
        out = null_mask(idx)
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
        mask = ~ok | null_mask(arr)
        return pa.array(ints, TS, mask=mask)
    import pandas as pd

    text = to_string(arr)
    s = pd.Series(text.to_pylist(), dtype=object)
    num = pd.to_numeric(s, errors="coerce")
    out = pd.to_datetime(s.where(num.isna()), errors="coerce", utc=True, format="ISO8601")
    res = pa.array(out, type=TS, from_pandas=True)
    if num.notna().any():
        from_num = parse_ts(pa.array(num.to_numpy(dtype=float), pa.float64(), mask=num.isna().to_numpy()))
        res = pc.coalesce(res, from_num)
    return res


def parse_number(col: pa.ChunkedArray | pa.Array, typ: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Numbers (or numeric text) -> `typ`; second value: rows that had a value but not a valid one."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    present = ~null_mask(arr)
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

        text = to_string(arr)
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

    def overrule(self, mask: np.ndarray, why: str) -> None:
        """Give rows `mask` the reason `why`, whatever they were found before."""
        if mask.any():
            self.names.append(why)
            self.code[mask] = len(self.names) - 1

    @property
    def reason(self) -> np.ndarray:
        """Object array: None = valid, else the quarantine reason."""
        return np.array(self.names, dtype=object)[self.code]


def validate(raw: pa.Table, cfg: IngestConfig, now_us: int, source: str,
             candidate_ids: pa.Array | None, columns: dict[str, str] | None = None,
             min_us: int | None = None) -> Validated:
    """Type and check one raw batch; every row gets exactly one verdict (valid or one reason).

    Order of checks (the first failing one is the reason): missing field, unknown event type,
    unparseable timestamp, malformed field (value / position), missing value for types that
    need one, future ts (past now + max_clock_skew), stale ts (before `min_us`, when given),
    orphan (response id matches no candidate)."""
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
        cols[name] = to_string(raw.column(name)) if name in raw.column_names else pa.nulls(n, pa.string())
    if "ts" in raw.column_names:
        ts_in = raw.column("ts")
        ts_in = ts_in.combine_chunks() if isinstance(ts_in, pa.ChunkedArray) else ts_in
        ts_present = ~null_mask(ts_in)
        if pa.types.is_string(ts_in.type) or pa.types.is_large_string(ts_in.type):
            ts_present &= ~null_mask(to_string(ts_in))
        ts = parse_ts(ts_in)
    else:
        ts_present = np.zeros(n, bool)
        ts = pa.nulls(n, TS)
    for name in REQUIRED:
        miss = ~ts_present if name == "ts" else null_mask(cols[name])
        mark(miss, f"missing field: {name}")
    # event types: normalise case; checked on the (small) dictionary of distinct values
    et = cols["event_type"]
    et_d = et if pa.types.is_dictionary(et.type) else pc.dictionary_encode(et)
    norm_dict = pc.utf8_lower(et_d.dictionary)
    known = pc.is_in(norm_dict, value_set=pa.array(list(cfg.event_weights), pa.string()))
    known_np = np.asarray(known.to_numpy(zero_copy_only=False), bool)
    idx = et_d.indices.to_numpy(zero_copy_only=False)
    idx_valid = ~null_mask(et_d.indices)
    row_known = np.zeros(n, bool)
    row_known[idx_valid] = known_np[idx[idx_valid].astype(np.int64)]
    mark(idx_valid & ~row_known, "unknown event type")
    cols["event_type"] = pa.DictionaryArray.from_arrays(et_d.indices, norm_dict)
    mark(ts_present & null_mask(ts), "unparseable timestamp")
    for name, typ in (("value", pa.float64()), ("position", pa.int32())):
        if name in raw.column_names:
            cols[name], bad = parse_number(raw.column(name), typ)
            mark(bad, f"malformed field: {name}")
        else:
            cols[name] = pa.nulls(n, typ)
    if cfg.value_required:
        need = pc.is_in(norm_dict, value_set=pa.array(cfg.value_required, pa.string()))
        need_np = np.asarray(need.to_numpy(zero_copy_only=False), bool)
        row_need = np.zeros(n, bool)
        row_need[idx_valid] = need_np[idx[idx_valid].astype(np.int64)]
        mark(row_need & null_mask(cols["value"]), "missing field: value")
    ts_us = ts.cast(pa.int64()).to_numpy(zero_copy_only=False) if ts.null_count == 0 else \
        pc.fill_null(ts.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    mark(ts_us > now_us + int(cfg.max_clock_skew * 1e6), "future ts")
    if min_us is not None:
        mark(~null_mask(ts) & (ts_us < min_us), "stale ts")
    if candidate_ids is not None:
        # the candidate index doubles as the response code (see EventAccumulator.preload)
        r = cols["response_id"]
        if pa.types.is_dictionary(r.type):
            di = pc.fill_null(pc.index_in(r.dictionary, value_set=candidate_ids), -1).to_numpy().astype(np.int32)
            rcodes = np.append(di, np.int32(-1))[indices(r, len(di))]
        else:
            rcodes = pc.fill_null(pc.index_in(r, value_set=candidate_ids), -1).to_numpy().astype(np.int32)
        mark(~null_mask(r) & (rcodes < 0), "orphan")
    else:
        rcodes = None
    cols["ts"] = ts
    # one path per batch: a dictionary column, not n copies of the path
    cols["source"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([source], pa.string()))
    typed = pa.table({f.name: cols[f.name] for f in FEEDBACK_EVENTS})
    return Validated(typed, code, names, rcodes)


def without_bad_utf8(raw: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Text columns with bytes that are no UTF-8 (a Parquet writer that did not check them):
    those values decoded with U+FFFD replacements, and the rows that held one. The slow path:
    only called when validating a batch failed on them."""
    bad = np.zeros(raw.num_rows, bool)
    for i, f in enumerate(raw.schema):
        col = raw.column(i).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        values = col.cast(pa.large_binary()).to_pylist()
        fixed = []
        for k, v in enumerate(values):
            try:
                fixed.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[k] = True
                fixed.append(v.decode("utf-8", "replace"))
        raw = raw.set_column(i, pa.field(f.name, pa.string()), pa.array(fixed, pa.string()))
    return raw, bad


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
