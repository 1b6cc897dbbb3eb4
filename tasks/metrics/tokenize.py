"""CJK-aware tokenization for BLEU and ROUGE, over whole Arrow columns.

Why: sacrebleu's default ``13a`` tokenizer treats an unspaced Chinese sentence as one
token and ``rouge_score`` drops every non-ASCII character, so Chinese text silently scores
0 (or 100). We keep the reference behaviour for English text bit for bit and add one rule.

Tokenization rule
-----------------
* **CJK characters are tokens.** Every character in the CJK set (Han ideographs incl.
  extensions and compatibility ideographs, CJK symbols and punctuation U+3001–U+303F,
  Hiragana, Katakana, Katakana phonetic extensions, halfwidth Katakana, fullwidth
  punctuation) is split off as a token of its own, wherever it occurs in the string.
* **Other scripts are words.** Everything else is tokenized like the reference tools:

  - BLEU: sacrebleu ``13a`` (``rstrip``, ``<skipped>`` removal, ``-\\n`` joins, XML
    un-escaping, punctuation split, whitespace split using Python's definition of
    whitespace). Case-sensitive unless ``lowercase``. CJK punctuation is a token, like
    ASCII punctuation in 13a.
  - ROUGE: lowercase, then words are maximal runs of Unicode letters / digits / marks
    (``[\\pL\\pN\\pM]+``); everything else (punctuation incl. CJK punctuation, emoji,
    symbols, ``_``) separates words. With stemming, the Porter stemmer (nltk, as
    rouge_score) applies to ``[a-z0-9]+`` words longer than 3 characters.
* For ASCII text this is exactly sacrebleu 13a / rouge_score's tokenizer, so English
  scores equal theirs. For non-ASCII Latin, Cyrillic, etc., ROUGE keeps the words
  (``café`` is one token) where rouge_score would drop the letters (``caf``).
* Emoji: in BLEU an emoji sticks to an adjacent word unless spaced (13a behaviour); in
  ROUGE it is a separator. Korean Hangul is spaced, so it is tokenized as words.

Everything runs as Arrow compute kernels (RE2 regex) over the column: no Python call per
text. Tokens come back as integer ids over a vocabulary shared by all texts of the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Python's str.split() whitespace (sacrebleu splits with it); \x1c-\x1f and \x85 included. Written
# out: scanning all 1.1M code points for str.isspace() cost 0.2 s at every import (a test checks it).
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                 "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WS_CLASS = "[" + "".join(f"\\x{{{ord(c):X}}}" for c in PY_WHITESPACE) + "]"

CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3001, 0x303F),  # CJK symbols and punctuation (U+3000 is whitespace)
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF01, 0xFF0F),  # fullwidth punctuation (digits / letters stay word characters)
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF65),
    (0xFF66, 0xFF9F),  # halfwidth Katakana
    (0x20000, 0x2FA1F),  # extensions B-F, compatibility supplement
    (0x30000, 0x323AF),  # extensions G-H
)
CJK_CLASS = "[" + "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in CJK_RANGES) + "]"

# sacrebleu TokenizerRegexp (13a), char class written with explicit code points for RE2.
_13A_RULES = (
    (r"([\x{7B}-\x{7E}\x{5B}-\x{60}\x{20}-\x{26}\x{28}-\x{2B}\x{3A}-\x{40}\x{2F}])", r" \1 "),
    (r"([^0-9])([\.,])", r"\1 \2 "),
    (r"([\.,])([^0-9])", r" \1 \2"),
    (r"([0-9])(-)", r"\1 \2 "),
)
_13A_LITERALS = (("<skipped>", ""), ("-\n", ""), ("\n", " "), ("&quot;", '"'), ("&amp;", "&"),
                 ("&lt;", "<"), ("&gt;", ">"))


@dataclass
class Tokens:
    """Token ids of n texts: ids[offsets[i]:offsets[i+1]] belong to text i."""

    ids: np.ndarray  # int64 token ids
    lengths: np.ndarray  # int64 tokens per text
    vocab_size: int

    @property
    def offsets(self) -> np.ndarray:
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out


def _as_string_array(texts) -> pa.Array:
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.fill_null(arr, "")


def _split_spaces(t: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Split single-space-normalised, trimmed strings; empty strings give no tokens."""
    parts = pc.split_pattern(t, " ")
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = pc.equal(t, "").to_numpy(zero_copy_only=False)
    values = pc.list_flatten(parts)
    if empty.any():
        values = values.filter(pc.not_equal(values, ""))
        lengths[empty] = 0
    return values, lengths


