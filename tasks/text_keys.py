"""Per text, from its UTF-8 bytes: the CJK-aware unit length, whether it is empty once
normalised, and an *identity key* that equal normalised texts always share.

Why not a hash of the normalised text: building or hashing the normalised text costs a dozen numpy passes per byte (NFKC, whitespace runs), and most texts are never equal
to another. The balance funnel only needs a key that cannot separate two texts that are equal
once normalised (NFKC + whitespace runs -> one space + trim); the few rows whose keys match are
then compared on their normalised texts (`normalized`, below). The key is
(units, non-space characters of the normalised text): both are unchanged by normalisation and
cost a few passes over the bytes, with one byte-class table.

Texts made of the characters `tasks.text_codes` knows (ASCII except the controls only trimming treats
as space, CJK ideographs, kana, Hangul, common CJK punctuation, full-width ASCII, the
ideographic space) are read from the bytes; any other text takes the exact Arrow path of
`tasks.text` (`normalize`, `unit_length`). Tests compare both paths with those functions. This is
the one byte scanner of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.tasks.text import normalize, unit_length
from dpoflow.tasks.text_codes import _CJK, _CLASS, _FULL, _ISPACE, _OTHER, _buffers, normalise_fast

CHUNK_BYTES = 1 << 18  # texts are scanned in slices of about this many bytes: with the 5 scratch arrays the
# working set stays in L2 (1 MB slices: ~20% more CPU, 64 KB: per-call overhead)

_U8 = np.uint8


def _is_word(b: np.ndarray) -> np.ndarray:
    """ASCII letters and digits (wrapping uint8 comparisons: one SIMD pass each)."""
    return (((b | _U8(0x20)) - _U8(97)) < _U8(26)) | ((b - _U8(48)) < _U8(10))


class _Scratch:
    """Work arrays reused by every slice: a fresh 1 MB numpy temporary is a fresh mmap, and its
    page faults cost more CPU than the comparisons themselves (3.4 s of 6 s at 0.4 GB)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.u8 = np.empty(size, np.uint8)
        self.word, self.ws, self.rare, self.tmp = (np.empty(size, bool) for _ in range(4))

    def views(self, m: int) -> tuple[np.ndarray, ...]:
        if m > self.size:
            self.__init__(m)
        return self.u8[:m], self.word[:m], self.ws[:m], self.rare[:m], self.tmp[:m]


@dataclass
class TextKeys:
    """Per text: identity key (equal normalised texts -> equal keys), empty once normalised, units."""

    key: np.ndarray
    empty: np.ndarray
    units: np.ndarray


def _sums(mask: np.ndarray, starts: np.ndarray, nonempty: np.ndarray, n: int) -> np.ndarray:
    """Per text, the number of True bytes of `mask` (texts are contiguous from `starts`)."""
    out = np.zeros(n, np.int64)
    st = starts[nonempty]
    if len(st):
        out[nonempty] = np.add.reduceat(mask.view(np.uint8), st, dtype=np.int32)
    return out


