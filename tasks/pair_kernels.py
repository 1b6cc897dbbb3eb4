"""Columnar helpers of the pairs and balance kernels: id lookups, distinct keys, string views.

Why a module of their own: at 250k prompts the Arrow string hash tables (id lookups) and the
copies of long text columns made the stages slower than a plain Polars script. Each returns
exactly what the slower form returned (the tests compare them). Pair ids are `tasks.ids.stable_id`,
the language guess `tasks.lang.detect_language`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.tasks.text_codes import hash_strings


def lookup(keys: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Position of each key in `values` (first occurrence), -1 when absent: `pc.index_in` by
    hashes and a binary search, every hit confirmed on the strings (a hash collision falls back
    to Arrow for its keys). Nulls: Arrow's own lookup."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    keys, values = pc.cast(keys, pa.string()), pc.cast(values, pa.string())
    if keys.null_count or values.null_count:
        return _index_in(keys, values)
    # hashes less as many low bits as a row number needs: key and row then sort as one word
    # (`sorted_order`); a shorter hash only means more hits that the strings then reject
    shift = np.uint64(max(len(values), len(keys), 1).bit_length())
    hv, hk = hash_strings(values) >> shift, hash_strings(keys) >> shift
    order = sorted_order(hv)  # stable: the first of equal values comes first
    sv = hv[order]
    out = np.full(len(keys), -1, np.int64)
    if not len(sv):
        return out
    qo = sorted_order(hk)  # the binary searches walk memory in order when the queries are sorted (~4x)
    at = np.empty(len(hk), np.int64)
    at[qo] = np.minimum(np.searchsorted(sv, hk[qo]), len(sv) - 1)
    hit = sv[at] == hk
    pos = order[at[hit]]
    out[hit] = pos
    same = np.asarray(pc.equal(values.take(pa.array(pos)), keys.filter(pa.array(hit))), bool)
    if not same.all():  # a collision: Arrow decides for those keys, among the values sharing their hashes
        bad = np.flatnonzero(hit)[~same]
        sub = np.flatnonzero(np.isin(hv, hk[bad]))  # ascending: the first occurrence stays first
        found = _index_in(keys.take(pa.array(bad)), values.take(pa.array(sub)))
        out[bad] = np.where(found >= 0, sub[np.maximum(found, 0)], -1)
    return out


def _index_in(keys: pa.Array, values: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.index_in(keys, value_set=values), -1).to_numpy(zero_copy_only=False), np.int64)


def sorted_order(h: np.ndarray) -> np.ndarray:
    """`np.argsort(h, kind="stable")` for unsigned 64-bit keys. When the keys leave room for the
    row number in their top bits (small keys: offsets, codes), key and row are packed into one
    word and sorted by value (numpy's SIMD sort, ~10x faster than an argsort)."""
    n = len(h)
    bits = max(int(n).bit_length(), 1)
    if n and bits < 64 and int(h.max()) < (1 << (64 - bits)):
        packed = (h.astype(np.uint64) << np.uint64(bits)) | np.arange(n, dtype=np.uint64)
        packed.sort()
        return (packed & np.uint64((1 << bits) - 1)).astype(np.int64)
    return np.argsort(h, kind="stable")


def first_and_inverse(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For 64-bit keys: the first row of each distinct key (in key order), and each row's index
    into those: `np.unique(..., return_index, return_inverse)` by one stable sort, without
    numpy's hashing (~10x slower on a million keys)."""
    order = sorted_order(h)
    sh = h[order]
    new = np.ones(len(h), bool)
    new[1:] = sh[1:] != sh[:-1]
    inv = np.empty(len(h), np.int64)
    inv[order] = np.cumsum(new) - 1
    return order[new], inv


# --- texts as string views ---------------------------------------------------------------------
#
# The pairs and split tables repeat the candidates' texts (a response is the chosen side of some
# pairs and the rejected side of others). As Arrow string views they point into the candidates'
# own buffers: a gather moves 16 bytes per row, not the text, and no table holds a second copy.
# The contracts accept string views for string columns (the store writes them as strings).

def as_views(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string-view array over the column's chunks (no character data is copied)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    views = [c if pa.types.is_string_view(c.type) else c.cast(pa.string()).cast(pa.string_view()) for c in chunks]
    return pa.concat_arrays(views) if len(views) != 1 else views[0]


def take_views(arr: pa.Array, idx: np.ndarray) -> pa.Array:
    """`arr.take(idx)` for a string-view array (Arrow has no take kernel for views): the 16-byte
    views are gathered with numpy, the character buffers are shared."""
    idx = np.asarray(idx, np.int64)
    bufs = arr.buffers()
    views = np.frombuffer(bufs[1], np.uint64).reshape(-1, 2)[arr.offset:arr.offset + len(arr)]
    validity = None
    if arr.null_count:
        valid = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), bool)[idx]
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.string_view(), len(idx), [validity, pa.py_buffer(np.ascontiguousarray(views[idx]))]
                                 + bufs[2:])


def take_text(col: pa.Array | pa.ChunkedArray, idx: np.ndarray) -> pa.Array:
    """Rows `idx` of a text column as plain strings (for the few rows a step looks at again)."""
    if isinstance(col, pa.ChunkedArray):
        if not any(pa.types.is_string_view(c.type) for c in col.chunks):
            return col.take(pa.array(np.asarray(idx, np.int64))).combine_chunks()
        col = as_views(col)
    if pa.types.is_string_view(col.type):
        return take_views(col, idx).cast(pa.string())
    return col.take(pa.array(np.asarray(idx, np.int64)))


def conform_views(name: str, table: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """`storage.schemas.conform`, except that string-view columns of string fields stay views
    (conform would cast them to strings, copying every text); their nulls are checked the same."""
    from dpoflow.storage.schemas import SchemaError, conform, schema_for

    schema = schema if schema is not None else schema_for(name)
    views = [f.name for f in schema if pa.types.is_string(f.type) and f.name in table.column_names
             and pa.types.is_string_view(table.schema.field(f.name).type)]
    if not views:
        return conform(name, table, schema)
    rest = conform(name, table.drop_columns(views), pa.schema([f for f in schema if f.name not in views]))
    cols, fields = [], []
    for f in schema:
        if f.name in views:
            col = table.column(f.name)
            if not f.nullable and col.null_count:
                raise SchemaError(name, f.name, f"{col.null_count} null value(s) in a required column")
            cols.append(col)
            fields.append(pa.field(f.name, pa.string_view(), f.nullable))
        else:
            cols.append(rest.column(f.name))
            fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))
