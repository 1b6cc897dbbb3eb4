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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.flows.config import Section
from dpoflow.storage.schemas import DPO_SPLIT, PAIRS, conform
from dpoflow.tasks.text import normalize, stable_hash64, unit_interval, unit_length, units

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


def _codes(*cols: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """Codes of the concatenated columns' texts: (raw code per row, normalised code per raw
    code, raw codes whose text is empty after normalisation). Normalisation runs once per
    distinct text. Also returns the distinct raw texts."""
    chunks = [c for col in cols for c in col.chunks]
    allc = pa.chunked_array(chunks, type=pa.string()) if chunks else pa.chunked_array([], pa.string())
    enc = pc.dictionary_encode(pc.fill_null(allc, "")).combine_chunks()
    raw = np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)
    uniq = enc.dictionary
    normed = normalize(uniq)
    norm = np.asarray(pc.dictionary_encode(normed).indices.to_numpy(zero_copy_only=False), np.int64)
    empty = np.flatnonzero(np.asarray(pc.equal(normed, "").to_numpy(zero_copy_only=False), bool)) \
        if len(uniq) else np.zeros(0, np.int64)
    return raw, norm, empty, uniq


def _stats(t: pa.Table, lc: np.ndarray, lr: np.ndarray) -> dict[str, Any]:
    """Distribution summary for the report (before / after)."""
    n = t.num_rows
    margin = np.asarray(pc.fill_null(t.column("margin"), np.nan).to_numpy(), dtype=float) if n else np.zeros(0)
    mg = margin[~np.isnan(margin)]
    q = np.quantile(mg, [0.1, 0.5, 0.9]).round(4).tolist() if len(mg) else [None] * 3

    def counts(c: str) -> dict[str, int]:
        vc = pc.value_counts(pc.fill_null(t.column(c), "unknown")) if n else []
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


