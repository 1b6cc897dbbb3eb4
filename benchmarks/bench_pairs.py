"""Benchmark: pairs + balance against the Polars and DuckDB scripts a user would write.

Input (issue 16): N prompts x 4 scored candidates, English / Chinese texts of varied length
(Zipf words and characters, punctuation, paragraph breaks, full-width forms, ~400 bytes per
answer), written once to Parquet and read by every implementation. Steps:

1. all within-prompt pairs with margin >= 1.0 (ties dropped);
2. drop pairs whose chosen and rejected texts are equal;
3. drop exact (prompt, chosen, rejected) duplicates;
4. keep the 3 largest margins per prompt.

dpoflow runs `build_pairs` (all_pairs, min_margin 1.0, metrics source) + `balance_pairs`
(near-dup off, length band off, cap 3, no split), once with its own rules (NFKC + whitespace
identity, hash tie breaks) and once with the peers' rules (`identity: raw`,
`tie_break: lowest_id`), where its pair set must equal theirs. Every implementation runs in
its own process, rounds alternate the order; each reports wall, CPU seconds (all threads) and
peak RSS of the work (reading the input included, interpreter start and imports not).

    python benchmarks/bench_pairs.py                       # 250,000 prompts, 2 rounds
    python benchmarks/bench_pairs.py --prompts 750000 --rounds 1
    python benchmarks/bench_pairs.py --quick               # 5,000 prompts, also the pandas apply footnote
    python benchmarks/bench_pairs.py --before /tmp/old     # also the code of another commit, e.g. from
        mkdir -p /tmp/old/dpoflow && git archive <commit> tasks storage flows | tar -x -C /tmp/old/dpoflow
        && cp dpoflow/__init__.py /tmp/old/dpoflow/
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

K = 4
MIN_MARGIN = 1.0
CAP = 3
IMPLS = ("dpoflow", "dpoflow-peer-rules", "polars", "duckdb")  # + "dpoflow-before" with --before


# --- input ---------------------------------------------------------------------------------

def _vocab_en(rng: np.random.Generator, n: int = 3000) -> list[str]:
    syl = ["ta", "re", "in", "on", "er", "an", "st", "al", "ex", "pro", "com", "de", "ma", "ti", "ve", "lo", "ca",
           "se", "ar", "po", "li", "ne", "ge", "ra", "mo", "di", "co", "ple", "tion", "ment", "ing", "ed", "ly"]
    words = ["the", "a", "to", "of", "and", "is", "in", "it", "you", "that", "for", "with", "as", "this", "on",
             "be", "can", "are", "or", "by", "Python", "data", "model", "list", "function", "value", "example"]
    while len(words) < n:
        words.append("".join(rng.choice(syl, rng.integers(1, 4))))
    return words


def _texts(rng: np.random.Generator, lens: np.ndarray, zh: np.ndarray) -> pa.Array:
    """`len(lens)` texts of lens[i] tokens: English words with punctuation and paragraph breaks, or
    Chinese characters with full-width punctuation, a few full-width digits and English words.
    Built as one byte buffer (token table gather), so millions of texts take seconds."""
    en = _vocab_en(np.random.default_rng(1))
    zh_chars = [chr(c) for c in np.random.default_rng(2).choice(np.arange(0x4E00, 0x9FA5), 3000, replace=False)]
    en_tok = [w + s for w in en for s in (" ", ", ", ". ", ".\n\n")]
    zh_tok = zh_chars + ["，", "。", "？", "\n", " Python ", "２０２４", "、"]
    table = [t.encode() for t in en_tok + zh_tok]
    tlen = np.array([len(t) for t in table], np.int64)
    tcut = np.array([len(t) - len(t.rstrip()) for t in table], np.int64)  # separators cut at a text's end
    zipf_en = np.repeat(1.0 / np.arange(1, len(en) + 1) ** 1.05, 4) * np.tile([0.86, 0.07, 0.06, 0.01], len(en))
    zipf_zh = 1.0 / np.arange(1, len(zh_chars) + 1) ** 0.9
    p_zh = np.concatenate([zipf_zh / zipf_zh.sum() * 0.87, [0.06, 0.035, 0.004, 0.005, 0.003, 0.003, 0.02]])
    flat = np.frombuffer(b"".join(table), np.uint8)
    tstart = np.concatenate([[0], np.cumsum(tlen)[:-1]])
    offsets, chunks, pos = [np.zeros(1, np.int64)], [], 0
    for lo in range(0, len(lens), 200_000):  # bounded temporaries
        ln, z = lens[lo:lo + 200_000], zh[lo:lo + 200_000]
        owner_zh = np.repeat(z, ln)
        ids = np.where(owner_zh, len(en_tok) + rng.choice(len(zh_tok), len(owner_zh), p=p_zh),
                       rng.choice(len(en_tok), len(owner_zh), p=zipf_en / zipf_en.sum()))
        size = tlen[ids]
        last = np.cumsum(ln) - 1
        size[last] -= tcut[ids[last]]
        ends = np.cumsum(size)
        rel = np.arange(int(ends[-1])) - np.repeat(ends - size, size)
        chunks.append(flat[np.repeat(tstart[ids], size) + rel])
        offsets.append(pos + ends[last])
        pos += int(ends[-1])
    off = np.concatenate(offsets)
    return pa.LargeStringArray.from_buffers(len(lens), pa.py_buffer(off), pa.py_buffer(np.concatenate(chunks))
                                            ).cast(pa.string())


SHARD_PROMPTS = 250_000  # inputs above 4 shards are generated and written a shard at a time (bounded memory)


def make_inputs(n_prompts: int, folder: Path, seed: int = 0) -> None:
    """The input files; above 4 shards of SHARD_PROMPTS prompts (e.g. 2.5M prompts), shard by shard
    (each shuffled in itself, seeds seed + shard), appended to one file per table."""
    if n_prompts <= 4 * SHARD_PROMPTS:
        _make_inputs(n_prompts, folder, seed)
        return
    writers: dict[str, pq.ParquetWriter] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shard, lo in enumerate(range(0, n_prompts, SHARD_PROMPTS)):
            _make_inputs(min(SHARD_PROMPTS, n_prompts - lo), Path(tmp), seed + shard, first_prompt=lo)
            for name in ("candidates", "scores"):
                t = pq.read_table(Path(tmp) / f"{name}.parquet")
                if name not in writers:
                    folder.mkdir(parents=True, exist_ok=True)
                    writers[name] = pq.ParquetWriter(folder / f"{name}.parquet", t.schema)
                writers[name].write_table(t, row_group_size=128 * 1024)
    for w in writers.values():
        w.close()


def _make_inputs(n_prompts: int, folder: Path, seed: int = 0, first_prompt: int = 0) -> None:
    """candidates.parquet and scores.parquet, with the near-identities real data has: ~2% of answers
    copy a sibling (identical pair), ~0.5% copy it with other whitespace or full-width forms
    (identical only after normalisation), ~0.5% of prompts repeat an earlier prompt with its answers
    (duplicate pairs across prompt ids). Judge scores have one decimal (ties and equal margins)."""
    rng = np.random.default_rng(seed)
    n = n_prompts * K
    zh_p = rng.random(n_prompts) < 0.4
    prompts = _texts(rng, np.where(zh_p, rng.integers(10, 60, n_prompts), rng.integers(8, 40, n_prompts)), zh_p)
    zh = np.repeat(zh_p, K)
    resp = _texts(rng, np.maximum(1, rng.lognormal(np.where(zh, 4.7, 4.1), 0.7, n)).astype(np.int64), zh)
    resp_l = resp.to_pylist()
    copy_prompt = np.flatnonzero(rng.random(n_prompts) < 0.005)
    copy_prompt = copy_prompt[copy_prompt > 0]
    src_prompt = np.arange(n_prompts)
    src_prompt[copy_prompt] = copy_prompt - 1
    for c in np.flatnonzero(rng.random(n) < 0.025):
        if c % K:
            sib = resp_l[c - 1]
            resp_l[c] = sib if rng.random() < 0.8 else (sib.replace(" ", "  ", 1) + "\n" if rng.random() < 0.5
                                                        else sib.replace("2", "２").replace(",", "，") + " ")
    for p in copy_prompt:
        resp_l[p * K:(p + 1) * K] = resp_l[(p - 1) * K:p * K]
    resp_l = [r if r.strip() else "OK." for r in resp_l]  # no empty answers: the peers keep those
    pid = np.char.add("p", np.char.zfill((first_prompt + np.arange(n_prompts)).astype(str), 8))
    cid = np.char.add(np.repeat(pid, K), np.tile(["-c0", "-c1", "-c2", "-c3"], n_prompts))
    cand = pa.table({"candidate_id": pa.array(cid), "prompt_id": pa.array(np.repeat(pid, K)),
                     "prompt": prompts.take(pa.array(np.repeat(src_prompt, K))),
                     "response": pa.array(resp_l, pa.string()), "origin": pa.array(["sampled"] * n),
                     "model_version": pa.array(["m1"] * n), "dup_count": pa.array(np.ones(n, np.int32))})
    score = np.clip(np.round(rng.normal(5.5, 2.2, n), 1), 0.0, 10.0)
    f = pa.array(np.zeros(n, bool))
    sc = pa.table({"candidate_id": pa.array(cid), "prompt_id": pa.array(np.repeat(pid, K)), "auto_score": score,
                   "reward": pa.nulls(n, pa.float64()), "flag_safety": f, "flag_pii": f, "flag_repetition": f,
                   "flag_length": f, "flag_refusal": f, "flag_language": f, "flag_empty": f,
                   "flag_reasons": pa.array([[]] * n, pa.list_(pa.string()))})
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(n)  # rows as a store would hold them: not grouped by prompt
    pq.write_table(cand.take(pa.array(order)), folder / "candidates.parquet", row_group_size=128 * 1024)
    pq.write_table(sc.take(pa.array(rng.permutation(n))), folder / "scores.parquet", row_group_size=128 * 1024)


# --- implementations -----------------------------------------------------------------------

def read_by_row_group(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The file one row group at a time, on the calling thread (chunks of the table, no
    concatenation): the decoder's buffers stay row-group sized. `pq.read_table` peaks at ~2.3x
    the table (1.2 GB for 0.53 GB at 250k prompts) and its reader threads cost ~2 CPU s more on
    2 cores (4.3 vs 2.3 s; wall about the same)."""
    f = pq.ParquetFile(path)
    return pa.concat_tables([f.read_row_group(i, columns=columns, use_threads=False)
                             for i in range(f.num_row_groups)])


