"""Stable content ids: the same content gives the same id in every run, so reruns are idempotent."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def stable_id(*columns: pa.Array | pa.ChunkedArray, prefix: str = "", length: int = 16) -> pa.Array:
    """Hash of the given columns row-wise (nulls hash as empty), hex, `length` chars.

    The columns are joined with a unit separator in Arrow (vectorised); only the digest is
    per row, in C via hashlib.
    """
    parts = [pc.fill_null(pc.cast(c, pa.string()), "") for c in columns]
    joined = pc.binary_join_element_wise(*parts, "\x1f") if len(parts) > 1 else parts[0]
    blake = hashlib.blake2b
    out = [prefix + blake(s.encode(), digest_size=16).hexdigest()[:length] if s is not None else None
           for s in joined.to_pylist()]
    return pa.array(out, pa.string())


def stable_id_one(*values: object, prefix: str = "", length: int = 16) -> str:
    """The scalar twin of :func:`stable_id` (identical result for the same values)."""
    s = "\x1f".join("" if v is None else str(v) for v in values)
    return prefix + hashlib.blake2b(s.encode(), digest_size=16).hexdigest()[:length]
