"""Byte-level text helpers of the balance stage: the classes of the characters whose NFKC form
is known without context, the normalisation of texts made of them, and a fast string hash.

Why: `tasks.text.normalize` (NFKC + whitespace runs -> one space + trim) is a chain of Arrow
regex passes (~10 s CPU per 0.4 GB of answers). The balance stage normalises only the few rows
whose identity keys match (`tasks.text_keys`), and for texts made of ASCII (except the controls
that only trimming treats as space), CJK ideographs, kana, Hangul syllables, a few CJK /
typographic punctuation marks, full-width ASCII (NFKC: minus 0xFEE0) and the ideographic space
(NFKC: a space) it does so on the bytes with numpy. `tasks.text_keys` finds the other texts,
which take the exact Arrow path; the tests check both paths against `tasks.text`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# class of each BMP code point in 3-byte UTF-8: 0 = other (exact path), 1 = CJK unit,
# 2 = punctuation (not a word, not space), 3 = full-width ASCII, 4 = ideographic space.
_OTHER, _CJK, _PUNCT, _FULL, _ISPACE = 0, 1, 2, 3, 4
_CLASS = np.zeros(0x10000, np.uint8)
for _lo, _hi, _c in ((0x3400, 0x4DBF, _CJK), (0x4E00, 0x9FFF, _CJK), (0xAC00, 0xD7A3, _CJK),
                     (0x3041, 0x3096, _CJK), (0x30A1, 0x30FA, _CJK), (0x30FC, 0x30FC, _CJK),
                     (0x3001, 0x3003, _PUNCT), (0x3008, 0x3011, _PUNCT), (0x3014, 0x301F, _PUNCT),
                     (0x2013, 0x2014, _PUNCT), (0x2018, 0x2019, _PUNCT), (0x201C, 0x201D, _PUNCT),
                     (0x2022, 0x2022, _PUNCT), (0xFF01, 0xFF5E, _FULL), (0x3000, 0x3000, _ISPACE)):
    _CLASS[_lo:_hi + 1] = _c

# ASCII: `\s+` collapses tab, newline, form feed, carriage return and space; bytes 11 and 28-31
# are space to trimming only (such texts take the exact path).
CHUNK_BYTES = 1 << 20  # texts are processed in cache-sized slices of about this many bytes


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data bytes, start, length) of each string; nulls read as empty."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    arr = pc.fill_null(arr, "")
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    return data, offs[:-1], np.diff(offs)


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of each string, plain or view, null hashing as "" (Polars' hash: ~50x faster
    than a numpy word loop on long texts; stable within one Polars version, so it is only used
    to group rows within a run)."""
    import polars as pl  # here, not at the top: loading the config imports this module (~0.5 s, 27 MB)

    return pl.Series(arr).fill_null("").hash(seed=0).to_numpy().copy()


def _normalise_slice(b: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """NFKC (full-width ASCII, ideographic space) + whitespace runs -> one space + trim, on bytes
    of texts that take the fast path: (normalised bytes, their text)."""
    q = np.flatnonzero((b >= 0xE0) & (b < 0xF0))
    q = q[q + 2 < len(b)]
    cp = ((b[q].astype(np.int32) & 0x0F) << 12) | ((b[q + 1].astype(np.int32) & 0x3F) << 6) | (b[q + 2] & 0x3F)
    cls = _CLASS[cp]
    m = (cls == _FULL) | (cls == _ISPACE)
    mp = q[m]
    out = b.copy()
    out[mp] = np.where(cls[m] == _FULL, cp[m] - 0xFEE0, 32).astype(np.uint8)
    keep = np.ones(len(b), bool)
    keep[mp + 1] = False
    keep[mp + 2] = False
    out, own = out[keep], owner[keep]
    new_text = np.ones(len(out), bool)
    new_text[1:] = own[1:] != own[:-1]
    ws = (out == 32) | ((out >= 9) & (out <= 13) & (out != 11))
    prev_ws = np.concatenate([[False], ws[:-1]]) & ~new_text
    keep2 = ~(ws & prev_ws)
    out, own, ws, new_text = out[keep2], own[keep2], ws[keep2], new_text[keep2]
    end_text = np.ones(len(out), bool)
    end_text[:-1] = own[1:] != own[:-1]
    keep3 = ~(ws & (new_text | end_text))
    out[ws] = 32
    return out[keep3], own[keep3]


def _as_strings(data: np.ndarray, owner: np.ndarray, n: int) -> pa.Array:
    lens = np.bincount(owner, minlength=n)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offs), pa.py_buffer(np.ascontiguousarray(data)))


def normalise_fast(texts: pa.Array) -> pa.Array:
    """Normalised copies of texts that take the fast path (`text_keys` tells which), as a string
    array (slice by slice); a text normalisation leaves as it is comes back unchanged."""
    data, starts, lens = _buffers(texts)
    parts = []
    ends = starts + lens
    lo = 0
    while lo < len(lens):
        hi = min(len(lens), max(lo + 1, int(np.searchsorted(ends, starts[lo] + CHUNK_BYTES))))
        owner = np.repeat(np.arange(hi - lo, dtype=np.int32), lens[lo:hi])
        out, own = _normalise_slice(data[starts[lo]:ends[hi - 1]], owner, hi - lo)
        parts.append(_as_strings(out, own, hi - lo))
        lo = hi
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())