def run_dpoflow(folder: Path, peer_rules: bool) -> tuple[pa.Table, dict]:
    from dpoflow.tasks.balance import BalanceConfig, balance_pairs
    from dpoflow.tasks.pairs import PairsConfig, build_pairs

    cand = read_by_row_group(folder / "candidates.parquet", ["candidate_id", "prompt_id", "prompt", "response"])
    pcfg = PairsConfig(strategy="all_pairs", min_margin=MIN_MARGIN)
    sc = read_by_row_group(folder / "scores.parquet", ["candidate_id", pcfg.metric_column, pcfg.reward_column,
                                                       *pcfg.unsafe_flags])  # the columns the config uses
    rules = {"identity": "raw", "tie_break": "lowest_id"} if peer_rules else {}
    pairs, _, prep = build_pairs(cand, pcfg, scores=sc)
    del cand
    cfg = BalanceConfig(near_dup=False, length_control=False, max_pairs_per_prompt=CAP, eval_fraction=0.0,
                        plots=False, **rules)
    train, _, brep, _ = balance_pairs(pairs, cfg)
    return train, {"all_pairs": prep["kept"], "dropped": brep["dropped"]}


def run_polars(folder: Path) -> tuple[pa.Table, dict]:
    """The Polars script (lazy): self-join per prompt, filter, orient, dedup, top 3 per prompt."""
    import polars as pl

    cand = pl.scan_parquet(folder / "candidates.parquet").select("candidate_id", "prompt_id", "prompt", "response")
    scores = pl.scan_parquet(folder / "scores.parquet").select("candidate_id", "auto_score")
    c = cand.join(scores, on="candidate_id")
    a = c.select("prompt_id", "prompt", a_id="candidate_id", a_text="response", a_score="auto_score")
    b = c.select("prompt_id", b_id="candidate_id", b_text="response", b_score="auto_score")
    d = pl.col("a_score") - pl.col("b_score")
    a_wins = d > 0
    pairs = (
        a.join(b, on="prompt_id")
        .filter(pl.col("a_id") < pl.col("b_id"), d.abs() >= MIN_MARGIN)
        .select(
            "prompt_id", "prompt",
            chosen_id=pl.when(a_wins).then("a_id").otherwise("b_id"),
            rejected_id=pl.when(a_wins).then("b_id").otherwise("a_id"),
            chosen=pl.when(a_wins).then("a_text").otherwise("b_text"),
            rejected=pl.when(a_wins).then("b_text").otherwise("a_text"),
            margin=d.abs(),
        )
    )
    out = (
        pairs.filter(pl.col("chosen") != pl.col("rejected"))
        .sort("prompt_id", "chosen_id", "rejected_id")
        .unique(subset=["prompt", "chosen", "rejected"], keep="first", maintain_order=True)
        .sort(["prompt_id", "margin", "chosen_id", "rejected_id"], descending=[False, True, False, False])
        .group_by("prompt_id", maintain_order=True)
        .head(CAP)
        .collect()
    )
    return out.to_arrow(), {}


