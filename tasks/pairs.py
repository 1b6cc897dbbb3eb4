"""The `pairs` stage: merge every signal a candidate has into a per-prompt ordering and expand
it into preference pairs, each with a record of why it exists.

Why pair-level decisions: signals are partial (a human rated two of four answers, behaviour
exists only for served ones), so a single sort key per candidate cannot say which source
decided. We therefore decide every within-prompt pair (a, b) on its own:

* ``priority``: the first level, in ``priority`` order, where both sides have a value and
  differ by more than ``tie_tolerance`` decides; a lower source only breaks ties of a higher
  one. Human evidence is, in order: an explicit pairwise label, a ranking, a rating.
* ``weighted``: every source is z-normalised within the prompt and summed with ``weights``
  (a missing value counts as the prompt mean); explicit pairwise labels still decide their pair.

The ordering that strategies need (best, worst, adjacent) is the Copeland score of those
decisions (wins - losses within the prompt), unsafe candidates last, so "best" is the best
*safe* answer. A candidate flagged unsafe (``unsafe_flags``) is never ``chosen``: with
``safe_beats_unsafe`` (default) a safe candidate wins against a flagged one whatever the
other sources say (a useful pair: it teaches to avoid the unsafe answer; source "metrics",
since rule flags come from the score stage), and a pair of two flagged candidates is dropped
with reason ``unsafe_chosen``. When sources disagree about a pair (A > B by one,
B > A by another), ``contradictions: resolve`` keeps the policy's decision (counted in the
report) and ``drop`` drops the pair with reason ``contradiction``.

Everything is numpy over arrays of pairs: within-prompt pairs are generated per distinct
prompt size from one ``triu`` template, so there is no per-prompt Python loop.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.storage.schemas import PAIRS, QUARANTINE, conform
from dpoflow.tasks.contract import Section, StageContext, StageResult
from dpoflow.tasks.ids import stable_id
from dpoflow.tasks.lang import detect_language
from dpoflow.tasks.pair_kernels import as_views, first_and_inverse, lookup, take_text, take_views
from dpoflow.tasks.text import unit_interval
from dpoflow.tasks.text_codes import hash_strings

SOURCES = ("human", "behaviour", "reward", "metrics")
STRATEGIES = ("all_pairs", "best_vs_worst", "best_vs_rest", "adjacent", "best_vs_random_lower",
              "best_vs_mean_minus_k_std")
# internal evidence levels -> public source name
LEVELS = (("pairwise", "human"), ("human_rank", "human"), ("human_rating", "human"),
          ("behaviour", "behaviour"), ("reward", "reward"), ("metrics", "metrics"),
          ("safety", "metrics"))  # rule flags come from the score stage: reported as "metrics"


class PairsConfig(Section):
    policy: Literal["priority", "weighted"] = Field(
        "priority", description="priority: a lower source only breaks ties of a higher one; "
        "weighted: per-prompt z-normalised weighted sum of sources")
    priority: list[str] = Field(list(SOURCES), description="source order for the priority policy (highest first)")
    weights: dict[str, float] = Field({"human": 4.0, "behaviour": 2.0, "reward": 1.0, "metrics": 1.0},
                                      description="source weights for the weighted policy")
    strategy: Literal["all_pairs", "best_vs_worst", "best_vs_rest", "adjacent", "best_vs_random_lower",
                      "best_vs_mean_minus_k_std"] = Field("all_pairs", description="how an ordering becomes pairs")
    k_std: float = Field(1.0, description="best_vs_mean_minus_k_std: reject candidates scoring <= mean - k*std")
    seed: int = Field(0, description="seed of best_vs_random_lower (hashed with the prompt id: reproducible per prompt)")
    min_margin: float = Field(0.0, description="drop pairs whose margin (in the deciding source's units) is below this")
    min_margin_by_source: dict[str, float] = Field({}, description="per-source min margin, overrides min_margin")
    tie_tolerance: float = Field(1e-9, description="score differences up to this are ties")
    max_pairs_per_prompt: int | None = Field(None, description="cap per prompt (highest-priority source, then "
                                             "largest margin kept); None = no cap")
    contradictions: Literal["resolve", "drop"] = Field(
        "resolve", description="sources disagreeing on a pair: resolve = the policy decides (counted), "
        "drop = drop the pair with reason 'contradiction'")
    unsafe_flags: list[str] = Field(["flag_safety", "flag_pii"],
                                    description="scores flags that make a candidate unfit to be chosen")
    metric_column: str = Field("auto_score", description="scores column used as the 'metrics' source")
    reward_column: str = Field("reward", description="scores column used as the 'reward' source")
    min_signal_confidence: float = Field(0.0, description="behaviour signals below this confidence are ignored")
    safe_beats_unsafe: bool = Field(True, description="a safe candidate is preferred to a flagged one whatever "
                                    "the other sources say (source 'metrics', margin 1); False = sources decide "
                                    "and pairs with an unsafe chosen side are dropped")
    pairwise_always: bool = Field(True, description="explicit human pairwise labels always become pairs, "
                                  "whatever the strategy")

    @field_validator("priority")
    @classmethod
    def _check_priority(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SOURCES]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"priority must be distinct names from {SOURCES}, got {v}")
        return v + [s for s in SOURCES if s not in v]

    @field_validator("weights", "min_margin_by_source")
    @classmethod
    def _check_sources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [s for s in v if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown source(s) {bad}; sources: {SOURCES}")
        return v


# --- helpers ---------------------------------------------------------------------------------

def _np(a: Any, dtype: Any = np.float64) -> np.ndarray:
    """Arrow column -> numpy with nulls as NaN (floats) / False (bools)."""
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    if pa.types.is_boolean(a.type):
        return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(pc.fill_null(pc.cast(a, pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=dtype)


def _group_mean(idx: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    ok = (idx >= 0) & ~np.isnan(vals)
    s = np.bincount(idx[ok], weights=vals[ok], minlength=n)
    c = np.bincount(idx[ok], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def _sign(d: np.ndarray, tol: float) -> np.ndarray:
    """+1 / -1 / 0 (tie) / NaN (missing on a side)."""
    out = np.sign(d)
    out[np.abs(d) <= tol] = 0.0
    return out


def _quarantine(rows: pa.Table, reasons: list[str], dataset: str = "judgements") -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    raws = [json.dumps(r, default=str, ensure_ascii=False) for r in rows.to_pylist()]
    n = len(raws)
    return pa.table({"source": [dataset] * n, "stage": ["pairs"] * n, "dataset": [dataset] * n,
                     "reason": reasons, "raw": raws, "row_index": pa.nulls(n, pa.int64()),
                     "quarantined_at": pa.array([now] * n, QUARANTINE.field("quarantined_at").type)},
                    schema=QUARANTINE)


def within_group_pairs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (a, b) row pairs with a < b inside each group of consecutive rows, plus the group index.

    One triu template per distinct group size, broadcast over the groups of that size.
    """
    a_parts, b_parts, g_parts = [], [], []
    for k in np.unique(sizes):
        if k < 2:
            continue
        gs = np.flatnonzero(sizes == k)
        ti, tj = np.triu_indices(int(k), 1)
        base = starts[gs][:, None]
        a_parts.append((base + ti[None, :]).ravel())
        b_parts.append((base + tj[None, :]).ravel())
        g_parts.append(np.repeat(gs, len(ti)))
    if not a_parts:
        z = np.zeros(0, np.int64)
        return z, z, z
    a, b, g = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(g_parts)
    order = np.lexsort((b, a))  # deterministic order: by first row, then second
    return a[order], b[order], g[order]


