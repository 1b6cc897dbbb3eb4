"""Feed the doors garbage (issue 15): every bad row is a quarantine row, the rest of the input
goes on, imports add instead of replacing, and nothing ends in a traceback.

The hypothesis tests throw random bytes, types, nesting and sizes at the import door and the
ingest door and check the accounting: rows in = kept + quarantined (+ duplicates dropped)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.flows.cli import main
from dpoflow.flows.importing import import_dataset
from dpoflow.flows.ingest import run_ingest
from dpoflow.flows.workspace import Workspace
from tests.builders import candidates, write_jsonl

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def recent(hours: float = 1.0) -> str:
    return (NOW - dt.timedelta(hours=hours)).isoformat()


# --- hypothesis: random input at both doors ---------------------------------------------------------

scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["", "   ", "\t\u3000", "01.11.2026", "2026-11-01",
                                                          "like", "c1", "u1", "r1"]))
nested = st.recursive(scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), kids, max_size=3)),
                      max_leaves=8)
FIELDS = ["prompt", "response", "chosen", "rejected", "response_id", "model_version", "served_at", "position",
          "event_id", "user_id", "event_type", "ts", "value", "messages"]
record = st.dictionaries(st.sampled_from(FIELDS), nested, max_size=8)
line = st.one_of(
    record.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),  # random bytes: invalid UTF-8, broken JSON, control characters
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),  # nesting, from harmless to absurd
    st.just(b'{"prompt": "' + b"x" * 20_000 + b'"}'),  # size
)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


CSV_HEADER = b"event_id,user_id,response_id,event_type,ts,prompt,response"


def _write(base, lines: list[bytes], fmt: str, good: list[dict] = ()):
    if fmt == "jsonl":
        path = base / "in.jsonl"
        path.write_bytes(b"\n".join(lines + [json.dumps(g).encode() for g in good]) + b"\n")
    elif fmt == "csv":
        path = base / "in.csv"
        rows = [ln.replace(b"\n", b" ") for ln in lines]
        rows += [",".join(str(g.get(k, "")) for k in CSV_HEADER.decode().split(",")).encode() for g in good]
        path.write_bytes(CSV_HEADER + b"\n" + b"\n".join(rows) + b"\n")
    else:
        path = base / "in.parquet"
        path.write_bytes(b"".join(lines))  # garbage (or empty) Parquet
    return path


@SETTINGS
@given(lines=st.lists(line, max_size=15), dataset=st.sampled_from(["prompts", "served", "pairs"]),
       fmt=st.sampled_from(["jsonl", "csv", "parquet"]))
def test_import_door_never_crashes_and_accounts_for_every_row(lines, dataset, fmt, tmp_path_factory):
    base = tmp_path_factory.mktemp("imp")
    ws = Workspace.open(base / "ws")
    run = import_dataset(ws, dataset, _write(base, lines, fmt))
    rep = run.report
    assert rep["rows_in"] == rep["rows_out"] + sum(rep["quarantined"].values())
    kept = ws.store.read(dataset).num_rows if ws.store.exists(dataset) else 0
    assert kept == rep["rows_out"]
    n_q = ws.store.read("quarantine").num_rows if ws.store.exists("quarantine") else 0
    assert n_q == sum(rep["quarantined"].values())
    if ws.store.exists(dataset):  # what got in reads back (no out-of-range timestamp, no crash)
        assert main(["datasets", "show", dataset, "--limit", "100", "--workspace", str(ws.root)]) == 0


@SETTINGS
@given(lines=st.lists(line, max_size=15), fmt=st.sampled_from(["jsonl", "csv", "parquet"]),
       door=st.sampled_from(["import", "source"]))
def test_ingest_doors_never_crash_and_account_for_every_row(lines, fmt, door, tmp_path_factory):
    base = tmp_path_factory.mktemp("ing")
    ws = Workspace.open(base / "ws")
    candidates(ws, ("c1", "r1"))
    good = [{"event_id": f"g{i}", "user_id": "u1", "response_id": "c1", "event_type": "like", "ts": recent()}
            for i in range(2)]
    path = _write(base, lines, fmt, good)
    if door == "import":
        run = import_dataset(ws, "feedback_events", path)
    else:
        ws.config.ingest.sources = [{"name": "fuzz", "path": str(path)}]
        run = run_ingest(ws)
    rep = run.report
    if not run.outputs:  # an empty file: nothing read, no version
        assert rep["rows_in"] == 0 and not ws.store.exists("feedback_events")
        return
    accepted = ws.store.read("feedback_events").num_rows
    n_q = ws.store.read("quarantine").num_rows if ws.store.exists("quarantine") else 0
    assert rep["accepted"] == accepted and sum(rep["quarantined"].values()) == n_q
    assert rep["rows_in"] == accepted + n_q + sum(rep["dropped"].values())
    if fmt == "jsonl":  # (in a CSV, a stray quote may swallow the lines after it: quarantined, not lost)
        assert {"g0", "g1"} <= set(ws.store.read("feedback_events").column("event_id").to_pylist())


# --- one bad byte, one bad file: the rest goes on ---------------------------------------------------

def test_a_bad_byte_line_an_empty_and_a_garbage_parquet_do_not_stop_ingest(ws, tmp_path):
    candidates(ws, ("c1",))
    src = tmp_path / "events"
    src.mkdir()
    good = [json.dumps({"event_id": f"e{i}", "user_id": f"u{i}", "response_id": "c1", "event_type": "like",
                        "ts": recent(1 + i / 60)}).encode() for i in range(20)]
    (src / "night.jsonl").write_bytes(b"\n".join(good[:10] + [b'{"event_id": "bad", "user_id": "\xff"}'] + good[10:]))
    (src / "empty.parquet").write_bytes(b"")
    (src / "garbage.parquet").write_bytes(b"PAR1 not really")
    (src / "more.csv").write_bytes(b"event_id,user_id,response_id,event_type,ts\n"
                                   + f"c-1,u1,c1,like,{recent(2)}\n".encode() + b"c-2,u2,c1\n"
                                   + b"c-3,u\xfe,c1,like,2026-01-01\n")
    ws.config.ingest.sources = [{"name": "app", "path": str(src)}]
    run = run_ingest(ws)
    rep = run.report
    assert rep["accepted"] == 21
    assert rep["quarantined"] == {"malformed row: invalid UTF-8": 2, "malformed row: unreadable Parquet file": 2,
                                  "malformed row: CSV": 1}
    assert rep["rows_in"] == 21 + 5
    # and the next night is not stuck on the same file: nothing new, nothing fails
    assert run_ingest(ws).skipped


# --- imports add, never replace, unless asked ---------------------------------------------------------

def test_imports_add_to_the_latest_version_and_replace_only_when_asked(ws, tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(2)] + [{"prompt": "a0"}])
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "only me"}])
    root = ["--workspace", str(ws.root)]
    assert main(["import", "prompts", str(tmp_path / "a.jsonl"), *root]) == 0
    assert main(["import", "prompts", str(tmp_path / "b.jsonl"), *root]) == 0
    assert sorted(ws.store.read("prompts").column("prompt").to_pylist()) == ["a0", "a1", "a2", "b0", "b1"]
    assert "added to the rows of prompts@0" in capsys.readouterr().out
    assert main(["import", "prompts", str(tmp_path / "c.jsonl"), "--replace", *root]) == 0
    assert "replaced prompts@1" in capsys.readouterr().out
    assert ws.store.read("prompts").column("prompt").to_pylist() == ["only me"]


def test_event_and_quarantine_imports_add(ws, tmp_path):
    candidates(ws, ("c1",))
    for night in (1, 2):
        write_jsonl(tmp_path / f"n{night}.jsonl", [
            {"event_id": f"n{night}-{i}", "user_id": f"u{i}", "response_id": "c1", "event_type": "like",
             "ts": recent(night + i / 100)} for i in range(5 if night == 1 else 2)])
        import_dataset(ws, "feedback_events", tmp_path / f"n{night}.jsonl")
    assert ws.store.read("feedback_events").num_rows == 7
    assert ws.store.read("signals").column("n_events").to_pylist() == [7]
    write_jsonl(tmp_path / "bad.jsonl", [{"event_id": "x", "user_id": "u", "response_id": "gone", "event_type": "like",
                                          "ts": recent()}])
    import_dataset(ws, "feedback_events", tmp_path / "bad.jsonl")
    n_q = ws.store.read("quarantine").num_rows
    q_rows = [{"source": "audit", "stage": "manual", "dataset": "prompts", "reason": "looked wrong", "raw": "{}",
               "quarantined_at": recent()}]
    write_jsonl(tmp_path / "q.jsonl", q_rows)
    import_dataset(ws, "quarantine", tmp_path / "q.jsonl")
    assert ws.store.read("quarantine").num_rows == n_q + 1


def test_an_empty_file_writes_no_version(ws, tmp_path, capsys):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "keep me"}])
    import_dataset(ws, "prompts", tmp_path / "p.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.csv").write_text("\n\n")
    for f in ("empty.jsonl", "blank.csv"):
        assert main(["import", "prompts", str(tmp_path / f), "--workspace", str(ws.root)]) == 0
        assert "no new version" in capsys.readouterr().out
    assert ws.store.latest("prompts") == 0 and ws.store.read("prompts").num_rows == 1
    run = import_dataset(ws, "feedback_events", tmp_path / "empty.jsonl")
    assert run.outputs == {} and not ws.store.exists("feedback_events")


def test_strict_types_dates_ints_and_json_arrays(ws, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}]))
    rep = import_dataset(ws, "prompts", tmp_path / "p.json").report
    assert (rep["rows_in"], rep["rows_out"]) == (3, 3)
    row = {"prompt": "q", "response": "a", "model_version": "m"}
    write_jsonl(tmp_path / "s.jsonl", [
        {**row, "response_id": "ok", "served_at": "2026-11-01T10:00:00Z", "position": 1},
        {**row, "response_id": "ambiguous", "served_at": "01.11.2026"},
        {**row, "response_id": "overflow", "served_at": "2026-11-01T10:00:00Z", "position": 2**40},
        {**row, "response_id": "nan-text", "response": float("nan"), "served_at": "2026-11-01T10:00:00Z"},
    ])
    rep = import_dataset(ws, "served", tmp_path / "s.jsonl").report
    assert ws.store.read("served").column("response_id").to_pylist() == ["ok"]
    assert rep["quarantined"] == {"malformed served_at: not a valid timestamp[us, tz=UTC]": 1,
                                  "malformed position: not a valid int32": 1, "malformed response: not text": 1}
    # a year -1 timestamp in a Parquet file: quarantined, so `datasets show` never meets it
    ts = pa.array([-62_200_000_000_000_000, 1_700_000_000_000_000], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"response_id": ["old", "fine"], "prompt": ["q", "q"], "response": ["a", "b"],
                             "model_version": ["m", "m"], "served_at": ts}), tmp_path / "s.parquet")
    rep = import_dataset(ws, "served", tmp_path / "s.parquet").report
    assert rep["rows_out"] == 1 and sum(rep["quarantined"].values()) == 1
    assert main(["datasets", "show", "served", "--limit", "100", "--workspace", str(ws.root)]) == 0


def test_an_import_rerun_adds_no_quarantine_row_twice(ws, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}, {"prompt": 5}])
    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text() + "{broken\n")
    import_dataset(ws, "prompts", tmp_path / "p.jsonl")
    n = ws.store.read("quarantine").num_rows
    assert n == 3
    again = import_dataset(ws, "prompts", tmp_path / "p.jsonl", force=True)  # e.g. a rerun after a kill
    assert again.report["quarantined_before"] == 3 and ws.store.read("quarantine").num_rows == n


def test_sql_source_errors_are_one_line_and_never_hold_the_password(ws, monkeypatch, capsys):
    monkeypatch.setenv("EVENTS_URL", "postgresql+psycopg://bob:Leaky@Fragment-123@localhost:1/events")
    (ws.root / "dpoflow.yaml").write_text("ingest:\n  sources:\n    - name: pg\n      kind: sql\n"
                                          "      url_env: EVENTS_URL\n      table: events\n")
    assert main(["feedback", "ingest", "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("dpoflow: error: source 'pg'")
    for secret in ("Leaky", "Fragment-123", "bob"):
        assert secret not in err
    assert os.environ["EVENTS_URL"].endswith("/events")


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"[" * 200_000])
def test_bad_lines_in_an_event_import_are_rows_in_quarantine(ws, tmp_path, bad):
    candidates(ws, ("c1",))
    good = json.dumps({"event_id": "g", "user_id": "u", "response_id": "c1", "event_type": "like", "ts": recent()})
    (tmp_path / "e.jsonl").write_bytes(good.encode() + b"\n" + bad + b"\n")
    rep = import_dataset(ws, "feedback_events", tmp_path / "e.jsonl").report
    assert rep["accepted"] == 1 and sum(rep["quarantined"].values()) == 1 and rep["rows_in"] == 2


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a night of sampling and scoring on a busy 2-core machine
def test_a_night_with_a_bad_byte_event_line_completes_and_quarantines_the_line(tmp_path):
    """The nightly (without training) on the demo inbox, one event line holding byte 0xFF: the
    night finishes, the line is in quarantine, and the rerun finishes too."""
    import yaml

    from dpoflow.flows.demo import _ensure_model, demo_config
    from dpoflow.flows.nightly import nightly_direct
    from dpoflow.tasks.demo_data import demo_night

    root = tmp_path / "ws"
    root.mkdir()
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(demo_config(root)))
    fast = ["sample.samplers=[{model: models@production, n: 1, max_new_tokens: 4, seed: 0}]", "nightly.train=false"]
    _ensure_model(Workspace.open(root, fast))
    demo_night(root / "inbox", 1)
    events = sorted((root / "inbox" / "events").glob("*.jsonl"))[0]
    events.write_bytes(events.read_bytes() + b'{"event_id": "bad-byte", "user_id": "\xff"}\n')
    out = nightly_direct(str(root), fast)
    assert {"feedback_events", "signals", "pairs", "dpo_train"} <= set(out)
    ws = Workspace.open(root)
    bad = [r for r in ws.store.read("quarantine").to_pylist() if r["reason"] == "malformed row: invalid UTF-8"]
    assert len(bad) == 1 and "bad-byte" in bad[0]["raw"]
    assert nightly_direct(str(root), fast)["feedback_events"] == out["feedback_events"]
