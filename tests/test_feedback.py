"""Feedback ingestion: sources, every quarantine reason, exactly-once, abuse filters, formulas."""

from __future__ import annotations

import datetime as dt
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpoflow.flows.ingest import run_ingest
from dpoflow.tasks import feedback as fb
from dpoflow.tasks.kernels import hash64
from tests.builders import T0, candidates, ev, iso, quarantine_reasons, sqlite_events, write_jsonl


@pytest.fixture(autouse=True)
def _events_from_2024_are_not_stale(request):
    """These tests date their events around 2024-03-01: open the timestamp window for them
    (the window itself is tested in tests/test_validation_path.py)."""
    if "ws" in request.fixturenames:
        request.getfixturevalue("ws").config.ingest.min_ts = T0 - dt.timedelta(days=365)


def configure(ws, **ingest) -> None:
    for k, v in ingest.items():
        setattr(ws.config.ingest, k, v)


def signals(ws) -> dict[str, dict]:
    return {r["candidate_id"]: r for r in ws.store.read("signals").to_pylist()}


def test_every_quarantine_reason_and_valid_rows(ws, tmp_path):
    candidates(ws)
    rows = [
        ev("ok1", "u1", "c1"),
        ev("ok2", "u2", "c1", "dwell", value=12000),
        {"event_id": "m1", "response_id": "c1", "event_type": "like", "ts": iso()},  # no user
        ev("m2", "u1", "c1", ts=None) | {"ts": None},
        ev("bad-type", "u1", "c1", "upvote"),
        ev("bad-ts", "u1", "c1", ts="yesterday-ish"),
        ev("future", "u1", "c1", ts="2999-01-01T00:00:00Z"),
        ev("orphan", "u1", "nope"),
        ev("badval", "u1", "c2", "dwell", value="long"),
        ev("noval", "u1", "c2", "dwell"),
        ev("badpos", "u1", "c3", position=-2),
        ev("ok1", "u1", "c1"),  # duplicate in batch: dropped as dedup, not quarantined
    ]
    src = tmp_path / "events"
    src.mkdir()
    write_jsonl(src / "day1.jsonl", rows)
    (src / "day1b.jsonl").write_text("{not json\n")
    configure(ws, sources=[{"name": "app", "path": str(src)}])
    run = run_ingest(ws)
    rep = run.report
    assert rep["accepted"] == 2
    assert rep["dropped"] == {"duplicate event_id": 1}
    assert rep["quarantined"] == {
        "missing field: user_id": 1, "missing field: ts": 1, "unknown event type": 1,
        "unparseable timestamp": 1, "future ts": 1, "orphan": 1, "malformed field: value": 1,
        "missing field: value": 1, "malformed field: position": 1, "malformed row: invalid JSON": 1}
    assert rep["rows_in"] == rep["accepted"] + sum(rep["quarantined"].values()) + sum(rep["dropped"].values())
    events = ws.store.read("feedback_events")
    assert sorted(events.column("event_id").to_pylist()) == ["ok1", "ok2"]
    q = ws.store.read("quarantine")
    orphan = [json.loads(r) for r, why in zip(q["raw"].to_pylist(), q["reason"].to_pylist(), strict=True) if why == "orphan"]
    assert orphan[0]["event_id"] == "orphan" and q["stage"].to_pylist()[0] == "ingest"


def test_exactly_once_over_overlapping_files_and_watermark(ws, tmp_path):
    candidates(ws)
    src = tmp_path / "ev"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [ev(f"e{i}", f"u{i}", "c1") for i in range(5)] + [ev("x", "u9", "zzz")])
    configure(ws, sources=[{"name": "app", "path": str(src / "*.jsonl")}])
    r1 = run_ingest(ws)
    assert r1.report["accepted"] == 5 and quarantine_reasons(ws) == ["orphan"]
    assert run_ingest(ws).skipped  # nothing new: no new version at all
    # a second file overlapping the first (3 old + 2 new events, the orphan again)
    write_jsonl(src / "b.jsonl", [ev(f"e{i}", f"u{i}", "c1") for i in range(3, 8)] + [ev("x", "u9", "zzz")])
    r2 = run_ingest(ws)
    assert r2.report["accepted"] == 3 and r2.report["dropped"]["duplicate event_id"] == 2
    assert r2.report["dropped"]["already quarantined"] == 1
    assert ws.store.read("feedback_events").num_rows == 8
    assert quarantine_reasons(ws) == ["orphan"]  # not quarantined twice
    state = ws.store.get_state(fb.STATE_KEY)
    assert len(state["app"]["files"]) == 2  # the watermark: files already ingested
    # forcing a re-run re-reads nothing (watermark) and adds nothing (dedup)
    r3 = run_ingest(ws, force=True)
    assert r3.report["rows_in"] == 0 and ws.store.read("feedback_events").num_rows == 8
    assert signals(ws)["c1"]["n_users"] == 8


