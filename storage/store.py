"""The versioned dataset store: one Delta Lake table per dataset, one table version per write.

Why Delta Lake: each write is a Parquet file set plus one JSON commit in `_delta_log`; the
commit is a put-if-absent of the next log entry, so a reader sees a version whole or not at
all (also after a crash mid-write), two writers cannot both take the same version, and every
old version stays readable by time travel. Spark, DuckDB and Polars read the same tables.

What Delta lacks we keep beside the tables under ``<root>/_dpoflow/`` as small JSON files:
named tags, the content-key index (stage + inputs + config + code -> outputs) that lets
unchanged stages skip, and the record of versions removed by ``gc``. Lineage goes into each
commit's own metadata, so it travels with the table.

Log retention is set to ~100 years and expired-log cleanup off, so Delta never forgets a
version on its own; only :meth:`DatasetStore.gc` removes data, and it keeps every version
that a tag, a model or the lineage of a kept version refers to.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, create_table_with_add_actions

from dpoflow.storage.schemas import SCHEMAS, conform, schema_for, validate_name

META_KEY = "dpoflow"
ANY = object()  # "any current value" for compare-and-set arguments
ROWS_PER_FILE = 2_000_000  # rows per Parquet data file
ROW_GROUP = 128 * 1024  # rows per row group: streaming reads hold about one group per column
TABLE_CONFIG = {
    # Never let Delta drop history by itself: gc is an explicit, reference-aware command.
    "delta.logRetentionDuration": "interval 36500 days",
    "delta.deletedFileRetentionDuration": "interval 36500 days",
    "delta.enableExpiredLogCleanup": "false",
}


@dataclass(frozen=True)
class StagedFiles:
    """Data files written by `DatasetStore.stage_files`, not yet part of any version: pass it
    to `write` to commit them as one version (several threads may stage files in parallel)."""

    name: str
    actions: tuple[AddAction, ...]


class StoreError(RuntimeError):
    """A store operation failed in a way the user should read (bad ref, missing version...)."""


class ConcurrentWriteError(StoreError):
    """Another writer committed the same dataset version first."""


class ConflictError(ConcurrentWriteError):
    """A read-modify-write lost the race: the dataset (or tag) moved past the version the
    write was computed from. Nothing of the write is visible; recompute from the newer
    version and write again (`DatasetStore.update` does that loop)."""


@dataclass(frozen=True)
class Ref:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class VersionInfo:
    """What a version records about itself (its Delta commit metadata)."""

    name: str
    version: int
    rows: int
    created: str
    stage: str | None = None
    parents: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    code_version: str | None = None
    content_key: str | None = None
    flow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        return d


_SELECTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``name[@selector]`` into (name, selector); selector defaults to ``latest``.

    A selector is ``latest``, a version number (ASCII digits only: ``"²".isdigit()`` is true
    in Python but no version) or a tag name; anything else is a one-line StoreError."""
    if not isinstance(ref, str):
        raise StoreError(f"invalid ref {ref!r}: expected 'name', 'name@VERSION' or 'name@TAG'")
    name, _, sel = ref.partition("@")
    validate_name(name)  # DatasetNameError: a one-line error naming the bad name
    sel = sel or "latest"
    if not _SELECTOR_RE.match(sel):
        raise StoreError(f"invalid ref {ref!r}: after '@' comes a version number (ASCII digits), "
                         "'latest' or a tag name (letters, digits, '_', '-', '.')")
    return name, sel


def _is_version(sel: str) -> bool:
    return sel.isascii() and sel.isdigit()