DUCKDB_SQL = f"""
WITH c AS (
  SELECT c.candidate_id, c.prompt_id, c.prompt, c.response, s.auto_score
  FROM read_parquet($cand) c JOIN read_parquet($scores) s USING (candidate_id)),
p AS (
  SELECT a.prompt_id, a.prompt,
         CASE WHEN a.auto_score > b.auto_score THEN a.candidate_id ELSE b.candidate_id END AS chosen_id,
         CASE WHEN a.auto_score > b.auto_score THEN b.candidate_id ELSE a.candidate_id END AS rejected_id,
         CASE WHEN a.auto_score > b.auto_score THEN a.response ELSE b.response END AS chosen,
         CASE WHEN a.auto_score > b.auto_score THEN b.response ELSE a.response END AS rejected,
         abs(a.auto_score - b.auto_score) AS margin
  FROM c a JOIN c b ON a.prompt_id = b.prompt_id AND a.candidate_id < b.candidate_id
  WHERE abs(a.auto_score - b.auto_score) >= {MIN_MARGIN}),
d AS (
  SELECT * FROM p WHERE chosen <> rejected
  QUALIFY row_number() OVER (PARTITION BY prompt, chosen, rejected
                             ORDER BY prompt_id, chosen_id, rejected_id) = 1)
SELECT * FROM d
QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY margin DESC, chosen_id, rejected_id) <= {CAP}
"""