def test_parquet_and_csv_sources(ws, tmp_path):
    candidates(ws)
    pq.write_table(pa.table({
        "event_id": ["p1", "p2"], "user_id": ["u1", "u2"], "response_id": ["c1", "c2"],
        "event_type": ["LIKE", "share"], "ts": pa.array([T0, T0], pa.timestamp("ms")),
        "position": pa.array([1, 2], pa.int64())}), tmp_path / "e.parquet")
    (tmp_path / "e.csv").write_text("event_id,user_id,response_id,event_type,ts,value\n"
                                    "c-1,7,c3,dwell,1709251200000,40000\nc-2,8,c3,copy,2024-03-01 00:00:00,\n")
    configure(ws, sources=[{"name": "pq", "path": str(tmp_path / "e.parquet")},
                           {"name": "csv", "path": str(tmp_path / "e.csv")}])
    run = run_ingest(ws)
    assert run.report["accepted"] == 4, run.report
    t = ws.store.read("feedback_events").sort_by("event_id")
    assert t["event_type"].to_pylist() == ["dwell", "copy", "like", "share"]  # normalised case
    assert t["user_id"].to_pylist()[:2] == ["7", "8"]
    assert set(t["ts"].to_pylist()) == {T0}  # epoch ms, naive text and Arrow ms all in UTC


def test_sqlite_source_incremental_with_lookback(ws, tmp_path, monkeypatch):
    candidates(ws)
    db = tmp_path / "ev.db"
    sqlite_events(db, [ev(f"s{i}", f"u{i}", "c2", ts=iso(seconds=i)) for i in range(10)])
    monkeypatch.setenv("EVENTS_DB_URL", f"sqlite:///{db}")
    configure(ws, sources=[{"name": "db", "kind": "sql", "url_env": "EVENTS_DB_URL", "table": "events",
                            "chunk_rows": 3, "lookback_s": 3600}])
    r1 = run_ingest(ws)
    assert r1.report["accepted"] == 10
    assert "sqlite" not in json.dumps(ws.store.info("feedback_events").to_dict())  # never the URL
    assert run_ingest(ws).skipped
    # late rows and a re-sent old row: the look-back window overlaps, dedup keeps it exactly-once
    sqlite_events(db, [ev("s3", "u3", "c2", ts=iso(seconds=3)), ev("late", "u99", "c2", ts=iso(seconds=5)),
                        ev("s10", "u10", "c2", ts=iso(seconds=20))])
    r2 = run_ingest(ws)
    assert r2.report["accepted"] == 2 and r2.report["dropped"] == {"duplicate event_id": 11}
    assert ws.store.read("feedback_events").num_rows == 12
    assert ws.store.get_state(fb.STATE_KEY)["db"]["watermark"] == iso(seconds=20)
    assert ws.store.get_state(fb.STATE_KEY)["db"]["rows_last_run"] == r2.report["rows_in"]  # sizes the next run


def test_sql_query_source_and_missing_env(ws, tmp_path, monkeypatch):
    candidates(ws)
    db = tmp_path / "ev.db"
    sqlite_events(db, [ev("q1", "u1", "c1"), ev("q2", "u2", "c1", "dislike")])
    configure(ws, sources=[{"name": "db", "kind": "sql", "url_env": "NOPE_URL", "query": "SELECT * FROM events"}])
    monkeypatch.delenv("NOPE_URL", raising=False)
    with pytest.raises(fb.SourceError, match="NOPE_URL is not set"):
        run_ingest(ws)
    monkeypatch.setenv("NOPE_URL", f"sqlite:///{db}")
    assert run_ingest(ws).report["accepted"] == 2


