"""Sentence-level BLEU and ROUGE-1/2/L over whole columns (the `score` stage's fast path).

Why: calling sacrebleu / rouge_score (or an `evaluate` module) once per candidate costs
tens of microseconds to milliseconds of Python per row. Here a batch is tokenized with
Arrow kernels (:mod:`dpoflow.tasks.metrics.tokenize`), n-grams become dense integer ids (pairs of
(n-1)-gram id, token id, factorised by hashing), clipped counts are found with hash joins
and summed with ``bincount``, and ROUGE-L's LCS uses the bit-parallel algorithm of Hyyrö
(2004) run for all pairs at once (one numpy step per token position, multi-word bit
vectors with carries). Rows are split into chunks that run on a thread pool: the kernels
release the GIL, so the work spreads over cores without copying data into processes.

Numbers are those of ``sacrebleu.sentence_bleu`` (13a, effective order, smoothing
exp / floor / add-k / none, 0-100 scale, closest reference length, n-gram counts clipped by
the max over references) and ``rouge_score.RougeScorer`` (F1; several references: the best
F1 per ROUGE type, as ``score_multi``), with the CJK rule of the tokenizer module.

Nulls: a null prediction, or a row without any non-empty reference, gives null (NaN) for
every metric, never 0. An empty prediction against a reference scores 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.tasks.metrics.tokenize import PY_WHITESPACE, Tokens, bleu_tokenize, rouge_tokenize

BUILTIN_METRICS = ("bleu", "rouge")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}
_MIN_ROWS_PER_WORKER = 5_000


@dataclass
class Inputs:
    """Normalised batch: predictions + flat references with their row index."""

    predictions: pa.Array  # string, nulls filled with ""
    pred_valid: np.ndarray  # bool: prediction not null
    ref_values: pa.Array  # string, non-empty references only
    ref_row: np.ndarray  # int64 row of each reference
    n_rows: int

    def has_ref(self) -> np.ndarray:
        return np.bincount(self.ref_row, minlength=self.n_rows) > 0


def _to_array(x) -> pa.Array:
    if isinstance(x, pa.ChunkedArray):
        return x.combine_chunks() if x.num_chunks else pa.array([], x.type)
    if isinstance(x, pa.Array):
        return x
    return pa.array(list(x))


def normalise(predictions, references) -> Inputs:
    """Accept strings / lists of strings (Python or Arrow) and drop null or blank references."""
    preds = _to_array(predictions)
    if not (pa.types.is_string(preds.type) or pa.types.is_large_string(preds.type)):
        preds = preds.cast(pa.string())
    if not isinstance(references, (pa.Array, pa.ChunkedArray)):
        references = list(references)
        if any(isinstance(r, (list, tuple)) for r in references):  # mixed str / list -> lists
            references = [[r] if isinstance(r, str) else r for r in references]
        references = pa.array(references, pa.list_(pa.string()) if any(
            isinstance(r, (list, tuple)) for r in references) else pa.string())
    refs = _to_array(references)
    n = len(preds)
    if len(refs) != n:
        raise ValueError(f"{n} predictions but {len(refs)} references")
    if pa.types.is_null(refs.type):
        refs = pa.nulls(n, pa.string())
    if pa.types.is_list(refs.type) or pa.types.is_large_list(refs.type):
        values = pc.list_flatten(refs)
        rows = pc.list_parent_indices(refs).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        values = refs
        rows = np.arange(n, dtype=np.int64)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    keep = pc.and_(pc.is_valid(values),
                   pc.not_equal(pc.utf8_trim(pc.fill_null(values, ""), characters=PY_WHITESPACE), ""))
    keep = pc.fill_null(keep, False)
    keep_np = keep.to_numpy(zero_copy_only=False)
    return Inputs(
        predictions=pc.fill_null(preds, "").cast(pa.string()),
        pred_valid=pc.is_valid(preds).to_numpy(zero_copy_only=False),
        ref_values=values.filter(keep).cast(pa.string()),
        ref_row=rows[keep_np],
        n_rows=n,
    )


# --- n-gram machinery ----------------------------------------------------------------------


def _ngram_ids(tok: Tokens, n_max: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """For n = 1..n_max: (ngram id, text index, number of distinct ids) of every n-gram."""
    N = len(tok.ids)
    doc = np.repeat(np.arange(len(tok.lengths), dtype=np.int64), tok.lengths)
    pos = np.arange(N, dtype=np.int64) - tok.offsets[:-1][doc]
    remaining = tok.lengths[doc] - pos  # tokens from here to the end of the text
    out = [(tok.ids, doc, max(tok.vocab_size, 1))]
    prev = tok.ids
    for n in range(2, n_max + 1):
        idx = np.flatnonzero(remaining >= n)
        comb = prev[idx] * np.int64(max(tok.vocab_size, 1)) + tok.ids[idx + n - 1]
        codes, uniq = pd.factorize(comb)
        full = np.full(N, -1, dtype=np.int64)
        full[idx] = codes
        out.append((codes.astype(np.int64), doc[idx], max(len(uniq), 1)))
        prev = full
    return out


def _count(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, uniq = pd.factorize(keys)
    return np.asarray(uniq, dtype=np.int64), np.bincount(codes, minlength=len(uniq))


def _lookup(table_keys: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """Position of each probe key in table_keys (-1 when absent), by hash."""
    if len(table_keys) == 0:
        return np.full(len(probe), -1, dtype=np.int64)
    return pd.Index(table_keys).get_indexer(probe)


# --- BLEU ----------------------------------------------------------------------------------


def _bleu_stats(tok: Tokens, n_rows: int, ref_row: np.ndarray, max_order: int = 4):
    """correct[n], total[n] per row, hypothesis and closest reference lengths.

    `tok` holds n_rows hypotheses followed by the references (text n_rows + k is reference k).
    """
    n_refs = len(ref_row)
    hyp_len = tok.lengths[:n_rows]
    ref_len = tok.lengths[n_rows:]
    correct = np.zeros((max_order, n_rows))
    total = np.zeros((max_order, n_rows))
    for n, (gid, doc, G) in enumerate(_ngram_ids(tok, max_order), start=1):
        G = np.int64(G)
        is_hyp = doc < n_rows
        h_keys, h_cnt = _count(doc[is_hyp] * G + gid[is_hyp])
        r_doc = doc[~is_hyp] - n_rows
        r_keys3, r_cnt3 = _count(r_doc * G + gid[~is_hyp])  # per (reference, ngram)
        r_key2 = ref_row[r_keys3 // G] * G + r_keys3 % G  # per (row, ngram): max over refs
        codes, r_keys = pd.factorize(r_key2)
        r_max = np.zeros(len(r_keys), dtype=np.int64)
        np.maximum.at(r_max, codes, r_cnt3)
        pos = _lookup(np.asarray(r_keys, dtype=np.int64), h_keys)
        clipped = np.where(pos >= 0, np.minimum(h_cnt, r_max[np.maximum(pos, 0)] if len(r_max) else 0), 0)
        correct[n - 1] = np.bincount(h_keys // G, weights=clipped, minlength=n_rows)[:n_rows]
        total[n - 1] = np.maximum(hyp_len - n + 1, 0)
    # closest reference length, ties -> shorter (sacrebleu)
    closest = np.zeros(n_rows, dtype=np.int64)
    if n_refs:
        big = np.int64(1 << 32)
        key = np.abs(hyp_len[ref_row] - ref_len) * big + ref_len
        best = np.full(n_rows, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, ref_row, key)
        has = best != np.iinfo(np.int64).max
        closest[has] = best[has] % big
    return correct, total, hyp_len.astype(np.int64), closest


def _bleu_from_stats(correct, total, sys_len, ref_len, smooth_method="exp", smooth_value=None,
                     max_order: int = 4) -> np.ndarray:
    """sacrebleu's BLEU.compute_bleu(effective_order=True), vectorised with the same float ops."""
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth_method {smooth_method!r}; use one of {list(SMOOTH_DEFAULTS)}")
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    n_rows = len(sys_len)
    correct = correct.astype(np.float64).copy()
    total = total.astype(np.float64).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        short = sys_len < ref_len
        bp = np.ones(n_rows)
        ratio = np.where(sys_len > 0, ref_len / np.where(sys_len > 0, sys_len, 1), 0.0)
        bp = np.where(short, np.where(sys_len > 0, np.exp(1 - ratio), 0.0), bp)
        any_correct = (correct != 0).any(axis=0)
        precisions = np.zeros((max_order, n_rows))
        smooth_mteval = np.ones(n_rows)
        eff_order = np.zeros(n_rows, dtype=np.int64)
        alive = np.ones(n_rows, dtype=bool)  # the sacrebleu loop has not hit `break` yet
        for i in range(max_order):
            if smooth_method == "add-k" and i > 0:
                correct[i] += smooth_value
                total[i] += smooth_value
            alive &= total[i] != 0
            eff_order = np.where(alive, i + 1, eff_order)
            zero = alive & (correct[i] == 0)
            if smooth_method == "exp":
                smooth_mteval = np.where(zero, smooth_mteval * 2, smooth_mteval)
                p_zero = 100.0 / (smooth_mteval * np.where(zero, total[i], 1))
            elif smooth_method == "floor":
                p_zero = 100.0 * smooth_value / np.where(zero, total[i], 1)
            else:
                p_zero = np.zeros(n_rows)
            p_hit = 100.0 * correct[i] / np.where(alive, total[i], 1)
            precisions[i] = np.where(zero, p_zero, np.where(alive, p_hit, 0.0))
        logs = np.where(precisions == 0, -9999999999.0, np.log(np.where(precisions == 0, 1, precisions)))
        s = np.zeros(n_rows)
        for i in range(max_order):
            s = s + np.where(i < eff_order, logs[i], 0.0)
        score = bp * np.exp(s / np.maximum(eff_order, 1))
    return np.where(any_correct & (eff_order > 0), score, 0.0)


