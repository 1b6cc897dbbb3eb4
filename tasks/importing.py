"""The `import` stage: an external Parquet / JSONL / CSV file (or a folder of them) becomes a
new version of a dataset, validated row by row against the contract.

Good rows are written; bad rows (unparseable lines, missing required fields, values that do
not convert to the column's type) go to `quarantine` with a reason. The import never fails
because of some bad rows, and never drops one silently: rows_in = rows_out + quarantined.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dpoflow.storage.schemas import QUARANTINE, schema_for
from dpoflow.tasks.contract import StageContext, StageResult
from dpoflow.tasks.ids import stable_id
from dpoflow.tasks.kernels import hash64, is_in
from dpoflow.tasks.lang import detect_language

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl",
           ".ndjson": "jsonl", ".csv": "csv"}
# Free-text fields of the contracts: a value must be text (a number is not a prompt), and the
# required ones must hold more than whitespace.
TEXT_FIELDS = {"prompts": ("prompt", "reference"), "served": ("prompt", "response"),
               "pairs": ("prompt", "chosen", "rejected"), "candidates": ("prompt", "response"),
               "dpo_train": ("prompt", "chosen", "rejected"), "dpo_eval": ("prompt", "chosen", "rejected")}
REQUIRED_TEXT = {"prompts": ("prompt",), "served": ("prompt", "response"), "pairs": ("prompt", "chosen", "rejected"),
                 "candidates": ("prompt", "response"),
                 "dpo_train": ("prompt", "chosen", "rejected"), "dpo_eval": ("prompt", "chosen", "rejected")}
# Timestamps Python (and so every reader of the dataset) can represent: years 1..9999, in us.
_TS_RANGE = (-62_135_596_800_000_000, 253_402_300_799_999_999)


class ImportError_(ValueError):
    """The file itself cannot be imported (missing, unknown format, no dataset contract)."""


def list_files(path: str | os.PathLike[str]) -> list[Path]:
    """A file, or every supported file in a folder (sorted, so imports are reproducible)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise ImportError_(f"{p} holds no .parquet / .jsonl / .csv files")
        return files
    if not p.exists():
        raise ImportError_(f"{p} does not exist")
    if p.suffix.lower() not in FORMATS:
        raise ImportError_(f"{p}: unknown format {p.suffix!r} (use .parquet, .jsonl or .csv)")
    return [p]


def fingerprint(files: list[Path]) -> str:
    """What the content key needs to know about the files: names, sizes, modification times."""
    return json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def _quarantine(source: str, dataset: str, reasons: list[str], raws: list[str], idx: list[int],
                stage: str = "import") -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    n = len(reasons)
    return pa.table({
        "source": [source] * n, "stage": [stage] * n, "dataset": [dataset] * n, "reason": reasons,
        "raw": raws, "row_index": pa.array(idx, pa.int64()), "quarantined_at": pa.array([now] * n, QUARANTINE.field("quarantined_at").type),
    }, schema=QUARANTINE)


def _text_ok(table: pa.Table, name: str) -> bool:
    """A column that is text (or absent / all null), as the contract's free-text fields must be."""
    if name not in table.column_names:
        return True
    t = table.column(name).type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or \
        (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))


def _quarantine_keys(q: pa.Table) -> np.ndarray:
    """A content key per quarantine row: the dataset it was meant for and the raw row."""
    parts = [pc.fill_null(q.column(c).cast(pa.string()), "") for c in ("dataset", "raw")]
    return hash64(pc.binary_join_element_wise(*parts, "\x1f"))


def unseen_quarantine(store: Any, q: pa.Table) -> pa.Table:
    """The rows of `q` not quarantined before (same dataset and raw row), so that importing a
    file again (or a copy of it), or rerunning an import killed after its quarantine commit,
    adds nothing to `quarantine`."""
    if not q.num_rows or not store.exists("quarantine"):
        return q
    datasets = pc.unique(q.column("dataset"))
    old = store.read("quarantine", columns=["dataset", "raw"],
                     filter=pc.field("dataset").isin(datasets.to_pylist()))
    if not old.num_rows:
        return q
    seen = is_in(_quarantine_keys(q), _quarantine_keys(old))
    return q.filter(pa.array(~seen)) if seen.any() else q