def test_postgres_source(ws, postgres_url, monkeypatch):
    import sqlalchemy as sa

    candidates(ws)
    eng = sa.create_engine(postgres_url)
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE ev (event_id text, user_id text, response_id text, event_type text, "
                          "value double precision, ts timestamptz, position int)"))
        c.execute(sa.text("INSERT INTO ev VALUES ('g1','u1','c1','like',NULL,'2024-03-01T00:00:00Z',1),"
                          "('g2','u2','c1','dwell',5000,'2024-03-01T00:00:01Z',NULL),"
                          "('g3','u3','c9','like',NULL,'2024-03-01T00:00:02Z',NULL)"))
    monkeypatch.setenv("PG_EVENTS", postgres_url)
    configure(ws, sources=[{"name": "pg", "kind": "sql", "url_env": "PG_EVENTS", "table": "ev", "chunk_rows": 2}])
    r1 = run_ingest(ws)
    assert r1.report["accepted"] == 2 and r1.report["quarantined"] == {"orphan": 1}
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO ev VALUES ('g4','u4','c2','share',NULL,'2024-03-01T00:00:03Z',NULL)"))
    r2 = run_ingest(ws)
    assert r2.report["accepted"] == 1
    assert r2.report["rows_in"] == 2  # only rows at/after the watermark were read
    assert ws.store.read("feedback_events").num_rows == 3
    eng.dispose()


def test_bot_filters(ws, tmp_path):
    candidates(ws, [f"c{i}" for i in range(40)])
    rows = [ev(f"b{i}", "bot", f"c{i}", ts=iso(seconds=3600 * i)) for i in range(30)]  # 30 likes, nothing else
    rows += [ev(f"h{i}", "human", f"c{i}", "like" if i % 2 else "dislike", ts=iso(seconds=3600 * i)) for i in range(30)]
    rows += [ev(f"s{i}", "spammer", f"c{i % 40}", "copy", ts=iso(seconds=0.1 * i)) for i in range(20)]  # burst
    rows += [ev(f"r{i}", "flood", f"c{i % 40}", "copy", ts=iso(seconds=500 * i)) for i in range(120)]  # rate cap
    src = tmp_path / "ev.jsonl"
    write_jsonl(src, rows)
    configure(ws, sources=[{"name": "app", "path": str(src)}])
    ws.config.ingest.abuse = fb.AbuseConfig(rate_cap_per_day=100, uniform_min_responses=20,
                                            burst_max_events=10, burst_window_s=60)
    rep = run_ingest(ws).report
    assert rep["quarantined"] == {"abuse: uniform voter": 30, "abuse: burst": 20, "abuse: rate cap": 120}
    users = set(ws.store.read("feedback_events").column("user_id").to_pylist())
    assert users == {"human"}


def test_abuse_found_later_moves_prior_events(ws, tmp_path):
    candidates(ws, [f"c{i}" for i in range(30)])
    src = tmp_path / "ev"
    src.mkdir()
    write_jsonl(src / "1.jsonl", [ev(f"b{i}", "bot", f"c{i}", ts=iso(days=i * 0.1)) for i in range(10)])
    configure(ws, sources=[{"name": "app", "path": str(src)}])
    assert run_ingest(ws).report["accepted"] == 10
    write_jsonl(src / "2.jsonl", [ev(f"b{i}", "bot", f"c{i}", ts=iso(days=i * 0.1)) for i in range(10, 25)])
    rep = run_ingest(ws).report
    assert rep["moved_from_prior_to_quarantine"] == {"abuse: uniform voter": 10}
    assert ws.store.read("feedback_events").num_rows == 0
    assert quarantine_reasons(ws).count("abuse: uniform voter") == 25


# --- formulas on hand-computed examples -----------------------------------------------------

def table(rows: list[dict]) -> pa.Table:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in keys})


def _agg(rows, **cfg) -> dict[str, dict]:
    c = fb.IngestConfig(**cfg)
    acc = fb.EventAccumulator(c)
    v = fb.validate(table(rows), c, int(9e15), "test", None)
    assert (v.reason == None).all(), v.reason  # noqa: E711
    acc.add(v.typed, True)
    out = acc.finish()
    return {r["candidate_id"]: r for r in out.signals.to_pylist()}


