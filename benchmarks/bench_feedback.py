"""Benchmark: ingest + aggregate N behaviour events from Parquet (default 10,000,000).

Compares, in the same run and on the same files:
  dpoflow-stage  the full `ingest` stage (validate, dedup, abuse filters, votes, signals, and the
                 writes of feedback_events + signals to the Delta store), streamed in batches,
                 as `run_ingest` runs it (two worker threads, two writer threads)
  dpoflow-core   the same validation and per-event state, without the spool and the store writes
  pandas         a plain pandas script doing the same validation and aggregation in memory
Each runs in its own process; peak RSS is that process's ru_maxrss.

    python benchmarks/bench_feedback.py            # 10M events
    python benchmarks/bench_feedback.py --n 200000 # quick
    python benchmarks/bench_feedback.py --n 30000000 --modes dpoflow-stage --state-mb 256 --data-dir /tmp/ev30m
                                                   # bounded memory: the per-event state spills
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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TYPES = ["like", "dislike", "favourite", "copy", "share", "regenerate", "report", "dwell"]
T0 = 1_709_251_200_000_000  # 2024-03-01 in us


def generate(folder: Path, n: int, n_users: int, n_resp: int, seed: int = 0) -> None:
    """Parquet files of 1M-row chunks: ~0.5% duplicate ids, ~0.1% orphans, ~0.1% unknown types."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rid = pc.binary_join_element_wise("c-", pc.cast(pa.array(np.arange(n_resp)), pa.string()), "")
    pq.write_table(pa.table({"candidate_id": rid}), folder.parent / "candidates.parquet")
    chunk = 1_000_000
    for k, s in enumerate(range(0, n, chunk)):
        m = min(chunk, n - s)
        ids = np.arange(s, s + m)
        dup = rng.random(m) < 0.005
        ids[dup] = rng.integers(0, s + 1, dup.sum())
        users = rng.integers(0, n_users, m)
        users[rng.random(m) < 0.001] = n_users  # one bot over the daily cap
        resp = rng.integers(0, n_resp, m).astype(object)
        etype = np.array(TYPES, dtype=object)[rng.integers(0, len(TYPES), m)]
        etype[rng.random(m) < 0.001] = "upvote"
        r = pc.binary_join_element_wise("c-", pc.cast(pa.array(resp.astype(np.int64)), pa.string()), "")
        orphan = rng.random(m) < 0.001
        r = pc.if_else(pa.array(orphan), pa.scalar("missing"), r)
        t = pa.table({
            "event_id": pc.binary_join_element_wise("evt-", pc.cast(pa.array(ids), pa.string()), ""),
            "user_id": pc.binary_join_element_wise("u-", pc.cast(pa.array(users), pa.string()), ""),
            "response_id": r, "event_type": pa.array(etype, pa.string()),
            "value": pa.array(np.where(etype == "dwell", rng.exponential(20000, m), np.nan), pa.float64(),
                              from_pandas=True),
            "ts": pa.array(T0 + rng.integers(0, 30 * 86_400_000_000, m), pa.timestamp("us", tz="UTC")),
            "position": pa.array(rng.integers(0, 10, m), pa.int32()),
        })
        pq.write_table(t, folder / f"part-{k:04d}.parquet", row_group_size=chunk)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(data: Path, write: bool, state_mb: int | None = None) -> dict:
    from dpoflow.tasks import feedback as fb

    cand = pq.read_table(data.parent / "candidates.parquet").column("candidate_id")
    cfg = fb.IngestConfig(sources=[{"name": "bench", "path": str(data)}], half_life_days=7,
                          min_ts="2024-01-01T00:00:00Z",  # the events are dated March 2024: not stale
                          propensities={0: 1.0, 1: 0.7, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.25},
                          **({"state_memory_mb": state_mb} if state_mb else {}))
    if write:
        from dpoflow.flows.ingest import run_ingest
        from dpoflow.flows.workspace import Workspace

        ws = Workspace.open(Path(tempfile.mkdtemp(prefix="bench-ws-")))  # imports every stage's config (torch)
        n_c = len(cand)
        ws.store.write("candidates", pa.table({
            "candidate_id": cand, "prompt_id": cand, "prompt": cand, "response": cand,
            "origin": pa.array(["sampled"] * n_c), "model_version": pa.array(["m"] * n_c),
            "dup_count": pa.array(np.ones(n_c, np.int32))}))
    base = rss_mb()
    t, c0 = time.perf_counter(), time.process_time()
    if write:
        run = run_ingest(ws, config=cfg)
        rep = run.report
        n_signals = ws.store.info("signals").rows
    else:  # the core alone: validation + aggregation, no spool / store
        cands = pc.unique(cand)
        acc = fb.EventAccumulator(cfg, expected_rows=fb.expected_rows(cfg, {}))
        acc.preload(cands)
        rep = {"rows_in": 0, "accepted": 0}
        now = int(time.time() * 1e6)
        for rb in fb.iter_files(cfg.sources[0], {}, cfg.batch_rows, [], {}):  # the stage's own reader
            v = fb.validate(rb.table, cfg, now, rb.source, cands)
            rep["rows_in"] += rb.table.num_rows
            acc.merge(acc.prepare(v.typed, v.response_codes, ~v.bad), True)
        out = acc.finish()
        rep["accepted"] = int((out.status == 0).sum())
        rep["state"] = {"partitions": acc.by_id.k, "spilled_mb": round(acc.budget.spilled_bytes / 2**20, 1)}
        n_signals = out.signals.num_rows
    secs = time.perf_counter() - t
    if write:
        shutil.rmtree(ws.root, ignore_errors=True)  # ~0.3 GB of Delta files per 10M events
    return {"seconds": secs, "rows_in": rep["rows_in"], "accepted": rep["accepted"], "signals": n_signals,
            "rss_before_mb": base, "phases": rep.get("seconds"), "phases_cpu": rep.get("cpu_seconds"),
            "state": rep.get("state"), "cpu_s": time.process_time() - c0}


