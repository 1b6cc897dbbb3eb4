"""Columnar kernels shared by the stages: a fast 64-bit string hash, growing string codes, and
grouping over numeric keys (repeats, group sizes, dense codes).

Why a module of its own: exactly-once, the abuse filters, the votes and any other stage that
groups millions of rows by a string key need the same few vectorised steps. Everything works
on whole Arrow / numpy columns; no per-row Python.

`hash64` here is a speed hash for in-run grouping (splitmix64 over the Arrow buffers); it is
not promised stable across versions. Values that must stay stable on disk or across runs
(splits, MinHash) use `tasks.text.stable_hash64` (blake2b).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        return hash64(arr.dictionary)[indices(arr)]  # null entries hash like the first value: callers mask them
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
        return self.resolve(d.dictionary, hash64(d.dictionary))[indices(d)]


def indices(d: pa.DictionaryArray, null_to: int = 0) -> np.ndarray:
    """Dictionary indices as int64 (null entries -> `null_to`)."""
    i = d.indices
    return (pc.fill_null(i, null_to) if i.null_count else i).to_numpy().astype(np.int64)


def dict_parts(arr: pa.Array, codes: Codes) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
    """Dictionary-encode, hash the distinct values, and look them up in a snapshot of `codes`
    (in the worker thread; `merge` resolves only what the snapshot did not know)."""
    d = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
    dh = hash64(d.dictionary)
    return indices(d), d.dictionary, dh, Codes.find(codes.index(), dh)


def is_in(values: np.ndarray, value_set: np.ndarray) -> np.ndarray:
    """Membership of numeric `values` in `value_set` (Arrow's hash table; zero-copy in)."""
    if not len(value_set) or not len(values):
        return np.zeros(len(values), bool)
    return np.asarray(pc.is_in(pa.array(values), value_set=pa.array(value_set)).to_numpy(zero_copy_only=False), bool)


def rows_sharing_a_key(keys: np.ndarray, sorted_keys: np.ndarray | None = None) -> np.ndarray:
    """Indices of the rows whose key occurs more than once (usually few): one sort finds the
    repeated keys (pass `sorted_keys` when the caller has sorted already), a hash lookup their
    rows, so only those few rows need ordering."""
    s = np.sort(keys) if sorted_keys is None else sorted_keys
    rep = s[1:][s[1:] == s[:-1]]
    return np.flatnonzero(is_in(keys, rep)) if len(rep) else np.zeros(0, np.int64)


def repeats(h: np.ndarray) -> np.ndarray:
    """True where an earlier element has the same value (first occurrences are not repeats)."""
    out = np.zeros(len(h), bool)
    m = rows_sharing_a_key(h)
    if len(m):
        o = np.argsort(h[m], kind="stable")  # stable: arrival order within equal values
        hm = h[m][o]
        out[m[o[1:][hm[1:] == hm[:-1]]]] = True
    return out


def dense_codes(h: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense int32 codes of 64-bit keys (Arrow's hash table) and how many distinct keys."""
    d = pc.dictionary_encode(pa.array(h))
    return d.indices.to_numpy().astype(np.int32, copy=False), len(d.dictionary)


def group_counts(keys: np.ndarray) -> np.ndarray:
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


def distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + adjacent compare)."""
    if len(keys) == 0:
        return keys
    s = np.sort(keys)
    return s[np.r_[True, s[1:] != s[:-1]]]