def read_file(path: Path, dataset: str) -> tuple[pa.Table, pa.Table]:
    """Read one file into a table of raw values, plus quarantine rows for what cannot be read:
    unparseable lines or CSV rows, invalid UTF-8, absurd nesting, and whole files that are no
    valid Parquet. Never raises for the file's content: the rest of the input goes on."""
    fmt = FORMATS[path.suffix.lower()]
    src = str(path)
    if fmt == "parquet":
        try:
            return pq.read_table(path), _quarantine(src, dataset, [], [], [])
        except (pa.ArrowException, OSError) as exc:
            return pa.table({}), _quarantine(src, dataset, ["unreadable Parquet file"], [f"{src}: {_one_line(exc)}"], [0])
    if fmt == "csv":
        return _read_csv(path, dataset)
    return _read_json_lines(path, dataset)


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


def _read_csv(path: Path, dataset: str) -> tuple[pa.Table, pa.Table]:
    """CSV with every column as text (typing happens in `coerce`, row by row, with reasons).
    Arrow's reader first; a file it cannot read as a whole (e.g. invalid UTF-8) is read row
    by row with the csv module, so only its bad rows are quarantined."""
    src = str(path)
    bad: list[tuple[int, str, str]] = []

    def on_invalid(row: Any) -> str:
        # Arrow cannot number lines when values may hold newlines: then -k marks the k-th bad
        # row, so two identical bad rows stay two quarantine rows
        number = row.number if row.number and row.number > 0 else -(len(bad) + 1)
        try:
            bad.append((number, row.text, "malformed CSV row"))
        except UnicodeDecodeError:  # the row's bytes are no UTF-8 (Arrow decodes them for `text`)
            bad.append((number, f"<row {number}: not UTF-8>", "invalid UTF-8"))
        return "skip"

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    if not header:
        return pa.table({}), _quarantine(src, dataset, [], [], [])
    opts = pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=True)
    conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=True)
    try:
        if not _is_utf8(path):  # Arrow would stop at the first bad byte: read row by row instead
            raise OSError("not UTF-8")
        table = pacsv.read_csv(path, parse_options=opts, convert_options=conv)
        return table, _quarantine(src, dataset, [r for _, _, r in bad], [t for _, t, _ in bad], [i for i, _, _ in bad])
    except (pa.ArrowException, OSError):
        pass
    rows: list[dict[str, Any]] = []
    reasons, raws, idx = [], [], []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        names = next(reader, [])
        try:
            for i, rec in enumerate(reader, start=1):
                text = ",".join(rec)
                if any("\udc80" <= ch <= "\udcff" for ch in text):
                    reasons.append("invalid UTF-8")
                elif len(rec) != len(names):
                    reasons.append("malformed CSV row")
                else:
                    rows.append({k: (v if v != "" else None) for k, v in zip(names, rec, strict=True)})
                    continue
                raws.append(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
                idx.append(i)
        except csv.Error as exc:
            reasons.append("malformed CSV")
            raws.append(f"{src}: {_one_line(exc)}")
            idx.append(-1)
    cols = {k: pa.array([r.get(k) for r in rows], pa.string()) for k in names}
    table = pa.table(cols) if cols else pa.table({})
    return table, _quarantine(src, dataset, reasons, raws, idx)


def _is_utf8(path: Path, chunk: int = 1 << 24) -> bool:
    """Whether the whole file is valid UTF-8 (checked in chunks, without holding the file)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                dec.decode(block)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _read_json_lines(path: Path, dataset: str) -> tuple[pa.Table, pa.Table]:
    """JSONL (or a .json array of objects): Arrow's reader when the whole file parses, else
    object by object, so bad lines (invalid JSON or UTF-8, not an object, absurd nesting,
    text fields that are not text) are quarantined one by one."""
    src = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        return pa.table({}), _quarantine(src, dataset, ["unreadable file"], [f"{src}: {_one_line(exc)}"], [0])
    if not (head.startswith(b"[") and path.suffix.lower() == ".json") and _is_utf8(path):
        try:  # (Arrow's JSON reader does not check UTF-8: files with bad bytes go line by line)
            table = pajson.read_json(path)
            if all(_text_ok(table, name) for name in TEXT_FIELDS.get(dataset, ())):
                return table, _quarantine(src, dataset, [], [], [])
        except (pa.ArrowException, OSError, RecursionError):
            pass
    rows, reasons, raws, idx = [], [], [], []
    for i, line, obj, why in _json_objects(path, head.startswith(b"[") and path.suffix.lower() == ".json"):
        if why is None:
            why = next((f"malformed {k}: not text" for k in TEXT_FIELDS.get(dataset, ())
                        if obj.get(k) is not None and not isinstance(obj[k], str)), None)
        if why is None:
            rows.append(obj)
        else:
            reasons.append(why[:200])
            raws.append(line)
            idx.append(i)
    return _rows_to_table(rows), _quarantine(src, dataset, reasons, raws, idx)


def _json_objects(path: Path, array: bool) -> Iterator[tuple[int, str, dict, str | None]]:
    """(index, raw text, object, None) per good object, (index, raw text, {}, reason) per bad one."""
    if array:  # a .json file holding one array: its elements are the rows
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError) not one array: by line
            items = None
        if isinstance(items, list):
            for i, obj in enumerate(items):
                raw = _dumps(obj)
                yield (i, raw, obj, None) if isinstance(obj, dict) else (i, raw, {}, "invalid JSON: not a JSON object")
            return
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield i, text, {}, "invalid UTF-8"
                continue
            except RecursionError:
                yield i, text[:10_000], {}, "invalid JSON: nested too deeply"
                continue
            except ValueError as exc:
                yield i, text, {}, f"invalid JSON: {_one_line(exc)}"
                continue
            if isinstance(obj, dict):
                yield i, text, obj, None
            else:
                yield i, text, {}, "invalid JSON: not a JSON object"


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)[:10_000]
    except (ValueError, RecursionError):
        return repr(obj)[:10_000]


def _rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows of mixed JSON types -> a table; columns whose values disagree in type become text."""
    cols: dict[str, list] = {}
    for i, r in enumerate(rows):
        for k in r:
            cols.setdefault(k, [None] * i)
        for k, vals in cols.items():
            vals.append(r.get(k))
    out = {}
    for k, vals in cols.items():
        try:
            out[k] = pa.array(vals)
        except (pa.ArrowException, OverflowError, RecursionError, ValueError, TypeError):
            out[k] = pa.array([None if v is None else (v if isinstance(v, str) else _dumps(v)) for v in vals],
                              pa.string())
    return pa.table(out) if out else pa.table({})


def _convert(col: pa.ChunkedArray, typ: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Convert a raw column to `typ`; return (converted, mask of rows that failed to convert).

    Nothing is guessed: text timestamps must be ISO 8601 (``01.11.2026`` is rejected, not read
    as 11 January), integers must fit the contract's type, timestamps must lie in years
    1..9999."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    valid_in = ~np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), bool)
    out = None
    if arr.type == typ:
        out = arr
    elif not (pa.types.is_timestamp(typ) and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type))):
        try:  # text timestamps always go through the strict ISO parser below
            out = arr.cast(typ)
        except (pa.ArrowException, OverflowError):
            out = None
    if out is None:
        out = _convert_values(arr, typ)
    if pa.types.is_timestamp(typ):
        us = pc.fill_null(out.cast(pa.timestamp("us", tz=typ.tz)).cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        outside = (us < _TS_RANGE[0]) | (us > _TS_RANGE[1])
        if outside.any():
            out = pc.if_else(pa.array(outside), pa.scalar(None, typ), out)
    failed = valid_in & np.asarray(pc.is_null(out).to_numpy(zero_copy_only=False), bool)
    return out, failed


def _convert_values(arr: pa.Array, typ: pa.DataType) -> pa.Array:
    """The slow path of `_convert`, through text; values that do not convert become null."""
    import pandas as pd

    n = len(arr)
    try:
        text = arr.cast(pa.string()) if not pa.types.is_nested(arr.type) else None
    except (pa.ArrowException, OverflowError):
        text = None
    if pa.types.is_timestamp(typ) and text is not None:
        parsed = pd.to_datetime(pd.Series(text.to_pylist(), dtype=object), errors="coerce", utc=True,
                                format="ISO8601")
        return pa.array(parsed, type=typ, from_pandas=True)
    if (pa.types.is_integer(typ) or pa.types.is_floating(typ)) and text is not None:
        num = pd.to_numeric(pd.Series(text.to_pylist(), dtype=object), errors="coerce").astype(float)
        if pa.types.is_integer(typ):
            info = np.iinfo(typ.to_pandas_dtype())
            num = num.where(num.isna() | ((num == np.floor(num.fillna(0))) & (num >= info.min) & (num <= info.max)))
            return pa.array(num.astype("Int64"), type=typ, from_pandas=True)
        return pa.array(num.where(np.isfinite(num)), type=typ, from_pandas=True)
    if pa.types.is_boolean(typ) and text is not None:
        low = pc.utf8_lower(text)
        true = pc.is_in(low, pa.array(["true", "1", "yes"]))
        false = pc.is_in(low, pa.array(["false", "0", "no"]))
        return pc.if_else(true, True, pc.if_else(false, False, pa.scalar(None, pa.bool_())))
    if pa.types.is_nested(typ):
        vals = []
        for v in arr.to_pylist():
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except (ValueError, RecursionError):
                    v = None
            vals.append(v)
        good = []
        for v in vals:
            try:
                pa.array([v], type=typ)
                good.append(v)
            except (pa.ArrowException, OverflowError, RecursionError, TypeError, ValueError):
                good.append(None)
        return pa.array(good, type=typ)
    return pa.nulls(n, typ)


def coerce(dataset: str, table: pa.Table, source: str) -> tuple[pa.Table, pa.Table, Counter]:
    """Split raw rows into (rows typed to the contract, quarantine rows, counts per reason)."""
    schema = schema_for(dataset)
    if schema is None:
        raise ImportError_(f"dataset {dataset!r} has no contract; importable: see storage/schemas.py")
    n = table.num_rows
    reason = np.full(n, None, dtype=object)
    cols = {}
    for field in schema:
        if field.name not in table.column_names:
            cols[field.name] = pa.nulls(n, field.type)
            continue
        if field.name in TEXT_FIELDS.get(dataset, ()) and not _text_ok(table, field.name):
            raw = table.column(field.name)
            reason[_present(raw) & (reason == None)] = f"malformed {field.name}: not text"  # noqa: E711
            cols[field.name] = pa.nulls(n, field.type)
            continue
        conv, failed = _convert(table.column(field.name), field.type)
        reason[failed & (reason == None)] = f"malformed {field.name}: not a valid {field.type}"  # noqa: E711
        cols[field.name] = conv
    typed = pa.table(cols, schema=pa.schema([f.with_nullable(True) for f in schema]))
    typed = _fill_derived(dataset, typed)
    for name in REQUIRED_TEXT.get(dataset, ()):
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(typed.column(name))), 0)
        blank = np.asarray(pc.fill_null(empty, False).to_numpy(zero_copy_only=False), bool)
        reason[blank & (reason == None)] = f"blank {name}"  # noqa: E711
    for field in schema:
        if not field.nullable:
            missing = np.asarray(pc.is_null(typed.column(field.name)).to_numpy(zero_copy_only=False), bool)
            reason[missing & (reason == None)] = f"missing {field.name}"  # noqa: E711
    extra = [c for c in table.column_names if schema.get_field_index(c) < 0]
    bad = reason != None  # noqa: E711
    counts = Counter(reason[bad].tolist())
    good = typed.filter(pa.array(~bad))
    good = pa.Table.from_arrays(good.columns, schema=schema)
    idx = np.nonzero(bad)[0]
    raws = _raw_rows(table, idx)
    q = _quarantine(source, dataset, reason[bad].tolist(), raws, idx.tolist())
    if extra:
        counts[f"ignored unknown columns: {', '.join(extra)}"] += 0
    return good, q, counts