def run_pandas(data: Path) -> dict:
    """The same validation + aggregation as a straightforward in-memory pandas script."""
    import pandas as pd

    base = rss_mb()
    t, c0 = time.perf_counter(), time.process_time()
    cands = set(pd.read_parquet(data.parent / "candidates.parquet")["candidate_id"])
    df = pd.read_parquet(data)
    weights = {"like": 1.0, "dislike": -1.0, "favourite": 2.0, "copy": 0.5, "share": 1.5, "regenerate": -0.5,
               "report": -3.0, "dwell": 0.5}
    now = pd.Timestamp.now(tz="UTC")
    ok = df[["event_id", "user_id", "response_id", "event_type", "ts"]].notna().all(axis=1)
    ok &= df["event_type"].isin(list(weights)) & (df["ts"] <= now) & df["response_id"].isin(cands)
    ok &= ~((df["event_type"] == "dwell") & df["value"].isna())
    df = df[ok].drop_duplicates("event_id", keep="first")
    df["day"] = df["ts"].dt.floor("D")
    per_day = df.groupby(["user_id", "day"])["event_id"].transform("size")
    df = df[per_day <= 1000]
    df["group"] = df["event_type"].replace({"like": "likedislike", "dislike": "likedislike"})
    df = df.sort_values("ts", kind="stable").drop_duplicates(["user_id", "response_id", "group"], keep="last")
    s = df["event_type"].map(weights).astype(float)
    s = s.where(df["event_type"] != "dwell", s * (df["value"] / 30000).clip(0, 1))
    as_of = df["ts"].max()
    age = (as_of - df["ts"]).dt.total_seconds() / 86400
    d = np.exp2(-age / 7)
    props = pd.Series({0: 1.0, 1: 0.7, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.25})
    p = df["position"].clip(upper=5).map(props).fillna(1.0).clip(lower=0.05)
    e = s * d / p
    df = df.assign(P=e.clip(lower=0), N=(-e).clip(lower=0))
    g = df.groupby("response_id").agg(P=("P", "sum"), N=("N", "sum"), n_users=("user_id", "nunique"),
                                      n_events=("event_id", "size"))
    n = g["P"] + g["N"]
    p_ = g["P"] / n
    z = 1.96
    g["wilson_lower"] = (p_ + z * z / (2 * n) - z * np.sqrt(p_ * (1 - p_) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    g["behaviour_score"] = (g["P"] - g["N"]) / (n + 2)
    secs = time.perf_counter() - t
    return {"seconds": secs, "rows_in": int(ok.size), "accepted": int(len(df)), "signals": int(len(g)),
            "rss_before_mb": base, "cpu_s": time.process_time() - c0}


def child(mode: str, data: Path, state_mb: int | None) -> None:
    out = run_pandas(data) if mode == "pandas" else run_ours(data, write=(mode == "dpoflow-stage"), state_mb=state_mb)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000, help="events (default 10M)")
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--responses", type=int, default=200_000)
    ap.add_argument("--modes", default="dpoflow-stage,dpoflow-core,pandas")
    ap.add_argument("--state-mb", type=int, help="ingest.state_memory_mb for our modes (default: the config's)")
    ap.add_argument("--data-dir", help="keep the generated events here and reuse them on the next run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.data), args.state_mb)
        return
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    data = tmp / "events"
    stamp = tmp / "generated.json"
    spec = {"n": args.n, "users": args.users, "responses": args.responses}
    if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        generate(data, args.n, args.users, args.responses)
        stamp.write_text(json.dumps(spec))
        print(f"generated {args.n:,} events in {time.perf_counter() - t:.1f}s")
    print(f"{args.n:,} events, {sum(f.stat().st_size for f in data.iterdir()) / 1e6:.0f} MB Parquet")
    rows = []
    for mode in args.modes.split(","):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", mode, "--data", str(data)]
        p = subprocess.run(cmd + (["--state-mb", str(args.state_mb)] if args.state_mb else []), capture_output=True,
                           text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-2000:], p.stderr[-4000:])
            continue
        r = json.loads(line[7:])
        r["mode"] = mode
        r["load"] = (load0, os.getloadavg()[0])
        r["events_per_s"] = r["rows_in"] / r["seconds"]
        rows.append(r)
    if not args.data_dir:
        shutil.rmtree(tmp, ignore_errors=True)
    base = next((r for r in rows if r["mode"] == "pandas"), None)
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| mode | events | accepted | signals | seconds | events/s | peak RSS (MB) | RSS before (MB) | speed-up vs pandas |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"{base['seconds'] / r['seconds']:.1f}x" if base else "-"
        print(f"| {r['mode']} | {r['rows_in']:,} | {r['accepted']:,} | {r['signals']:,} | {r['seconds']:.1f} | "
              f"{r['events_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['rss_before_mb']:,.0f} | {sp} |")
    print()
    for r in rows:  # CPU seconds (all threads) and the 1-minute load average before / after each mode
        extra = f", phases (s) {r['phases']}" if r.get("phases") else ""
        extra += f", state {r['state']}" if r.get("state") else ""
        print(f"{r['mode']}: CPU {r.get('cpu_s', float('nan')):.1f} s, load {r['load'][0]:.1f} -> {r['load'][1]:.1f}{extra}")


if __name__ == "__main__":
    main()
