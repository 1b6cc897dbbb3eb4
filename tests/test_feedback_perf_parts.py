"""The pieces the fast ingest path is built from: the exactly-once hash table, hash-keyed
dictionary codes, candidate-indexed response codes, and staged Parquet files in the store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storage.store import DatasetStore, StagedFiles, StoreError
from tasks import feedback as fb


def test_seen_ids_flags_repeats_across_batches_and_survives_growth():
    rng = np.random.default_rng(3)
    seen = fb.SeenIds(0)  # starts tiny: forces several rehashes
    first = np.unique(rng.integers(0, 2**64 - 1, 50_000, dtype=np.uint64, endpoint=True))
    assert not seen.check_add(first).any()
    again = np.unique(np.concatenate([first[:100], rng.integers(0, 2**64 - 1, 200_000, dtype=np.uint64)]))
    found = seen.check_add(again)
    assert found.sum() == 100 and np.isin(again[found], first[:100]).all()
    assert seen.size == len(first) + len(again) - 100
    assert seen.check_add(np.array([0], np.uint64)).tolist() == [False]  # 0 is stored (as 1), not "free"
    assert seen.check_add(np.array([0], np.uint64)).tolist() == [True]


def test_codes_are_stable_per_value_and_trimmed_duplicates_share_one_code():
    codes = fb.Codes()
    codes.preload(pa.array(["c1", "c2", "c3"]))
    a = codes.encode(pa.array(["c3", "x", "c1", "x"]))
    assert a.tolist() == [2, 3, 0, 3] and codes.values == ["c1", "c2", "c3", "x"]
    # a dictionary can hold one value twice after trimming: both entries get one code
    d = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2]), pa.array(["y", "y", "c2"]))
    assert codes.encode(d).tolist() == [4, 4, 1]
    # a worker's lookup against an old snapshot is completed by resolve
    old = codes.index()
    vals = pa.array(["z", "y"])
    pre = fb.Codes.find(old, fb.hash64(vals))
    codes.encode(pa.array(["z"]))
    assert pre.tolist() == [-1, 4] and codes.resolve(vals, fb.hash64(vals), pre).tolist() == [5, 4]


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
