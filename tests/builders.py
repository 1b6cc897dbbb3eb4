"""Builders shared by the test modules (events, candidates, source files), so that no test
module imports another one."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pyarrow as pa

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


def iso(days: float = 0.0, seconds: float = 0.0) -> str:
    return (T0 + dt.timedelta(days=days, seconds=seconds)).isoformat()


def candidates(ws, ids=("c1", "c2", "c3")) -> None:
    """A `candidates` version holding these candidate ids (for the orphan check)."""
    n = len(ids)
    ws.store.write("candidates", pa.table({
        "candidate_id": list(ids), "prompt_id": ["p"] * n, "prompt": ["q"] * n, "response": list(ids),
        "origin": ["sampled"] * n, "model_version": ["m"] * n, "dup_count": pa.array([1] * n, pa.int32())}))


def ev(eid, user, resp, etype="like", ts=None, **kw) -> dict:
    """One behaviour event as a source row."""
    return {"event_id": eid, "user_id": user, "response_id": resp, "event_type": etype, "ts": ts or iso(), **kw}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sqlite_events(path, rows) -> None:
    """Append event dicts to the `events` table of a SQLite file (created on first use)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT, user_id TEXT, response_id TEXT, "
                "event_type TEXT, value REAL, ts TEXT, position INTEGER, variant TEXT)")
    con.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
                    [(r["event_id"], r["user_id"], r["response_id"], r["event_type"], r.get("value"), r["ts"],
                      r.get("position"), r.get("variant")) for r in rows])
    con.commit()
    con.close()


def quarantine_reasons(ws) -> list[str]:
    return sorted(ws.store.read("quarantine").column("reason").to_pylist()) if ws.store.exists("quarantine") else []
