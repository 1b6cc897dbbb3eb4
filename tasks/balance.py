"""The `balance` stage: clean, de-duplicate, cap, mix and length-balance preference pairs, then
split them by prompt group into `dpo_train` / `dpo_eval`, with a funnel report of every drop.

Order of the funnel (each step's drops are counted under its reason):

1. ``empty``: a side is empty after normalisation; ``identical``: both sides are the same
   after normalisation (NFKC + whitespace), which teaches DPO nothing.
2. ``duplicate``: exact duplicates of (prompt, chosen, rejected) after normalisation.
3. ``over_token_budget``: prompt + longer side over ``max_tokens``, counted with the
   configured tokenizer (skipped when ``tokenizer`` is not set: the default).
4. near-duplicate prompt clusters (CJK-aware unit shingles + MinHash LSH, verified by the
   estimated Jaccard) and ``cluster_cap`` / ``prompt_cap`` (largest margins kept).
5. ``mix:<dimension>``: subsample to target shares of source / category / language.
6. ``length_bias``: subsample so that the share of pairs whose chosen side is longer (in CJK
   units) lies within ``length_target +- length_tolerance``.
7. split: a group (prompt id, or its near-duplicate cluster) goes to eval when a stable hash of
   its id falls below ``eval_fraction``; the side depends on the group id only, so a prompt
   keeps its side in later runs whatever other rows exist (with clusters, as long as its
   cluster keeps the same representative: the member with the smallest id hash).

Every subsample is decided by a stable per-pair hash, so reruns give the same rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.storage.schemas import DPO_SPLIT, PAIRS
from dpoflow.tasks import text_codes
from dpoflow.tasks.contract import Section, StageContext, StageResult
from dpoflow.tasks.pair_kernels import (
    as_views,
    conform_views,
    first_and_inverse,
    take_text,
    take_views,
)
from dpoflow.tasks.text import stable_hash64, unit_interval, units
from dpoflow.tasks.text_keys import normalized, text_keys

MIX_DIMENSIONS = ("source", "category", "language")


class BalanceConfig(Section):
    near_dup: bool = Field(True, description="cluster near-duplicate prompts (MinHash over CJK-aware shingles)")
    near_dup_threshold: float = Field(0.7, description="estimated Jaccard at or above which two prompts are near duplicates")
    shingle_size: int = Field(3, description="shingle length in units (a CJK character or a Latin word)")
    num_perm: int = Field(64, description="MinHash permutations")
    bands: int = Field(16, description="LSH bands (num_perm must be a multiple)")
    split_by_cluster: bool = Field(True, description="split by near-duplicate cluster (when near_dup) instead of prompt id")
    max_pairs_per_cluster: int | None = Field(None, description="cap of pairs per near-duplicate cluster; None = no cap")
    max_pairs_per_prompt: int | None = Field(None, description="cap of pairs per prompt; None = no cap")
    mix: dict[str, dict[str, float]] = Field({}, description="target shares, e.g. {language: {zh: 0.5, en: 0.5}}; "
                                             "dimensions: source, category, language; '*' = any other value; "
                                             "values not listed (and no '*') are dropped")
    length_control: bool = Field(True, description="keep the chosen-longer share within the band by subsampling")
    length_target: float = Field(0.5, description="target share of pairs whose chosen side is longer")
    length_tolerance: float = Field(0.05, description="allowed distance from length_target")
    length_max_drop: float = Field(0.5, description="never drop more than this share of pairs for length balance")
    tokenizer: str | None = Field(None, description="tokenizer for the token budget: a folder, a hub-free name, or "
                                  "'models@production' (registry); None = no token budget check")
    max_tokens: int | None = Field(None, description="drop pairs with prompt + longer side over this many tokens")
    eval_fraction: float = Field(0.05, description="share of prompt groups that go to dpo_eval")
    split_salt: str = Field("dpoflow-split-v1", description="salt of the split hash (change it to draw a new split)")
    seed: int = Field(0, description="seed of the deterministic subsampling hashes")
    plots: bool = Field(True, description="write PNG plots of the funnel and distributions")
    identity: Literal["normalized", "raw"] = Field(
        "normalized", description="when two texts are the same for the identical and duplicate checks: "
        "normalized = after NFKC + whitespace normalisation; raw = byte for byte (as a plain SQL / Polars "
        "script compares them)")
    tie_break: Literal["hash", "lowest_id"] = Field(
        "hash", description="which pair wins a tie: hash = the smallest pair id among duplicates and a seeded "
        "hash of the pair id among equal margins in the caps; lowest_id = the smallest (prompt_id, chosen_id, "
        "rejected_id)")

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for dim, shares in v.items():
            if dim not in MIX_DIMENSIONS:
                raise ValueError(f"mix dimension {dim!r} is not one of {MIX_DIMENSIONS}")
            if not shares or any(s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
                raise ValueError(f"mix.{dim}: shares must be non-negative with a positive sum")
        return v


# --- near-duplicate clusters -----------------------------------------------------------------

_M1, _M2, _G = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread 64-bit mixer (wrapping uint64 arithmetic)."""
    z = x + _G
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def minhash(texts: pa.Array | pa.ChunkedArray, num_perm: int = 64, shingle: int = 3, seed: int = 0) -> np.ndarray:
    """MinHash signatures (n x num_perm, uint64) of CJK-aware unit shingles.

    Texts with fewer units than `shingle` use one shingle of all their units; empty texts get
    a signature of their own (never matching another text).
    """
    tok = units(texts)
    n = len(tok)
    lens = np.asarray(pc.list_value_length(tok).to_numpy(zero_copy_only=False), dtype=np.int64)
    flat = pc.list_flatten(tok)
    h = stable_hash64(flat, salt="unit:")
    starts = np.asarray(tok.offsets)[:-1].astype(np.int64)
    parent = np.repeat(np.arange(n), lens)
    pos = np.arange(len(flat)) - starts[parent] if len(flat) else np.zeros(0, np.int64)
    m = lens[parent]
    sh = h.copy()
    with np.errstate(over="ignore"):
        for t in range(1, shingle):
            nxt = np.zeros_like(h)
            nxt[:-t or None] = h[t:] if t < len(h) else nxt[:0]
            ok = pos + t < m
            sh = np.where(ok, _mix64(sh ^ (nxt + np.uint64(t) * _G)), sh)
        valid = (pos + shingle <= m) | ((m < shingle) & (pos == 0))
        sh, sp = sh[valid], parent[valid]
        sig = np.empty((n, num_perm), np.uint64)
        has = np.bincount(sp, minlength=n) > 0
        first = np.searchsorted(sp, np.arange(n))
        empty_sig = _mix64(stable_hash64(pa.array(np.arange(n).astype(str)), salt="empty:"))
        for p in range(num_perm):
            salt = _mix64(np.array([seed * 1_000_003 + p], np.uint64))[0]
            v = _mix64(sh ^ salt)
            col = np.full(n, np.iinfo(np.uint64).max, np.uint64)
            if len(v):
                red = np.minimum.reduceat(v, np.minimum(first[has], len(v) - 1))
                col[has] = red
            sig[:, p] = np.where(has, col, empty_sig ^ salt)
    return sig


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components by min-label propagation with pointer jumping (numpy only)."""
    labels = np.arange(n)
    if not len(u):
        return labels
    while True:
        m = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        while True:  # pointer jumping: follow labels to their roots
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


def cluster_prompts(texts: pa.Array | pa.ChunkedArray, cfg: BalanceConfig) -> np.ndarray:
    """Near-duplicate cluster label per text (the index of a member), by MinHash LSH + verification."""
    n = len(texts)
    if cfg.num_perm % cfg.bands:
        raise ValueError(f"balance.num_perm ({cfg.num_perm}) must be a multiple of balance.bands ({cfg.bands})")
    sig = minhash(texts, cfg.num_perm, cfg.shingle_size, cfg.seed)
    r = cfg.num_perm // cfg.bands
    us, vs = [], []
    with np.errstate(over="ignore"):
        for band in range(cfg.bands):
            key = sig[:, band * r].copy()
            for c in range(band * r + 1, (band + 1) * r):
                key = _mix64(key ^ sig[:, c])
            order = np.argsort(key, kind="stable")
            ks = key[order]
            new_run = np.concatenate([[True], ks[1:] != ks[:-1]]) if n else np.zeros(0, bool)
            run_id = np.cumsum(new_run) - 1
            head = order[np.flatnonzero(new_run)][run_id]
            m = head != order
            us.append(order[m])
            vs.append(head[m])
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    if len(u):
        pair = np.unique(np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1), axis=0)
        u, v = pair[:, 0], pair[:, 1]
        sim = np.empty(len(u))
        step = 1 << 16
        for i in range(0, len(u), step):  # chunked so memory stays bounded
            sim[i:i + step] = (sig[u[i:i + step]] == sig[v[i:i + step]]).mean(axis=1)
        ok = sim >= cfg.near_dup_threshold
        u, v = u[ok], v[ok]
    return _components(n, u, v)


# --- the balance core ------------------------------------------------------------------------
#
# The funnel moves row numbers of the input table and per-row numbers (text hashes, lengths,
# margins); each step returns its count. The texts are gathered once, for the kept rows.

def _rank_within(keys_group: np.ndarray, order_keys: list[np.ndarray]) -> np.ndarray:
    """0-based rank of each row within its group, rows ordered by `order_keys` (last = primary)."""
    n = len(keys_group)
    order = np.lexsort(order_keys + [keys_group])
    g = keys_group[order]
    first = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1]) if n else np.zeros(0, np.int64)
    start = np.repeat(first, np.diff(np.append(first, n)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - start
    return rank


def _dense(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Integer codes of a string column (null -> its own code)."""
    enc = pc.dictionary_encode(pc.fill_null(pc.cast(col, pa.string()), "\x00null")).combine_chunks() \
        if isinstance(col, pa.ChunkedArray) else pc.dictionary_encode(pc.fill_null(pc.cast(col, pa.string()), "\x00null"))
    return np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