def run_duckdb(folder: Path) -> tuple[pa.Table, dict]:
    """The DuckDB script: the same steps in SQL, two QUALIFY windows."""
    import duckdb

    con = duckdb.connect()
    rel = con.sql(DUCKDB_SQL, params={"cand": str(folder / "candidates.parquet"),
                                      "scores": str(folder / "scores.parquet")})
    return rel.to_arrow_table(), {}


def run_pandas_apply(folder: Path) -> tuple[pa.Table, dict]:
    """The slowest way (footnote only): groupby().apply() with per-row Python."""
    import pandas as pd

    df = pq.read_table(folder / "candidates.parquet", columns=["candidate_id", "prompt_id", "prompt", "response"]
                       ).to_pandas().merge(pq.read_table(folder / "scores.parquet", columns=[
                           "candidate_id", "auto_score"]).to_pandas(), on="candidate_id")

    def make(g: pd.DataFrame) -> pd.DataFrame:
        recs = g.sort_values("candidate_id").to_dict("records")
        rows = []
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                x, y = recs[i], recs[j]
                if abs(x["auto_score"] - y["auto_score"]) < MIN_MARGIN:
                    continue
                ch, rj = (x, y) if x["auto_score"] > y["auto_score"] else (y, x)
                if ch["response"] != rj["response"]:
                    rows.append({"prompt_id": ch["prompt_id"], "prompt": ch["prompt"], "chosen": ch["response"],
                                 "rejected": rj["response"], "chosen_id": ch["candidate_id"],
                                 "rejected_id": rj["candidate_id"], "margin": abs(x["auto_score"] - y["auto_score"])})
        return pd.DataFrame(rows)

    df["g"] = df["prompt_id"]
    p = df.groupby("g").apply(make).reset_index(drop=True)
    p = p.sort_values(["prompt_id", "chosen_id", "rejected_id"]).drop_duplicates(["prompt", "chosen", "rejected"])
    p = p.sort_values(["prompt_id", "margin", "chosen_id", "rejected_id"], ascending=[True, False, True, True])
    return pa.Table.from_pandas(p.groupby("prompt_id").head(CAP), preserve_index=False), {}


# --- harness -------------------------------------------------------------------------------