def storage_options_from_env(root: str) -> dict[str, str]:
    """S3 settings from the standard AWS_* environment variables (never stored anywhere)."""
    if not root.startswith("s3://"):
        return {}
    keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_CONDITIONAL_PUT"]
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def _fsspec_options(options: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "AWS_ACCESS_KEY_ID" in options:
        out["key"] = options["AWS_ACCESS_KEY_ID"]
    if "AWS_SECRET_ACCESS_KEY" in options:
        out["secret"] = options["AWS_SECRET_ACCESS_KEY"]
    if "AWS_SESSION_TOKEN" in options:
        out["token"] = options["AWS_SESSION_TOKEN"]
    client: dict[str, Any] = {}
    if "AWS_ENDPOINT_URL" in options:
        client["endpoint_url"] = options["AWS_ENDPOINT_URL"]
    if "AWS_REGION" in options:
        client["region_name"] = options["AWS_REGION"]
    if client:
        out["client_kwargs"] = client
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _encoding_plan(sample: pa.Table | pa.RecordBatch) -> tuple[list[str], list[str]]:
    """(columns worth Parquet dictionary encoding, columns worth min/max statistics), judged
    on the first 64k rows written (the caller needs 1,000 or more). Columns with repeats (categories, ids shared by many rows)
    shrink with a dictionary; nearly unique ones (event ids, timestamps, free text) would pay
    for building a dictionary that the writer abandons once it outgrows its page (40% of the
    encoding time on 10M feedback events). Statistics of nearly unique, unsorted text prune no
    row group, so they are skipped too; numbers and times keep theirs (range filters)."""
    sample = sample.slice(0, 1 << 16)
    dictionary, stats = [], []
    for name, col in zip(sample.schema.names, sample.columns, strict=True):
        if pa.types.is_nested(col.type):
            continue  # neither (the writer's column lists name leaf paths, not nested columns)
        present = len(col) - col.null_count
        repeats = pa.types.is_dictionary(col.type) or present == 0 or \
            pc.count_distinct(col).as_py() <= present // 2
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)
        if repeats:
            dictionary.append(name)
        if repeats or not text:
            stats.append(name)
    return dictionary, stats


