"""Exactly-once ingestion: a second ingest over an overlapping window gives the same
`feedback_events` and `signals` as ingesting the union once (files and SQL look-back)."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest

from dpoflow.flows.ingest import run_ingest
from dpoflow.flows.workspace import Workspace
from tests.builders import sqlite_events

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
CANDS = [f"c{i}" for i in range(6)]


def ev(eid, user, resp, etype="like", hours=0.0, **kw) -> dict:
    return {"event_id": eid, "user_id": user, "response_id": resp, "event_type": etype,
            "ts": (T0 + dt.timedelta(hours=hours)).isoformat(), **kw}


# day 1: ordinary votes, positions, dwell, an orphan, one user building towards the rate cap
DAY1 = [
    ev("e0", "u0", "c0", "like", 1, position=0),
    ev("e1", "u1", "c1", "dislike", 30, position=1),
    ev("e2", "u2", "c0", "dwell", 2, value=12_000),
    ev("e3", "u3", "c2", "share", 3, position=2, variant="random"),
    ev("e4", "u4", "c3", "report", 4),
    ev("e5", "u5", "c4", "copy", 5, position=5),
    ev("e6", "u0", "c1", "favourite", 6, position=1),
    ev("e7", "u2", "c2", "like", 7),
    ev("e8", "u3", "c0", "regenerate", 8),
    ev("e9", "u4", "c5", "like", 9, position=0),
    ev("orphan", "u5", "nope", "like", 10),
    ev("f0", "flood", "c0", "copy", 11), ev("f1", "flood", "c1", "copy", 11.5), ev("f2", "flood", "c2", "copy", 12),
]
# day 2 re-sends e6..e9 and the orphan (overlap), adds new events: u0 changes its c0 like to a
# dislike (later ts wins), a late u1 like on c1 older than its day-1 dislike (the dislike stays),
# more dwell, and 4 more "flood" events on the same UTC day: 7 > cap 5, so all 7 are abuse
DAY2 = DAY1[6:11] + [
    ev("e10", "u0", "c0", "dislike", 40, position=0),
    ev("e11", "u1", "c1", "like", 0.5, position=1),
    ev("e12", "u6", "c4", "dwell", 41, value=45_000, position=3),
    ev("e13", "u7", "c5", "share", 42, position=4),
    ev("e14", "u6", "c3", "like", 43, position=2),
    ev("e15", "u7", "c0", "like", 44, position=0),
    ev("f3", "flood", "c3", "copy", 13), ev("f4", "flood", "c4", "copy", 14), ev("f5", "flood", "c5", "copy", 15),
    ev("f6", "flood", "c0", "copy", 16),
]


def setup(ws: Workspace, sources: list[dict]) -> None:
    n = len(CANDS)
    ws.store.write("candidates", pa.table({
        "candidate_id": CANDS, "prompt_id": ["p"] * n, "prompt": ["q"] * n, "response": CANDS,
        "origin": ["sampled"] * n, "model_version": ["m"] * n, "dup_count": pa.array([1] * n, pa.int32())}))
    cfg = ws.config.ingest
    cfg.sources = sources
    cfg.min_ts = T0 - dt.timedelta(days=1)  # events of 2024: inside the timestamp window
    cfg.half_life_days = 2.0
    cfg.propensities = {0: 1.0, 1: 0.5, 2: 0.25}
    cfg.abuse.rate_cap_per_day = 5


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def outputs(ws: Workspace, drop_source: bool = False) -> tuple[list[dict], list[dict]]:
    events = ws.store.read("feedback_events")
    if drop_source:
        events = events.drop_columns(["source"])
    events = sorted(events.to_pylist(), key=lambda r: r["event_id"])
    signals = sorted(ws.store.read("signals").to_pylist(), key=lambda r: r["candidate_id"])
    return events, signals


def assert_same(a: tuple[list[dict], list[dict]], b: tuple[list[dict], list[dict]]) -> None:
    assert a[0] == b[0]
    assert [r["candidate_id"] for r in a[1]] == [r["candidate_id"] for r in b[1]]
    for x, y in zip(a[1], b[1], strict=True):
        for k, v in x.items():  # sums over a different row order may differ in the last bit
            assert y[k] == (pytest.approx(v, rel=1e-12, abs=1e-15) if isinstance(v, float) else v), (x, y, k)


def quarantined(ws: Workspace) -> set[tuple[str, str]]:
    q = ws.store.read("quarantine").to_pylist()
    return {(r["reason"], json.loads(r["raw"])["event_id"]) for r in q}


EXPECTED_EVENTS = {f"e{i}" for i in range(16)}
EXPECTED_QUARANTINE = {("orphan", "orphan")} | {("abuse: rate cap", f"f{i}") for i in range(7)}


def test_overlapping_files_in_two_runs_equal_the_union_in_one(tmp_path):
    # A: day 1, then day 2 (overlapping) in a second run
    a = Workspace.open(tmp_path / "a")
    src_a = tmp_path / "src_a"
    src_a.mkdir()
    setup(a, [{"name": "app", "path": str(src_a)}])
    write_jsonl(src_a / "day1.jsonl", DAY1)
    assert run_ingest(a).report["accepted"] == 13
    write_jsonl(src_a / "day2.jsonl", DAY2)
    r2 = run_ingest(a).report
    assert r2["dropped"]["duplicate event_id"] == 4 and r2["dropped"]["already quarantined"] == 1
    assert r2["moved_from_prior_to_quarantine"] == {"abuse: rate cap": 3}
    # B: the same two files, one run
    b = Workspace.open(tmp_path / "b")
    src_b = tmp_path / "src_b"
    src_b.mkdir()
    write_jsonl(src_b / "day1.jsonl", DAY1)
    write_jsonl(src_b / "day2.jsonl", DAY2)
    setup(b, [{"name": "app", "path": str(src_b)}])
    run_ingest(b)
    # C: the union as one file (no overlap inside it), one run
    c = Workspace.open(tmp_path / "c")
    write_jsonl(tmp_path / "union.jsonl", DAY1 + DAY2[5:])
    setup(c, [{"name": "app", "path": str(tmp_path / "union.jsonl")}])
    run_ingest(c)

    # sources differ only by folder name: compare A and B with the file name, and C without it
    oa, ob = outputs(a), outputs(b)
    for rows in (oa[0], ob[0]):
        for r in rows:
            r["source"] = r["source"].rsplit("/", 1)[-1]
    assert_same(oa, ob)
    assert_same(outputs(a, drop_source=True), outputs(c, drop_source=True))
    events, signals = oa
    assert {r["event_id"] for r in events} == EXPECTED_EVENTS
    sig = {r["candidate_id"]: r for r in signals}
    assert sig["c0"]["n_users"] == 4  # u0 (its dislike), u2 dwell, u3 regenerate, u7 like
    # c1: u0 favourite (w 2, 6 h), u1's dislike (w -1, 30 h) beats its older like; both at position 1
    # (IPW 1 / 0.5); decay to as_of = the newest event (44 h) with a 48 h half-life
    P, N = 2 * 2 * 2 ** (-38 / 48), 1 * 2 * 2 ** (-14 / 48)
    assert sig["c1"]["positive_share"] == pytest.approx(P / (P + N))
    assert sig["c1"]["behaviour_score"] == pytest.approx((P - N) / (P + N + 2))
    for w in (a, b, c):
        assert quarantined(w) == EXPECTED_QUARANTINE
    # a third run over the same overlap adds nothing and changes nothing
    before = outputs(a)
    r3 = run_ingest(a, force=True)
    assert r3.report["accepted"] == 0
    assert_same(outputs(a), before)


def test_sql_lookback_window_in_two_runs_equals_the_union_in_one(tmp_path, monkeypatch):
    src = {"name": "db", "kind": "sql", "url_env": "EXACTLY_ONCE_DB", "table": "events", "chunk_rows": 4,
           "lookback_s": 3 * 86400}  # the second run re-reads up to 3 days before the watermark
    a, b = Workspace.open(tmp_path / "a"), Workspace.open(tmp_path / "b")
    setup(a, [src])
    setup(b, [src])
    monkeypatch.setenv("EXACTLY_ONCE_DB", f"sqlite:///{tmp_path / 'a.db'}")
    sqlite_events(tmp_path / "a.db", DAY1)
    run_ingest(a)
    sqlite_events(tmp_path / "a.db", DAY2)  # re-sent rows are in the table twice
    r2 = run_ingest(a).report
    assert r2["rows_in"] > len(DAY2)  # the look-back re-read day-1 rows too
    monkeypatch.setenv("EXACTLY_ONCE_DB", f"sqlite:///{tmp_path / 'b.db'}")
    sqlite_events(tmp_path / "b.db", DAY1 + DAY2)
    run_ingest(b)
    assert_same(outputs(a), outputs(b))
    assert {r["event_id"] for r in outputs(a)[0]} == EXPECTED_EVENTS
    assert quarantined(a) == quarantined(b) == EXPECTED_QUARANTINE