def balance_pairs(pairs: pa.Table, config: BalanceConfig | None = None, tokenizer: Any = None
                  ) -> tuple[pa.Table, pa.Table, dict[str, Any], dict[str, np.ndarray]]:
    """Pairs -> (dpo_train, dpo_eval, report, arrays for plots). No I/O."""
    cfg = config or BalanceConfig()
    t = conform("pairs", pairs)
    n_in = t.num_rows
    dropped: dict[str, int] = {}
    funnel: list[dict[str, Any]] = []
    report: dict[str, Any] = {"input_pairs": n_in}

    def step(name: str, mask_drop: np.ndarray, reason: str | None = None) -> None:
        nonlocal t, lc, lr, extra
        nd = int(mask_drop.sum())
        funnel.append({"step": name, "in": t.num_rows, "dropped": nd, "out": t.num_rows - nd})
        dropped[reason or name] = dropped.get(reason or name, 0) + nd
        if nd:
            keep = ~mask_drop
            t = t.filter(pa.array(keep))
            lc, lr = lc[keep], lr[keep]
            extra = {k: v[keep] for k, v in extra.items()}

    # Responses repeat across pairs (a candidate is in up to K-1 pairs): normalise and measure
    # each distinct text once, then work on integer codes.
    resp_raw, resp_norm, resp_empty, resp_uniq = _codes(t.column("chosen"), t.column("rejected"))
    ulen = unit_length(resp_uniq)
    n = t.num_rows
    lc, lr = ulen[resp_raw[:n]], ulen[resp_raw[n:]]
    extra: dict[str, np.ndarray] = {"nc": resp_norm[resp_raw[:n]], "nr": resp_norm[resp_raw[n:]]}
    before = _stats(t, lc, lr)
    plot_data = {"margin_before": np.asarray(pc.fill_null(t.column("margin"), np.nan).to_numpy(), float),
                 "lendiff_before": (lc - lr).astype(float)}

    # 1. empty / identical sides (after NFKC + whitespace normalisation)
    empty_code = resp_norm[resp_empty]
    step("empty", np.isin(extra["nc"], empty_code) | np.isin(extra["nr"], empty_code))
    step("identical", extra["nc"] == extra["nr"])

    # 2. exact duplicates of (prompt, chosen, rejected): keep the smallest pair_id.
    if t.num_rows:
        p_raw, p_norm, _, _ = _codes(t.column("prompt"))
        pcode = p_norm[p_raw]
        pid_rank = np.empty(t.num_rows, np.int64)
        pid_rank[np.asarray(pc.sort_indices(t.column("pair_id")))] = np.arange(t.num_rows)
        order = np.lexsort((pid_rank, extra["nr"], extra["nc"], pcode))
        k1, k2, k3 = pcode[order], extra["nc"][order], extra["nr"][order]
        same_as_prev = np.concatenate([[False], (k1[1:] == k1[:-1]) & (k2[1:] == k2[:-1]) & (k3[1:] == k3[:-1])])
        dup = np.zeros(t.num_rows, bool)
        dup[order[same_as_prev]] = True
    else:
        dup = np.zeros(0, bool)
    step("duplicate", dup)

    # 3. token budget
    if tokenizer is not None and cfg.max_tokens is not None and t.num_rows:
        ntok = _token_counts(tokenizer, t)
        over = ntok > cfg.max_tokens
        report["tokens_max_before"] = int(ntok.max())
        step("token_budget", over, "over_token_budget")
    elif cfg.max_tokens is not None:
        report["token_budget"] = "skipped: no tokenizer configured"

    # 4. near-duplicate clusters and caps
    pid_codes = _dense(t.column("prompt_id"))
    group_id = t.column("prompt_id").combine_chunks() if t.num_rows else pa.array([], pa.string())
    cluster_of = pid_codes
    if cfg.near_dup and t.num_rows:
        uniq_first = np.unique(pid_codes, return_index=True)[1]
        ptexts = normalize(t.column("prompt").take(pa.array(uniq_first)))
        lab = cluster_prompts(ptexts, cfg)  # per unique prompt code
        codes_sorted = pid_codes[uniq_first]
        comp_of_code = np.empty(pid_codes.max() + 1, np.int64)
        comp_of_code[codes_sorted] = lab
        # representative: the member prompt whose id hash is smallest (stable as unrelated rows come and go)
        up_ids = t.column("prompt_id").take(pa.array(uniq_first))
        hv = stable_hash64(up_ids, salt="cluster-rep:")
        best = np.full(len(lab), np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(best, lab, hv)
        rep_idx = np.empty(len(lab), np.int64)
        is_rep = hv == best[lab]
        rep_idx[lab[is_rep]] = np.flatnonzero(is_rep)
        rep_of_code = np.empty(pid_codes.max() + 1, np.int64)
        rep_of_code[codes_sorted] = rep_idx[lab]
        cluster_of = comp_of_code[pid_codes]
        sizes = np.bincount(lab)
        report["near_dup_clusters"] = int((sizes > 1).sum())
        report["near_dup_prompts"] = int(sizes[sizes > 1].sum())
        report["largest_cluster"] = int(sizes.max()) if len(sizes) else 0
        if cfg.split_by_cluster:
            group_id = up_ids.take(pa.array(rep_of_code[pid_codes]))
    extra = {"cluster": cluster_of, "pcode": pid_codes, "gidx": np.arange(t.num_rows)}

    def prio_keys() -> list[np.ndarray]:
        m = np.asarray(pc.fill_null(t.column("margin"), -np.inf).to_numpy(), float)
        return [unit_interval(t.column("pair_id"), salt=f"cap:{cfg.seed}:"), -m]

    if cfg.max_pairs_per_cluster is not None and t.num_rows:
        r = _rank_within(extra["cluster"], prio_keys())
        step("cluster_cap", r >= cfg.max_pairs_per_cluster)
    if cfg.max_pairs_per_prompt is not None and t.num_rows:
        r = _rank_within(extra["pcode"], prio_keys())
        step("prompt_cap", r >= cfg.max_pairs_per_prompt)

    # 5. mixes
    for dim, shares in cfg.mix.items():
        if not t.num_rows:
            break
        vals = pc.fill_null(t.column(dim), "unknown").combine_chunks()
        enc = pc.dictionary_encode(vals)
        names = enc.dictionary.to_pylist()
        codes = np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)
        # values not listed share the '*' target as one bucket
        names = [v if v in shares and v != "*" else "*" for v in names]
        bucket_names = sorted(set(names))
        codes = np.array([bucket_names.index(v) for v in names], np.int64)[codes]
        names = bucket_names
        counts = np.bincount(codes, minlength=len(names))
        target = np.array([shares.get(v, 0.0) for v in names], float)
        present = (counts > 0) & (target > 0)
        if present.any():
            tt = target / target[present].sum()
            total = np.min(counts[present] / tt[present])
            quota = np.where(present, np.floor(total * tt + 1e-9), 0).astype(np.int64)
        else:
            quota = np.zeros(len(names), np.int64)
        r = _rank_within(codes, [unit_interval(t.column("pair_id"), salt=f"mix:{dim}:{cfg.seed}:")])
        step(f"mix:{dim}", r >= quota[codes])

    # 6. length-bias band
    share_before = float((lc > lr).mean()) if t.num_rows else None
    lo = max(0.0, cfg.length_target - cfg.length_tolerance)
    hi = min(1.0, cfg.length_target + cfg.length_tolerance)
    if cfg.length_control and t.num_rows:
        longer = lc > lr
        nl, nn = int(longer.sum()), int((~longer).sum())
        budget = int(np.floor(cfg.length_max_drop * t.num_rows))
        drop_from, n_drop = None, 0
        if nl / t.num_rows > hi and hi < 1.0:
            drop_from, n_drop = longer, nl - int(np.floor(hi * nn / (1 - hi)))
        elif nl / t.num_rows < lo:
            drop_from, n_drop = ~longer, nn - int(np.floor(nl * (1 - lo) / lo))
        n_drop = min(max(n_drop, 0), budget)
        mask = np.zeros(t.num_rows, bool)
        if drop_from is not None and n_drop:
            u = unit_interval(t.column("pair_id"), salt=f"length:{cfg.seed}:")
            cand = np.flatnonzero(drop_from)
            mask[cand[np.argsort(u[cand], kind="stable")[:n_drop]]] = True
        step("length_bias", mask)
    share_after = float((lc > lr).mean()) if t.num_rows else None
    report["length_bias"] = {"chosen_longer_before": share_before, "chosen_longer_after": share_after,
                             "band": [lo, hi],
                             "band_met": share_after is not None and lo - 1e-12 <= share_after <= hi + 1e-12}

    # 7. split by group hash (group ids were fixed at clustering time; rows carry an index into them)
    gid = group_id.take(pa.array(extra["gidx"])) if t.num_rows else pa.array([], pa.string())
    u = unit_interval(gid, salt=cfg.split_salt + ":") if t.num_rows else np.zeros(0)
    is_eval = u < cfg.eval_fraction
    t = t.append_column("group_id", gid)
    train = conform("dpo_train", t.filter(pa.array(~is_eval)), DPO_SPLIT)
    evals = conform("dpo_eval", t.filter(pa.array(is_eval)), DPO_SPLIT)
    after = _stats(t, lc, lr)
    plot_data.update({"margin_after": np.asarray(pc.fill_null(t.column("margin"), np.nan).to_numpy(), float)
                      if t.num_rows else np.zeros(0), "lendiff_after": (lc - lr).astype(float)})
    report.update({"dropped": dropped, "funnel": funnel, "kept": t.num_rows, "train": train.num_rows,
                   "eval": evals.num_rows, "train_groups": int(pc.count_distinct(train.column("group_id")).as_py()),
                   "eval_groups": int(pc.count_distinct(evals.column("group_id")).as_py()),
                   "before": before, "after": after})
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


def load_tokenizer(name: str, workspace: Any = None) -> Any:
    """A tokenizer from a folder or the model registry (``models@production``); never the hub."""
    from transformers import AutoTokenizer

    path: str | Path = name
    if name.startswith("models@"):
        if workspace is None:
            raise ValueError(f"tokenizer {name!r} needs a workspace registry")
        path = workspace.registry.local_path(name)
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


def balance(ctx: Any) -> Any:
    """Stage function: balance `pairs` into dpo_train / dpo_eval, with plots and a data card."""
    from dpoflow.flows.stage import StageResult

    cfg: BalanceConfig = ctx.config
    tokenizer = None
    if cfg.tokenizer and cfg.max_tokens is not None:
        tokenizer = load_tokenizer(cfg.tokenizer, ctx.workspace)
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
