"""Hashes of normalised texts and CJK-aware unit lengths, straight from UTF-8 bytes.

Why: `tasks.text.normalize` (NFKC + whitespace runs -> one space + trim) and `unit_length`
are Arrow regex passes that cost ~10 s and ~28 s CPU per 0.4 GB of answers, while the balance
stage only needs, per text, a hash of the normalised text (identical / duplicate checks), whether
it is empty, and its length in units. This module computes those three from the bytes with numpy,
without building the normalised strings, for every text made of characters whose NFKC form is
known without context: ASCII (except the controls that only trimming treats as space), CJK
ideographs, kana, Hangul syllables, a few CJK / typographic punctuation marks, full-width ASCII
(NFKC: minus 0xFEE0) and the ideographic space (NFKC: a space). Any other text (accents,
combining marks, compatibility characters, 4-byte characters...) takes the exact Arrow path of
`tasks.text`; the test suite checks both paths against it on random texts.

The result equals ``hash_strings(normalize(x))`` and ``unit_length(x)`` of `tasks.text`, with
Polars' string hash (a speed hash for in-run grouping: equal hashes are checked
again on the texts where a decision depends on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.tasks.text import normalize, unit_length

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


@dataclass
class TextProfile:
    """Per text: hash of the normalised text, whether it is empty once normalised, length in units."""

    norm_hash: np.ndarray
    empty: np.ndarray
    units: np.ndarray


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
    return pl.Series(arr).fill_null("").hash(seed=0).to_numpy().copy()


def _text_of(pos: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index of the text that byte position `pos` belongs to (texts are contiguous from `starts`)."""
    return np.searchsorted(starts, pos, side="right") - 1


def _scan(b: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Units, `exact path` flag and `changed by normalisation` flag of each text in one slice.

    Only comparisons and a few gathers over the bytes; the rarer bytes (non-ASCII, space and
    controls) are classified at their positions only."""
    n = len(starts)
    slow, dirty = np.zeros(n, bool), np.zeros(n, bool)
    word = ((b | np.uint8(0x20)) - np.uint8(97)) < 26
    word |= (b - np.uint8(48)) < 10
    cjk = np.zeros(n, np.int64)
    if len(b) and b.max() >= 0x80:
        q = np.flatnonzero(b >= 0xC0)  # lead bytes of multi-byte characters
        bq = b[q]
        three = (bq >= 0xE0) & (bq < 0xF0)
        slow[_text_of(q[~three], starts)] = True  # 2- and 4-byte characters
        p = q[three]
        p = p[p + 2 < len(b)]
        cp = ((b[p].astype(np.int32) & 0x0F) << 12) | ((b[p + 1].astype(np.int32) & 0x3F) << 6) | (b[p + 2] & 0x3F)
        cls = _CLASS[cp]
        slow[_text_of(p[cls == _OTHER], starts)] = True
        cjk = np.bincount(_text_of(p[cls == _CJK], starts), minlength=n)
        full = cls == _FULL
        dirty[_text_of(p[full | (cls == _ISPACE)], starts)] = True
        fw = p[full]
        mapped = (cp[full] - 0xFEE0).astype(np.uint8)
        fw = fw[(((mapped | np.uint8(0x20)) - np.uint8(97)) < 26) | ((mapped - np.uint8(48)) < 10)]
        word[fw] = word[fw + 1] = word[fw + 2] = True  # NFKC makes them ASCII letters / digits
    low = np.flatnonzero(b <= 32)  # spaces and controls
    bl = b[low]
    slow[_text_of(low[(bl == 11) | ((bl >= 28) & (bl <= 31))], starts)] = True
    ws = (bl == 32) | ((bl >= 9) & (bl <= 13) & (bl != 11))
    wpos, wb = low[ws], bl[ws]
    double = np.zeros(len(wpos), bool)
    double[1:] = wpos[1:] == wpos[:-1] + 1  # a run of two whitespace bytes (or two texts' edges: also dirty)
    dirty[_text_of(wpos[(wb != 32) | double], starts)] = True
    ends = np.append(starts[1:], len(b))
    nonempty = ends > starts
    is_ws = np.zeros(len(b) + 1, bool)
    is_ws[wpos] = True
    dirty |= nonempty & (is_ws[starts] | is_ws[np.maximum(ends - 1, 0)])
    # units: CJK characters + runs of letters / digits (a run starts where the byte before is no word byte).
    first = word.copy()
    first[1:] &= ~word[:-1]
    st = starts[nonempty]
    first[st] = word[st]
    runs = np.zeros(n, np.int64)
    if len(st):
        runs[nonempty] = np.add.reduceat(first, st, dtype=np.int64)
    return cjk + runs, slow, dirty


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


def _run(texts: pa.Array | pa.ChunkedArray, strings: bool) -> tuple[TextProfile, pa.Array | None]:
    """Scan every text in slices of about CHUNK_BYTES; normalise only the texts that change;
    then the exact Arrow path for texts with other characters."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    data, starts, lens = _buffers(texts)
    n = len(lens)
    units = np.zeros(n, np.int64)
    slow, dirty = np.zeros(n, bool), np.zeros(n, bool)
    ends = starts + lens
    lo = 0
    while lo < n:
        hi = min(n, max(lo + 1, int(np.searchsorted(ends, starts[lo] + CHUNK_BYTES))))
        base = starts[lo]
        units[lo:hi], slow[lo:hi], dirty[lo:hi] = _scan(data[base:ends[hi - 1]], starts[lo:hi] - base)
        lo = hi
    fix = np.flatnonzero(dirty & ~slow)
    h = hash_strings(texts)  # texts normalisation leaves as they are: the hash of the text itself
    empty = lens == 0
    result = texts if strings else None
    if len(fix):
        fixed = _normalise_rows(texts.take(pa.array(fix)))  # one contiguous copy of those texts
        h[fix] = hash_strings(fixed)
        empty[fix] = np.diff(np.frombuffer(fixed.buffers()[1], np.int32, len(fix) + 1)) == 0
        if strings:
            result = _put(result, fix, fixed)
    slow_idx = np.flatnonzero(slow)
    if len(slow_idx):  # the exact Arrow path for texts with other characters
        sub = texts.take(pa.array(slow_idx))
        exact = normalize(sub)
        h[slow_idx] = hash_strings(exact)
        empty[slow_idx] = np.asarray(pc.equal(pc.binary_length(exact), 0).to_numpy(zero_copy_only=False), bool)
        units[slow_idx] = unit_length(sub)
        if strings:
            result = _put(result, slow_idx, exact)
    return TextProfile(h, empty, units), result


def _normalise_rows(texts: pa.Array) -> pa.Array:
    """Normalised copies of the given (fast-path) texts, as a string array (slice by slice)."""
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


def _put(into: pa.Array, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """`into` with `values` at `rows`."""
    pos = np.full(len(into), -1, np.int64)
    pos[rows] = np.arange(len(rows))
    return pc.if_else(pa.array(pos >= 0), values.take(pa.array(np.maximum(pos, 0))), into)


def profile(texts: pa.Array | pa.ChunkedArray) -> TextProfile:
    """Normalised-text hash, emptiness and unit length of each text (null = empty text)."""
    return _run(texts, strings=False)[0]


def normalized(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The normalised texts themselves (equal to `tasks.text.normalize`, null as ""): to confirm
    that rows with equal hashes are equal, on the few rows where a drop depends on it."""
    return _run(texts, strings=True)[1]