def _bleu_chunk(inp: Inputs, smooth_method: str, smooth_value, lowercase: bool) -> np.ndarray:
    texts = pa.concat_arrays([inp.predictions, inp.ref_values])
    tok = bleu_tokenize(texts, lowercase)
    correct, total, sys_len, ref_len = _bleu_stats(tok, inp.n_rows, inp.ref_row)
    out = _bleu_from_stats(correct, total, sys_len, ref_len, smooth_method, smooth_value)
    out[~(inp.has_ref() & inp.pred_valid)] = np.nan
    return out


# --- ROUGE ---------------------------------------------------------------------------------


def _fmeasure(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


def _rouge_n(tok: Tokens, n_rows: int, ref_row: np.ndarray, orders=(1, 2)) -> dict[int, np.ndarray]:
    """ROUGE-N F1 per (row, reference) pair, i.e. per reference."""
    hyp_len = tok.lengths[:n_rows]
    ref_len = tok.lengths[n_rows:]
    grams = _ngram_ids(tok, max(orders))
    out = {}
    for n in orders:
        gid, doc, G = grams[n - 1]
        G = np.int64(G)
        is_hyp = doc < n_rows
        h_keys, h_cnt = _count(doc[is_hyp] * G + gid[is_hyp])
        r_doc = doc[~is_hyp] - n_rows
        r_keys, r_cnt = _count(r_doc * G + gid[~is_hyp])
        r_ref = r_keys // G
        pos = _lookup(h_keys, ref_row[r_ref] * G + r_keys % G)
        inter_each = np.where(pos >= 0, np.minimum(r_cnt, h_cnt[np.maximum(pos, 0)] if len(h_cnt) else 0), 0)
        inter = np.bincount(r_ref, weights=inter_each, minlength=len(ref_row))[: len(ref_row)]
        p = inter / np.maximum(np.maximum(hyp_len[ref_row] - n + 1, 0), 1)
        r = inter / np.maximum(np.maximum(ref_len - n + 1, 0), 1)
        out[n] = _fmeasure(p, r)
    return out


def lcs_lengths(a: Tokens, a_doc: np.ndarray, b: Tokens, b_doc: np.ndarray) -> np.ndarray:
    """LCS length of token sequences a[a_doc[k]] and b[b_doc[k]] for every pair k.

    Bit-parallel (Hyyrö): V <- (V + (V & M)) | (V & ~M) per symbol of a, where M is the
    match mask of that symbol in b; LCS = zero bits of V among the first len(b) bits. All
    pairs advance together; pairs are grouped by the number of 64-bit words b needs.
    Both token sets must share one vocabulary.
    """
    P = len(a_doc)
    out = np.zeros(P, dtype=np.int64)
    la, lb = a.lengths[a_doc], b.lengths[b_doc]
    words = (lb + 63) // 64
    a_off, b_off = a.offsets, b.offsets
    V_size = np.int64(max(a.vocab_size, b.vocab_size, 1))
    for W in np.unique(words[(la > 0) & (lb > 0)]):
        sel = np.flatnonzero((words == W) & (la > 0))
        sel = sel[np.argsort(-la[sel], kind="stable")]  # longest a first: active pairs are a prefix
        k = len(sel)
        W = int(W)
        # match masks of (pair, symbol) from b
        blen = lb[sel]
        bpair = np.repeat(np.arange(k, dtype=np.int64), blen)
        bpos = np.arange(len(bpair), dtype=np.int64) - np.repeat(np.cumsum(blen) - blen, blen)
        btok = b.ids[np.repeat(b_off[b_doc[sel]], blen) + bpos]
        codes, uniq = pd.factorize(bpair * V_size + btok)
        masks = np.zeros((len(uniq) + 1, W), dtype=np.uint64)  # last row: no match
        np.add.at(masks, (codes, bpos // 64), np.left_shift(np.uint64(1), (bpos % 64).astype(np.uint64)))
        # a symbols in step-major order: step i holds the pairs with len(a) > i, in order
        alen = la[sel]
        steps = int(alen[0])
        active = np.bincount(np.minimum(alen, steps), minlength=steps + 1)[::-1].cumsum()[::-1][1:]
        step_off = np.concatenate([[0], np.cumsum(active)])
        apair = np.repeat(np.arange(k, dtype=np.int64), alen)
        apos = np.arange(len(apair), dtype=np.int64) - np.repeat(np.cumsum(alen) - alen, alen)
        atok = a.ids[np.repeat(a_off[a_doc[sel]], alen) + apos]
        code = pd.Index(np.asarray(uniq, dtype=np.int64)).get_indexer(apair * V_size + atok)
        code[code < 0] = len(uniq)
        flat = np.empty(len(apair), dtype=np.int64)
        flat[step_off[apos] + apair] = code
        V = np.full((k, W), np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(steps):
            m = int(active[i])
            M = masks[flat[step_off[i]:step_off[i + 1]]]
            Vi = V[:m]
            U = Vi & M
            keep = Vi & ~M
            if W == 1:
                V[:m] = (Vi + U) | keep
                continue
            carry = np.zeros(m, dtype=np.uint64)
            S = np.empty_like(Vi)
            for w in range(W):
                s = Vi[:, w] + U[:, w]
                c1 = s < Vi[:, w]
                s2 = s + carry
                c2 = s2 < s
                S[:, w] = s2
                carry = (c1 | c2).astype(np.uint64)
            V[:m] = S | keep
        # zeros among the first len(b) bits
        bitpos = np.arange(W, dtype=np.int64)[None, :] * 64
        nbits = np.clip(blen[:, None] - bitpos, 0, 64)
        full = np.uint64(np.iinfo(np.uint64).max)
        low = np.where(nbits >= 64, full,
                       (np.left_shift(np.uint64(1), np.minimum(nbits, 63).astype(np.uint64)) - np.uint64(1)))
        zeros = np.bitwise_count(~V & low).sum(axis=1)
        out[sel] = zeros
    return out


def _rouge_chunk(inp: Inputs, use_stemmer: bool) -> dict[str, np.ndarray]:
    texts = pa.concat_arrays([inp.predictions, inp.ref_values])
    tok = rouge_tokenize(texts, use_stemmer)
    n_rows, ref_row = inp.n_rows, inp.ref_row
    per_ref = _rouge_n(tok, n_rows, ref_row)
    hyp = Tokens(tok.ids, tok.lengths, tok.vocab_size)
    lcs = lcs_lengths(hyp, ref_row, hyp, np.arange(len(ref_row), dtype=np.int64) + n_rows)
    hl = tok.lengths[:n_rows][ref_row]
    rl = tok.lengths[n_rows:]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where((hl > 0) & (rl > 0), lcs / np.maximum(hl, 1), 0.0)
        r = np.where((hl > 0) & (rl > 0), lcs / np.maximum(rl, 1), 0.0)
    per_ref_l = _fmeasure(p, r)
    valid = inp.has_ref() & inp.pred_valid
    out = {}
    for key, vals in (("rouge1", per_ref[1]), ("rouge2", per_ref[2]), ("rougeL", per_ref_l)):
        best = np.full(n_rows, -np.inf)
        np.maximum.at(best, ref_row, vals)
        best[~valid] = np.nan
        out[key] = best
    return out


# --- public API ----------------------------------------------------------------------------


def _slice(inp: Inputs, start: int, stop: int) -> Inputs:
    lo, hi = np.searchsorted(inp.ref_row, [start, stop])
    return Inputs(inp.predictions.slice(start, stop - start), inp.pred_valid[start:stop],
                  inp.ref_values.slice(lo, hi - lo), inp.ref_row[lo:hi] - start, stop - start)


def _one_chunk(inp: Inputs, metrics: Sequence[str], smooth_method, smooth_value, lowercase,
               use_stemmer) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if "bleu" in metrics:
        out["bleu"] = _bleu_chunk(inp, smooth_method, smooth_value, lowercase)
    if "rouge" in metrics:
        out.update(_rouge_chunk(inp, use_stemmer))
    return out


def compute(predictions, references, metrics: Sequence[str] = BUILTIN_METRICS, *,
            smooth_method: str = "exp", smooth_value: float | None = None, lowercase: bool = False,
            use_stemmer: bool = False, workers: int | None = None,
            chunk_rows: int = 20_000) -> dict[str, np.ndarray]:
    """Per-row BLEU (0-100) and ROUGE-1/2/L F1 (0-1); NaN where there is nothing to score.

    predictions: strings (None allowed); references: per row a string or a list of strings.
    workers: threads (default: all cores); rows are cut into chunks of `chunk_rows`.
    """
    unknown = set(metrics) - set(BUILTIN_METRICS)
    if unknown:
        raise ValueError(f"unknown built-in metric(s) {sorted(unknown)}; built-in: {BUILTIN_METRICS}")
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth_method {smooth_method!r}; use one of {list(SMOOTH_DEFAULTS)}")
    inp = normalise(predictions, references)
    n = inp.n_rows
    workers = max(1, workers or os.cpu_count() or 1)
    chunk_rows = max(1, chunk_rows)
    n_chunks = max(1, math.ceil(n / chunk_rows))
    if workers > 1 and n >= 2 * _MIN_ROWS_PER_WORKER:
        n_chunks = max(n_chunks, workers)
    bounds = np.linspace(0, n, n_chunks + 1).astype(int)
    parts = [_slice(inp, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    args = (metrics, smooth_method, smooth_value, lowercase, use_stemmer)
    if workers > 1 and len(parts) > 1:
        with ThreadPoolExecutor(min(workers, len(parts))) as pool:
            results = list(pool.map(lambda p: _one_chunk(p, *args), parts))
    else:
        results = [_one_chunk(p, *args) for p in parts]
    keys = results[0].keys() if results else []
    return {k: np.concatenate([r[k] for r in results]) if results else np.zeros(0) for k in keys}


def to_arrow(values: np.ndarray) -> pa.Array:
    """float64 Arrow array with NaN -> null (null means 'not scored', never 0)."""
    return pa.array(values, pa.float64(), mask=np.isnan(values))
