"""Rule checks on responses: each rule gives a boolean flag and a human-readable reason.

Why: metrics and reward models rank candidates, but some answers must be caught whatever
their score (PII leaks, refusals, loops, wrong language). Rules are cheap, explainable and
configurable. Checks run as Arrow regex kernels (RE2) over the whole column; the only
per-row Python is the checksum of ID-card / card-number candidates, and only on the rows
whose text already matched the candidate pattern.

Rules (flag column -> reason prefix):
  flag_safety     "safety:term:<term>" / "safety:regex:<pattern>"  blocklist, EN + ZH
  flag_pii        "pii:email" / "pii:phone" / "pii:cn_id" / "pii:card"
  flag_repetition "repetition:<ratio>"   share of repeated n-grams (CJK-aware tokens)
  flag_length     "length:<n><min" / "length:<n>>max"   in CJK-aware words (skipped if empty)
  flag_refusal    "refusal"              EN + ZH refusal phrases
  flag_language   "language:prompt=zh,response=en"
  flag_empty      "empty"                null, blank or only zero-width characters
  flag_encoding   "encoding:broken_bytes" U+FFFD replacement characters: the model emitted byte-level
                                         tokens that are no valid UTF-8 (never scored as normal text)
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.tasks.contract import Section
from dpoflow.tasks.lang import detect_language
from dpoflow.tasks.metrics.tokenize import PY_WHITESPACE, rouge_tokenize, word_counts

FLAGS = ("flag_safety", "flag_pii", "flag_repetition", "flag_length", "flag_refusal", "flag_language",
         "flag_empty", "flag_encoding")

DEFAULT_BLOCKLIST = [
    "kill yourself", "how to make a bomb", "child sexual", "credit card dump",
    "去死吧", "自杀方法", "制造炸弹", "炸药配方",
]
DEFAULT_REFUSALS = [
    r"(?i)\b(?:i['’]?m|i am) (?:so |very |really )?(?:sorry|afraid),? (?:but )?i (?:can(?:no|['’])t|cannot|am unable|won['’]t|am not able)",
    r"(?i)\bi (?:can(?:no|['’])t|cannot|won['’]t|am not able to|am unable to) (?:help|assist|provide|comply|do that|fulfil|support|answer)",
    r"(?i)\bas an ai(?: language model| assistant)?\b,? i",
    r"(?i)\bi must (?:decline|refuse)",
    r"(?:对不起|抱歉|很抱歉|不好意思)[，,。\s]*(?:但是?)?[，,\s]*我?(?:不能|无法|没法|不可以|不会)",
    r"我(?:不能|无法|没法|不可以)(?:帮助|帮你|协助|提供|回答|满足|完成)",
    r"作为(?:一个|一名)?(?:人工智能|AI)(?:语言模型|助手|模型)?[，,]?\s*我(?:不能|无法)",
    r"我(?:必须)?拒绝",
]
LANGUAGE_EXEMPT = r"(?i)translat|翻译|译成|译为|用英文|用中文|in english|in chinese|英语|汉语"

# PII: RE2 patterns (vectorised prefilter) and Python twins to extract candidates for checksums.
_EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
_PHONES = [
    r"(?:^|[^0-9])(?:\+?86[\s\-]?)?1[3-9][0-9](?:[\s\-]?[0-9]{4}){2}(?:$|[^0-9])",  # CN mobile
    r"(?:^|[^0-9])0[1-9][0-9]{1,2}-[0-9]{7,8}(?:$|[^0-9])",  # CN landline 010-12345678
    r"(?:^|[^0-9])(?:\+?1[\s\-.]?)?\(?[2-9][0-9]{2}\)?[\s\-.][0-9]{3}[\s\-.][0-9]{4}(?:$|[^0-9])",  # NANP
    r"(?:^|[^0-9])\+[1-9][0-9]{0,3}[\s\-]?(?:\(?[0-9]{1,4}\)?[\s\-]?){2,5}[0-9]{2,4}(?:$|[^0-9])",  # +intl
]
_CN_ID = r"(?:^|[^0-9])[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx](?:$|[^0-9A-Za-z])"
_CN_ID_PY = re.compile(r"(?<![0-9])([1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx])(?![0-9A-Za-z])")
_CARD = r"(?:^|[^0-9])[0-9](?:[ \-]?[0-9]){12,18}(?:$|[^0-9])"
_CARD_PY = re.compile(r"(?<![0-9])([0-9](?:[ \-]?[0-9]){12,18})(?![0-9])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
PII_KINDS = ("email", "phone", "cn_id", "card")


def cn_id_valid(s: str) -> bool:
    """GB 11643 checksum of an 18-character Chinese resident ID number."""
    if len(s) != 18 or not s[:17].isdigit():
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    """Luhn checksum (payment card numbers)."""
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _check_regex(p: str) -> str:
    try:
        pc.match_substring_regex(pa.array([""]), p)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"invalid RE2 regex {p!r}: {exc}") from None
    return p


class RulesConfig(Section):
    blocklist: bool = Field(True, description="flag responses containing blocklisted terms / regexes")
    blocklist_terms: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST),
                                       description="case-insensitive terms; Latin terms match whole words, CJK terms as substrings")
    blocklist_regexes: list[str] = Field(default_factory=list, description="extra RE2 regexes that flag a response (safety)")
    pii: bool = Field(True, description="flag personal data (e-mail, phone, Chinese ID card, card number)")
    pii_kinds: list[str] = Field(default_factory=lambda: list(PII_KINDS), description=f"PII kinds to check: {', '.join(PII_KINDS)}")
    repetition: bool = Field(True, description="flag responses with many repeated n-grams")
    repetition_n: int = Field(3, ge=1, le=8, description="n-gram order for the repetition ratio")
    repetition_max_ratio: float = Field(0.5, ge=0, le=1, description="flag when repeated n-grams / all n-grams exceeds this")
    repetition_min_ngrams: int = Field(6, ge=1, description="only judge repetition on responses with at least this many n-grams")
    length: bool = Field(True, description="flag responses outside [min_words, max_words] (CJK character = 1 word)")
    min_words: int = Field(1, ge=0, description="minimum length in CJK-aware words")
    max_words: int = Field(4000, ge=1, description="maximum length in CJK-aware words")
    refusal: bool = Field(True, description="flag refusals (English and Chinese phrases)")
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS), description="RE2 regexes that mark a refusal")
    language: bool = Field(True, description="flag a response whose language (zh / en) differs from the prompt's")
    language_threshold: float = Field(0.3, ge=0, le=1, description="CJK share above which a text counts as Chinese")
    language_exempt_regex: str = Field(LANGUAGE_EXEMPT, description="prompts matching this RE2 regex (translation requests) skip the language rule")
    empty: bool = Field(True, description="flag empty / blank responses")
    encoding: bool = Field(True, description="flag responses holding U+FFFD (broken byte sequences decoded from "
                           "byte-level tokens)")

    @field_validator("blocklist_regexes", "refusal_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [_check_regex(p) for p in v]

    @field_validator("language_exempt_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        return _check_regex(v) if v else v

    @field_validator("pii_kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = set(v) - set(PII_KINDS)
        if bad:
            raise ValueError(f"unknown PII kind(s) {sorted(bad)}; known: {', '.join(PII_KINDS)}")
        return v


_RE2_SPECIAL = set(r"\.^$|?*+()[]{}")


def _re2_escape(s: str) -> str:
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in s)


def _term_pattern(term: str) -> str:
    body = _re2_escape(term.strip())
    if term.isascii():  # whole words for Latin terms ("ass" must not flag "class")
        return rf"(?i)(?:^|[^\pL\pN_]){body}(?:$|[^\pL\pN_])"
    return rf"(?i){body}"


def _mask(arr: pa.Array) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)


def _match(texts: pa.Array, pattern: str) -> np.ndarray:
    return _mask(pc.match_substring_regex(texts, pattern))


class _Reasons:
    """Collects (row, reason) pairs, then builds the list<string> column in rule order."""

    def __init__(self, n: int):
        self.n, self.rows, self.texts = n, [], []

    def add(self, mask: np.ndarray, reason) -> None:
        idx = np.flatnonzero(mask)
        if not len(idx):
            return
        self.rows.append(idx)
        self.texts.extend([reason] * len(idx) if isinstance(reason, str) else [reason[i] for i in idx])

    def column(self) -> pa.Array:
        if not self.rows:
            return pa.ListArray.from_arrays(pa.array(np.zeros(self.n + 1, np.int32)), pa.array([], pa.string()))
        rows = np.concatenate(self.rows)
        order = np.argsort(rows, kind="stable")
        offsets = np.zeros(self.n + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=self.n), out=offsets[1:])
        values = pa.array(self.texts, pa.string()).take(pa.array(order))
        return pa.ListArray.from_arrays(pa.array(offsets), values)


def _pii_checksum(texts: pa.Array, candidates: np.ndarray, rx: re.Pattern, valid) -> np.ndarray:
    out = np.zeros(len(texts), dtype=bool)
    idx = np.flatnonzero(candidates)
    if len(idx):
        for i, t in zip(idx, texts.take(pa.array(idx)).to_pylist(), strict=True):
            out[i] = any(valid(m.group(1).replace(" ", "").replace("-", "")) for m in rx.finditer(t or ""))
    return out


def repetition_ratio(texts: pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(repeated n-gram share, n-gram count) per text, over CJK-aware unstemmed tokens."""
    import pandas as pd

    from dpoflow.tasks.metrics.fast import _ngram_ids

    tok = rouge_tokenize(texts)
    gid, doc, G = _ngram_ids(tok, n)[n - 1]
    total = np.maximum(tok.lengths - n + 1, 0)
    uniq = pd.unique(doc * np.int64(G) + gid)
    distinct = np.bincount(np.asarray(uniq) // np.int64(G), minlength=len(texts))[: len(texts)]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(total > 0, 1.0 - distinct / np.maximum(total, 1), 0.0)
    return ratio, total


def check(prompts, responses, cfg: RulesConfig | None = None, *, max_chars: int | None = None) -> pa.Table:
    """Flags (one bool column per rule, see FLAGS) and `flag_reasons` for each response.

    Null responses count as empty; null prompts skip the language rule. `max_chars` caps the
    text the repetition rule tokenizes (length is judged on the full text).
    """
    cfg = cfg or RulesConfig()
    resp = pc.fill_null(_arr(responses), "")
    prm = pc.fill_null(_arr(prompts), "")
    n = len(resp)
    reasons = _Reasons(n)
    flags: dict[str, np.ndarray] = {f: np.zeros(n, dtype=bool) for f in FLAGS}

    visible = pc.replace_substring_regex(resp, r"[\x{200B}-\x{200D}\x{2060}\x{FEFF}]", "")
    empty = _mask(pc.equal(pc.utf8_trim(visible, characters=PY_WHITESPACE), ""))
    if cfg.empty:
        flags["flag_empty"] = empty
        reasons.add(empty, "empty")

    if cfg.blocklist and (cfg.blocklist_terms or cfg.blocklist_regexes):
        pats = [(_term_pattern(t), f"safety:term:{t}") for t in cfg.blocklist_terms if t.strip()]
        pats += [(p, f"safety:regex:{p}") for p in cfg.blocklist_regexes]
        any_hit = _match(resp, "|".join(f"(?:{p})" for p, _ in pats))
        if any_hit.any():
            hit_idx = np.flatnonzero(any_hit)
            sub = resp.take(pa.array(hit_idx))
            for p, reason in pats:
                m = np.zeros(n, dtype=bool)
                m[hit_idx] = _match(sub, p)
                reasons.add(m, reason)
        flags["flag_safety"] = any_hit

    if cfg.pii:
        pii = np.zeros(n, dtype=bool)
        for kind in cfg.pii_kinds:
            if kind == "email":
                m = _match(resp, _EMAIL)
            elif kind == "phone":
                m = _match(resp, "|".join(f"(?:{p})" for p in _PHONES))
            elif kind == "cn_id":
                m = _pii_checksum(resp, _match(resp, _CN_ID), _CN_ID_PY, cn_id_valid)
            else:
                m = _pii_checksum(resp, _match(resp, _CARD), _CARD_PY, luhn_valid)
            reasons.add(m, f"pii:{kind}")
            pii |= m
        flags["flag_pii"] = pii

    if cfg.repetition:
        capped = pc.utf8_slice_codeunits(resp, 0, max_chars) if max_chars else resp
        ratio, total = repetition_ratio(capped, cfg.repetition_n)
        m = (total >= cfg.repetition_min_ngrams) & (ratio > cfg.repetition_max_ratio)
        flags["flag_repetition"] = m
        reasons.add(m, [f"repetition:{r:.2f}" for r in ratio] if m.any() else "")

    if cfg.length:
        words = word_counts(resp)
        short = (words < cfg.min_words) & ~empty
        long_ = words > cfg.max_words
        flags["flag_length"] = short | long_
        if short.any():
            reasons.add(short, [f"length:{w}<{cfg.min_words}" for w in words])
        if long_.any():
            reasons.add(long_, [f"length:{w}>{cfg.max_words}" for w in words])

    if cfg.refusal and cfg.refusal_patterns:
        m = _match(resp, "|".join(f"(?:{p})" for p in cfg.refusal_patterns))
        flags["flag_refusal"] = m
        reasons.add(m, "refusal")

    if cfg.language:
        lp = detect_language(prm, cfg.language_threshold)
        lr = detect_language(resp, cfg.language_threshold)
        known = pc.and_(pc.is_in(lp, pa.array(["zh", "en"])), pc.is_in(lr, pa.array(["zh", "en"])))
        m = _mask(pc.and_(known, pc.not_equal(lp, lr))) & ~empty
        if cfg.language_exempt_regex:
            m &= ~_match(prm, cfg.language_exempt_regex)
        flags["flag_language"] = m
        if m.any():
            lp_l, lr_l = lp.to_pylist(), lr.to_pylist()
            reasons.add(m, {i: f"language:prompt={lp_l[i]},response={lr_l[i]}" for i in np.flatnonzero(m)})

    if cfg.encoding:
        m = _match(resp, r"\x{FFFD}")
        flags["flag_encoding"] = m
        reasons.add(m, "encoding:broken_bytes")

    cols = {f: pa.array(v, pa.bool_()) for f, v in flags.items()}
    cols["flag_reasons"] = reasons.column()
    return pa.table(cols)


def _arr(x) -> pa.Array:
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks() if x.num_chunks else pa.array([], pa.string())
    if not isinstance(x, pa.Array):
        x = pa.array(list(x), pa.string())
    return x.cast(pa.string()) if not pa.types.is_string(x.type) else x