def _present(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return ~np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), bool)


def _raw_rows(table: pa.Table, idx: np.ndarray) -> list[str]:
    """Rows `idx` as JSON text for quarantine; temporal columns as text first (a year -1 or
    9999+ timestamp is no Python datetime)."""
    if not len(idx):
        return []
    if not table.num_columns:  # rows like {}: Arrow keeps their count, not a row list
        return ["{}"] * len(idx)
    t = table.take(pa.array(idx, pa.int64()))
    for i, f in enumerate(t.schema):
        if pa.types.is_temporal(f.type):
            t = t.set_column(i, pa.field(f.name, pa.string()), pc.cast(t.column(i), pa.string()))
    return [_dumps(r) for r in t.to_pylist()]


def _fill_derived(dataset: str, t: pa.Table) -> pa.Table:
    """Fill ids and fields an external file may leave out, the same way every time."""

    def setcol(name: str, arr: pa.Array) -> None:
        nonlocal t
        t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), arr)

    def fill(name: str, default: pa.Array) -> None:
        col = t.column(name)
        if col.null_count:
            setcol(name, pc.coalesce(col, default))

    if dataset == "prompts":
        if t.column("messages").null_count < t.num_rows:
            last_user = pa.array([_last_user(m) for m in t.column("messages").to_pylist()], pa.string())
            fill("prompt", last_user)
        msgs = pa.array([None if m is None else json.dumps(m, ensure_ascii=False, sort_keys=True)
                         for m in t.column("messages").to_pylist()], pa.string())
        fill("prompt_id", stable_id(t.column("prompt"), msgs, prefix="p-"))
        fill("language", detect_language(t.column("prompt")))
    elif dataset == "served":
        fill("prompt_id", stable_id(t.column("prompt"), prefix="p-"))
    elif dataset in ("pairs", "dpo_train", "dpo_eval"):  # TRL-style prompt/chosen/rejected rows bring no ids
        fill("source", pa.array(["imported"] * t.num_rows, pa.string()))
        fill("strategy", pa.array(["imported"] * t.num_rows, pa.string()))
        fill("prompt_id", stable_id(t.column("prompt"), prefix="p-"))
        fill("chosen_id", stable_id(t.column("prompt_id"), t.column("chosen"), prefix="c-"))
        fill("rejected_id", stable_id(t.column("prompt_id"), t.column("rejected"), prefix="c-"))
        fill("pair_id", stable_id(t.column("prompt_id"), t.column("chosen_id"), t.column("rejected_id"), prefix="pair-"))
    elif dataset == "feedback_events":
        fill("event_id", stable_id(t.column("user_id"), t.column("response_id"), t.column("event_type"),
                                   t.column("ts"), prefix="e-"))
    return t