# --- evidence per candidate ------------------------------------------------------------------

def _judgement_evidence(judgements: pa.Table, cand_ids: pa.Array, group: np.ndarray, report: dict
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], pa.Table | None]:
    """Human rank score and rating per candidate, and pairwise labels keyed by candidate pair."""
    n = len(cand_ids)
    hr = np.full(n, np.nan)
    hrat = np.full(n, np.nan)
    empty = {"lo": np.zeros(0, np.int64), "hi": np.zeros(0, np.int64), "label": np.zeros(0),
             "strength": np.zeros(0)}
    if judgements is None or judgements.num_rows == 0:
        return hr, hrat, empty, None
    judgements = conform("judgements", judgements)  # typed columns even for hand-built tables
    kind = judgements.column("kind")
    q_rows: list[pa.Table] = []
    q_reasons: list[str] = []
    unknown = 0

    # rankings: normalised Borda score (max_rank - rank) / (max_rank - min_rank) in [0, 1].
    rk = judgements.filter(pc.equal(kind, "ranking"))
    rk = rk.filter(pc.greater(pc.list_value_length(rk.column("item_ids")), 0))
    if rk.num_rows:
        items = rk.column("item_ids").combine_chunks()
        flat = pc.list_flatten(items)
        parent = np.asarray(pc.list_parent_indices(items))
        offsets = np.asarray(items.offsets)[:-1]
        rank = (np.arange(len(flat)) - offsets[parent] + 1).astype(np.float64)
        ranks = rk.column("ranks").combine_chunks()
        good = pc.and_(pc.is_valid(ranks), pc.equal(pc.fill_null(pc.list_value_length(ranks), -1),
                                                    pc.list_value_length(items)))
        good_np = _np(good)
        if good_np.any():
            rank[good_np[parent]] = _np(pc.list_flatten(ranks.filter(good)))
        rmax = np.maximum.reduceat(rank, offsets)
        rmin = np.minimum.reduceat(rank, offsets)
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(rmax[parent] > rmin[parent], (rmax[parent] - rank) / (rmax[parent] - rmin[parent]), np.nan)
        idx = lookup(flat, cand_ids)
        unknown += int((idx < 0).sum())
        hr = _group_mean(idx, score, n)

    rt = judgements.filter(pc.and_(pc.equal(kind, "rating"), pc.is_valid(judgements.column("rating"))))
    if rt.num_rows:
        idx = lookup(pc.list_element(rt.column("item_ids").combine_chunks(), 0), cand_ids) \
            if rt.num_rows else np.zeros(0, np.int64)
        unknown += int((idx < 0).sum())
        hrat = _group_mean(idx, _np(rt.column("rating")), n)

    pw = judgements.filter(pc.equal(kind, "pairwise"))
    labels = empty
    if pw.num_rows:
        items = pw.column("item_ids").combine_chunks()
        two = _np(pc.equal(pc.list_value_length(items), 2))
        winner = pc.fill_null(pw.column("winner"), "").combine_chunks()
        a_id = pc.list_element(items.filter(pa.array(two)), 0)
        b_id = pc.list_element(items.filter(pa.array(two)), 1)
        w2 = winner.filter(pa.array(two))
        valid = np.zeros(pw.num_rows, bool)
        lab = np.zeros(pw.num_rows)
        ia = np.full(pw.num_rows, -1)
        ib = np.full(pw.num_rows, -1)
        if two.any():
            wa, wb, wt = _np(pc.equal(w2, a_id)), _np(pc.equal(w2, b_id)), _np(pc.equal(w2, "tie"))
            pos = np.flatnonzero(two)
            valid[pos] = wa | wb | wt
            lab[pos] = np.where(wa, 1.0, np.where(wb, -1.0, 0.0))
            ia[pos] = lookup(a_id, cand_ids)
            ib[pos] = lookup(b_id, cand_ids)
        bad_shape = ~two
        bad_winner = two & ~valid
        if bad_shape.any():
            q_rows.append(pw.filter(pa.array(bad_shape)))
            q_reasons += ["pairwise judgement needs exactly 2 item_ids"] * int(bad_shape.sum())
        if bad_winner.any():
            q_rows.append(pw.filter(pa.array(bad_winner)))
            q_reasons += ["pairwise winner is neither item nor 'tie'"] * int(bad_winner.sum())
        known = valid & (ia >= 0) & (ib >= 0)
        unknown += int((valid & ~known).sum())
        cross = known & (group[np.maximum(ia, 0)] != group[np.maximum(ib, 0)])
        if cross.any():
            q_rows.append(pw.filter(pa.array(cross)))
            q_reasons += ["pairwise items belong to different prompts"] * int(cross.sum())
        same = known & (ia == ib)
        if same.any():
            q_rows.append(pw.filter(pa.array(same)))
            q_reasons += ["pairwise judgement compares a candidate with itself"] * int(same.sum())
        use = known & ~cross & ~same
        if use.any():
            a, b, lb = ia[use], ib[use], lab[use]
            strength = _np(pw.column("strength"))[use]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            lb = np.where(a == lo, lb, -lb)  # label from lo's point of view
            key = lo * n + hi
            uk, inv = np.unique(key, return_inverse=True)
            lmin = np.full(len(uk), np.inf)
            lmax = np.full(len(uk), -np.inf)
            np.minimum.at(lmin, inv, lb)
            np.maximum.at(lmax, inv, lb)
            agg = np.where((lmin < 0) & (lmax > 0), np.nan, np.where(lmax > 0, 1.0, np.where(lmin < 0, -1.0, 0.0)))
            report["pairwise_conflicts"] = int(np.isnan(agg).sum())
            labels = {"lo": uk // n, "hi": uk % n, "label": agg, "strength": _group_mean(inv, strength, len(uk))}
    report["judgement_items_unknown"] = unknown
    quarantine = None
    if q_rows:
        quarantine = _quarantine(pa.concat_tables(q_rows), q_reasons)
    return hr, hrat, labels, quarantine


# --- the stage's core, in named steps --------------------------------------------------------
#
# Ids, codes, scores and margins move through the steps as numpy arrays over candidate rows;
# the texts are gathered once, for the kept pairs, at the end (`_gather`).

@dataclass
class _Candidates:
    """Candidates ordered by (prompt, candidate id): a prompt's candidates are a run of rows."""

    rows: np.ndarray  # row of each ordered candidate in the input table (texts are gathered through it)
    pid: pa.Array
    cid: pa.Array
    starts: np.ndarray
    sizes: np.ndarray
    group: np.ndarray

    @property
    def n(self) -> int:
        return len(self.rows)


@dataclass
class _Evidence:
    """Per candidate: a value per evidence level (NaN = nothing), the unsafe flag, pairwise labels."""

    values: dict[str, np.ndarray]
    unsafe: np.ndarray
    labels: dict[str, np.ndarray]


@dataclass
class _Decisions:
    """Per within-prompt pair (a < b): the decision (+1: a wins), which level decided, contradictions."""

    a: np.ndarray
    b: np.ndarray
    pg: np.ndarray
    decision: np.ndarray
    decided_by: np.ndarray
    contra: np.ndarray
    has_pw: np.ndarray
    pw_strength: np.ndarray
    comb: np.ndarray | None  # the weighted policy's combined score per candidate


LEVEL_NAMES = [lv for lv, _ in LEVELS]
SOURCE_NAMES = [s for _, s in LEVELS] + ["none"]  # by decided_by (-1 = none)


def _sort_words(arr: pa.Array, max_words: int = 8) -> list[np.ndarray] | None:
    """Sort keys of short strings: big-endian 8-byte words (zero padded) and the byte length,
    most significant last as np.lexsort wants them; their lexicographic order is the strings'
    byte order. None when a string is longer than `max_words` words (the caller sorts in Arrow)."""
    arr = pc.fill_null(arr, "")
    n = len(arr)
    offs = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4).astype(np.int64)
    lens = np.diff(offs)
    if n == 0:
        return [lens]
    if lens.max() > 8 * max_words:
        return None
    lo, hi = int(offs[0]), int(offs[-1])
    buf = np.zeros(hi - lo + 8, np.uint8)
    buf[:hi - lo] = np.frombuffer(arr.buffers()[2], np.uint8, hi - lo, lo)
    window = np.lib.stride_tricks.as_strided(np.frombuffer(buf, np.uint64, 1), (hi - lo + 1,), (1,))
    words = []
    for j in range(int((lens.max() + 7) // 8)):
        w = window[np.minimum(offs[:-1] - lo + 8 * j, hi - lo)].byteswap()
        keep = np.clip(lens - 8 * j, 0, 8).astype(np.uint64) * np.uint64(8)  # bits of the row in this word
        mask = np.where(keep >= 64, np.uint64(0xFFFFFFFFFFFFFFFF), ~(np.uint64(0xFFFFFFFFFFFFFFFF) >> keep))
        words.append(w & mask)
    return [lens] + words[::-1]


def _order_candidates(candidates: pa.Table, dropped: dict[str, int]) -> _Candidates:
    """Drop repeated candidate ids (first kept) and order by (prompt, candidate) on the ids only."""
    ids = candidates.select(["candidate_id", "prompt_id"])
    ids = pa.table({c: ids.column(c).combine_chunks() for c in ids.column_names})  # one chunk: plain takes
    rows = np.arange(ids.num_rows)
    cid = ids.column("candidate_id").combine_chunks()
    hs = np.sort(hash_strings(cid))
    if ids.num_rows and (hs[1:] == hs[:-1]).any():  # distinct hashes: distinct ids
        first = ids.select(["candidate_id"]).append_column("__i", pa.array(rows)).group_by(
            "candidate_id", use_threads=False).aggregate([("__i", "min")])
        if first.num_rows < ids.num_rows:
            dropped["duplicate_candidate"] = ids.num_rows - first.num_rows
            rows = np.sort(np.asarray(first.column("__i_min")))
            ids = ids.take(pa.array(rows))
    ck, pk = (_sort_words(ids.column(c).combine_chunks()) for c in ("candidate_id", "prompt_id"))
    if ck is not None and pk is not None:
        order = np.lexsort(ck + pk)
    else:
        order = np.asarray(pc.sort_indices(ids, [("prompt_id", "ascending"), ("candidate_id", "ascending")]))
    ids = ids.take(pa.array(order))
    rows = rows[order]
    n = len(rows)
    pid = ids.column("prompt_id").combine_chunks()
    cid = ids.column("candidate_id").combine_chunks()
    change = np.ones(n, bool)
    if n > 1:
        change[1:] = _np(pc.not_equal(pid.slice(1), pid.slice(0, n - 1)))
    starts = np.flatnonzero(change)
    sizes = np.diff(np.append(starts, n))
    return _Candidates(rows, pid, cid, starts, sizes, np.cumsum(change) - 1)


def _gather_evidence(c: _Candidates, cfg: PairsConfig, scores: pa.Table | None, signals: pa.Table | None,
                     judgements: pa.Table | None, report: dict) -> tuple[_Evidence, pa.Table | None]:
    """Every source's value per candidate, NaN where a source has nothing."""
    n = c.n
    unsafe = np.zeros(n, bool)
    reward, metric, behaviour = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    if scores is not None and scores.num_rows:
        si = lookup(c.cid, scores.column("candidate_id"))
        has = si >= 0
        take = np.where(has, si, 0)  # numpy gathers: an Arrow take over many chunks is ~5x slower
        for col, dst in ((cfg.reward_column, reward), (cfg.metric_column, metric)):
            if col not in scores.column_names:
                raise ValueError(f"scores has no column {col!r} (pairs.{'reward' if dst is reward else 'metric'}_column)")
            dst[has] = _np(scores.column(col))[take][has]
        for flag in cfg.unsafe_flags:
            if flag not in scores.column_names:
                raise ValueError(f"scores has no flag column {flag!r} (pairs.unsafe_flags)")
            unsafe |= has & _np(scores.column(flag))[take]
    if signals is not None and signals.num_rows:
        si = lookup(c.cid, signals.column("candidate_id"))
        has = si >= 0
        take = pa.array(np.where(has, si, 0))
        conf = _np(pc.take(signals.column("confidence"), take))
        ok = has & (conf >= cfg.min_signal_confidence)
        behaviour[ok] = _np(pc.take(signals.column("behaviour_score"), take))[ok]
    hr, hrat, labels, quarantine = _judgement_evidence(judgements, c.cid, c.group, report)
    values = {"human_rank": hr, "human_rating": hrat, "behaviour": behaviour, "reward": reward, "metrics": metric}
    return _Evidence(values, unsafe, labels), quarantine


def _pairwise_on_pairs(a: np.ndarray, b: np.ndarray, n: int, labels: dict[str, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explicit pairwise label and strength of each pair (NaN where none), and whether it has one."""
    pw_label, pw_strength, has_pw = np.full(len(a), np.nan), np.full(len(a), np.nan), np.zeros(len(a), bool)
    if len(labels["lo"]) and len(a):
        key = a * n + b  # pairs are sorted by (a, b): key is sorted
        lk = labels["lo"] * n + labels["hi"]
        pos = np.minimum(np.searchsorted(key, lk), len(key) - 1)
        hit = key[pos] == lk
        has_pw[pos[hit]] = True
        pw_label[pos[hit]] = labels["label"][hit]
        pw_strength[pos[hit]] = labels["strength"][hit]
    return pw_label, pw_strength, has_pw


def _weighted_scores(values: dict[str, np.ndarray], c: _Candidates, cfg: PairsConfig
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-prompt z-scores per source and their weighted mean (missing = the prompt mean)."""
    group, n_groups = c.group, len(c.starts)
    z = {}
    for lv, v in values.items():
        ok = ~np.isnan(v)
        cnt = np.bincount(group[ok], minlength=n_groups)
        mean = np.bincount(group[ok], weights=v[ok], minlength=n_groups) / np.maximum(cnt, 1)
        var = np.bincount(group[ok], weights=(v[ok] - mean[group[ok]]) ** 2, minlength=n_groups) / np.maximum(cnt, 1)
        std = np.sqrt(var)
        with np.errstate(invalid="ignore", divide="ignore"):
            zz = np.where(std[group] > 0, (v - mean[group]) / std[group], 0.0)
        z[lv] = np.where(ok, zz, np.nan)
    hz = np.vstack([z["human_rank"], z["human_rating"]])
    hc = (~np.isnan(hz)).sum(axis=0)
    zsrc = {"human": np.where(hc > 0, np.nansum(hz, axis=0) / np.maximum(hc, 1), np.nan),
            "behaviour": z["behaviour"], "reward": z["reward"], "metrics": z["metrics"]}
    comb = np.zeros(c.n)
    wsum = np.zeros(n_groups)
    for src, zs in zsrc.items():
        w = cfg.weights.get(src, 0.0)
        wsum += w * (np.bincount(group[~np.isnan(zs)], minlength=n_groups) > 0)
        comb += w * np.nan_to_num(zs)
    comb = np.where(wsum[group] > 0, comb / np.where(wsum[group] > 0, wsum[group], 1), 0.0)
    return comb, zsrc


def _decide(c: _Candidates, ev: _Evidence, cfg: PairsConfig) -> _Decisions:
    """Decide every within-prompt pair by the policy, then the safety rule; flag contradictions."""
    a, b, pg = within_group_pairs(c.starts, c.sizes)
    pw_label, pw_strength, has_pw = _pairwise_on_pairs(a, b, c.n, ev.labels)
    tol = cfg.tie_tolerance
    signs = {"pairwise": pw_label}
    signs.update({lv: _sign(v[a] - v[b], tol) for lv, v in ev.values.items()})
    decision = np.zeros(len(a))
    decided_by = np.full(len(a), -1)  # index into LEVEL_NAMES
    comb = None
    if cfg.policy == "priority":
        for lv in [lv for src in cfg.priority for lv, s in LEVELS if s == src and lv != "safety"]:
            s = signs[lv]
            take_it = (decided_by < 0) & ~np.isnan(s) & (s != 0)
            decision[take_it] = s[take_it]
            decided_by[take_it] = LEVEL_NAMES.index(lv)
    else:
        comb, zsrc = _weighted_scores(ev.values, c, cfg)
        s = _sign(comb[a] - comb[b], tol)
        decision = s.copy()
        contrib = np.vstack([cfg.weights.get(src, 0.0) * np.nan_to_num(zs[a] - zs[b]) * s for src, zs in zsrc.items()])
        src_idx = np.argmax(contrib, axis=0) if len(a) else np.zeros(0, np.int64)
        src_level = np.array([LEVEL_NAMES.index(x) for x in ("human_rank", "behaviour", "reward", "metrics")])
        decided_by = np.where(s != 0, src_level[src_idx], -1)
        ovr = ~np.isnan(pw_label) & (pw_label != 0)  # explicit pairwise labels decide their pair
        decision[ovr] = pw_label[ovr]
        decided_by[ovr] = LEVEL_NAMES.index("pairwise")
    # contradictions: any level that says the opposite of the decision.
    contra = np.zeros(len(a), bool)
    for lv in LEVEL_NAMES[:-1]:
        sg = signs[lv]
        contra |= (decision != 0) & ~np.isnan(sg) & (sg == -decision)
    contra |= has_pw & np.isnan(pw_label)  # humans disagree among themselves
    if cfg.safe_beats_unsafe:  # a hard rule above every source, not a contradiction
        m = ev.unsafe[a] != ev.unsafe[b]
        decision[m] = np.where(ev.unsafe[a[m]], -1.0, 1.0)
        decided_by[m] = LEVEL_NAMES.index("safety")
        contra[m] = False
    return _Decisions(a, b, pg, decision, decided_by, contra, has_pw, pw_strength, comb)


PAIR_BATCH = 1 << 18  # within-prompt pairs decided per batch of whole prompts: bounds the per-pair arrays


def _batches(c: _Candidates) -> list[tuple[int, int]]:
    """Ranges of prompts (groups) holding about PAIR_BATCH within-prompt pairs each (at least one range)."""
    ends = np.cumsum(c.sizes * (c.sizes - 1) // 2)
    cuts = np.searchsorted(ends, np.arange(PAIR_BATCH, int(ends[-1]) if len(ends) else 0, PAIR_BATCH), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(c.sizes)]]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)) or [(0, 0)]


def _batch(c: _Candidates, ev: _Evidence, g0: int, g1: int) -> tuple[_Candidates, _Evidence, int]:
    """Prompts g0..g1-1 as candidates and evidence of their own (rows from 0), and their first row."""
    r0 = int(c.starts[g0]) if g0 < len(c.starts) else c.n
    r1 = int(c.starts[g1]) if g1 < len(c.starts) else c.n
    sub = _Candidates(c.rows[r0:r1], c.pid.slice(r0, r1 - r0), c.cid.slice(r0, r1 - r0), c.starts[g0:g1] - r0,
                      c.sizes[g0:g1], c.group[r0:r1] - g0)
    lb = ev.labels
    m = (lb["lo"] >= r0) & (lb["lo"] < r1)  # both items of a label are in one prompt
    labels = {"lo": lb["lo"][m] - r0, "hi": lb["hi"][m] - r0, "label": lb["label"][m], "strength": lb["strength"][m]}
    return sub, _Evidence({k: v[r0:r1] for k, v in ev.values.items()}, ev.unsafe[r0:r1], labels), r0


def _select_strategy(c: _Candidates, d: _Decisions, ev: _Evidence, cfg: PairsConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs the strategy considers, and whether a pair is there only as a pairwise label.

    The ordering is the Copeland score (wins - losses), unsafe last, then the weighted score, then id.
    """
    n, group, starts, sizes = c.n, c.group, c.starts, c.sizes
    a, b, pg = d.a, d.b, d.pg
    cope = np.bincount(a, weights=d.decision, minlength=n) - np.bincount(b, weights=d.decision, minlength=n)
    keys = [np.arange(n)]  # candidate id order (rows are sorted by id within a prompt)
    if d.comb is not None:
        keys.append(-d.comb)
    keys += [-cope, ev.unsafe.astype(np.int8), group]
    order = np.lexsort(keys)
    rank_of = np.empty(n, np.int64)
    rank_of[order] = np.arange(n) - starts[group[order]]
    ra, rb = rank_of[a], rank_of[b]
    top, bottom = np.minimum(ra, rb), np.maximum(ra, rb)
    k = sizes[pg]
    strat = cfg.strategy
    if strat == "all_pairs":
        sel = np.ones(len(a), bool)
    elif strat == "best_vs_worst":
        sel = (top == 0) & (bottom == k - 1)
    elif strat == "best_vs_rest":
        sel = top == 0
    elif strat == "adjacent":
        sel = (bottom - top) == 1
    elif strat == "best_vs_random_lower":
        u = unit_interval(c.pid.take(pa.array(starts)) if len(starts) else pa.array([], pa.string()),
                          salt=f"best_vs_random_lower:{cfg.seed}:")
        pick = 1 + np.floor(u * np.maximum(sizes - 1, 1)).astype(np.int64)
        sel = (top == 0) & (bottom == pick[pg])
    else:  # best_vs_mean_minus_k_std
        sc = d.comb if d.comb is not None else cope
        cnt = np.bincount(group, minlength=len(starts))
        mean = np.bincount(group, weights=sc, minlength=len(starts)) / np.maximum(cnt, 1)
        std = np.sqrt(np.bincount(group, weights=(sc - mean[group]) ** 2, minlength=len(starts)) / np.maximum(cnt, 1))
        lower = np.where(ra == 0, b, a)
        sel = (top == 0) & (sc[lower] <= (mean - cfg.k_std * std)[pg]) & (rank_of[lower] != 0)
    only_pairwise = ~sel
    if cfg.pairwise_always:
        sel = sel | d.has_pw
    return sel, only_pairwise


@dataclass
class _Kept:
    """The considered pairs, oriented, with scores, margin, source and a keep mask."""

    chosen: np.ndarray
    rejected: np.ndarray
    pg: np.ndarray
    cs: np.ndarray
    rs: np.ndarray
    margin: np.ndarray
    decided_by: np.ndarray
    only_pairwise: np.ndarray
    keep: np.ndarray

    def drop(self, mask: np.ndarray, reason: str, dropped: dict[str, int]) -> None:
        m = self.keep & mask
        dropped[reason] = dropped.get(reason, 0) + int(m.sum())
        self.keep &= ~m

    def kept_only(self, row0: int, group0: int) -> _Kept:
        """The kept pairs only, their candidate rows and groups shifted by (row0, group0)."""
        i = np.flatnonzero(self.keep)
        return _Kept((self.chosen[i] + row0).astype(np.int32), (self.rejected[i] + row0).astype(np.int32),
                     (self.pg[i] + group0).astype(np.int32), self.cs[i], self.rs[i], self.margin[i],
                     self.decided_by[i].astype(np.int8), self.only_pairwise[i], np.ones(len(i), bool))

    @staticmethod
    def concat(parts: list[_Kept]) -> _Kept:
        return _Kept(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Kept)))


def _apply_rules(d: _Decisions, sel: np.ndarray, only_pairwise: np.ndarray, ev: _Evidence, cfg: PairsConfig,
                 dropped: dict[str, int], report: dict) -> _Kept:
    """Orient the considered pairs; drop ties, contradictions (drop mode), unsafe chosen sides and
    margins below the minimum (margin in the deciding source's units; weighted: the combined score)."""
    idx = np.flatnonzero(sel)
    decision, decided_by, contra = d.decision[idx], d.decided_by[idx], d.contra[idx]
    a, b = d.a[idx], d.b[idx]
    chosen = np.where(decision < 0, b, a)
    rejected = np.where(decision < 0, a, b)
    if d.comb is None:
        cs, rs = np.full(len(idx), np.nan), np.full(len(idx), np.nan)
        for li, lv in enumerate(LEVEL_NAMES):
            if lv in ("pairwise", "safety"):
                continue
            m = decided_by == li
            if m.any():
                cs[m] = ev.values[lv][chosen[m]]
                rs[m] = ev.values[lv][rejected[m]]
    else:
        cs, rs = d.comb[chosen], d.comb[rejected]
    margin = np.where(decided_by == LEVEL_NAMES.index("pairwise"), d.pw_strength[idx], cs - rs)
    is_safety = decided_by == LEVEL_NAMES.index("safety")
    cs, rs, margin = np.where(is_safety, 1.0, cs), np.where(is_safety, 0.0, rs), np.where(is_safety, 1.0, margin)
    k = _Kept(chosen, rejected, d.pg[idx], cs, rs, margin, decided_by, only_pairwise[idx], np.ones(len(idx), bool))
    k.drop(decision == 0, "tie", dropped)
    if cfg.contradictions == "drop":
        k.drop(contra, "contradiction", dropped)
    else:
        report["contradictions_resolved"] = report.get("contradictions_resolved", 0) + int((k.keep & contra).sum())
    k.drop(ev.unsafe[chosen], "unsafe_chosen", dropped)
    thr = np.array([cfg.min_margin_by_source.get(s, cfg.min_margin) for s in SOURCE_NAMES])[decided_by]
    k.drop(~np.isnan(margin) & (margin < thr), "below_min_margin", dropped)
    return k


def _cap(k: _Kept, cfg: PairsConfig, dropped: dict[str, int]) -> None:
    """At most max_pairs_per_prompt per prompt: highest-priority source, then largest margin, then ids."""
    if cfg.max_pairs_per_prompt is None:
        return
    prio = np.array([cfg.priority.index(s) if s in cfg.priority else 99 for s in SOURCE_NAMES])[k.decided_by]
    kidx = np.flatnonzero(k.keep)
    o = kidx[np.lexsort((k.chosen[kidx], k.rejected[kidx], -np.nan_to_num(k.margin[kidx], nan=np.inf),
                         prio[kidx], k.pg[kidx]))]
    g_o = k.pg[o]
    first_pos = np.flatnonzero(np.concatenate([[True], g_o[1:] != g_o[:-1]])) if len(o) else np.zeros(0, np.int64)
    run_start = np.repeat(first_pos, np.diff(np.append(first_pos, len(o))))
    m = np.zeros(len(k.keep), bool)
    m[o[(np.arange(len(o)) - run_start) >= cfg.max_pairs_per_prompt]] = True
    k.drop(m, "cap", dropped)


def _gather(candidates: pa.Table, c: _Candidates, k: _Kept, cfg: PairsConfig) -> pa.Table:
    """The kept pairs as a table: ids and numbers, and the texts as string views into the
    candidates' buffers (a gather of 16-byte views; the characters are never copied)."""
    kidx = np.flatnonzero(k.keep)
    ch, rj = k.chosen[kidx], k.rejected[kidx]
    prompt_id = c.pid.take(pa.array(ch))
    ch_id, rj_id = c.cid.take(pa.array(ch)), c.cid.take(pa.array(rj))
    prompt, response = (as_views(candidates.column(x)) for x in ("prompt", "response"))
    strategy = pa.array([cfg.strategy, "pairwise"]).take(pa.array(k.only_pairwise[kidx].astype(np.int8)))
    return pa.table({
        "pair_id": stable_id(prompt_id, ch_id, rj_id),
        "prompt_id": prompt_id,
        "prompt": take_views(prompt, c.rows[ch]),
        "chosen": take_views(response, c.rows[ch]),
        "rejected": take_views(response, c.rows[rj]),
        "chosen_id": ch_id,
        "rejected_id": rj_id,
        "chosen_score": pa.array(k.cs[kidx], pa.float64(), from_pandas=True),
        "rejected_score": pa.array(k.rs[kidx], pa.float64(), from_pandas=True),
        "margin": pa.array(k.margin[kidx], pa.float64(), from_pandas=True),
        "source": pa.array(SOURCE_NAMES).take(pa.array(k.decided_by[kidx] % len(SOURCE_NAMES))),
        "strategy": strategy,
    })


def _merge_imported(generated: pa.Table, imported: pa.Table | None, scores: pa.Table | None,
                    prompts: pa.Table | None, cfg: PairsConfig, dropped: dict[str, int]) -> tuple[pa.Table, int]:
    """Imported pairs pass through (source "imported") after the safety and duplicate rules."""
    if imported is None or not imported.num_rows:
        return generated, 0
    imp = imported.select([c for c in PAIRS.names if c in imported.column_names])
    n_imp = imp.num_rows
    imp = imp.set_column(imp.schema.get_field_index("pair_id"), "pair_id",
                         stable_id(imp.column("prompt_id"), imp.column("chosen_id"), imp.column("rejected_id")))
    imp = imp.set_column(imp.schema.get_field_index("source"), "source", pa.array(["imported"] * imp.num_rows))
    ikeep = np.ones(imp.num_rows, bool)
    if scores is not None and scores.num_rows:
        ui = lookup(imp.column("chosen_id"), scores.column("candidate_id"))
        take = pa.array(np.maximum(ui, 0))
        bad = np.zeros(imp.num_rows, bool)
        for flag in cfg.unsafe_flags:
            bad |= (ui >= 0) & _np(pc.take(scores.column(flag), take))
        dropped["unsafe_chosen"] = dropped.get("unsafe_chosen", 0) + int(bad.sum())
        ikeep &= ~bad
    dup = lookup(imp.column("pair_id"), generated.column("pair_id")) >= 0
    first = imp.append_column("__i", pa.array(np.arange(imp.num_rows))).group_by(
        "pair_id", use_threads=False).aggregate([("__i", "min")])
    not_first = np.ones(imp.num_rows, bool)
    not_first[np.asarray(first.column("__i_min"))] = False
    d = ikeep & (dup | not_first)
    if d.any():
        dropped["duplicate"] = dropped.get("duplicate", 0) + int(d.sum())
    ikeep &= ~d
    imp = _attach_prompt_info(imp.filter(pa.array(ikeep)), prompts)
    imp = _conform_pairs(imp)
    gen = _conform_pairs(generated)  # texts as views in both: a cast of the generated ones would copy them
    imp = pa.Table.from_arrays([col if col.type == f.type else as_views(col) if pa.types.is_string_view(f.type)
                                else col.cast(f.type) for col, f in zip(imp.columns, gen.schema, strict=True)],
                               schema=gen.schema)
    return pa.concat_tables([gen, imp]), n_imp


def build_pairs(candidates: pa.Table, config: PairsConfig | None = None, *, prompts: pa.Table | None = None,
                scores: pa.Table | None = None, signals: pa.Table | None = None,
                judgements: pa.Table | None = None, imported: pa.Table | None = None
                ) -> tuple[pa.Table, pa.Table | None, dict[str, Any]]:
    """Candidates + whatever signals exist -> (pairs table, quarantine or None, report).

    Steps: order the candidates, gather evidence, decide every within-prompt pair, select the
    strategy's pairs, apply the drop rules, cap, gather the texts, merge imported pairs.
    """
    cfg = config or PairsConfig()
    report: dict[str, Any] = {"policy": cfg.policy, "strategy": cfg.strategy}
    dropped: dict[str, int] = {}
    c = _order_candidates(candidates, dropped)
    report["prompts"] = len(c.starts)
    report["candidates"] = c.n
    dropped["single_candidate"] = int((c.sizes == 1).sum())  # counted in candidates (= prompts), not pairs
    ev, quarantine = _gather_evidence(c, cfg, scores, signals, judgements, report)
    possible = considered = 0
    kept = []
    for g0, g1 in _batches(c):  # whole prompts per batch: every decision and rule is within a prompt
        cb, eb, r0 = _batch(c, ev, g0, g1)
        d = _decide(cb, eb, cfg)
        sel, only_pairwise = _select_strategy(cb, d, eb, cfg)
        possible, considered = possible + len(d.a), considered + int(sel.sum())
        kept.append(_apply_rules(d, sel, only_pairwise, eb, cfg, dropped, report).kept_only(r0, g0))
        del d, sel, only_pairwise  # the per-pair arrays of every possible pair: one batch at a time
    report["pairs_possible"] = possible
    unsafe = int(ev.unsafe.sum())
    del ev
    k = _Kept.concat(kept)
    del kept
    _cap(k, cfg, dropped)
    generated = _attach_prompt_info(_gather(candidates, c, k, cfg), prompts)
    del k
    out, n_imported = _merge_imported(generated, imported, scores, prompts, cfg, dropped)
    out = _conform_pairs(out)
    report["considered"] = considered + n_imported
    report["kept"] = out.num_rows
    report["dropped"] = dropped
    report["sources"] = _counts(out.column("source"))
    report["strategies"] = _counts(out.column("strategy"))
    report["unsafe_candidates"] = unsafe
    return out, quarantine, report


def _counts(col: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    vc = pc.value_counts(col)
    return {str(v["values"]): int(v["counts"]) for v in vc.to_pylist()} if len(col) else {}


def _conform_pairs(t: pa.Table) -> pa.Table:
    """The PAIRS columns in contract order and types; string views stay views (the contract
    takes them for strings, and a cast would copy every text)."""
    cols, out_fields = [], []
    for f in PAIRS:
        if f.name in t.column_names:
            col = t.column(f.name)
            if not (pa.types.is_string(f.type) and pa.types.is_string_view(col.type)):
                col = pc.cast(col, f.type)
            cols.append(col)
            out_fields.append(pa.field(f.name, col.type, f.nullable))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
            out_fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(out_fields))


def _attach_prompt_info(t: pa.Table, prompts: pa.Table | None) -> pa.Table:
    """prompt_messages / category / language from `prompts`; language guessed when unknown."""
    n = t.num_rows
    msgs = pa.nulls(n, PAIRS.field("prompt_messages").type)
    cat = pa.nulls(n, pa.string())
    lang = pa.nulls(n, pa.string())
    if prompts is not None and prompts.num_rows and n:
        pi = lookup(t.column("prompt_id"), prompts.column("prompt_id"))
        has = pa.array(pi >= 0)
        take = pa.array(np.where(pi >= 0, pi, 0))
        null_of = {}
        for name, col in (("messages", "prompt_messages"), ("category", "category"), ("language", "language")):
            if name in prompts.column_names:
                v = pc.take(prompts.column(name), take)
                null_of[col] = pc.if_else(has, v, pa.nulls(n, v.type))
        msgs = null_of.get("prompt_messages", msgs)
        cat = null_of.get("category", cat)
        lang = null_of.get("language", lang)
    for name, col in (("prompt_messages", msgs), ("category", cat), ("language", lang)):
        if name in t.column_names:
            existing = t.column(name)
            col = pc.coalesce(existing, pc.cast(col, existing.type))
            t = t.set_column(t.schema.get_field_index(name), name, col)
        else:
            t = t.append_column(name, col)
    lang_col = t.column("language")
    if lang_col.null_count:
        prompt = t.column("prompt")
        first, inv = first_and_inverse(hash_strings(prompt))
        guessed = detect_language(take_text(prompt, first)).take(pa.array(inv))  # once per prompt
        t = t.set_column(t.schema.get_field_index("language"), "language", pc.coalesce(lang_col, guessed))
    return t


def pairs(ctx: StageContext) -> StageResult:
    """Stage function: read whichever inputs exist, build pairs, return the StageResult."""

    def opt(role: str) -> pa.Table | None:
        return ctx.read(role) if ctx.has(role) else None

    out, quarantine, report = build_pairs(
        ctx.read("candidates"), ctx.config, prompts=opt("prompts"), scores=opt("scores"), signals=opt("signals"),
        judgements=opt("judgements"), imported=opt("pairs_import"))
    report["inputs"] = sorted(ctx.inputs)
    if quarantine is not None:
        report["quarantined"] = _counts(quarantine.column("reason"))
    return StageResult(outputs={"pairs": out}, quarantine=quarantine, report=report,
                       metadata={"pairs": {"report": report}})
