"""The pieces the fast ingest path is built from: exactly-once by sort, partitions that spill
over a memory budget, hash-keyed dictionary codes, candidate-indexed response codes, and
staged Parquet files in the store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dpoflow.storage.store import DatasetStore, StagedFiles, StoreError
from dpoflow.tasks import feedback as fb
from dpoflow.tasks import kernels
from dpoflow.tasks.feedback import sources, validation
from dpoflow.tasks.partitions import Budget, Partitions


def test_repeats_flags_every_later_occurrence_in_arrival_order():
    h = np.array([5, 3, 5, 7, 3, 5, 0], np.uint64)
    assert kernels.repeats(h).tolist() == [False, False, True, False, True, True, False]
    rng = np.random.default_rng(3)
    big = rng.integers(0, 5000, 20_000).astype(np.uint64)
    seen: set[int] = set()
    want = []
    for x in big.tolist():
        want.append(x in seen)
        seen.add(x)
    assert kernels.repeats(big).tolist() == want


def test_partitions_spill_over_budget_and_read_back_in_arrival_order(tmp_path):
    rng = np.random.default_rng(4)
    budget = Budget(64 << 10, tmp_path)  # 64 KiB: most chunks spill
    parts = Partitions(4, {"h": np.uint64, "x": np.int64, "f": np.bool_}, budget)
    chunks = []
    for i in range(30):
        h = rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64, endpoint=True)
        cols = {"h": h, "x": np.arange(i * 1000, (i + 1) * 1000), "f": h % np.uint64(2) == 0}
        for p, piece in parts.split(h, cols):
            parts.append(p, piece)
        chunks.append(cols)
    assert budget.spilled_bytes > 0 and any(parts.files) and budget.used <= 64 << 10
    allh = np.concatenate([c["h"] for c in chunks])
    allx = np.concatenate([c["x"] for c in chunks])
    top = allh >> np.uint64(62)
    for p in range(4):
        got = parts.read(p) if p == 0 else parts.take(p)
        want = top == p
        assert got["x"].tolist() == allx[want].tolist()  # arrival order, spilled rows first
        assert (got["h"] == allh[want]).all() and (got["f"] == (allh[want] % np.uint64(2) == 0)).all()
    assert parts.take(0)["x"].tolist() == allx[top == 0].tolist()  # read() left it in place
    assert not any(parts.files) and budget.used == 0
    assert not any(f.suffix == ".arrow" for f in tmp_path.rglob("*"))
    budget.close()
    assert not list(tmp_path.iterdir())


def _random_events(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = seed * int(n * 0.8) + rng.integers(0, int(n * 0.9), n)  # repeats within and across batches
    types = np.array(["like", "dislike", "copy", "dwell", "share"])[rng.integers(0, 5, n)]
    users = np.array([f"u{u}" for u in rng.integers(0, 300, n)], object)
    ts = 1_709_251_200_000_000 + rng.integers(0, 5 * 86_400_000_000, n)
    users[:n // 20] = "over-the-cap"  # ~1200 events a day
    users[n // 20:n // 20 + 40] = "burst"  # 40 events in two minutes, once per batch
    ts[n // 20:n // 20 + 40] = 1_709_251_200_000_000 + seed * 86_400_000_000 + rng.integers(0, 120_000_000, 40)
    return pa.table({
        "event_id": [f"e{i}" for i in ids], "user_id": users,
        "response_id": [f"c{r}" for r in rng.integers(0, 50, n)], "event_type": types,
        "value": pa.array(np.where(types == "dwell", rng.integers(1, 60_000, n), np.nan), from_pandas=True),
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "position": rng.integers(0, 6, n), "variant": np.where(rng.random(n) < 0.5, "random", "a")})


def test_spilled_state_gives_the_same_statuses_and_signals_as_in_memory():
    cfg = {"propensities": {0: 1.0, 1: 0.5}, "abuse": {"rate_cap_per_day": 150, "burst_max_events": 20}}
    outs = []
    for mb in (1, 1024):
        c = fb.IngestConfig(state_memory_mb=mb, partition_rows=10_000, **cfg)
        acc = fb.EventAccumulator(c, expected_rows=120_000)
        for seed in range(4):  # 4 batches, overlapping ids across them
            v = fb.validate(_random_events(30_000, seed), c, int(9e15), "t", None)
            acc.add(v.typed, True)
        out = acc.finish()
        outs.append((out, acc.budget.spilled_bytes))
    (spilled, nbytes), (mem, zero) = outs
    assert nbytes > 0 and zero == 0  # 1 MB is far below ~50 B x 120k events
    assert spilled.status.tolist() == mem.status.tolist()
    assert {fb.DUP, fb.RATE_CAP, fb.BURST} <= set(np.unique(mem.status).tolist())
    assert (mem.status == fb.OK).mean() > 0.5 and not (mem.status == fb.INVALID).any()
    assert spilled.signals.equals(mem.signals) and spilled.signals.num_rows == 50


def test_codes_are_stable_per_value_and_trimmed_duplicates_share_one_code():
    codes = kernels.Codes()
    codes.preload(pa.array(["c1", "c2", "c3"]))
    a = codes.encode(pa.array(["c3", "x", "c1", "x"]))
    assert a.tolist() == [2, 3, 0, 3] and codes.values == ["c1", "c2", "c3", "x"]
    # a dictionary can hold one value twice after trimming: both entries get one code
    d = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2]), pa.array(["y", "y", "c2"]))
    assert codes.encode(d).tolist() == [4, 4, 1]
    # a worker's lookup against an old snapshot is completed by resolve
    old = codes.index()
    vals = pa.array(["z", "y"])
    pre = kernels.Codes.find(old, kernels.hash64(vals))
    codes.encode(pa.array(["z"]))
    assert pre.tolist() == [-1, 4] and codes.resolve(vals, kernels.hash64(vals), pre).tolist() == [5, 4]


def test_validate_response_codes_are_candidate_indices():
    cand = pa.array(["c1", "c2"])
    raw = pa.table({"event_id": ["e1", "e2", "e3"], "user_id": ["u", "u", "u"],
                    "response_id": ["c2", "nope", " c1 "], "event_type": ["like"] * 3,
                    "ts": ["2024-01-01T00:00:00Z"] * 3})
    v = fb.validate(raw, fb.IngestConfig(), int(9e15), "t", cand)
    assert v.response_codes.tolist() == [1, -1, 0]
    assert v.reason.tolist() == [None, "orphan", None]


def test_staged_files_commit_as_one_version_and_only_where_staged(tmp_path):
    store = DatasetStore(tmp_path)
    t = pa.table({"candidate_id": ["a", "b"], "behaviour_score": [0.1, 0.2], "confidence": [0.5, 0.5],
                  "positive_share": [1.0, None], "wilson_lower": [0.2, None], "n_users": [1, 2],
                  "n_events": [1, 2], "last_ts": pa.array([0, 1], pa.timestamp("us", tz="UTC"))})
    parts = [store.stage_files("signals", [t.slice(i, 1)]) for i in range(2)]
    staged = StagedFiles("signals", parts[0].actions + parts[1].actions)
    assert not store.exists("signals")  # staged files are invisible
    info = store.write("signals", staged)
    assert info.rows == 2 and sorted(store.read(info.ref).column("candidate_id").to_pylist()) == ["a", "b"]
    with pytest.raises(StoreError):
        store.write("feedback_events", staged)


def test_to_string_trims_ascii_and_unicode_spaces_and_skips_clean_columns():
    assert validation.to_string(pa.array(["\u3000a", "b\u00a0", "c", " d\t", "  ", None])).to_pylist() == \
        ["a", "b", "c", "d", None, None]
    clean = pa.array(["a", "bc", "", None])
    assert not validation.may_need_trim(clean) and validation.to_string(clean).to_pylist() == ["a", "bc", None, None]
    assert validation.may_need_trim(pa.array(["a", "事"]))  # a non-ASCII edge byte: checked by the real trim
    assert validation.to_string(pa.array(["a\x1f", "\x1c"])).to_pylist() == ["a", None]  # Arrow's trim strips 28-31


def test_dictionary_ids_with_nulls_are_quarantined_not_a_crash():
    ids = pa.array(["e1", None, "e3"]).dictionary_encode()
    users = pa.array(["u1", "u2", None]).dictionary_encode()
    raw = pa.table({"event_id": ids, "user_id": users, "response_id": ["r", "r", "r"],
                    "event_type": ["like"] * 3, "ts": ["2024-01-01T00:00:00Z"] * 3})
    c = fb.IngestConfig()
    v = fb.validate(raw, c, int(9e15), "t", None)
    assert v.reason.tolist() == [None, "missing field: event_id", "missing field: user_id"]
    acc = fb.EventAccumulator(c)
    acc.merge(acc.prepare(v.typed, v.response_codes, ~v.bad), True)
    out = acc.finish()
    assert out.status.tolist() == [fb.OK, fb.INVALID, fb.INVALID] and out.signals.num_rows == 1


def test_parse_number_fast_paths_flag_the_same_rows_as_the_general_one():
    out, bad = validation.parse_number(pa.array([1, -1, None, 2**40, 0]), pa.int32())
    assert out.to_pylist() == [1, None, None, None, 0] and bad.tolist() == [False, True, False, True, False]
    out, bad = validation.parse_number(pa.array([1.5, None, float("nan"), float("inf")]), pa.float64())
    assert out.to_pylist() == [1.5, None, None, None] and bad.tolist() == [False, False, True, True]
    clean = pa.array([2.0, None, 3.25])
    out, bad = validation.parse_number(clean, pa.float64())
    assert out.to_pylist() == [2.0, None, 3.25] and not bad.any()
    out, bad = validation.parse_number(pa.array(["7", "x", None, "-2"]), pa.int32())  # text: the general path
    assert out.to_pylist() == [7, None, None, None] and bad.tolist() == [False, True, False, True]


def test_partition_count_follows_the_expected_rows_of_every_source(tmp_path):
    import pyarrow.parquet as pq

    from dpoflow.tasks.partitions import partition_count

    pq.write_table(pa.table({"event_id": [f"e{i}" for i in range(300)]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"event_id": "x"}\n' * 100)  # 1,800 bytes
    cfg = fb.IngestConfig(sources=[{"name": "files", "path": str(tmp_path)},
                                   {"name": "db", "kind": "sql", "url_env": "X", "table": "t"}])
    state = {"db": {"watermark": 5, "type": "number", "rows_last_run": 4_000}}
    assert sources.expected_rows(cfg, state) == 300 + 1_800 // sources.TEXT_BYTES_PER_ROW + 4_000
    seen = {"files": {str(tmp_path / "a.parquet"): sources.file_sig(tmp_path / "a.parquet")}}
    assert sources.expected_rows(cfg, {**state, "files": seen}) == 1_800 // sources.TEXT_BYTES_PER_ROW + 4_000
    assert partition_count(0, 1000) == 16 and partition_count(40_000, 1000) == 64  # powers of two
    assert partition_count(10**12, 1000) == 4096


def test_partitioned_state_matches_a_plain_pandas_reference():
    """Exactly-once, latest vote per (user, response, group), decay, dwell, IPW and the score,
    recomputed the obvious way in pandas over all rows at once."""
    import pandas as pd

    c = fb.IngestConfig(state_memory_mb=1, partition_rows=5_000, half_life_days=2,
                        propensities={0: 1.0, 1: 0.5},
                        abuse={"rate_cap_per_day": 0, "uniform_min_responses": 0, "burst_max_events": 0})
    acc = fb.EventAccumulator(c, expected_rows=60_000)
    frames = []
    for seed in range(3):
        t = _random_events(20_000, seed)
        v = fb.validate(t, c, int(9e15), "t", None)
        assert not v.bad.any()
        acc.add(v.typed, True)
        frames.append(t.to_pandas())
    out = acc.finish()
    assert acc.budget.spilled_bytes > 0
    df = pd.concat(frames, ignore_index=True)
    df["arrival"] = np.arange(len(df))
    assert out.status.tolist() == np.where(df.duplicated("event_id"), fb.DUP, fb.OK).tolist()
    df = df.drop_duplicates("event_id")
    df["group"] = df["event_type"].replace({"like": "ld", "dislike": "ld"})
    votes = df.sort_values(["ts", "arrival"]).drop_duplicates(["user_id", "response_id", "group"], keep="last")
    w = votes["event_type"].map(c.event_weights)
    w = w.where(votes["event_type"] != "dwell", w * (votes["value"] / c.dwell_full_ms).clip(0, 1))
    age = (df["ts"].max() - votes["ts"]).dt.total_seconds() / 86400
    e = w * 2.0 ** (-age / c.half_life_days) / votes["position"].clip(upper=1).map({0: 1.0, 1: 0.5})
    g = votes.assign(P=e.clip(lower=0), N=(-e).clip(lower=0)).groupby("response_id")[["P", "N"]].sum()
    g["n_users"] = df.groupby("response_id")["user_id"].nunique()
    g["n_events"] = df.groupby("response_id").size()
    g["score"] = (g["P"] - g["N"]) / (g["P"] + g["N"] + c.prior_strength)
    got = out.signals.to_pandas().set_index("candidate_id").loc[g.index]
    assert got["n_users"].tolist() == g["n_users"].tolist() and got["n_events"].tolist() == g["n_events"].tolist()
    assert np.allclose(got["behaviour_score"], g["score"], rtol=1e-9, atol=1e-12)
