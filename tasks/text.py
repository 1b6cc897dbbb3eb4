"""Shared text helpers for pairing and balancing: normalisation, CJK-aware lengths, stable hashes.

Lengths and shingles count *units*: one CJK ideograph (or kana / hangul syllable) is one unit,
one run of Latin letters or digits is one unit. Counting characters would make Chinese look
three times longer than English for the same content; counting whitespace words would make a
Chinese paragraph one "word". Everything is vectorised over Arrow columns; hashes are blake2b
over *unique* values only, so they are stable across library versions and machines.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# CJK ideographs, kana, hangul syllables, CJK compatibility ideographs, extension B.
CJK_CHAR = (r"[\x{3040}-\x{30FF}\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{AC00}-\x{D7AF}"
            r"\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}]")
WORD = r"[\p{L}\p{N}]+"


def normalize(texts: pa.Array | pa.ChunkedArray, lower: bool = False) -> pa.Array | pa.ChunkedArray:
    """NFKC, whitespace runs collapsed to one space, trimmed (null stays null).

    NFKC folds full-width Latin / digits that Chinese input methods produce (`ＡＢＣ１` -> `ABC1`),
    so the same answer typed two ways is recognised as the same answer.
    """
    out = pc.utf8_normalize(texts, "NFKC")
    out = pc.replace_substring_regex(out, r"\s+", " ")
    out = pc.utf8_trim_whitespace(out)
    return pc.utf8_lower(out) if lower else out


def units(texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Each text as a list of lowercase units: single CJK characters and Latin/digit words."""
    t = pc.utf8_lower(pc.utf8_normalize(pc.fill_null(texts, ""), "NFKC"))
    t = pc.replace_substring_regex(t, "(" + CJK_CHAR + ")", r" \1 ")
    t = pc.replace_substring_regex(t, r"[^\p{L}\p{N}]+", " ")
    if isinstance(t, pa.ChunkedArray):
        t = t.combine_chunks()
    return pc.utf8_split_whitespace(pc.utf8_trim_whitespace(t))


def unit_length(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """CJK-aware length: CJK characters + Latin/digit words (a mixed text counts both)."""
    t = pc.utf8_normalize(pc.fill_null(texts, ""), "NFKC")
    n_cjk = pc.count_substring_regex(t, CJK_CHAR)
    # Latin/digit words: word runs once the CJK characters are blanked out.
    no_cjk = pc.replace_substring_regex(t, CJK_CHAR, " ")
    n_words = pc.count_substring_regex(no_cjk, WORD)
    return (np.asarray(n_cjk, dtype=np.int64) + np.asarray(n_words, dtype=np.int64)) if len(t) else \
        np.zeros(0, np.int64)


def stable_hash64(values: pa.Array | pa.ChunkedArray | list, salt: str = "") -> np.ndarray:
    """Stable 64-bit hash per value (blake2b of salt + value; null hashes like "").

    Hashes each distinct value once (dictionary encoding), so a column with many repeats
    costs one digest per distinct value.
    """
    arr = pa.chunked_array([values]) if isinstance(values, pa.Array) else values
    if isinstance(arr, list):
        arr = pa.chunked_array([pa.array(arr, pa.string())])
    arr = pc.fill_null(pc.cast(arr, pa.string()), "")
    enc = pc.dictionary_encode(arr).combine_chunks()
    s = salt.encode()
    blake = hashlib.blake2b
    uniq = np.fromiter(
        (int.from_bytes(blake(s + v.encode(), digest_size=8).digest(), "little") for v in enc.dictionary.to_pylist()),
        dtype=np.uint64, count=len(enc.dictionary))
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return uniq[idx] if len(idx) else np.zeros(0, np.uint64)


def unit_interval(values: pa.Array | pa.ChunkedArray | list, salt: str = "") -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per value: for splits and seeded sampling."""
    return (stable_hash64(values, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