def _encode(values: pa.Array, lengths: np.ndarray) -> Tokens:
    if len(values) == 0:
        return Tokens(np.zeros(0, np.int64), lengths, 0)
    enc = pc.dictionary_encode(values)
    ids = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return Tokens(ids, lengths, len(enc.dictionary))


def bleu_token_strings(texts, lowercase: bool = False) -> tuple[pa.Array, np.ndarray]:
    """13a + CJK tokens as strings (flat values, per-text lengths)."""
    t = _as_string_array(texts)
    if lowercase:
        t = pc.utf8_lower(t)
    t = pc.utf8_rtrim(t, characters=PY_WHITESPACE)
    for old, new in _13A_LITERALS:
        t = pc.replace_substring(t, old, new)
    t = pc.replace_substring_regex(t, f"({CJK_CLASS})", r" \1 ")
    t = pc.binary_join_element_wise(" ", t, " ", "")
    for pattern, repl in _13A_RULES:
        t = pc.replace_substring_regex(t, pattern, repl)
    t = pc.replace_substring_regex(t, _WS_CLASS + "+", " ")
    t = pc.utf8_trim(t, characters=" ")
    return _split_spaces(t)


def bleu_tokenize(texts, lowercase: bool = False) -> Tokens:
    """Tokenize for BLEU (sacrebleu 13a for non-CJK text, CJK characters as tokens)."""
    return _encode(*bleu_token_strings(texts, lowercase))


def rouge_token_strings(texts) -> tuple[pa.Array, np.ndarray]:
    """rouge_score-compatible words + CJK characters, as strings (no stemming)."""
    t = pc.utf8_lower(_as_string_array(texts))
    t = pc.replace_substring_regex(t, f"({CJK_CLASS})", r" \1 ")
    t = pc.replace_substring_regex(t, r"[^\pL\pN\pM]+", " ")
    t = pc.utf8_trim(t, characters=" ")
    return _split_spaces(t)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


_STEM_CACHE: dict[str, str] = {}


def _stem_vocab(words: list[str]) -> list[str]:
    """Porter-stem ASCII alnum words longer than 3 chars (rouge_score's rule), cached."""
    stem = _stemmer().stem
    cache = _STEM_CACHE
    out = []
    for w in words:  # one call per distinct word, not per token
        s = cache.get(w)
        if s is None:
            s = stem(w) if len(w) > 3 and w.isascii() and w.isalnum() else w
            if len(cache) < 1_000_000:
                cache[w] = s
        out.append(s)
    return out


def rouge_tokenize(texts, use_stemmer: bool = False) -> Tokens:
    """Tokenize for ROUGE (rouge_score's tokenizer for ASCII text, CJK characters as tokens)."""
    values, lengths = rouge_token_strings(texts)
    if not use_stemmer or len(values) == 0:
        return _encode(values, lengths)
    enc = pc.dictionary_encode(values)
    stemmed = _stem_vocab(enc.dictionary.to_pylist())
    remap = pc.dictionary_encode(pa.array(stemmed, pa.string())).indices.to_numpy().astype(np.int64)
    ids = remap[enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    return Tokens(ids, lengths, int(remap.max()) + 1 if len(remap) else 0)


def word_counts(texts) -> np.ndarray:
    """Length in CJK-aware words (one CJK character = one word), for length rules."""
    return rouge_token_strings(texts)[1]
