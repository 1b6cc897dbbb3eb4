"""Benchmark: N prompts x 4 scored candidates -> pairs (all_pairs, min margin) -> balanced and split.

Compares the vectorised stage code (tasks.pairs.build_pairs + tasks.balance.balance_pairs) with
a plain pandas ``groupby().apply()`` implementation of the same steps, each in its own
subprocess (so peak RSS is per implementation), and checks that both give identical pair
sets and identical train / eval splits.

    python benchmarks/bench_pairs.py              # 250,000 prompts (the reported run)
    python benchmarks/bench_pairs.py --prompts 5000 --quick-check

Steps compared: pair generation (metrics source, safe beats unsafe, ties and min margin
dropped, stable pair ids), then empty / identical drops, exact de-duplication, the
chosen-longer band by hash subsampling, and the prompt-grouped split. Near-duplicate
clustering has no pandas twin here; its own time is measured separately (``--near-dup``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 4
MIN_MARGIN = 0.05
EVAL_FRACTION = 0.05
EN = ["the", "a", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "please", "explain", "binary", "search", "python", "list", "tuple", "sort", "data", "model"]
ZH = list("今天天气很好我们去公园散步吧请用简单的话解释二分查找是如何工作的机器学习模型从数据中规律")


def make_data(n_prompts: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Candidates and scores (auto_score with ties, ~1% unsafe), English and Chinese."""
    rng = np.random.default_rng(seed)
    n = n_prompts * K
    en_words = np.array(EN, dtype=object)
    zh_chars = np.array(ZH, dtype=object)
    pid = np.array([f"p{i:07d}" for i in range(n_prompts)], dtype=object)
    is_zh = rng.random(n_prompts) < 0.4
    ptxt = np.where(is_zh, ["".join(rng.choice(zh_chars, 10)) for _ in range(n_prompts)],
                    [" ".join(rng.choice(en_words, 8)) for _ in range(n_prompts)])
    ptxt = np.array([f"{t} {i}" for i, t in enumerate(ptxt)], dtype=object)
    lens = rng.integers(0, 25, n)
    cz = np.repeat(is_zh, K)
    resp = np.array([("".join(rng.choice(zh_chars, m)) if z else " ".join(rng.choice(en_words, m)))
                     for m, z in zip(lens, cz, strict=True)], dtype=object)
    cid = np.array([f"{p}-c{k}" for p in pid for k in range(K)], dtype=object)
    cand = pa.table({"candidate_id": cid, "prompt_id": np.repeat(pid, K), "prompt": np.repeat(ptxt, K),
                     "response": resp, "origin": ["sampled"] * n, "model_version": ["m1"] * n,
                     "dup_count": pa.array(np.ones(n, np.int32))})
    score = np.round(rng.random(n), 2)
    unsafe = rng.random(n) < 0.01
    f = pa.array(np.zeros(n, bool))
    sc = pa.table({"candidate_id": cid, "prompt_id": np.repeat(pid, K), "auto_score": score,
                   "reward": pa.nulls(n, pa.float64()), "flag_safety": unsafe, "flag_pii": f,
                   "flag_repetition": f, "flag_length": f, "flag_refusal": f, "flag_language": f, "flag_empty": f,
                   "flag_reasons": pa.array([[]] * n, pa.list_(pa.string()))})
    return cand, sc


def run_vectorised(cand: pa.Table, sc: pa.Table, near_dup: bool) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    from dpoflow.tasks.balance import BalanceConfig, balance_pairs
    from dpoflow.tasks.pairs import PairsConfig, build_pairs

    t0 = time.perf_counter()
    pairs, _, rep = build_pairs(cand, PairsConfig(strategy="all_pairs", min_margin=MIN_MARGIN), scores=sc)
    t1 = time.perf_counter()
    cfg = BalanceConfig(near_dup=near_dup, eval_fraction=EVAL_FRACTION, plots=False)
    train, evals, brep, _ = balance_pairs(pairs, cfg)
    t2 = time.perf_counter()
    return pairs, train, evals, {"pairs_s": t1 - t0, "balance_s": t2 - t1, "report": brep}


