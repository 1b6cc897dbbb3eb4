"""Property tests: random junk rows never crash ingest (through a source or the import door), and
every row ends in exactly one place."""

from __future__ import annotations

import json

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.flows.ingest import run_ingest

junk = st.one_of(st.none(), st.text(max_size=6), st.integers(-10**12, 10**18), st.floats(allow_nan=True),
                 st.booleans(), st.sampled_from(["like", "dwell", "LIKE ", "c1", "u1", "2024-01-01", ""]))
row = st.fixed_dictionaries({}, optional={
    "event_id": st.one_of(junk, st.sampled_from(["e1", "e2", "e3"])),
    "user_id": st.one_of(junk, st.sampled_from(["u1", "u2"])),
    "response_id": st.one_of(junk, st.sampled_from(["c1", "c2", "zz"])),
    "event_type": st.one_of(junk, st.sampled_from(["like", "dislike", "dwell", "report"])),
    "ts": st.one_of(junk, st.sampled_from(["2024-01-01T00:00:00Z", "2024-02-30", "3000-01-01"])),
    "value": junk, "position": junk, "extra": junk,
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=0, max_size=25), as_csv=st.booleans(), door=st.sampled_from(["source", "import"]))
def test_junk_rows_never_crash_and_are_all_accounted_for(rows, as_csv, door, tmp_path_factory):
    """Both doors: an ingest source and `dpoflow import feedback_events` (the same stage)."""
    from dpoflow.flows.importing import import_dataset
    from dpoflow.flows.workspace import Workspace

    base = tmp_path_factory.mktemp("prop")
    ws = Workspace.open(base / "ws")
    ws.store.write("candidates", pa.table({
        "candidate_id": ["c1", "c2"], "prompt_id": ["p", "p"], "prompt": ["q", "q"], "response": ["a", "b"],
        "origin": ["sampled"] * 2, "model_version": ["m"] * 2, "dup_count": pa.array([1, 1], pa.int32())}))
    if as_csv:
        import csv

        keys = sorted({k for r in rows for k in r}) or ["event_id"]
        with open(base / "e.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        path = base / "e.csv"
    else:
        path = base / "e.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + ("{broken\n" if len(rows) % 3 == 0 else ""))
    ws.config.ingest.min_ts = "2023-01-01T00:00:00Z"
    if door == "source":
        ws.config.ingest.sources = [{"name": "junk", "path": str(path)}]
        run = run_ingest(ws)
    else:
        run = import_dataset(ws, "feedback_events", path)
        if not run.outputs:  # an empty file: no version
            assert not rows and not ws.store.exists("feedback_events")
            return
    rep = run.report
    n_q = ws.store.read("quarantine").num_rows if ws.store.exists("quarantine") else 0
    accepted = ws.store.read("feedback_events").num_rows
    assert rep["accepted"] == accepted
    assert sum(rep["quarantined"].values()) == n_q
    # exactly one place per input row: accepted, quarantined (with a reason) or deduplicated
    assert rep["rows_in"] == accepted + n_q + sum(rep["dropped"].values())
    if ws.store.exists("quarantine"):
        assert all(ws.store.read("quarantine").column("reason").to_pylist())
    ids = ws.store.read("feedback_events").column("event_id").to_pylist()
    assert len(ids) == len(set(ids))