def _last_user(messages: list[dict] | None) -> str | None:
    if not messages:
        return None
    users = [m.get("content") for m in messages if m and m.get("role") == "user"]
    return users[-1] if users else messages[-1].get("content")


def import_files(dataset: str, path: str | os.PathLike[str]) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Read + validate every file: (good rows, quarantine rows, report)."""
    files = list_files(path)
    goods, quarantines, counts = [], [], Counter()
    rows_in = 0
    for f in files:
        raw, q_parse = read_file(f, dataset)
        good, q_rows, c = coerce(dataset, raw, str(f))
        rows_in += raw.num_rows + q_parse.num_rows
        counts.update(Counter(q_parse.column("reason").to_pylist()))
        counts.update(c)
        goods.append(good)
        quarantines += [q_parse, q_rows]
    good = pa.concat_tables(goods)
    q = pa.concat_tables(quarantines)
    report = {"files": [str(f) for f in files], "rows_in": rows_in, "rows_out": good.num_rows,
              "quarantined": {k: v for k, v in counts.items() if v}, "notes": [k for k, v in counts.items() if not v]}
    return good, q, report


# Rows of these datasets are identified by this column: an import adds its rows, and a row
# whose id is already there replaces the old one (the file is the newer word on it).
ID_COLUMNS = {"prompts": "prompt_id", "served": "response_id", "pairs": "pair_id", "candidates": "candidate_id",
              "models": "model_version", "judgements": "judgement_id", "annotations": "annotation_id",
              "dpo_train": "pair_id", "dpo_eval": "pair_id"}


def add_rows(previous: pa.Table, new: pa.Table, dataset: str) -> pa.Table:
    """`previous` plus `new`; a previous row with the id of a new one is replaced by it."""
    key = ID_COLUMNS.get(dataset)
    if key and previous.num_rows and new.num_rows:
        keep = pc.invert(pc.is_in(previous.column(key), value_set=new.column(key).combine_chunks()))
        previous = previous.filter(keep)
    return pa.concat_tables([previous.select(new.column_names).cast(new.schema), new])


def import_stage(ctx: StageContext) -> StageResult:
    """`dpoflow import DATASET PATH`: the file's valid rows added to the previous version
    (role ``previous``; absent with ``--replace``), bad rows to quarantine.

    Config: ``dataset``, ``path`` and ``on_bad_rows``. A file without a valid row writes no
    version of the dataset (only its quarantine rows), and bad rows an earlier import of the
    same file quarantined already are not added again."""
    cfg = ctx.config
    dataset = cfg["dataset"]
    good, quarantine, report = import_files(dataset, cfg["path"])
    if cfg.get("on_bad_rows") == "fail" and quarantine.num_rows:
        raise ImportError_(f"{quarantine.num_rows} bad row(s) in {cfg['path']}: {report['quarantined']}")
    fresh = unseen_quarantine(ctx.store, quarantine)
    report["quarantined_before"] = quarantine.num_rows - fresh.num_rows
    outputs: dict[str, Any] = {}
    if good.num_rows:
        table = good
        if ctx.has("previous"):
            table = add_rows(ctx.read("previous"), good, dataset)
            report["added_to"] = ctx.inputs["previous"]
        outputs[dataset] = table
    return StageResult(outputs=outputs, quarantine=fresh, report=report,
                       metadata={dataset: {"files": report["files"]}} if outputs else {})