def test_decay_bayesian_average_and_wilson_by_hand():
    rows = [ev("1", "a", "r", "like", ts=iso(days=0)), ev("2", "b", "r", "like", ts=iso(days=10)),
            ev("3", "c", "r", "dislike", ts=iso(days=10))]
    s = _agg(rows, half_life_days=10, prior_strength=2, abuse=fb.AbuseConfig(uniform_min_responses=0))["r"]
    # as_of = newest event (day 10): the first like is one half-life old -> weight 0.5
    P, N = 0.5 + 1.0, 1.0
    n = P + N
    assert s["positive_share"] == pytest.approx(P / n)
    assert s["behaviour_score"] == pytest.approx((P - N) / (n + 2))
    p, z = P / n, 1.96
    lo = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    hi = (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert s["wilson_lower"] == pytest.approx(lo)
    assert s["confidence"] == pytest.approx(1 - (hi - lo))
    assert s["n_users"] == 3 and s["n_events"] == 3


def test_latest_vote_wins_and_weights():
    rows = [ev("1", "a", "r", "like", ts=iso(0)), ev("2", "a", "r", "dislike", ts=iso(1)),  # a changed mind
            ev("3", "a", "r", "copy", ts=iso(1)), ev("4", "b", "r", "dwell", ts=iso(1), value=15000)]
    s = _agg(rows, half_life_days=1e9, prior_strength=0)["r"]
    # a: dislike (-1) + copy (+0.5); b: dwell 0.5 * 15000/30000 = 0.25
    assert s["positive_share"] == pytest.approx(0.75 / 1.75)
    assert s["behaviour_score"] == pytest.approx((0.75 - 1) / 1.75)
    assert s["n_events"] == 4 and s["n_users"] == 2


def test_ipw_from_config_and_estimated():
    rows = [ev("1", "a", "r", "like", position=0), ev("2", "b", "r", "dislike", position=3)]
    s = _agg(rows, half_life_days=1e9, prior_strength=0, propensities={0: 1.0, 1: 0.5, 2: 0.25})["r"]
    # position 3 is past the table: it takes the last entry (0.25) -> the dislike weighs 4
    assert s["positive_share"] == pytest.approx(1 / 5)
    # estimated: randomised traffic with 200 likes at position 0 and 50 at position 1 -> p1 = 0.25
    rnd = [ev(f"x{i}", f"u{i}", "z", "like", position=0, variant="random") for i in range(200)]
    rnd += [ev(f"y{i}", f"v{i}", "z", "like", position=1, variant="random") for i in range(50)]
    c = fb.IngestConfig(estimate_propensities=True, min_randomised_events=10)
    acc = fb.EventAccumulator(c)
    acc.add(fb.validate(table(rnd + [ev("t", "w", "q", "like", position=1)]), c, int(9e15), "t", None).typed, True)
    out = acc.finish()
    assert out.propensities == {0: 1.0, 1: 0.25}


def test_hash64_distinguishes_and_is_stable():
    arr = pa.array(["a", "a\x00", "", "abcdefgh", "abcdefghi", "事件-1", "事件-1", None], pa.string())
    h = hash64(arr.slice(0, 7))
    assert len(set(h[:6].tolist())) == 6 and h[5] == h[6]
    many = pa.array([f"evt-{i}" for i in range(100_000)])
    assert len(np.unique(hash64(many))) == 100_000
    assert (hash64(many.slice(50)) == hash64(many)[50:]).all()
    # a value's hash does not depend on its neighbours (lengths, empty strings, offsets)
    mixed = pa.array(["", "x" * 17, "事件-1", "", "abcdefgh"])
    alone = np.concatenate([hash64(pa.array([v])) for v in mixed.to_pylist()])
    assert (hash64(mixed) == alone).all() and (hash64(pa.array(["", ""])) == alone[0]).all()


def test_stage_runs_as_prefect_flow(ws, tmp_path, prefect_harness):
    from dpoflow.flows.ingest import ingest_flow

    candidates(ws)
    write_jsonl(tmp_path / "e.jsonl", [ev("f1", "u1", "c1"), ev("f2", "u2", "c1", "ponder")])
    (ws.root / "dpoflow.yaml").write_text(f"ingest:\n  min_ts: {iso(days=-1)}\n  sources:\n    - name: app\n"
                                          f"      path: {tmp_path / 'e.jsonl'}\n")
    out = ingest_flow(workspace=str(ws.root))
    assert set(out) == {"feedback_events", "signals", "quarantine"}
    assert ws.store.read(out["signals"]).num_rows == 1


def test_cli_feedback_commands(ws, tmp_path, capsys):
    from dpoflow.flows.cli import main

    candidates(ws)
    write_jsonl(tmp_path / "e.jsonl", [ev("f1", "u1", "c1")])
    (ws.root / "dpoflow.yaml").write_text(f"ingest:\n  min_ts: {iso(days=-1)}\n  sources:\n    - name: app\n"
                                          f"      path: {tmp_path / 'e.jsonl'}\n")
    assert main(["feedback", "ingest", "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"]["accepted"] == 1
    assert main(["feedback", "formulas"]) == 0
    assert "wilson_lower" in capsys.readouterr().out


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A throw-away PostgreSQL cluster on a Unix socket in a temp folder (skips without binaries)."""
    import glob
    import pwd
    import shutil
    import subprocess

    dirs = [os.path.dirname(shutil.which("initdb") or "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    bindir = next((d for d in dirs if d and os.path.exists(os.path.join(d, "initdb"))
                   and os.path.exists(os.path.join(d, "pg_ctl"))), None)
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    base = tmp_path_factory.mktemp("pg")
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(pwd, u)), None)
        if user is None:
            pytest.skip("running as root and no unprivileged user to run PostgreSQL")
        shutil.chown(base, user)
        shutil.chown(sock, user)
        os.chmod(base, 0o755)
        p = base
        while p != p.parent:  # the server user must reach the folder
            os.chmod(p, os.stat(p).st_mode | 0o711)
            p = p.parent
        runner = shutil.which("runuser") or shutil.which("su")
        prefix = [runner, "-u", user, "--"] if runner and runner.endswith("runuser") else None
        if prefix is None:
            pytest.skip("no runuser available")
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(prefix + [f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, env=env)
    opts = f"-k {sock} -c listen_addresses='' -c fsync=off"
    subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-w", "-l", str(base / "log"), "start"],
                   check=True, capture_output=True, env=env)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={sock}"
    finally:
        subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, env=env)


def _has_user(pwd, name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_sql_url_from_a_prefect_secret_block(ws, tmp_path, prefect_harness):
    """A Secret block holds the URL with its password; nothing downstream ever sees it."""
    from prefect.blocks.system import Secret

    candidates(ws)
    db = tmp_path / "secret-ev.db"
    sqlite_events(db, [ev(f"k{i}", f"u{i}", "c2", ts=iso(seconds=i)) for i in range(4)])
    Secret(value=f"sqlite:///{db}").save("events-db-url", overwrite=True)
    configure(ws, sources=[{"name": "db", "kind": "sql", "url_secret": "events-db-url", "table": "events"}])
    run = run_ingest(ws)
    assert run.report["accepted"] == 4
    meta = json.dumps(ws.store.info(run.outputs["feedback_events"]).to_dict())
    assert "secret-ev.db" not in meta and "events-db-url" in meta  # the block's name, never its value


def test_events_on_last_nights_candidates_are_not_orphans(ws, tmp_path):
    candidates(ws, ids=("old1", "old2"))  # night 1
    candidates(ws, ids=("new1",))  # night 2: a new candidates version
    write_jsonl(tmp_path / "e.jsonl", [ev("a", "u1", "old1"), ev("b", "u2", "new1"), ev("c", "u3", "gone")])
    configure(ws, sources=[{"name": "app", "path": str(tmp_path / "e.jsonl")}])
    rep = run_ingest(ws).report
    assert rep["accepted"] == 2 and rep["quarantined"] == {"orphan": 1}
    assert set(signals(ws)) == {"old1", "new1"}
    # the look-back counts versions back from the pinned one, never forward
    assert fb.known_candidates(ws.store, "candidates@latest", 0).to_pylist() == ["new1"]
    assert sorted(fb.known_candidates(ws.store, "candidates@1", 1).to_pylist()) == ["new1", "old1", "old2"]
    assert sorted(fb.known_candidates(ws.store, "candidates@0", 5).to_pylist()) == ["old1", "old2"]
