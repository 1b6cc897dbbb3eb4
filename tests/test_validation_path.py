"""One validation path for every input door (issue 13): events through `dpoflow import` obey the
ingest rules, clocks cannot poison the signals, blank text is stopped at the door, Label Studio
buckets and text-only pairwise tasks are imported."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter

import pyarrow as pa
import pytest

from dpoflow.flows.cli import main
from dpoflow.flows.importing import import_annotations, import_dataset
from dpoflow.flows.ingest import run_ingest
from dpoflow.flows.workspace import Workspace
from tests.builders import candidates, write_jsonl

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
RESPONSES = [f"r{i}" for i in range(100)]


def ts(hours_ago: float) -> str:
    return (NOW - dt.timedelta(hours=hours_ago)).isoformat()


def served_file(path) -> None:
    write_jsonl(path, [{"response_id": r, "prompt_id": f"p{i}", "prompt": f"question {i}", "response": f"answer {r}",
                        "model_version": "m1", "served_at": ts(300)} for i, r in enumerate(RESPONSES)])


def scenario(path) -> tuple[list[str], Counter]:
    """1,075 event lines: 1,000 valid events, 20 repeats of them and 55 bad ones; returns the
    valid event ids and the expected quarantine reasons."""
    rnd = random.Random(13)
    types = ["like", "dislike", "copy", "share"]
    valid = [{"event_id": f"e{i}", "user_id": f"u{i % 250}", "response_id": RESPONSES[(i * 7) % 100],
              "event_type": types[i % 4], "ts": ts(1 + (i % 240) + i / 1000)} for i in range(1000)]
    bad = ([{**valid[i], "event_id": f"tp{i}", "event_type": "teleport"} for i in range(10)]
           + [{**valid[i], "event_id": f"fut{i}", "ts": f"2031-0{1 + i % 9}-01T00:00:00Z"} for i in range(10)]
           + [{**valid[i], "event_id": f"orph{i}", "response_id": f"nowhere-{i}"} for i in range(10)]
           + [{**valid[i], "event_id": f"nouser{i}", "user_id": None} for i in range(10)]
           + [{**valid[i], "event_id": f"badts{i}", "ts": f"not a time {i}"} for i in range(10)])
    lines = [json.dumps(r) for r in valid + [valid[i * 50] for i in range(20)] + bad]
    lines += [f'{{"event_id": "broken{i}", "user_id": ' for i in range(5)]
    rnd.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    assert len(lines) == 1075
    return [r["event_id"] for r in valid], Counter({
        "unknown event type": 10, "future ts": 10, "orphan": 10, "missing field: user_id": 10,
        "unparseable timestamp": 10, "malformed row: invalid JSON": 5})


def events_and_reasons(ws: Workspace) -> tuple[list[dict], Counter]:
    ev = ws.store.read("feedback_events").drop_columns(["source"]).to_pylist()
    q = ws.store.read("quarantine").to_pylist()
    return sorted(ev, key=lambda r: r["event_id"]), Counter(r["reason"] for r in q)


def test_the_1075_line_night_keeps_exactly_the_1000_valid_events_through_every_door(tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    ids, reasons = scenario(events)
    served_file(tmp_path / "served.jsonl")

    # door 1: `dpoflow import feedback_events FILE`, then `dpoflow feedback ingest`
    a = Workspace.open(tmp_path / "a")
    assert main(["import", "served", str(tmp_path / "served.jsonl"), "--workspace", str(a.root)]) == 0
    capsys.readouterr()
    assert main(["import", "feedback_events", str(events), "--workspace", str(a.root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["report"]
    assert (rep["rows_in"], rep["accepted"], rep["dropped"]) == (1075, 1000, {"duplicate event_id": 20})
    assert main(["feedback", "ingest", "--workspace", str(a.root)]) == 0
    ev_a, q_a = events_and_reasons(a)
    assert sorted(r["event_id"] for r in ev_a) == sorted(ids)
    assert q_a == reasons  # no orphan check turned off: `served` is known although there are no candidates

    # door 2: the same file as an ingest source
    b = Workspace.open(tmp_path / "b")
    import_dataset(b, "served", tmp_path / "served.jsonl")
    b.config.ingest.sources = [{"name": "app", "path": str(events)}]
    run = run_ingest(b)
    r = run.report
    assert r["rows_in"] == 1075 and r["accepted"] == 1000 and r["dropped"] == {"duplicate event_id": 20}
    assert r["rows_in"] == r["accepted"] + sum(r["quarantined"].values()) + sum(r["dropped"].values())
    ev_b, q_b = events_and_reasons(b)
    assert ev_b == ev_a and q_b == q_a


def test_import_door_report_accounts_for_every_line_and_reruns_add_nothing(tmp_path):
    events = tmp_path / "events.jsonl"
    scenario(events)
    served_file(tmp_path / "served.jsonl")
    ws = Workspace.open(tmp_path / "ws")
    import_dataset(ws, "served", tmp_path / "served.jsonl")
    run = import_dataset(ws, "feedback_events", events)
    r = run.report
    assert (r["rows_in"], r["rows_out"], sum(r["quarantined"].values()), r["dropped"]) == \
        (1075, 1000, 55, {"duplicate event_id": 20})
    v, q = ws.store.latest("feedback_events"), ws.store.read("quarantine").num_rows
    assert import_dataset(ws, "feedback_events", events).skipped
    assert run_ingest(ws).skipped or ws.store.read("feedback_events").num_rows == 1000
    assert ws.store.read("quarantine").num_rows == q and ws.store.read("feedback_events").num_rows == 1000
    assert ws.store.latest("feedback_events") >= v


def _signals(ws: Workspace) -> dict[str, dict]:
    return {r["candidate_id"]: r for r in ws.store.read("signals").to_pylist()}


def test_one_skewed_clock_cannot_erase_the_other_signals(tmp_path):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # at the test, not at import: "ahead" must stay ahead

    def ago(hours: float) -> str:  # relative to the test's own now: the suite may run long after import
        return (now - dt.timedelta(hours=hours)).isoformat()

    honest = [{"event_id": f"h{i}", "user_id": f"h{i}", "response_id": "c1" if i < 6 else "c2",
               "event_type": "like", "ts": ago(1 + i / 10)} for i in range(10)]
    skewed = {  # one client, any timestamp
        "s-2031": ("2031-01-01T00:00:00Z", "future ts"),
        "s-1h-ahead": ((now + dt.timedelta(hours=1)).isoformat(), "future ts"),
        "s-10min-ahead": ((now + dt.timedelta(minutes=10)).isoformat(), "future ts"),
        "s-year-1": ("0001-01-01T00:00:00Z", "stale ts"),
        "s-2y-ago": (ago(2 * 366 * 24), "stale ts"),
        "s-2min-ahead": ((now + dt.timedelta(minutes=2)).isoformat(), None),  # inside max_clock_skew
    }
    bad = [{"event_id": k, "user_id": "skew", "response_id": "c3", "event_type": "like", "ts": t}
           for k, (t, _) in skewed.items()]
    runs = {}
    for name, rows in (("base", honest), ("attack", honest + bad)):
        ws = Workspace.open(tmp_path / name)
        candidates(ws, ("c1", "c2", "c3"))
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        ws.config.ingest.sources = [{"name": "app", "path": str(tmp_path / f"{name}.jsonl")}]
        runs[name] = (run_ingest(ws), ws)
        after = dt.datetime.now(dt.UTC)
        assert dt.datetime.fromisoformat(runs[name][0].report["as_of"]) <= after  # never later than ingest time
    (base, ws_b), (attack, ws_a) = runs["base"], runs["attack"]
    q = {json.loads(r["raw"])["event_id"]: r["reason"] for r in ws_a.store.read("quarantine").to_pylist()}
    assert q == {k: why for k, (_, why) in skewed.items() if why}
    assert "s-2min-ahead" in ws_a.store.read("feedback_events").column("event_id").to_pylist()
    # the skewed user may move as_of up to the ingest time (its accepted vote says "now"), not beyond:
    # every honest vote ages by exactly that step, so the other signals move by that decay only
    step_days = (dt.datetime.fromisoformat(attack.report["as_of"])
                 - dt.datetime.fromisoformat(base.report["as_of"])).total_seconds() / 86400
    assert 0 <= step_days <= 1.1 / 24
    c = 2 ** (-step_days / ws_a.config.ingest.half_life_days)
    sb, sa = _signals(ws_b), _signals(ws_a)
    m = ws_a.config.ingest.prior_strength
    for cid in ("c1", "c2"):
        p = sb[cid]["behaviour_score"] * m / (1 - sb[cid]["behaviour_score"])  # all likes: score = P / (P + m)
        assert sa[cid]["behaviour_score"] == pytest.approx(p * c / (p * c + m), rel=1e-9)
        assert sa[cid]["behaviour_score"] > 0.99 * sb[cid]["behaviour_score"]


def test_blank_and_non_text_prompts_are_quarantined_at_the_door(ws, tmp_path, capsys):
    rows = [{"prompt": f"good prompt {i}"} for i in range(200)]
    rows += [{"prompt": ""}, {"prompt": "   \t "}, {"prompt": "\u3000"}, {"prompt": 12345}, {"prompt": ["a", "list"]}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert main(["import", "prompts", str(tmp_path / "p.jsonl"), "--workspace", str(ws.root)]) == 0
    assert ws.store.read("prompts").num_rows == 200
    reasons = Counter(ws.store.read("quarantine").column("reason").to_pylist())
    assert reasons == {"blank prompt": 3, "malformed prompt: not text": 2}
    # served responses and imported pairs: the same rule for every text field the contract requires
    write_jsonl(tmp_path / "s.jsonl", [
        {"response_id": "r1", "prompt": "q", "response": "a", "model_version": "m", "served_at": ts(1)},
        {"response_id": "r2", "prompt": "q", "response": " \n", "model_version": "m", "served_at": ts(1)}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"},
                                           {"prompt": "q", "chosen": "", "rejected": "bad"},
                                           {"prompt": "\t", "chosen": "x", "rejected": "y"}])
    assert import_dataset(ws, "served", tmp_path / "s.jsonl").report["quarantined"] == {"blank response": 1}
    assert import_dataset(ws, "pairs", tmp_path / "pairs.jsonl").report["quarantined"] == \
        {"blank chosen": 1, "blank prompt": 1}
    # annotations: a blank annotator or item is no label
    write_jsonl(tmp_path / "ann.jsonl", [{"annotator": "  ", "a": "r1", "b": "r2", "winner": "a"},
                                         {"annotator": "x", "a": " ", "b": "r2", "winner": "a"},
                                         {"annotator": "x", "a": "r1", "b": "r2", "winner": "a"}])
    out = import_annotations(ws, tmp_path / "ann.jsonl")
    assert out["rows_out"] == 1 and out["quarantined"] == {"missing annotator": 1, "missing items": 1}


def _ls_task(tid, data, results):
    return {"id": tid, "data": data, "annotations": [
        {"id": tid * 10 + i, "completed_by": who, "result": [res], "was_cancelled": False,
         "created_at": "2026-01-01T00:00:00Z"} for i, (who, res) in enumerate(results)]}


def test_label_studio_ranker_buckets_become_a_ranking_with_ties(ws, tmp_path):
    buckets = {"best": ["c1"], "fine": ["c2", "c3"], "bad": ["c4"], "items": ["c5"]}  # c5: never placed
    task = _ls_task(1, {"prompt_id": "p1", "items": [{"id": c} for c in ("c1", "c2", "c3", "c4", "c5")]},
                    [(7, {"type": "ranker", "value": {"ranker": buckets}, "from_name": "rank", "to_name": "items"})])
    (tmp_path / "ls.json").write_text(json.dumps([task]))
    out = import_annotations(ws, tmp_path / "ls.json")
    assert out["rows_out"] == 6 and out["quarantined"] == {}
    ann = {tuple(a["item_ids"]): a["winner"] for a in ws.store.read("annotations").to_pylist()}
    assert ann == {("c1", "c2"): "c1", ("c1", "c3"): "c1", ("c1", "c4"): "c1", ("c2", "c3"): "tie",
                   ("c2", "c4"): "c2", ("c3", "c4"): "c3"}
    # one list (no buckets) stays a strict ranking
    one = _ls_task(2, {"prompt_id": "p2"}, [(7, {"type": "ranker", "value": {"ranker": {"rank": ["c2", "c1"]}},
                                                 "to_name": "items"})])
    (tmp_path / "ls2.json").write_text(json.dumps([one]))
    import_annotations(ws, tmp_path / "ls2.json")
    ranks = [a for a in ws.store.read("annotations").to_pylist() if a["kind"] == "ranking"]
    assert [r["item_ids"] for r in ranks] == [["c2", "c1"]]


def test_label_studio_pairwise_without_ids_is_matched_to_candidates_by_text(ws, tmp_path):
    n = 3
    ws.store.write("candidates", pa.table({
        "candidate_id": ["ca", "cb", "cc"], "prompt_id": ["p1"] * n, "prompt": ["写一首诗"] * n,
        "response": ["秋风起", "Autumn leaves fall", "other"], "origin": ["sampled"] * n, "model_version": ["m"] * n,
        "dup_count": pa.array([1] * n, pa.int32())}))
    pick = {"type": "pairwise", "value": {"selected": "right"}, "from_name": "comparison", "to_name": "answer1,answer2"}
    tasks = [
        _ls_task(1, {"prompt": "写一首诗", "answer1": "秋风起", "answer2": " Autumn leaves fall"}, [(7, pick), (8, pick)]),
        _ls_task(2, {"prompt": "写一首诗", "answer1": "秋风起", "answer2": "a text nobody generated"}, [(7, pick)]),
    ]
    (tmp_path / "pw.json").write_text(json.dumps(tasks, ensure_ascii=False))
    out = import_annotations(ws, tmp_path / "pw.json")
    assert out["rows_out"] == 2 and out["quarantined"] == {"no candidate matches the texts": 1}
    ann = ws.store.read("annotations").to_pylist()
    assert {(tuple(a["item_ids"]), a["winner"], a["prompt_id"]) for a in ann} == {(("ca", "cb"), "cb", "p1")}
    j = ws.store.read("judgements").to_pylist()
    assert j[0]["winner"] == "cb" and j[0]["n_annotators"] == 2
