"""Script-based language guess: enough to tell Chinese from English for mixes and checks.

A text is "zh" when CJK ideographs make at least `threshold` of its (ideographs + Latin words), "en" when it has
Latin letters, else "und". Vectorised with Arrow regex counts over the whole column.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

CJK_CLASS = r"[\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}]"
LATIN_WORD = r"[A-Za-z\x{00C0}-\x{024F}]+"


def cjk_share(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """CJK ideographs / (ideographs + Latin words): one ideograph weighs like one word."""
    cjk = pc.count_substring_regex(texts, CJK_CLASS)
    latin = pc.count_substring_regex(texts, LATIN_WORD)
    total = pc.add(cjk, latin)
    return pc.if_else(pc.equal(total, 0), 0.0, pc.divide(pc.cast(cjk, pa.float64()), pc.cast(total, pa.float64())))


def detect_language(texts: pa.Array | pa.ChunkedArray, threshold: float = 0.3) -> pa.Array:
    """'zh' / 'en' / 'und' per text (null text -> null)."""
    share = cjk_share(texts)
    latin = pc.count_substring_regex(texts, LATIN_WORD)
    out = pc.if_else(pc.greater_equal(share, threshold), "zh", pc.if_else(pc.greater(latin, 0), "en", "und"))
    return pc.if_else(pc.is_null(texts), pa.scalar(None, pa.string()), out)