def run_pandas(cand: pa.Table, sc: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """The same steps written the plain pandas way: groupby().apply() and per-row helpers."""
    import hashlib
    import re
    import unicodedata

    import pandas as pd

    from dpoflow.tasks.text import unit_interval

    t0 = time.perf_counter()
    df = cand.to_pandas().merge(sc.select(["candidate_id", "auto_score", "flag_safety", "flag_pii"]).to_pandas(),
                                on="candidate_id", how="left")
    df["unsafe"] = df["flag_safety"].fillna(False) | df["flag_pii"].fillna(False)

    def pair_id(p: str, c: str, r: str) -> str:
        return hashlib.blake2b("\x1f".join((p, c, r)).encode(), digest_size=16).hexdigest()[:16]

    def make_pairs(g: pd.DataFrame) -> pd.DataFrame:
        g = g.sort_values("candidate_id")
        prompt_id = g["prompt_id"].iloc[0]
        rows = []
        recs = g.to_dict("records")
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                a, b = recs[i], recs[j]
                if a["unsafe"] != b["unsafe"]:
                    ch, rj = (b, a) if a["unsafe"] else (a, b)
                    cs, rs, m, src = 1.0, 0.0, 1.0, "metrics"
                else:
                    d = a["auto_score"] - b["auto_score"]
                    if abs(d) <= 1e-9:
                        continue  # tie
                    ch, rj = (a, b) if d > 0 else (b, a)
                    if ch["unsafe"]:
                        continue
                    cs, rs, m, src = ch["auto_score"], rj["auto_score"], abs(d), "metrics"
                if m < MIN_MARGIN:
                    continue
                rows.append({"pair_id": pair_id(prompt_id, ch["candidate_id"], rj["candidate_id"]),
                             "prompt_id": prompt_id, "prompt": ch["prompt"], "chosen": ch["response"],
                             "rejected": rj["response"], "chosen_id": ch["candidate_id"],
                             "rejected_id": rj["candidate_id"], "chosen_score": cs, "rejected_score": rs,
                             "margin": m, "source": src, "strategy": "all_pairs"})
        return pd.DataFrame(rows)

    df["group"] = df["prompt_id"]  # pandas 3 leaves the grouping column out of each group
    pairs = df.groupby("group", sort=True).apply(make_pairs).reset_index(drop=True)
    t1 = time.perf_counter()

    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", s or "")).strip()

    cjk = re.compile(r"[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF\uF900-\uFAFF]")
    word = re.compile(r"[^\W_]+")

    def ulen(s: str) -> int:
        s = unicodedata.normalize("NFKC", s or "")
        return len(cjk.findall(s)) + len(word.findall(cjk.sub(" ", s)))

    p = pairs
    p["nc"], p["nr"], p["np"] = p["chosen"].map(norm), p["rejected"].map(norm), p["prompt"].map(norm)
    p = p[(p["nc"] != "") & (p["nr"] != "")]
    p = p[p["nc"] != p["nr"]]
    p = p.sort_values("pair_id").drop_duplicates(["np", "nc", "nr"], keep="first")
    p = p.sort_values(["prompt_id", "chosen_id", "rejected_id"]).reset_index(drop=True)
    longer = p["chosen"].map(ulen) > p["rejected"].map(ulen)
    share = longer.mean()
    lo, hi = 0.45, 0.55
    n = len(p)
    u = pd.Series(unit_interval(pa.array(p["pair_id"].tolist()), salt="length:0:"), index=p.index)
    drop = pd.Series(False, index=p.index)
    nl, nn = int(longer.sum()), int((~longer).sum())
    n_drop, pool = 0, None
    if share > hi:
        n_drop, pool = nl - int(np.floor(hi * nn / (1 - hi))), longer
    elif share < lo:
        n_drop, pool = nn - int(np.floor(nl * (1 - lo) / lo)), ~longer
    n_drop = min(max(n_drop, 0), int(np.floor(0.5 * n)))
    if pool is not None and n_drop:
        drop[u[pool].sort_values(kind="stable").index[:n_drop]] = True
    p = p[~drop]
    side = p.groupby("prompt_id")["prompt_id"].apply(
        lambda s: unit_interval(pa.array([s.name]), salt="dpoflow-split-v1:")[0] < EVAL_FRACTION)
    is_eval = p["prompt_id"].map(side)
    cols = ["pair_id", "prompt_id", "chosen_id", "rejected_id"]
    train, evals = p[~is_eval][cols], p[is_eval][cols]
    t2 = time.perf_counter()
    return (pa.Table.from_pandas(pairs[cols], preserve_index=False), pa.Table.from_pandas(train, preserve_index=False),
            pa.Table.from_pandas(evals, preserve_index=False), {"pairs_s": t1 - t0, "balance_s": t2 - t1})


def child(impl: str, n_prompts: int, out: str, near_dup: bool) -> None:
    cand, sc = make_data(n_prompts)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "vectorised":
        pairs, train, evals, info = run_vectorised(cand, sc, near_dup)
        info.pop("report")
    else:
        pairs, train, evals, info = run_pandas(cand, sc)
    cols = ["pair_id", "prompt_id", "chosen_id", "rejected_id"]
    for name, t in (("pairs", pairs), ("train", train), ("evals", evals)):
        pq.write_table(t.select(cols), f"{out}/{impl}-{name}.parquet")
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["data_rss_mib"] = base_rss / 1024
    info["pairs"], info["train"], info["eval"] = pairs.num_rows, train.num_rows, evals.num_rows
    Path(f"{out}/{impl}.json").write_text(json.dumps(info))


def keyset(path: str) -> set[tuple[str, str, str, str]]:
    t = pq.read_table(path)
    return set(zip(*(t.column(c).to_pylist() for c in ("pair_id", "prompt_id", "chosen_id", "rejected_id")),
                   strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=250_000)
    ap.add_argument("--quick", action="store_true", help="5,000 prompts")
    ap.add_argument("--near-dup", action="store_true", help="also time near-duplicate clustering (vectorised only)")
    ap.add_argument("--child", choices=["vectorised", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = 5_000 if args.quick else args.prompts
    if args.child:
        child(args.child, n, args.out, args.near_dup)
        return
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("vectorised", "pandas"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", impl, "--prompts", str(n), "--out", tmp],
                           check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            res[impl] = json.loads(Path(f"{tmp}/{impl}.json").read_text())
            res[impl]["wall_s"] = time.perf_counter() - t0
        same = {name: keyset(f"{tmp}/vectorised-{name}.parquet") == keyset(f"{tmp}/pandas-{name}.parquet")
                for name in ("pairs", "train", "evals")}
        nd = None
        if args.near_dup:
            subprocess.run([sys.executable, __file__, "--child", "vectorised", "--prompts", str(n), "--out", tmp,
                            "--near-dup"], check=True)
            nd = json.loads(Path(f"{tmp}/vectorised.json").read_text())
    v, p = res["vectorised"], res["pandas"]
    print(f"{n:,} prompts x {K} candidates -> {v['pairs']:,} pairs -> {v['train']:,} train / {v['eval']:,} eval")
    print(f"identical pair sets: pairs={same['pairs']} train={same['train']} eval={same['evals']}")
    print("| implementation | pairs (s) | balance+split (s) | total (s) | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("vectorised (pyarrow/numpy)", v), ("pandas groupby().apply()", p)):
        print(f"| {name} | {r['pairs_s']:.2f} | {r['balance_s']:.2f} | {r['pairs_s'] + r['balance_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")
    sp = (p["pairs_s"] + p["balance_s"]) / (v["pairs_s"] + v["balance_s"])
    print(f"speed-up: {sp:.1f}x (pairs step {p['pairs_s'] / v['pairs_s']:.1f}x, "
          f"balance step {p['balance_s'] / v['balance_s']:.1f}x)")
    if nd:
        print(f"with near-duplicate clustering (MinHash 64 perms, 16 bands): balance+split {nd['balance_s']:.2f}s, "
              f"peak RSS {nd['peak_rss_mib']:.0f} MiB")
    if not all(same.values()):
        sys.exit("pair sets differ")


if __name__ == "__main__":
    main()
