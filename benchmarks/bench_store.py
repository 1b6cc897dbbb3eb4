"""Store overhead: write / read a pairs table through the store vs plain pyarrow.parquet.

    python benchmarks/bench_store.py [--rows 1000000] [--repeat 3]

Each measurement runs in its own subprocess so its peak RSS is its own. The table has
realistic text lengths (prompt ~ 200 chars, chosen / rejected ~ 600 chars, mixed EN / ZH).
Same compression (snappy) on both sides. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def make_table(rows: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    words = np.array(["the", "model", "answer", "is", "clear", "and", "correct", "模型", "回答", "清楚", "正确", "data", "pair", "chosen", "rejected"])

    def texts(n: int, mean_words: int):
        # A pool of texts, sampled: realistic lengths without a Python loop per row.
        pool = [" ".join(rng.choice(words, size=max(1, int(rng.normal(mean_words, mean_words / 4)))))
                for _ in range(4096)]
        idx = rng.integers(0, len(pool), n)
        base = pa.array(pool).take(pa.array(idx))
        return pc.binary_join_element_wise(base, pa.array(np.char.mod("%d", np.arange(n))), " #")

    ids = pa.array(np.char.mod("p%08d", np.arange(rows)))
    return pa.table({
        "pair_id": ids, "prompt_id": ids, "prompt": texts(rows, 40), "chosen": texts(rows, 110),
        "rejected": texts(rows, 110), "chosen_id": ids, "rejected_id": ids,
        "chosen_score": rng.random(rows), "rejected_score": rng.random(rows), "margin": rng.random(rows),
        "source": pa.array(["metrics"] * rows), "strategy": pa.array(["all_pairs"] * rows),
    })


def child(mode: str, rows: int, path: str) -> None:
    import pyarrow.parquet as pq

    from dpoflow.storage.store import DatasetStore

    if mode.startswith("write"):
        table = make_table(rows)
        t0 = time.perf_counter()
        if mode == "write_store":
            DatasetStore(path).write("pairs", table)
        else:
            pq.write_table(table, os.path.join(path, "pairs.parquet"), compression="snappy")
        secs = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        if mode == "read_store":
            n = DatasetStore(path).read("pairs").num_rows
        else:
            n = pq.read_table(os.path.join(path, "pairs.parquet")).num_rows
        secs = time.perf_counter() - t0
        assert n == rows
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": secs, "peak_rss_mb": rss}))


def run(mode: str, rows: int, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(rows), "--path", path],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rows, args.path)
        return
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for side in ("store", "plain"):
            d = tempfile.mkdtemp(prefix=f"bench_{side}_")
            try:
                for op in ("write", "read"):
                    r = run(f"{op}_{side}", args.rows, d)
                    key = r["mode"]
                    if key not in best or r["seconds"] < best[key]["seconds"]:
                        best[key] = r
            finally:
                shutil.rmtree(d, ignore_errors=True)
    print(f"\n{args.rows:,} pair rows, best of {args.repeat}\n")
    print("| op | pyarrow.parquet s | store s | ratio | plain peak RSS MB | store peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for op in ("write", "read"):
        p, s = best[f"{op}_plain"], best[f"{op}_store"]
        print(f"| {op} | {p['seconds']:.2f} | {s['seconds']:.2f} | {s['seconds'] / p['seconds']:.2f}x | "
              f"{p['peak_rss_mb']:.0f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