@dataclass
class _Texts:
    """Per input row: identity hashes of prompt / chosen / rejected, empty sides, unit lengths."""

    hp: np.ndarray
    hc: np.ndarray
    hr: np.ndarray
    empty: np.ndarray
    lc: np.ndarray
    lr: np.ndarray


def _view_groups(arrs: list[pa.Array]) -> tuple[np.ndarray, np.ndarray] | None:
    """`first_and_inverse` of the rows of string-view arrays by where their texts are: the byte
    position in the arrays' common character buffers (texts over 12 bytes), or a number past
    them per distinct inline text (the view holds it). None when the arrays do not share their
    buffers or hold nulls, or when views of one key differ (texts of other lengths at one place)."""
    if not arrs or any(a.null_count for a in arrs):
        return None
    bufs = [[b.address if b is not None else 0 for b in a.buffers()[2:]] for a in arrs]
    if any(b != bufs[0] for b in bufs[1:]):
        return None
    w = np.concatenate([np.frombuffer(a.buffers()[1], np.uint64).reshape(-1, 2)[a.offset:a.offset + len(a)]
                        for a in arrs])
    length = (w[:, 0] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    base = np.concatenate([[0], np.cumsum([b.size if b is not None else 0 for b in arrs[0].buffers()[2:]])])
    inline = length <= 12
    key = np.empty(len(w), np.uint64)
    out = ~inline
    ref = w[out, 1]
    key[out] = (base[(ref & np.uint64(0xFFFFFFFF)).astype(np.int64)] + (ref >> np.uint64(32)).astype(np.int64)
                ).astype(np.uint64)
    if inline.any():  # short texts live in the view itself: one key per distinct (length, bytes)
        with np.errstate(over="ignore"):
            _, code = first_and_inverse(_mix64(w[inline, 0]) ^ w[inline, 1])
        key[inline] = np.uint64(base[-1]) + code.astype(np.uint64)
    first, inv = first_and_inverse(key)  # small keys: a packed sort, no argsort
    if not ((w[first, 0][inv] == w[:, 0]).all() and (w[first, 1][inv] == w[:, 1]).all()):
        return None  # two texts of one key differ in their views: group by the texts instead
    return first, inv


def _distinct(*cols: pa.ChunkedArray, raw_hashes: bool = True, by_view: bool = True) -> tuple[pa.Array, np.ndarray | None, np.ndarray]:
    """The distinct texts of the columns (one representative row each), their raw hashes (when
    `raw_hashes`) and, for the rows of the columns one after the other, the index of their text.

    Pairs built in this process hold views into the candidates' buffers: a response is one view
    in every pair it is a side of, so rows are grouped by their 16-byte views (no text is read;
    two views of equal texts only mean a text is profiled twice). Otherwise (or not `by_view`) by
    a 64-bit hash of the raw text: a collision (about n^2 / 2^65) would give two texts one
    profile; the decisions that drop rows are confirmed on the texts themselves."""
    arrs = [as_views(c) for c in cols]  # views: the representatives share the texts' buffers
    groups = _view_groups(arrs) if by_view else None
    h = None
    if groups is not None:
        first, inv = groups
    else:
        h = np.concatenate([text_codes.hash_strings(a) for a in arrs])
        first, inv = first_and_inverse(h)
    parts, lo = [], 0
    for a in arrs:  # representatives taken from each column (a take per array, no concatenation)
        mine = first[(first >= lo) & (first < lo + len(a))]
        parts.append(take_views(a, mine - lo))
        lo += len(a)
    col = np.searchsorted(np.cumsum([len(a) for a in arrs]), first, side="right")
    pos = np.empty(len(first), np.int64)  # position of each distinct text in the concatenated parts
    pos[np.argsort(col, kind="stable")] = np.arange(len(first))
    uniq = pa.concat_arrays(parts)
    hashes = None
    if raw_hashes:
        if h is None:
            hashes = text_codes.hash_strings(uniq)
        else:
            hashes = np.empty(len(first), np.uint64)
            hashes[pos] = h[first]
    return uniq, hashes, pos[inv]


def _profile_texts(t: pa.Table, cfg: BalanceConfig) -> _Texts:
    """Profile each distinct text once (responses repeat across pairs): identity key, emptiness
    after normalisation and CJK-aware unit length. The identity key is the raw hash
    (identity: raw) or `text_keys`' key, which equal normalised texts share (identity:
    normalized); either way the steps confirm on the texts before they drop a row."""
    n = t.num_rows
    uniq, uh, inv = _distinct(t.column("chosen"), t.column("rejected"), raw_hashes=cfg.identity == "raw")
    prof = text_keys(uniq)
    puniq, ph, pinv = _distinct(t.column("prompt"), by_view=False)  # a prompt is one view per candidate
    if cfg.identity == "raw":
        rh, ph = uh[inv], ph[pinv]
    else:
        rh, ph = prof.key[inv], text_keys(puniq).key[pinv]
    emp = prof.empty[inv]
    units = prof.units[inv]
    return _Texts(ph, rh[:n], rh[n:], emp[:n] | emp[n:], units[:n], units[n:])


def _same_texts(t: pa.Table, rows_a: np.ndarray, rows_b: np.ndarray, cols: tuple[tuple[str, str], ...],
                cfg: BalanceConfig) -> np.ndarray:
    """Whether row a's text equals row b's in every (column of a, column of b), by the identity rule."""
    same = np.ones(len(rows_a), bool)
    if not len(rows_a):
        return same
    for ca, cb in cols:
        xa = pc.fill_null(take_text(t.column(ca), rows_a), "")
        xb = pc.fill_null(take_text(t.column(cb), rows_b), "")
        eq = np.asarray(pc.equal(xa, xb).to_numpy(zero_copy_only=False), bool)
        if cfg.identity != "raw" and not eq.all():  # equal raw texts are equal normalised: the
            rest = pa.array(np.flatnonzero(~eq))  # others only are normalised
            eq[~eq] = np.asarray(pc.equal(normalized(xa.take(rest)), normalized(
                xb.take(rest))).to_numpy(zero_copy_only=False), bool)
        same &= eq
    return same


@dataclass
class _Rows:
    """The pairs still in the funnel: input row numbers and per-row arrays aligned with them."""

    idx: np.ndarray
    lc: np.ndarray
    lr: np.ndarray

    def keep(self, mask: np.ndarray) -> _Rows:
        return _Rows(self.idx[mask], self.lc[mask], self.lr[mask])


@dataclass(frozen=True)
class StepCount:
    """One funnel step's count: rows in, rows dropped (under `reason`)."""

    step: str
    reason: str
    n_in: int
    dropped: int

    def row(self) -> dict[str, Any]:
        return {"step": self.step, "in": self.n_in, "dropped": self.dropped, "out": self.n_in - self.dropped}


def _drop(rows: _Rows, step: str, mask_drop: np.ndarray, reason: str | None = None) -> tuple[_Rows, StepCount]:
    count = StepCount(step, reason or step, len(rows.idx), int(mask_drop.sum()))
    return (rows.keep(~mask_drop) if count.dropped else rows), count


def _step_empty(rows: _Rows, tx: _Texts) -> tuple[_Rows, StepCount]:
    """A side that is empty after normalisation."""
    return _drop(rows, "empty", tx.empty[rows.idx])


def _step_identical(rows: _Rows, t: pa.Table, tx: _Texts, cfg: BalanceConfig) -> tuple[_Rows, StepCount]:
    """Both sides the same text (normalised, or raw with identity: raw); equal hashes confirmed."""
    cand = np.flatnonzero(tx.hc[rows.idx] == tx.hr[rows.idx])
    mask = np.zeros(len(rows.idx), bool)
    r = rows.idx[cand]
    mask[cand[_same_texts(t, r, r, (("chosen", "rejected"),), cfg)]] = True
    return _drop(rows, "identical", mask)


def _id_order(t: pa.Table, rows: np.ndarray, cfg: BalanceConfig) -> np.ndarray:
    """Tie-break rank of the given rows: smallest pair id first, or (lowest_id) smallest
    (prompt_id, chosen_id, rejected_id) first."""
    keys = ["pair_id"] if cfg.tie_break == "hash" else ["prompt_id", "chosen_id", "rejected_id"]
    sub = t.select(keys).take(pa.array(rows))
    rank = np.empty(len(rows), np.int64)
    rank[np.asarray(pc.sort_indices(sub, [(k, "ascending") for k in keys]))] = np.arange(len(rows))
    return rank


def _step_duplicate(rows: _Rows, t: pa.Table, tx: _Texts, cfg: BalanceConfig) -> tuple[_Rows, StepCount]:
    """Exact duplicates of (prompt, chosen, rejected): one kept (smallest pair id, or lowest ids).

    Rows are grouped by one hash of their three text keys; only rows in a group of two or more
    are looked at again, grouped on the texts themselves, so a hash collision never drops a row."""
    i = rows.idx
    with np.errstate(over="ignore"):  # one 64-bit key of the three: a sort of one key, not three
        key = _mix64(_mix64(tx.hp[i]) ^ tx.hc[i]) ^ tx.hr[i]
    order = np.argsort(key)
    ks = key[order]
    same_prev = np.zeros(len(i), bool)
    same_prev[1:] = ks[1:] == ks[:-1]
    del key, ks
    in_group = same_prev.copy()
    in_group[:-1] |= same_prev[1:]
    cand = np.sort(order[in_group])  # positions (in rows) of rows sharing their hashes
    mask = np.zeros(len(i), bool)
    if len(cand):
        r = i[cand]
        kgroup = np.empty(len(i), np.int64)  # the key group of each row
        kgroup[order] = np.cumsum(~same_prev)
        kg = kgroup[cand]
        cols = ("prompt", "chosen", "rejected")
        texts = {c: pc.fill_null(take_text(t.column(c), r), "") for c in cols}
        codes = [_dense(texts[c]) for c in cols]
        if cfg.identity != "raw":  # a key group with one raw triple is one normalised group; only
            # the rows of groups holding different raw triples are normalised
            o = np.lexsort((*codes[::-1], kg))
            new_triple = np.ones(len(o), bool)
            new_triple[1:] = _differs(o, [kg, *codes])
            groups, n_triples = np.unique(kg[o[new_triple]], return_counts=True)
            mixed = np.isin(kg, groups[n_triples > 1])
            for k, c in enumerate(cols):
                codes[k] = np.where(mixed, 0, codes[k])
                if mixed.any():
                    codes[k][mixed] = _dense(normalized(texts[c].take(pa.array(np.flatnonzero(mixed)))))
        o = np.lexsort((_id_order(t, r, cfg), *codes[::-1], kg))
        dup = np.zeros(len(r), bool)
        dup[o[1:]] = ~_differs(o, [kg, *codes])
        mask[cand[dup]] = True
    return _drop(rows, "duplicate", mask)


def _differs(order: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    """For rows in `order` (from the second on): whether any key differs from the row before."""
    out = np.zeros(max(len(order) - 1, 0), bool)
    for k in keys:
        ks = k[order]
        out |= ks[1:] != ks[:-1]
    return out


def _step_token_budget(rows: _Rows, t: pa.Table, cfg: BalanceConfig, tokenizer: Any, report: dict
                       ) -> tuple[_Rows, StepCount] | None:
    """Prompt + longer side over max_tokens (only with a tokenizer)."""
    if tokenizer is not None and cfg.max_tokens is not None and len(rows.idx):
        ntok = _token_counts(tokenizer, pa.table({c: take_text(t.column(c), rows.idx) for c in ("prompt", "chosen",
                                                                                                  "rejected")}))
        report["tokens_max_before"] = int(ntok.max())
        return _drop(rows, "token_budget", ntok > cfg.max_tokens, "over_token_budget")
    if cfg.max_tokens is not None:
        report["token_budget"] = "skipped: no tokenizer configured"
    return None


@dataclass
class _Groups:
    """Per kept row: prompt code, near-duplicate cluster and split group; group ids by code."""

    pcode: np.ndarray
    cluster: np.ndarray
    group_of_code: pa.Array  # split group id (prompt id or its cluster's representative) per prompt code


def _prompt_groups(rows: _Rows, t: pa.Table, cfg: BalanceConfig, report: dict) -> _Groups:
    """Prompt codes and, with near_dup, near-duplicate clusters (CJK-aware MinHash LSH)."""
    pids = t.column("prompt_id").take(pa.array(rows.idx)).combine_chunks() if len(rows.idx) \
        else pa.array([], pa.string())
    pid_codes = _dense(pids)
    ucodes, uniq_first = np.unique(pid_codes, return_index=True)
    up_ids = pids.take(pa.array(uniq_first))  # codes are 0..k-1: up_ids[code] is that prompt's id
    group_of_code = up_ids
    cluster_of = pid_codes
    if cfg.near_dup and len(rows.idx):
        ptexts = normalized(take_text(t.column("prompt"), rows.idx[uniq_first]))
        lab = cluster_prompts(ptexts, cfg)  # per unique prompt code
        comp_of_code = np.empty(pid_codes.max() + 1, np.int64)
        comp_of_code[ucodes] = lab
        # representative: the member prompt whose id hash is smallest (stable as unrelated rows come and go)
        hv = stable_hash64(up_ids, salt="cluster-rep:")
        best = np.full(len(lab), np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(best, lab, hv)
        rep_idx = np.empty(len(lab), np.int64)
        is_rep = hv == best[lab]
        rep_idx[lab[is_rep]] = np.flatnonzero(is_rep)
        cluster_of = comp_of_code[pid_codes]
        sizes = np.bincount(lab)
        report["near_dup_clusters"] = int((sizes > 1).sum())
        report["near_dup_prompts"] = int(sizes[sizes > 1].sum())
        report["largest_cluster"] = int(sizes.max()) if len(sizes) else 0
        if cfg.split_by_cluster:
            rep_of_code = np.empty(pid_codes.max() + 1, np.int64)
            rep_of_code[ucodes] = rep_idx[lab]
            group_of_code = up_ids.take(pa.array(rep_of_code[np.sort(ucodes)]))
    return _Groups(pid_codes, cluster_of, group_of_code)


def _cap_rank(t: pa.Table, rows: _Rows, group: np.ndarray, cfg: BalanceConfig) -> np.ndarray:
    """Rank of each row in its group: largest margin first; equal margins by a seeded hash of the
    pair id, or (tie_break: lowest_id) by the smallest (prompt_id, chosen_id, rejected_id). The tie key is
    computed for the rows that share their group and margin only."""
    m = np.asarray(pc.fill_null(t.column("margin").take(pa.array(rows.idx)), -np.inf).to_numpy(), float)
    o = np.lexsort((-m, group))
    go, mo = group[o], m[o]
    tied = np.zeros(len(o), bool)
    tied[1:] = (go[1:] == go[:-1]) & (mo[1:] == mo[:-1])
    tied[:-1] |= tied[1:]
    tp = np.flatnonzero(tied)  # positions in o of rows that share their group and margin
    if len(tp):
        tr = o[tp]
        if cfg.tie_break == "hash":
            tie = unit_interval(t.column("pair_id").take(pa.array(rows.idx[tr])), salt=f"cap:{cfg.seed}:")
        else:
            tie = _id_order(t, rows.idx[tr], cfg)
        run = np.cumsum(np.concatenate([[True], (go[1:] != go[:-1]) | (mo[1:] != mo[:-1])]))[tp]
        o[tp] = tr[np.lexsort((tie, run))]  # each run of equal (group, margin) reordered by its tie key
    first = np.concatenate([[0], np.flatnonzero(go[1:] != go[:-1]) + 1]) if len(o) else np.zeros(0, np.int64)
    rank = np.empty(len(o), np.int64)
    rank[o] = np.arange(len(o)) - np.repeat(first, np.diff(np.append(first, len(o))))
    return rank


def _step_caps(rows: _Rows, g: _Groups, t: pa.Table, cfg: BalanceConfig
               ) -> tuple[_Rows, _Groups, list[StepCount]]:
    """cluster_cap and prompt_cap: the largest margins are kept."""
    counts = []
    for name, limit, attr in (("cluster_cap", cfg.max_pairs_per_cluster, "cluster"),
                              ("prompt_cap", cfg.max_pairs_per_prompt, "pcode")):
        if limit is None or not len(rows.idx):
            continue
        mask = _cap_rank(t, rows, getattr(g, attr), cfg) >= limit
        rows, c = _drop(rows, name, mask)
        g = _Groups(g.pcode[~mask], g.cluster[~mask], g.group_of_code)
        counts.append(c)
    return rows, g, counts


def _step_mix(rows: _Rows, g: _Groups, t: pa.Table, dim: str, shares: dict[str, float], cfg: BalanceConfig
              ) -> tuple[_Rows, _Groups, StepCount]:
    """Subsample to the target shares of one dimension (largest feasible total), by a seeded hash."""
    vals = pc.fill_null(t.column(dim).take(pa.array(rows.idx)), "unknown").combine_chunks()
    enc = pc.dictionary_encode(vals)
    names = [v if v in shares and v != "*" else "*" for v in enc.dictionary.to_pylist()]
    bucket_names = sorted(set(names))  # values not listed share the '*' target as one bucket
    codes = np.array([bucket_names.index(v) for v in names], np.int64)[
        np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]
    counts = np.bincount(codes, minlength=len(bucket_names))
    target = np.array([shares.get(v, 0.0) for v in bucket_names], float)
    present = (counts > 0) & (target > 0)
    if present.any():
        tt = target / target[present].sum()
        total = np.min(counts[present] / tt[present])
        quota = np.where(present, np.floor(total * tt + 1e-9), 0).astype(np.int64)
    else:
        quota = np.zeros(len(bucket_names), np.int64)
    r = _rank_within(codes, [unit_interval(t.column("pair_id").take(pa.array(rows.idx)), salt=f"mix:{dim}:{cfg.seed}:")])
    mask = r >= quota[codes]
    rows, c = _drop(rows, f"mix:{dim}", mask)
    return rows, _Groups(g.pcode[~mask], g.cluster[~mask], g.group_of_code), c


def _step_length(rows: _Rows, g: _Groups, t: pa.Table, cfg: BalanceConfig
                 ) -> tuple[_Rows, _Groups, StepCount | None, dict[str, Any]]:
    """Subsample the over-represented side so the chosen-longer share lies in the band."""
    share_before = float((rows.lc > rows.lr).mean()) if len(rows.idx) else None
    lo = max(0.0, cfg.length_target - cfg.length_tolerance)
    hi = min(1.0, cfg.length_target + cfg.length_tolerance)
    c = None
    if cfg.length_control and len(rows.idx):
        n = len(rows.idx)
        longer = rows.lc > rows.lr
        nl, nn = int(longer.sum()), int((~longer).sum())
        drop_from, n_drop = None, 0
        if nl / n > hi and hi < 1.0:
            drop_from, n_drop = longer, nl - int(np.floor(hi * nn / (1 - hi)))
        elif nl / n < lo:
            drop_from, n_drop = ~longer, nn - int(np.floor(nl * (1 - lo) / lo))
        n_drop = min(max(n_drop, 0), int(np.floor(cfg.length_max_drop * n)))
        mask = np.zeros(n, bool)
        if drop_from is not None and n_drop:
            cand = np.flatnonzero(drop_from)
            u = unit_interval(t.column("pair_id").take(pa.array(rows.idx[cand])), salt=f"length:{cfg.seed}:")
            mask[cand[np.argsort(u, kind="stable")[:n_drop]]] = True
        rows, c = _drop(rows, "length_bias", mask)
        g = _Groups(g.pcode[~mask], g.cluster[~mask], g.group_of_code)
    share_after = float((rows.lc > rows.lr).mean()) if len(rows.idx) else None
    info = {"chosen_longer_before": share_before, "chosen_longer_after": share_after, "band": [lo, hi],
            "band_met": share_after is not None and lo - 1e-12 <= share_after <= hi + 1e-12}
    return rows, g, c, info


def _stats(t: pa.Table, rows: np.ndarray, lc: np.ndarray, lr: np.ndarray) -> dict[str, Any]:
    """Distribution summary for the report (before / after)."""
    n = len(rows)
    s = t.select(["margin", "source", "language", "category"])
    s = s if n == t.num_rows else s.take(pa.array(rows))
    margin = np.asarray(pc.fill_null(s.column("margin"), np.nan).to_numpy(), dtype=float) if n else np.zeros(0)
    mg = margin[~np.isnan(margin)]
    q = np.quantile(mg, [0.1, 0.5, 0.9]).round(4).tolist() if len(mg) else [None] * 3

    def counts(c: str) -> dict[str, int]:
        vc = pc.value_counts(pc.fill_null(s.column(c), "unknown")) if n else []
        return {str(v["values"]): int(v["counts"]) for v in (vc.to_pylist() if n else [])}

    return {
        "pairs": n,
        "margin_p10_p50_p90": q,
        "margin_mean": round(float(mg.mean()), 4) if len(mg) else None,
        "chosen_len_mean": round(float(lc.mean()), 2) if n else None,
        "rejected_len_mean": round(float(lr.mean()), 2) if n else None,
        "chosen_longer_share": round(float((lc > lr).mean()), 4) if n else None,
        "sources": counts("source"),
        "languages": counts("language"),
        "categories": counts("category"),
    }


def _split(t: pa.Table, rows: _Rows, g: _Groups, cfg: BalanceConfig) -> tuple[pa.Table, pa.Table]:
    """Gather the kept rows once; a group goes to eval when the hash of its id is below eval_fraction."""
    n = len(rows.idx)
    gid = g.group_of_code.take(pa.array(g.pcode)) if n else pa.array([], pa.string())
    is_eval = np.zeros(n, bool)
    if n and cfg.eval_fraction > 0:
        is_eval = unit_interval(gid, salt=cfg.split_salt + ":") < cfg.eval_fraction
    picks = [np.flatnonzero(~is_eval), np.flatnonzero(is_eval)]
    cols: list[dict[str, Any]] = [{}, {}]
    for name in t.column_names:  # one column at a time, as one chunk: a take is then a plain gather
        col = t.column(name)
        view = pa.types.is_string_view(col.type)
        col = as_views(col) if view else col.combine_chunks()
        for part, pick in zip(cols, picks, strict=True):
            part[name] = take_views(col, rows.idx[pick]) if view else col.take(pa.array(rows.idx[pick]))
        del col
    train, evals = (pa.table({**part, "group_id": gid.take(pa.array(pick))}) for part, pick in zip(cols, picks,
                                                                                                     strict=True))
    return conform_views("dpo_train", train, DPO_SPLIT), conform_views("dpo_eval", evals, DPO_SPLIT)


def balance_pairs(pairs: pa.Table, config: BalanceConfig | None = None, tokenizer: Any = None
                  ) -> tuple[pa.Table, pa.Table, dict[str, Any], dict[str, np.ndarray]]:
    """Pairs -> (dpo_train, dpo_eval, report, arrays for plots). No I/O.

    Steps (each returns its count): empty, identical, duplicate, token budget, caps, mixes,
    length band; then the split."""
    cfg = config or BalanceConfig()
    t = conform_views("pairs", pairs)
    report: dict[str, Any] = {"input_pairs": t.num_rows}
    tx = _profile_texts(t, cfg)
    rows = _Rows(np.arange(t.num_rows), tx.lc, tx.lr)
    before = _stats(t, rows.idx, rows.lc, rows.lr)
    plot_data = {"margin_before": np.asarray(pc.fill_null(t.column("margin"), np.nan).to_numpy(), float),
                 "lendiff_before": (rows.lc - rows.lr).astype(float)}
    counts: list[StepCount] = []
    for step in (lambda r: _step_empty(r, tx), lambda r: _step_identical(r, t, tx, cfg),
                 lambda r: _step_duplicate(r, t, tx, cfg)):
        rows, c = step(rows)
        counts.append(c)
    tok = _step_token_budget(rows, t, cfg, tokenizer, report)
    if tok is not None:
        rows, c = tok
        counts.append(c)
    g = _prompt_groups(rows, t, cfg, report)
    rows, g, caps = _step_caps(rows, g, t, cfg)
    counts += caps
    for dim, shares in cfg.mix.items():
        if not len(rows.idx):
            break
        rows, g, c = _step_mix(rows, g, t, dim, shares, cfg)
        counts.append(c)
    rows, g, c, report["length_bias"] = _step_length(rows, g, t, cfg)
    if c is not None:
        counts.append(c)
    train, evals = _split(t, rows, g, cfg)
    dropped: dict[str, int] = {}
    for c in counts:
        dropped[c.reason] = dropped.get(c.reason, 0) + c.dropped
    plot_data.update({"margin_after": np.asarray(pc.fill_null(t.column("margin").take(pa.array(rows.idx)), np.nan)
                                                 .to_numpy(), float), "lendiff_after": (rows.lc - rows.lr).astype(float)})
    report.update({"dropped": dropped, "funnel": [c.row() for c in counts], "kept": len(rows.idx),
                   "train": train.num_rows, "eval": evals.num_rows,
                   "train_groups": int(pc.count_distinct(train.column("group_id")).as_py()),
                   "eval_groups": int(pc.count_distinct(evals.column("group_id")).as_py()),
                   "before": before, "after": _stats(t, rows.idx, rows.lc, rows.lr)})
    return train, evals, report, plot_data


def _token_counts(tokenizer: Any, t: pa.Table) -> np.ndarray:
    """prompt tokens + max(chosen, rejected) tokens per pair; each distinct text encoded once."""
    def count(col: pa.ChunkedArray) -> np.ndarray:
        enc = pc.dictionary_encode(pc.fill_null(col, "")).combine_chunks()
        uniq = enc.dictionary.to_pylist()
        ids = tokenizer(uniq, add_special_tokens=False)["input_ids"] if uniq else []
        lens = np.fromiter((len(x) for x in ids), np.int64, count=len(uniq))
        return lens[np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]

    return count(t.column("prompt")) + np.maximum(count(t.column("chosen")), count(t.column("rejected")))


def load_tokenizer(name: str, registry: Any = None) -> Any:
    """A tokenizer from a folder or the model registry (``models@production``); never the hub."""
    from transformers import AutoTokenizer

    path: str | Path = name
    if name.startswith("models@"):
        if registry is None:
            raise ValueError(f"tokenizer {name!r} needs the model registry")
        path = registry.local_path(name)
    if not Path(path).exists():
        raise FileNotFoundError(f"balance.tokenizer {name!r}: no such folder (tokenizers are loaded locally only)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# --- TRL interop -----------------------------------------------------------------------------

def to_trl(table: pa.Table, keep: tuple[str, ...] = ("pair_id",)) -> pa.Table:
    """TRL DPO columns: plain strings, or conversational message lists when any prompt is a chat.

    TRL needs one format per dataset, so when any row has `prompt_messages`, every row becomes
    conversational (a plain prompt turns into one user message) and chosen / rejected become
    one assistant message each.
    """
    from dpoflow.storage.schemas import MESSAGES

    table = table.cast(pa.schema([pa.field(f.name, pa.string(), f.nullable) if pa.types.is_string_view(f.type)
                                  else f for f in table.schema]))  # plain strings for TRL / datasets
    cols = {c: table.column(c) for c in keep if c in table.column_names}
    if table.num_rows == 0 or table.column("prompt_messages").null_count == table.num_rows:
        return pa.table({"prompt": table.column("prompt"), "chosen": table.column("chosen"),
                         "rejected": table.column("rejected"), **cols})

    def one(role: str, texts: pa.ChunkedArray) -> pa.Array:
        texts = texts.combine_chunks()
        roles = pa.array(np.full(len(texts), role, dtype=object), pa.string())
        structs = pa.StructArray.from_arrays([roles, texts], names=["role", "content"])
        offsets = pa.array(np.arange(len(texts) + 1, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, structs).cast(MESSAGES)

    msgs = table.column("prompt_messages").combine_chunks()
    prompt = pc.if_else(pc.is_valid(msgs), msgs, one("user", table.column("prompt")))
    return pa.table({"prompt": prompt, "chosen": one("assistant", table.column("chosen")),
                     "rejected": one("assistant", table.column("rejected")), **cols})


# --- report: plots and data card -------------------------------------------------------------

def write_plots(folder: Path, report: dict[str, Any], plot_data: dict[str, np.ndarray]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(report["funnel"]), 3) + 1.2))
    steps = [f["step"] for f in report["funnel"]] + ["kept"]
    vals = [f["dropped"] for f in report["funnel"]] + [report["kept"]]
    ax.barh(steps[::-1], vals[::-1], color=["#4c72b0"] + ["#dd8452"] * len(report["funnel"]))
    ax.set_xlabel("pairs")
    ax.set_title(f"balance funnel: {report['input_pairs']} in, {report['kept']} kept")
    fig.tight_layout()
    p = folder / "funnel.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (("margin_before", "before"), ("margin_after", "after")):
        m = plot_data[key]
        m = m[~np.isnan(m)]
        if len(m):
            axes[0].hist(m, bins=40, alpha=0.5, label=label)
    axes[0].set_title("margin")
    axes[0].legend()
    for key, label in (("lendiff_before", "before"), ("lendiff_after", "after")):
        d = plot_data[key]
        if len(d):
            axes[1].hist(np.clip(d, -200, 200), bins=40, alpha=0.5, label=label)
    axes[1].set_title("len(chosen) - len(rejected), CJK units")
    axes[1].legend()
    src = sorted(set(report["before"]["sources"]) | set(report["after"]["sources"]))
    x = np.arange(len(src))
    axes[2].bar(x - 0.2, [report["before"]["sources"].get(s, 0) for s in src], 0.4, label="before")
    axes[2].bar(x + 0.2, [report["after"]["sources"].get(s, 0) for s in src], 0.4, label="after")
    axes[2].set_xticks(x, src)
    axes[2].set_title("pairs by source")
    axes[2].legend()
    fig.tight_layout()
    p = folder / "distributions.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)
    return out


def data_card(report: dict[str, Any], config: BalanceConfig, input_ref: str) -> str:
    """The preference data card (markdown) stored with each dpo_train version."""
    b, a, lb = report["before"], report["after"], report["length_bias"]

    def table(d: dict[str, int]) -> str:
        return "\n".join(f"| {k} | {v} |" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "| - | 0 |"

    lines = [
        "# Preference data card", "",
        f"Built by the `balance` stage from `{input_ref}`.", "",
        "## Size", "",
        "| split | pairs | prompt groups |", "| --- | --- | --- |",
        f"| dpo_train | {report['train']} | {report['train_groups']} |",
        f"| dpo_eval | {report['eval']} | {report['eval_groups']} |", "",
        "No prompt group is in both splits; a group's side is a stable hash of its id "
        f"(salt `{config.split_salt}`, eval share {config.eval_fraction}).", "",
        "## Funnel", "",
        "| step | in | dropped | out |", "| --- | --- | --- | --- |",
        *[f"| {f['step']} | {f['in']} | {f['dropped']} | {f['out']} |" for f in report["funnel"]],
        "", f"Input {report['input_pairs']} = kept {report['kept']} + dropped {sum(report['dropped'].values())}.", "",
        "## Length bias", "",
        f"Chosen side longer (CJK-aware units): {_pct(lb['chosen_longer_before'])} before, "
        f"{_pct(lb['chosen_longer_after'])} after; band {_pct(lb['band'][0])}-{_pct(lb['band'][1])} "
        f"({'met' if lb['band_met'] else 'NOT met'}).", "",
        "## Distributions (before -> after)", "",
        "| measure | before | after |", "| --- | --- | --- |",
        f"| margin p10 / p50 / p90 | {b['margin_p10_p50_p90']} | {a['margin_p10_p50_p90']} |",
        f"| chosen length (mean units) | {b['chosen_len_mean']} | {a['chosen_len_mean']} |",
        f"| rejected length (mean units) | {b['rejected_len_mean']} | {a['rejected_len_mean']} |", "",
        "### Sources (after)", "", "| source | pairs |", "| --- | --- |", table(a["sources"]), "",
        "### Languages (after)", "", "| language | pairs |", "| --- | --- |", table(a["languages"]), "",
        "### Categories (after)", "", "| category | pairs |", "| --- | --- |", table(a["categories"]), "",
        "## Use with TRL", "",
        "Columns `prompt`, `chosen`, `rejected` are plain strings. For conversational prompts "
        "(`prompt_messages` set) convert with `dpoflow.tasks.balance.to_trl(table)` to message lists.", "",
        "## Config", "", "```json", json.dumps(config.model_dump(mode="json"), indent=1), "```", "",
    ]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def balance(ctx: StageContext) -> StageResult:
    """Stage function: balance `pairs` into dpo_train / dpo_eval, with plots and a data card."""

    cfg: BalanceConfig = ctx.config
    tokenizer = None
    if cfg.tokenizer and cfg.max_tokens is not None:
        tokenizer = load_tokenizer(cfg.tokenizer, ctx.registry)
    pairs = ctx.read("pairs")
    train, evals, report, plot_data = balance_pairs(pairs, cfg, tokenizer)
    input_ref = ctx.inputs["pairs"]
    tag = hashlib.sha256((input_ref + json.dumps(cfg.model_dump(mode="json"), sort_keys=True)).encode()).hexdigest()[:10]
    folder = ctx.artifacts / tag
    folder.mkdir(parents=True, exist_ok=True)
    card = data_card(report, cfg, input_ref)
    (folder / "data_card.md").write_text(card, encoding="utf-8")
    (ctx.artifacts / "data_card.md").write_text(card, encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    files = [str(folder / "data_card.md")]
    if cfg.plots:
        files += [str(p) for p in write_plots(folder, report, plot_data)]
    report["artifacts"] = files
    return StageResult(outputs={"dpo_train": train, "dpo_eval": evals}, report=report,
                       metadata={"dpo_train": {"data_card": card, "artifacts": files},
                                 "dpo_eval": {"artifacts": files}})


__all__ = ["BalanceConfig", "balance", "balance_pairs", "cluster_prompts", "minhash", "to_trl", "PAIRS"]