def _scan(b: np.ndarray, starts: np.ndarray, n: int, scratch: _Scratch
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(units less the CJK ideographs U+5000-9FFF, whitespace characters, 3-byte characters not
    led by E5-E9, `exact path` flag) of the texts of one slice. Byte classes come from uint8
    comparisons into reused arrays (a 256-entry table lookup per byte costs ~20 of them); the
    rarer bytes (other 3-byte leads, controls, 2- and 4-byte characters) are looked at at their
    positions only."""
    slow = np.zeros(n, bool)
    if not len(b):  # empty texts only
        z = np.zeros(n, np.int64)
        return z, z, z, slow
    ends = np.append(starts[1:], len(b))
    nonempty = ends > starts
    u8, word, ws, rare, tmp = scratch.views(len(b))
    np.bitwise_or(b, _U8(0x20), out=u8)  # letters: (b | 0x20) - 97 < 26; digits: b - 48 < 10
    np.subtract(u8, _U8(97), out=u8)
    np.less(u8, _U8(26), out=word)
    np.subtract(b, _U8(48), out=u8)
    np.less(u8, _U8(10), out=tmp)
    word |= tmp
    np.subtract(b, _U8(9), out=u8)  # \t \n \v \f \r and space (\v: exact path below)
    np.less(u8, _U8(5), out=ws)
    np.equal(b, _U8(32), out=tmp)
    ws |= tmp
    np.subtract(b, _U8(0xE5), out=u8)  # multi-byte leads other than E5-E9, and the rare controls
    np.greater_equal(u8, _U8(5), out=rare)
    np.greater_equal(b, _U8(0xC0), out=tmp)
    rare &= tmp
    np.subtract(b, _U8(28), out=u8)
    np.less(u8, _U8(4), out=tmp)
    rare |= tmp
    np.equal(b, _U8(11), out=tmp)
    rare |= tmp
    pos = np.flatnonzero(rare)
    extra = np.zeros(n, np.int64)  # CJK units among the looked-up characters
    spaces = np.zeros(n, np.int64)
    three = np.zeros(n, np.int64)
    if len(pos):
        br = b[pos]
        owner = np.searchsorted(starts, pos, side="right") - 1
        chk = (br >= 0xE2) & (br <= 0xEF) & (br != 0xEE)
        slow[owner[~chk]] = True  # controls, 2- and 4-byte characters, E0 / E1 / EE leads
        p, own = pos[chk], owner[chk]
        ok = p + 2 < len(b)
        p, own = p[ok], own[ok]
        three += np.bincount(own, minlength=n)
        cp = ((b[p].astype(np.int32) & 0x0F) << 12) | ((b[p + 1].astype(np.int32) & 0x3F) << 6) | (b[p + 2] & 0x3F)
        cls = _CLASS[cp]
        slow[own[cls == _OTHER]] = True
        extra += np.bincount(own[cls == _CJK], minlength=n)
        spaces += np.bincount(own[cls == _ISPACE], minlength=n)
        full = cls == _FULL
        fw = p[full]
        fw = fw[_is_word((cp[full] - 0xFEE0).astype(np.uint8))]  # NFKC makes them ASCII letters / digits
        word[fw] = word[fw + 1] = word[fw + 2] = True
    first = rare  # a unit run starts where the byte before is no word byte
    first[0] = word[0]
    np.greater(word[1:], word[:-1], out=first[1:])
    st = starts[nonempty]
    first[st] = word[st]
    return extra + _sums(first, starts, nonempty, n), spaces + _sums(ws, starts, nonempty, n), three, slow


VIEW_BATCH_BYTES = 1 << 24  # string views are copied to plain strings this many bytes at a time


def text_keys(texts: pa.Array | pa.ChunkedArray) -> TextKeys:
    """Identity key, emptiness and unit length of each text (null = empty text).

    String views (texts shared with another table) are read in batches of VIEW_BATCH_BYTES,
    so the scan never holds a second copy of all the texts."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not pa.types.is_string_view(texts.type):
        return _keys(texts)
    lens = np.frombuffer(texts.buffers()[1], np.int32).reshape(-1, 4)[texts.offset:texts.offset + len(texts), 0]
    bounds = np.searchsorted(np.cumsum(lens, dtype=np.int64), np.arange(VIEW_BATCH_BYTES, int(lens.sum()) + 1,
                                                                          VIEW_BATCH_BYTES))
    edges = np.unique(np.concatenate([[0], bounds + 1, [len(texts)]]).clip(0, len(texts)))
    parts = [_keys(texts.slice(lo, hi - lo).cast(pa.string())) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    if not parts:
        return _keys(pa.array([], pa.string()))
    return TextKeys(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("key", "empty", "units")))


def _scan_all(texts: pa.Array) -> tuple[np.ndarray, ...]:
    """(units less the 3-byte characters not looked up, whitespace characters, 3-byte characters
    looked up, exact-path flag, byte length) of each text, slice by slice."""
    data, starts, lens = _buffers(texts)
    n = len(lens)
    units, spaces, three = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    slow = np.zeros(n, bool)
    ends = starts + lens
    lo = 0
    scratch = _Scratch(CHUNK_BYTES)
    while lo < n:
        hi = min(n, max(lo + 1, int(np.searchsorted(ends, starts[lo] + CHUNK_BYTES))))
        base = starts[lo]
        units[lo:hi], spaces[lo:hi], three[lo:hi], slow[lo:hi] = _scan(
            data[base:ends[hi - 1]], starts[lo:hi] - base, hi - lo, scratch)
        lo = hi
    return units, spaces, three, slow, lens


def _keys(texts: pa.Array) -> TextKeys:
    import polars as pl  # here, not at the top: loading the config imports this module (~0.5 s, 27 MB)

    texts = pc.fill_null(texts.cast(pa.string()), "")
    units, spaces, three, slow, lens = _scan_all(texts)
    chars = pl.Series(texts).str.len_chars().to_numpy().astype(np.int64)
    # fast-path texts hold 1- and 3-byte characters only: (bytes - characters) / 2 of them are
    # 3-byte, and those not looked up one by one are CJK ideographs U+5000-9FFF (one unit each)
    units += (lens - chars) // 2 - three
    solid = chars - spaces  # characters of the normalised text other than its single spaces
    idx = np.flatnonzero(slow)
    if len(idx):  # the exact Arrow path for texts with other characters
        sub = texts.take(pa.array(idx))
        norm = pl.Series(normalize(sub))
        solid[idx] = (norm.str.len_chars() - norm.str.count_matches(" ", literal=True)).to_numpy()
        units[idx] = unit_length(sub)
    key = (units.astype(np.uint64) << np.uint64(32)) ^ solid.astype(np.uint64)
    return TextKeys(key, solid == 0, units)


def normalized(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The normalised texts (equal to `tasks.text.normalize`, null as ""), for the few rows
    whose keys match: fast-path texts on their bytes, the others by the exact Arrow path."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    slow = _scan_all(texts)[3]
    if not slow.any():
        return normalise_fast(texts)
    fast, rest = np.flatnonzero(~slow), np.flatnonzero(slow)
    parts = pa.concat_arrays([normalise_fast(texts.take(pa.array(fast))), normalize(texts.take(pa.array(rest)))
                              .cast(pa.string())])
    pos = np.empty(len(texts), np.int64)
    pos[np.concatenate([fast, rest])] = np.arange(len(texts))
    return parts.take(pa.array(pos))