def child(impl: str, folder: Path, out: Path) -> None:
    runner = {"dpoflow": lambda: run_dpoflow(folder, False), "dpoflow-peer-rules": lambda: run_dpoflow(folder, True),
              "dpoflow-before": lambda: run_dpoflow(folder, False),
              "polars": lambda: run_polars(folder), "duckdb": lambda: run_duckdb(folder),
              "pandas-apply": lambda: run_pandas_apply(folder)}[impl]
    if impl.startswith("dpoflow"):
        import dpoflow.tasks.balance  # noqa: F401  imports are not part of the work
        import dpoflow.tasks.pairs  # noqa: F401
    elif impl == "polars":
        import polars  # noqa: F401
    elif impl == "duckdb":
        import duckdb  # noqa: F401
    pa.array([0])  # pyarrow imports pandas on its first array from Python objects (~0.7 CPU s): an import
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    table, info = runner()
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    info.update({"wall_s": w1 - w0, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                 "peak_rss_mib": r1.ru_maxrss / 1024, "rows": table.num_rows})
    pq.write_table(table.select(["prompt_id", "chosen_id", "rejected_id", "margin"]), out / f"{impl}.parquet")
    (out / f"{impl}.json").write_text(json.dumps(info))


def keyset(path: Path) -> set[tuple[str, str, str]]:
    t = pq.read_table(path)
    return set(zip(*(t.column(c).to_pylist() for c in ("prompt_id", "chosen_id", "rejected_id")), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=250_000)
    ap.add_argument("--quick", action="store_true", help="5,000 prompts, and the pandas apply footnote")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs every implementation once")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS) + ", pandas-apply")
    ap.add_argument("--data-dir", default=None, help="where the input Parquet files are cached")
    ap.add_argument("--before", default=None, help="a folder holding dpoflow/ of an earlier commit: run it too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = 5_000 if args.quick else args.prompts
    folder = Path(args.data_dir or Path(tempfile.gettempdir()) / "dpoflow-bench-pairs") / f"{n}"
    if args.child:
        child(args.child, folder, Path(args.out))
        return
    if not (folder / "scores.parquet").exists():
        t0 = time.perf_counter()
        make_inputs(n, folder)
        print(f"input written to {folder} in {time.perf_counter() - t0:.0f} s")
    impls = args.impls.split(",") + (["pandas-apply"] if args.quick and "pandas-apply" not in args.impls else [])
    impls += ["dpoflow-before"] if args.before else []
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate the order
                env = {**os.environ, "PYTHONPATH": args.before} if impl == "dpoflow-before" else None
                subprocess.run([sys.executable, __file__, "--child", impl, "--prompts", str(n), "--out", tmp,
                                "--data-dir", str(folder.parent)], check=True, env=env)
                runs[impl].append(json.loads(Path(f"{tmp}/{impl}.json").read_text()))
                print(f"round {r + 1} {impl}: {runs[impl][-1]['cpu_s']:.2f} CPU s, load {os.getloadavg()[0]:.1f}",
                      flush=True)
        sets = {i: keyset(Path(f"{tmp}/{i}.parquet")) for i in impls}
    rows = pq.read_metadata(folder / "candidates.parquet").num_rows
    print(f"\n{n:,} prompts x {K} candidates ({rows:,} rows); load average {os.getloadavg()}")
    base = "polars" if "polars" in runs else impls[0]
    base_cpu = min(x["cpu_s"] for x in runs[base])
    print("| implementation | wall s | CPU s | peak RSS GB | CPU / Polars | pairs kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    for impl in impls:
        rs = runs[impl]
        w = [x["wall_s"] for x in rs]
        c = [x["cpu_s"] for x in rs]
        m = [x["peak_rss_mib"] / 1024 for x in rs]
        print(f"| {impl} | {min(w):.1f}-{max(w):.1f} | {min(c):.2f}-{max(c):.2f} | {min(m):.2f}-{max(m):.2f} | "
              f"{min(c) / base_cpu:.2f}x | {rs[-1]['rows']:,} |")
    for impl in impls:
        if impl.startswith("dpoflow"):
            print(f"{impl}: all pairs {runs[impl][-1]['all_pairs']:,}; dropped {runs[impl][-1]['dropped']}")
    if "dpoflow" in sets and "dpoflow-before" in sets:
        print(f"dpoflow vs dpoflow-before: same pair set = {sets['dpoflow'] == sets['dpoflow-before']}")
    for impl in impls:
        if impl != base:
            only_a, only_b = sets[impl] - sets[base], sets[base] - sets[impl]
            print(f"{impl} vs {base}: same pair set = {not only_a and not only_b} "
                  f"({len(only_a)} only in {impl}, {len(only_b)} only in {base})")


if __name__ == "__main__":
    main()