class DatasetStore:
    """Named, versioned, immutable datasets under one root (a folder or an ``s3://`` URI)."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, str] | None = None):
        root = str(root)
        self.remote = "://" in root
        self.root = root.rstrip("/") if self.remote else os.path.abspath(root)
        self.options = dict(storage_options or storage_options_from_env(self.root))
        if self.remote and self.root.startswith("s3://"):
            self.options.setdefault("AWS_CONDITIONAL_PUT", "etag")
            self.fs = fsspec.filesystem("s3", **_fsspec_options(self.options))
        else:
            self.fs = fsspec.filesystem("file")
            os.makedirs(self.root, exist_ok=True)

    # --- paths -----------------------------------------------------------------------------

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if self.remote else os.path.join(self.root, *parts)

    def table_uri(self, name: str) -> str:
        return self._join("datasets", validate_name(name))

    def _meta_path(self, *parts: str) -> str:
        return self._join("_dpoflow", *parts)

    def _read_json(self, path: str, default: Any) -> Any:
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return default

    def _write_json(self, path: str, obj: Any) -> None:
        """Atomic small-file write: temp + rename locally, a single PUT on object storage."""
        data = json.dumps(obj, indent=1, sort_keys=True, default=str)
        if self.remote:
            with self.fs.open(path, "w") as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # --- tables ----------------------------------------------------------------------------

    def _table(self, name: str, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(self.table_uri(name), version=version, storage_options=self.options or None)
        except TableNotFoundError as exc:
            raise StoreError(f"dataset {name!r} does not exist in {self.root}") from exc
        except Exception as exc:  # deltalake raises generic errors for a missing version
            if version is not None and self.exists(name):
                self._check_not_collected(name, version)
                raise StoreError(f"{name}@{version} does not exist (latest is {self.latest(name)})") from exc
            raise

    def exists(self, name: str) -> bool:
        try:
            DeltaTable(self.table_uri(name), storage_options=self.options or None)
            return True
        except TableNotFoundError:
            return False

    def list(self) -> list[str]:
        base = self._join("datasets")
        self.fs.invalidate_cache()  # object-store listings are cached; other writers add tables
        if not self.fs.exists(base):
            return []
        names = sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))
        return [n for n in names if self.exists(n)]

    def latest(self, name: str) -> int:
        return self._table(name).version()

    def resolve(self, ref: str) -> Ref:
        """``name``, ``name@latest``, ``name@3``, ``name@production`` -> a pinned Ref."""
        name, sel = parse_ref(ref)
        if sel == "latest":
            return Ref(name, self.latest(name))
        if _is_version(sel):
            v = int(sel)
            latest = self.latest(name)
            if v > latest:
                raise StoreError(f"{name}@{v} does not exist (latest is {latest})")
            self._check_not_collected(name, v)
            return Ref(name, v)
        tags = self.tags(name)
        if sel not in tags:
            raise StoreError(f"{name} has no version or tag {sel!r} (tags: {sorted(tags) or 'none'})")
        return Ref(name, int(tags[sel]))

    def write(
        self,
        name: str,
        data: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch],
        *,
        mode: str = "overwrite",
        parents: Iterable[str] = (),
        stage: str | None = None,
        config: dict[str, Any] | None = None,
        code_version: str | None = None,
        content_key: str | None = None,
        flow_run_id: str | None = None,
        extra: dict[str, Any] | None = None,
        schema: pa.Schema | None = None,
        expected_version: int | None = None,
    ) -> VersionInfo:
        """Commit `data` as the next version of `name` (``overwrite``: the version holds only
        `data`; ``append``: previous rows plus `data`). Validated against the contract first.

        `expected_version` is the version of `name` the data was computed from (-1: from
        nothing, the dataset must not exist yet). The commit then lands exactly on the next
        version, or raises :class:`ConflictError` when another writer got there first: a
        read-modify-write never silently drops the other writer's rows. ``None`` commits on
        top of whatever is latest (plain appends commute; an overwrite replaces). A failed
        write removes the data files it staged.

        Streams (readers / batch iterators) are validated batch by batch and never held whole.
        """
        validate_name(name)
        if mode not in ("overwrite", "append"):
            raise ValueError(f"mode must be 'overwrite' or 'append', not {mode!r}")
        if expected_version is not None:
            self._check_base(name, expected_version)
        contract = schema or schema_for(name)
        if isinstance(data, StagedFiles):
            if data.name != name or contract is None:
                raise StoreError(f"files staged for {data.name!r} cannot be committed to {name!r}")
            arrow_schema, batches = contract, []
        elif isinstance(data, pa.Table):
            table = conform(name, data, contract)
            arrow_schema = table.schema
            batches: Iterable[pa.Table | pa.RecordBatch] = [table]
        else:
            stream = iter(data)
            first = next(stream, None)
            if first is None and contract is None:
                raise StoreError(f"cannot write an empty stream to {name!r} without a contract")
            arrow_schema = contract if contract is not None else first.schema

            def gen() -> Iterator[pa.RecordBatch]:
                if first is not None:
                    yield from _conform_batch(name, first, contract)
                for b in stream:
                    yield from _conform_batch(name, b, contract)

            batches = gen()
        meta = {
            "stage": stage,
            "parents": sorted(set(parents)),
            "config": config,
            "code_version": code_version,
            "content_key": content_key,
            "flow_run_id": flow_run_id,
            "created": _now(),
            "extra": extra or {},
        }
        meta_json = json.dumps(meta, default=str, sort_keys=True)
        # Data files first (invisible until committed), then one atomic Delta commit.
        actions = list(data.actions) if isinstance(data, StagedFiles) else self._write_files(name, batches, arrow_schema)
        commit = CommitProperties(custom_metadata={META_KEY: meta_json},
                                  max_commit_retries=0 if expected_version is not None else None)
        try:
            self._commit(name, actions, mode, arrow_schema, commit, expected_version)
        except BaseException as exc:
            self._remove_staged(name, actions)  # unreferenced files would only be litter
            if isinstance(exc, ConflictError):
                raise
            if expected_version is not None and isinstance(exc, CommitFailedError):
                raise self._conflict(name, expected_version) from exc
            if isinstance(exc, CommitFailedError):
                raise ConcurrentWriteError(
                    f"another writer committed {name!r} at the same time; nothing of this write is "
                    f"visible, retry it ({exc})"
                ) from exc
            raise
        version = expected_version + 1 if expected_version is not None else self._find_commit(name, meta_json)
        return self.info(f"{name}@{version}")

    def update(self, name: str, compute: Callable[[str | None], Any], *, retries: int = 8,
               **write_kw: Any) -> VersionInfo:
        """Read-modify-write with optimistic concurrency: ``compute(base)`` gets the ref the
        new version is computed from (``None`` when `name` does not exist yet) and returns its
        data; when another writer commits in between, `compute` runs again on the newer
        version (up to `retries` times, then the ConflictError is raised)."""
        for attempt in range(retries + 1):
            base = self.latest(name) if self.exists(name) else -1
            data = compute(f"{name}@{base}" if base >= 0 else None)
            try:
                return self.write(name, data, expected_version=base, **write_kw)
            except ConflictError:
                if attempt == retries:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # let the winner finish
        raise AssertionError("unreachable")

    def append_unique(self, name: str, table: pa.Table, key: list[str], **write_kw: Any) -> VersionInfo | None:
        """Append the rows of `table` whose `key` columns are not in `name` yet (and not
        repeated within `table`); None when nothing is new. A rerun of the same write adds
        nothing, and two concurrent writers of the same rows add them once."""
        new_keys = _row_keys(table, key)
        first = pc.equal(pc.index_in(new_keys, new_keys), pa.array(range(len(new_keys)), pa.int32()))
        table = table.filter(first)

        def compute(base: str | None) -> pa.Table:
            if base is None:
                return table
            have = _row_keys(self.read(base, columns=key), key)
            return table.filter(pc.invert(pc.is_in(_row_keys(table, key), have)))

        for attempt in range(9):
            base = self.latest(name) if self.exists(name) else -1
            fresh = compute(f"{name}@{base}" if base >= 0 else None)
            if fresh.num_rows == 0:
                return None
            try:
                return self.write(name, fresh, mode="append", expected_version=base, **write_kw)
            except ConflictError:
                if attempt == 8:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        return None

    def _check_base(self, name: str, expected: int) -> None:
        latest = self.latest(name) if self.exists(name) else -1
        if latest != expected:
            raise self._conflict(name, expected)

    def _conflict(self, name: str, expected: int) -> ConflictError:
        latest = self.latest(name) if self.exists(name) else -1
        read = f"{name}@{expected}" if expected >= 0 else f"that {name!r} did not exist"
        if expected < 0:
            return ConflictError(f"conflict: this write assumed {read}, but another writer created it "
                                 f"(latest is {name}@{latest}); nothing was written, rerun to include it")
        return ConflictError(f"conflict: this write was computed from {read}, but another writer committed "
                             f"{name}@{latest} meanwhile; nothing was written, rerun to recompute from it")

    def _remove_staged(self, name: str, actions: Iterable[AddAction]) -> None:
        base = self._strip(self.table_uri(name))
        for a in actions:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(f"{base}/{a.path}")

    def stage_files(self, name: str, batches: Iterable[pa.Table | pa.RecordBatch]) -> StagedFiles:
        """Write (contract-checked) data files for a later `write(name, StagedFiles)`; they are
        invisible until then. Thread-safe, so one version's files can be encoded in parallel."""
        contract = schema_for(name)
        if contract is None:
            raise StoreError(f"stage_files needs a dataset with a contract, not {name!r}")

        def gen() -> Iterator[pa.Table | pa.RecordBatch]:
            for b in batches:
                if isinstance(b, pa.RecordBatch):
                    yield from _conform_batch(name, b, contract)
                else:
                    yield conform(name, b, contract)

        return StagedFiles(name, tuple(self._write_files(name, gen(), contract)))

    def _write_files(self, name: str, batches: Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema
                     ) -> list[AddAction]:
        """Write Parquet files with Arrow's writer (no extra copy, same speed as plain
        pyarrow.parquet), rolling to a new file every `ROWS_PER_FILE` rows."""
        fs = self._arrow_fs()
        base = self._strip(self.table_uri(name))
        if not self.remote:
            os.makedirs(base, exist_ok=True)
        actions: list[AddAction] = []
        state: dict[str, Any] = {"writer": None}

        def close() -> None:
            w = state["writer"]
            if w is None:
                return
            w.close()
            state["sink"].close()
            size = fs.get_file_info(state["path"]).size
            actions.append(AddAction(state["fname"], size, {}, int(time.time() * 1000), True,
                                     json.dumps({"numRecords": state["rows"]})))
            state["writer"] = None

        def open_(first: pa.Table | pa.RecordBatch | None) -> None:
            fname = f"part-{uuid.uuid4().hex}.snappy.parquet"
            path = f"{base}/{fname}"
            if "plan" not in state:
                # a few rows say nothing about repeats: then the writer's defaults (all on)
                state["plan"] = _encoding_plan(first) if first is not None and first.num_rows >= 1000 else (True, True)
            sink = fs.open_output_stream(path)
            dictionary, stats = state["plan"]
            state.update(writer=pq.ParquetWriter(sink, schema, compression="snappy", use_dictionary=dictionary,
                                                 write_statistics=stats),
                         sink=sink, path=path, fname=fname, rows=0)

        try:
            for part in batches:
                offset = 0
                while offset < part.num_rows:
                    if state["writer"] is None:
                        open_(part)
                    take = min(part.num_rows - offset, ROWS_PER_FILE - state["rows"])
                    chunk = part.slice(offset, take)
                    if isinstance(chunk, pa.Table):
                        state["writer"].write_table(chunk, row_group_size=ROW_GROUP)
                    else:
                        state["writer"].write_batch(chunk, row_group_size=ROW_GROUP)
                    state["rows"] += take
                    offset += take
                    if state["rows"] >= ROWS_PER_FILE:
                        close()
            if state["writer"] is None and not actions:
                open_(None)  # an empty version still gets one (empty) file carrying the schema
            close()
        except BaseException:
            # a bad batch mid-stream (or a kill signal turned exception): no half-written litter
            if state["writer"] is not None:
                with contextlib.suppress(Exception):
                    state["writer"].close()
                    state["sink"].close()
                actions.append(AddAction(state["fname"], 0, {}, 0, True, "{}"))
            self._remove_staged(name, actions)
            raise
        return actions

    def _commit(self, name: str, actions: list[AddAction], mode: str, schema: pa.Schema,
                commit: CommitProperties, expected: int | None = None) -> None:
        uri = self.table_uri(name)
        if expected == -1 or (expected is None and not self.exists(name)):
            try:
                create_table_with_add_actions(uri, DeltaSchema.from_arrow(schema), actions, mode="error",
                                              configuration=TABLE_CONFIG, storage_options=self.options or None,
                                              commit_properties=commit)
                return
            except Exception:
                if not self.exists(name):
                    raise
                if expected == -1:
                    raise self._conflict(name, -1) from None
                # another writer created the table first: commit on top of it below
        # Loaded at the version the data came from, with no commit retries: Delta's
        # put-if-absent of the next log entry then fails if anyone committed meanwhile.
        table = DeltaTable(uri, version=expected, storage_options=self.options or None)
        table.create_write_transaction(actions, mode=mode, schema=schema, commit_properties=commit)

    def _find_commit(self, name: str, meta_json: str) -> int:
        """The version our commit got (another writer may have committed right after it)."""
        latest = self.latest(name)
        for v in range(latest, max(latest - 64, -1), -1):
            if self._commit_info(Ref(name, v)).get(META_KEY) == meta_json:
                return v
        raise StoreError(f"could not find the commit just written to {name!r}")

    def read(self, ref: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        """The rows of a version as a pyarrow Table (in its contract schema).

        Like any table format, row order is not part of a version: sort by an id column
        where order matters.
        """
        table = self.dataset(ref).to_table(columns=columns, filter=filter)
        r = self.resolve(ref)
        contract = SCHEMAS.get(r.name)
        if contract is not None:
            target = pa.schema([contract.field(c) for c in table.column_names])
            if table.schema != target:
                table = table.cast(target)
        return table

    def dataset(self, ref: str) -> pads.Dataset:
        """A lazily read pyarrow Dataset of a version, for streaming large tables in batches.

        The version's Parquet files come from the Delta log; Arrow reads them directly (we
        never write deletion vectors, so the file list is the whole version).
        """
        r = self.resolve(ref)
        dt_ = self._table(r.name, r.version)
        files = [self._strip(u) for u in dt_.file_uris()]
        schema = dt_.schema().to_arrow()
        schema = pa.schema(schema) if not isinstance(schema, pa.Schema) else schema
        return pads.dataset(files, schema=_plain_types(schema), format="parquet", filesystem=self._arrow_fs())

    def _strip(self, uri: str) -> str:
        if self.remote:
            return uri.split("://", 1)[1]
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def _arrow_fs(self):
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def read_batches(self, ref: str, batch_size: int = 65536, columns: list[str] | None = None
                     ) -> Iterator[pa.RecordBatch]:
        yield from self.dataset(ref).to_batches(batch_size=batch_size, columns=columns)

    def head(self, ref: str, limit: int = 10) -> list[dict[str, Any]]:
        """The first `limit` rows as Python dicts, safe for any stored value (see `python_rows`)."""
        return python_rows(self.dataset(ref).head(max(limit, 0)))

    def to_pandas(self, ref: str, columns: list[str] | None = None):
        return self.read(ref, columns=columns).to_pandas()

    def to_hf(self, ref: str):
        """A Hugging Face ``datasets.Dataset`` over the same Arrow memory (no per-row copy)."""
        import datasets

        return datasets.Dataset(self.read(ref))

    # --- metadata --------------------------------------------------------------------------

    def info(self, ref: str) -> VersionInfo:
        r = self.resolve(ref)
        dt_ = self._table(r.name, r.version)
        commit = self._commit_info(r)
        meta = json.loads(commit.get(META_KEY) or "{}")
        rows = _count_rows(dt_)
        return VersionInfo(
            name=r.name, version=r.version, rows=rows,
            created=meta.get("created") or str(commit.get("timestamp")),
            stage=meta.get("stage"), parents=meta.get("parents") or [], config=meta.get("config"),
            code_version=meta.get("code_version"), content_key=meta.get("content_key"),
            flow_run_id=meta.get("flow_run_id"), extra=meta.get("extra") or {},
        )

    def _commit_info(self, r: Ref) -> dict[str, Any]:
        path = self._join("datasets", r.name, "_delta_log", f"{r.version:020d}.json")
        with self.fs.open(path, "r") as f:
            for line in f:
                action = json.loads(line)
                if "commitInfo" in action:
                    return action["commitInfo"]
        return {}

    def log(self, name: str) -> list[VersionInfo]:
        """Every version of a dataset, newest first (versions removed by gc are left out)."""
        removed = self.collected(name)
        return [self.info(f"{name}@{v}") for v in range(self.latest(name), -1, -1) if v not in removed]

    def lineage(self, ref: str) -> dict[str, Any]:
        """The whole ancestry of a version as a nested dict {ref, stage, parents: [...]}."""
        seen: dict[str, dict[str, Any]] = {}

        def walk(r: str) -> dict[str, Any]:
            if r in seen:
                return {"ref": r, "stage": seen[r]["stage"], "parents": [], "seen": True}
            if r.startswith("models@"):
                node = {"ref": r, "stage": "model", "parents": []}
                seen[r] = node
                return node
            info = self.info(r)
            node = {"ref": info.ref, "stage": info.stage, "parents": []}
            seen[r] = node
            node["parents"] = [walk(p) for p in info.parents]
            return node

        return walk(str(self.resolve(ref)))

    # --- tags ------------------------------------------------------------------------------

    def tags(self, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in self._read_json(self._meta_path("tags", f"{validate_name(name)}.json"), {}).items()}

    def tag(self, ref: str, tag: str, *, expected: int | None | object = ANY) -> Ref:
        """Point `tag` at a version (moving it if it pointed elsewhere).

        `expected`: the version the caller saw the tag at (None: unset); if it moved since,
        ConflictError, and the tag stays where the other writer put it."""
        if not tag or tag == "latest" or _is_version(tag) or not _SELECTOR_RE.match(tag):
            raise StoreError(f"invalid tag {tag!r}: not empty, not 'latest', not a number; letters, digits, "
                             "'_', '-', '.'")
        r = self.resolve(ref)

        def move(tags: dict[str, int]) -> dict[str, int]:
            if expected is not ANY and tags.get(tag) != expected:
                raise ConflictError(f"conflict: tag {r.name}@{tag} was expected at {expected}, but another "
                                    f"writer moved it to {tags.get(tag)}; it was left there")
            return {**tags, tag: r.version}

        self.update_json(self._meta_path("tags", f"{r.name}.json"), move)
        return r

    def untag(self, name: str, tag: str) -> None:
        self.update_json(self._meta_path("tags", f"{validate_name(name)}.json"),
                         lambda tags: {k: v for k, v in tags.items() if k != tag})

    def update_json(self, path: str, change: Callable[[Any], Any], default: Any = None) -> Any:
        """Read-modify-write of a small JSON record under an exclusive lock, so two writers
        moving different tags both land (no lost update). `change` may raise to abort."""
        with self._locked(path):
            value = change(self._read_json(path, {} if default is None else default))
            self._write_json(path, value)
            return value

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        """An advisory file lock beside `path` (local stores; on object storage a single
        PUT is the unit, and concurrent tag writers there are not serialised)."""
        if self.remote:
            yield
            return
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- content keys (skip unchanged stages) ----------------------------------------------

    @staticmethod
    def content_key(stage: str, inputs: dict[str, str], config: Any, code_version: str) -> str:
        payload = json.dumps(
            {"stage": stage, "inputs": dict(sorted(inputs.items())), "config": config, "code": code_version},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def find_outputs(self, key: str) -> dict[str, str] | None:
        """Outputs an earlier run with this content key produced, if they are all still readable."""
        rec = self._read_json(self._meta_path("keys", f"{key}.json"), None)
        if not rec:
            return None
        try:
            for ref in rec["outputs"].values():
                self.resolve(ref)
        except StoreError:
            return None
        return dict(rec["outputs"])

    def record_outputs(self, key: str, stage: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
        self._write_json(self._meta_path("keys", f"{key}.json"),
                         {"stage": stage, "inputs": inputs, "outputs": outputs, "created": _now()})

    # --- state (watermarks and other small per-stage records) ------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._read_json(self._meta_path("state", f"{_safe_key(key)}.json"), default)

    def set_state(self, key: str, value: Any) -> None:
        self._write_json(self._meta_path("state", f"{_safe_key(key)}.json"), value)

    # --- garbage collection ----------------------------------------------------------------

    def _gc_record(self, name: str) -> list[int]:
        return self._read_json(self._meta_path("gc", f"{name}.json"), [])

    def collected(self, name: str) -> set[int]:
        """Versions of a dataset removed by `dpoflow datasets gc`."""
        return set(self._gc_record(name))

    def _check_not_collected(self, name: str, version: int) -> None:
        if version in self.collected(name):
            raise StoreError(f"{name}@{version} was removed by 'dpoflow datasets gc'")

    def referenced_versions(self, keep_last: int = 3, extra_refs: Iterable[str] = ()) -> dict[str, set[int]]:
        """Versions gc must keep: the newest `keep_last` of each dataset, every tagged version,
        every dataset a registered model was trained from, `extra_refs`, and the whole lineage
        of each of those."""
        roots: list[str] = list(extra_refs)
        for name in self.list():
            latest = self.latest(name)
            removed = self.collected(name)
            live = [v for v in range(latest, -1, -1) if v not in removed]
            roots += [f"{name}@{v}" for v in live[:max(keep_last, 1)]]
            roots += [f"{name}@{v}" for v in self.tags(name).values()]
        if self.exists("models"):
            models = self.read("models", columns=["parents"])
            for parents in models.column("parents").to_pylist():
                roots += [p for p in parents or [] if not p.startswith("models@")]
        keep: dict[str, set[int]] = {}
        stack = list(roots)
        while stack:
            ref = stack.pop()
            try:
                r = self.resolve(ref)
            except StoreError:
                continue
            if r.version in keep.setdefault(r.name, set()):
                continue
            keep[r.name].add(r.version)
            stack += [p for p in self.info(str(r)).parents if not p.startswith("models@")]
        return keep

    def gc(self, keep_last: int = 3, dry_run: bool = False, shard_max_age_s: float = 86400
           ) -> dict[str, list[int]]:
        """Delete the data files of unreferenced versions; return {dataset: removed versions}.

        ``shard_*`` datasets are a stage's resumable work units (e.g. sampling shards): once
        older than `shard_max_age_s` their stage has long finished or been abandoned, so they
        are removed whole.
        """
        keep = self.referenced_versions(keep_last)
        removed: dict[str, list[int]] = {}
        if not dry_run:
            self.remove_litter(max_age_s=min(shard_max_age_s, 3600))
        now = dt.datetime.now(dt.UTC)
        for name in self.list():
            if name.startswith("shard_"):
                created = dt.datetime.fromisoformat(self.info(name).created)
                if (now - created).total_seconds() > shard_max_age_s:
                    removed[name] = list(range(self.latest(name) + 1))
                    if not dry_run:
                        self.fs.rm(self.table_uri(name), recursive=True)
                continue
            latest = self.latest(name)
            already = self.collected(name)
            kept = keep.get(name, set()) | {latest}
            drop = [v for v in range(latest + 1) if v not in kept and v not in already]
            if not drop:
                continue
            removed[name] = drop
            if dry_run:
                continue
            needed: set[str] = set()
            for v in kept:
                needed |= {posixpath.basename(u) for u in self._table(name, v).file_uris()}
            self._write_json(self._meta_path("gc", f"{name}.json"), sorted(already | set(drop)))
            base = self.table_uri(name)
            for path in self.fs.find(base):
                rel = path[len(base.replace("file://", "")):] if not self.remote else path
                if "_delta_log" in rel or not path.endswith(".parquet"):
                    continue
                if posixpath.basename(path) not in needed:
                    self.fs.rm(path)
        return removed


    def remove_litter(self, max_age_s: float = 3600) -> dict[str, int]:
        """Remove what killed writers leave behind, once older than `max_age_s` (so a writer
        still at work keeps its files): ``*.tmp`` files of small JSON records under
        ``_dpoflow/`` and Parquet files that no commit of their table ever referenced."""
        cutoff = time.time() - max_age_s
        out = {"tmp": 0, "parquet": 0}

        def old(path: str) -> bool:
            try:
                mtime = self.fs.info(path).get("mtime") or self.fs.modified(path)
            except (FileNotFoundError, OSError, NotImplementedError):
                return False
            stamp = mtime.timestamp() if isinstance(mtime, dt.datetime) else float(mtime)
            return stamp < cutoff

        meta = self._meta_path()
        if self.fs.exists(meta):
            for path in self.fs.find(meta):
                if path.endswith(".tmp") and old(path):
                    self.fs.rm(path)
                    out["tmp"] += 1
        for name in self.list():
            base = self._strip(self.table_uri(name))
            log = f"{base}/_delta_log"
            referenced: set[str] = set()
            for entry in self.fs.find(log):
                if entry.endswith(".json"):
                    with self.fs.open(entry, "r") as f:
                        actions = [json.loads(line) for line in f if line.strip()]
                    referenced |= {a["add"]["path"] for a in actions if "add" in a}
            for path in self.fs.find(base):
                if "_delta_log" in path or not path.endswith(".parquet"):
                    continue
                if path[len(base) + 1:] not in referenced and old(path):
                    self.fs.rm(path)
                    out["parquet"] += 1
        return out


_PY_MIN_US = int((dt.datetime(1, 1, 1, tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()) * 10**6
_PY_MAX_US = int((dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
                  - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()) * 10**6


def python_rows(table: pa.Table) -> list[dict[str, Any]]:
    """``table.to_pylist()`` that cannot crash on a stored value: a timestamp column holding
    a time Python's datetime cannot represent (year -1, year 10000) is given as ISO text."""
    columns = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_timestamp(col.type) and len(col) - col.null_count:
            micros = pc.cast(col.cast(pa.timestamp("us", tz=col.type.tz)), pa.int64())
            lo, hi = pc.min_max(micros).values()
            if lo.as_py() < _PY_MIN_US or hi.as_py() > _PY_MAX_US:
                col = col.cast(pa.string())
        columns[name] = col
    return pa.table(columns).to_pylist() if columns else [{} for _ in range(table.num_rows)]


def _safe_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32] if not key.replace("_", "").replace("-", "").isalnum() else key


def _row_keys(table: pa.Table, key: list[str]) -> pa.Array:
    """One string per row joining the `key` columns (nulls marked apart from empty text)."""
    if table.num_rows == 0:
        return pa.array([], pa.string())
    parts = []
    for c in key:
        col = table.column(c)
        text = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
        parts.append(pc.if_else(pc.is_null(text), "\x00null", pc.binary_join_element_wise("v", text, "")))
    joined = pc.binary_join_element_wise(*parts, "\x1f") if len(parts) > 1 else parts[0]
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def _conform_batch(name: str, batch: pa.RecordBatch, contract: pa.Schema | None) -> Iterator[pa.RecordBatch]:
    if contract is None:
        yield batch
        return
    yield from conform(name, pa.Table.from_batches([batch]), contract).to_batches()


def _plain_types(schema: pa.Schema) -> pa.Schema:
    """Delta reports large / view types; the Parquet files hold plain ones, read them as such."""

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            return pa.binary()
        if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_list(t):
            return pa.list_(pa.field(t.value_field.name, plain(t.value_type), t.value_field.nullable))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, plain(f.type), f.nullable) for f in t])
        if pa.types.is_map(t):
            return pa.map_(plain(t.key_type), plain(t.item_type))
        return t

    return pa.schema([pa.field(f.name, plain(f.type), f.nullable) for f in schema])


def _count_rows(table: DeltaTable) -> int:
    """Row count from the Delta log's per-file statistics (our writer always records them)."""
    vals = pa.table(table.get_add_actions(flatten=True)).column("num_records").to_pylist()
    if any(v is None for v in vals):
        raise StoreError("row count statistics missing from the Delta log")
    return int(sum(vals))
