"""Human annotations: JSONL / CSV / Label Studio imports (CLI and API), aggregation into
`judgements` (majority, mean, Bradley-Terry), agreement, reliability, quarantine, re-imports."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from dpoflow.flows.cli import main
from dpoflow.flows.importing import import_annotations
from dpoflow.tasks import annotations as an


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def judgements(ws, kind):
    return {j["prompt_id"] if kind != "rating" else (j["prompt_id"], j["item_ids"][0]): j
            for j in ws.store.read("judgements").to_pylist() if j["kind"] == kind}


def reliability(ws):
    return {a: s["reliability"] for a, s in ws.store.info("judgements").extra["annotators"].items()}


def quarantined(ws):
    if not ws.store.exists("quarantine"):
        return []
    q = ws.store.read("quarantine").to_pylist()
    return sorted((r["reason"], r["row_index"]) for r in q if r["dataset"] == "annotations")


def mm_with_virtual_item(items, wins, prior, iters=20000):
    """Independent reference fit: the prior as a virtual item V (strength fixed at 1) that wins and
    loses prior/2 games against every item, plain Hunter MM over items + V, ratios to V."""
    names = [*items, "V"]
    w = dict(wins)
    for i in items:
        w[(i, "V")] = w.get((i, "V"), 0) + prior / 2
        w[("V", i)] = w.get(("V", i), 0) + prior / 2
    s = dict.fromkeys(names, 1.0)
    for _ in range(iters):
        new = {}
        for i in names:
            won = sum(v for (x, _), v in w.items() if x == i)
            den = sum((w.get((i, j), 0) + w.get((j, i), 0)) / (s[i] + s[j]) for j in names if j != i)
            new[i] = won / den
        s = {k: v / new["V"] for k, v in new.items()}
    return {i: s[i] for i in items}


# --- JSONL: pairwise majority (with ties), Fleiss' kappa, reliability, quarantine ---------------

PAIRWISE = [
    # p1 over (x, y): x 2 votes, y 1 vote -> x, share 2/3 (ann2 gives the winner by id, a/b swapped)
    {"annotator": "ann1", "prompt_id": "p1", "a": "x", "b": "y", "winner": "a"},
    {"annotator": "ann2", "prompt_id": "p1", "a": "y", "b": "x", "winner": "x"},
    {"annotator": "ann3", "prompt_id": "p1", "a": "x", "b": "y", "winner": "b"},
    # p2 over (u, v): 2 ties beat 1 vote for u -> tie
    {"annotator": "ann1", "prompt_id": "p2", "a": "u", "b": "v", "winner": "tie"},
    {"annotator": "ann2", "prompt_id": "p2", "a": "u", "b": "v", "winner": "draw"},
    {"annotator": "ann3", "prompt_id": "p2", "a": "u", "b": "v", "winner": "left"},
    # p3 over (s, t): 1 - 1 split -> tie, nobody voted tie
    {"annotator": "ann1", "prompt_id": "p3", "a": "s", "b": "t", "winner": "s"},
    {"annotator": "ann2", "prompt_id": "p3", "a": "s", "b": "t", "winner": "t"},
    # bad rows, each with its reason (row index = line number, 0-based)
    {"annotator": "ann3", "prompt_id": "p3", "a": "s", "b": "t", "winner": "nobody"},  # 8
    {"prompt_id": "p3", "a": "s", "b": "t", "winner": "a"},  # 9: no annotator
    {"annotator": "ann4", "prompt_id": "p4", "a": "s", "b": "s", "winner": "a"},  # 10: a == b
    {"annotator": "ann4", "prompt_id": "p4", "a": "s", "b": "t"},  # 11: no winner
    "{this is not json",  # 12
    {"annotator": "ann4", "kind": "vibes", "item_ids": ["s"]},  # 13
]
BAD = [("invalid winner", 8), ("missing annotator", 9), ("missing items", 10), ("missing winner", 11),
       ("invalid JSON", 12), ("unknown kind", 13)]


def test_jsonl_pairwise_majority_ties_kappa_reliability_and_quarantine(ws, tmp_path):
    out = import_annotations(ws, write_jsonl(tmp_path / "a.jsonl", PAIRWISE))
    assert out["format"] == "jsonl" and out["rows_in"] == 14 and out["rows_out"] == 8
    assert out["quarantined"] == {r: 1 for r, _ in BAD}
    assert quarantined(ws) == sorted(BAD)
    q = [r for r in ws.store.read("quarantine").to_pylist() if r["reason"] == "invalid winner"][0]
    assert json.loads(q["raw"])["winner"] == "nobody" and q["source"].endswith("a.jsonl") and q["stage"] == "import"

    pw = judgements(ws, "pairwise")
    assert set(pw) == {"p1", "p2", "p3"}
    assert pw["p1"]["item_ids"] == ["x", "y"] and pw["p1"]["winner"] == "x"
    assert pw["p1"]["strength"] == pytest.approx(2 / 3) and pw["p1"]["agreement"] == pytest.approx(2 / 3)
    assert pw["p1"]["n_annotators"] == 3 and pw["p1"]["annotators"] == ["ann1", "ann2", "ann3"]
    assert pw["p2"]["winner"] == "tie" and pw["p2"]["agreement"] == pytest.approx(2 / 3)
    assert pw["p3"]["winner"] == "tie" and pw["p3"]["strength"] == 0.5 and pw["p3"]["agreement"] == 0.0
    # two-item prompts are below bt_min_items (3): no Bradley-Terry ranking from them
    assert judgements(ws, "ranking") == {}
    # Fleiss' kappa over the items with the most common rater count (3: p1 and p2), categories
    # (a, b, tie): p1 [2, 1, 0], p2 [1, 0, 2]. P_i = (4+1-3)/6 = 1/3 each; p_j = (3, 1, 2)/6,
    # Pe = 1/4 + 1/36 + 1/9 = 7/18; kappa = (1/3 - 7/18) / (1 - 7/18) = -1/11
    assert out["pairwise_fleiss_kappa"] == pytest.approx(-1 / 11)
    # reliability = share of an annotator's labels equal to the consensus:
    # ann1 p1 yes, p2 yes, p3 no; ann2 the same; ann3 p1 no, p2 no (its p3 label was quarantined)
    rel = reliability(ws)
    assert rel["ann1"] == pytest.approx(2 / 3) and rel["ann2"] == pytest.approx(2 / 3) and rel["ann3"] == 0.0
    assert "ann4" not in rel  # all its rows were bad
    # mean agreement over judgements (pairwise + ratings): (2/3 + 2/3 + 0) / 3
    assert out["agreement"] == pytest.approx(4 / 9)


def test_reimport_adds_nothing_and_later_label_replaces_earlier(ws, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", PAIRWISE)
    first = import_annotations(ws, f)
    n_ann, n_q = ws.store.read("annotations").num_rows, len(quarantined(ws))
    v_ann, v_j = ws.store.latest("annotations"), ws.store.latest("judgements")
    again = import_annotations(ws, f)
    assert again["skipped"] and again["judgements"] == first["judgements"]
    assert (ws.store.latest("annotations"), ws.store.latest("judgements")) == (v_ann, v_j)
    # the same content again under a new mtime and under another name: rows and quarantine unchanged
    os.utime(f, (1e9, 1e9))
    shutil.copy(f, tmp_path / "copy.jsonl")
    for p in (f, tmp_path / "copy.jsonl"):
        import_annotations(ws, p)
        assert ws.store.read("annotations").num_rows == n_ann
        assert len(quarantined(ws)) == n_q
    assert judgements(ws, "pairwise")["p1"]["winner"] == "x"

    # a later file where ann3 changes its p1 vote to x and ann1 labels p1 twice (last line wins)
    later = write_jsonl(tmp_path / "b.jsonl", [
        {"annotator": "ann3", "prompt_id": "p1", "a": "x", "b": "y", "winner": "x"},
        {"annotator": "ann1", "prompt_id": "p1", "a": "y", "b": "x", "winner": "y"},
        {"annotator": "ann1", "prompt_id": "p1", "a": "x", "b": "y", "winner": "tie"},
    ])
    rep = import_annotations(ws, later)
    assert rep["rows_in"] == 3 and rep["rows_out"] == 2
    ann = ws.store.read("annotations").to_pylist()
    assert len(ann) == n_ann  # replaced, not added
    p1 = sorted((a["annotator"], a["winner"]) for a in ann if a["prompt_id"] == "p1")
    assert p1 == [("ann1", "tie"), ("ann2", "x"), ("ann3", "x")]
    j = judgements(ws, "pairwise")["p1"]
    assert j["winner"] == "x" and j["strength"] == pytest.approx(2 / 3) and j["n_annotators"] == 3


# --- CSV through the CLI: ratings (mean), rankings (Bradley-Terry), reliability ----------------

CSV = ("annotator,prompt_id,item_id,rating,ranking\n"
       "a1,p1,c1,5,\n"
       "a2,p1,c1,3,\n"
       "a3,p1,c1,4,\n"
       "a1,p1,c2,abc,\n"        # row 3: invalid rating
       "a2,p1,c2,7,\n"          # row 4: off the 1-5 scale
       "a1,p9,,,c1>c2>c3\n"
       "a2,p9,,,c1>c3>c2\n"
       "a3,p9,,,c2>c1>c3\n"
       "a4,p9,,,c1\n"           # row 8: a ranking of one item
       "a4,p9,,,c1>c2>c1\n")    # row 9: an item twice


def test_csv_ratings_and_rankings_through_the_cli(ws, tmp_path, capsys):
    (tmp_path / "r.csv").write_text(CSV)
    assert main(["import", "annotations", str(tmp_path / "r.csv"), "--workspace", str(ws.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "csv" and out["rows_in"] == 10 and out["rows_out"] == 6
    assert out["judgements"].startswith("judgements@") and out["annotations"].startswith("annotations@")
    assert quarantined(ws) == [("invalid ranking", 8), ("invalid ranking", 9), ("invalid rating", 3),
                               ("rating out of scale", 4)]

    (r,) = judgements(ws, "rating").values()
    # mean of 5, 3, 4; agreement = 1 - mean |r - 4| / half the 1-5 range = 1 - (2/3) / 2
    assert r["item_ids"] == ["c1"] and r["rating"] == pytest.approx(4.0) and r["n_annotators"] == 3
    assert r["agreement"] == pytest.approx(2 / 3) and r["strength"] == pytest.approx(math.sqrt(2 / 3))

    rank = judgements(ws, "ranking")["p9"]
    assert rank["item_ids"] == ["c1", "c2", "c3"] and rank["ranks"] == [1, 2, 3] and rank["winner"] == "c1"
    # implied wins: c1>c2 twice, c2>c1 once, c1>c3 3x, c2>c3 twice, c3>c2 once; prior 0.5
    wins = {("c1", "c2"): 2, ("c2", "c1"): 1, ("c1", "c3"): 3, ("c2", "c3"): 2, ("c3", "c2"): 1}
    ref = mm_with_virtual_item(["c1", "c2", "c3"], wins, prior=0.5)
    assert rank["strength"] == pytest.approx(ref["c1"] / (ref["c1"] + ref["c2"]), rel=1e-6)
    # Kendall tau against c1>c2>c3: a1 1, a2 1/3, a3 1/3; agreement = mean (tau + 1) / 2
    assert rank["agreement"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # reliability = mean over each annotator's scored labels (rating: 1 - |r - mean| / 2)
    rel = reliability(ws)
    assert rel["a1"] == pytest.approx((0.5 + 1.0) / 2)
    assert rel["a2"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert rel["a3"] == pytest.approx((1.0 + 2 / 3) / 2)

    assert main(["feedback", "annotators", "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["a1"]["labels"] == 2
    # a file of an unknown format: a clear error, exit status 2
    (tmp_path / "nope.txt").write_text("x")
    assert main(["import", "annotations", str(tmp_path / "nope.txt"), "--workspace", str(ws.root)]) == 2
    assert main(["import", "annotations", str(tmp_path / "missing.jsonl"), "--workspace", str(ws.root)]) == 2


# --- Label Studio JSON export ------------------------------------------------------------------

def _ls_annotation(aid, user, results, cancelled=False, when="2024-03-01T10:00:00.000000Z"):
    return {"id": aid, "completed_by": user, "result": results, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": when, "updated_at": when, "lead_time": 12.5,
            "prediction": {}, "result_count": len(results), "task": aid // 100, "project": 3,
            "parent_prediction": None, "parent_annotation": None, "last_action": None}


def _ls_result(typ, value, from_name="choice", to_name="text"):
    return {"id": f"r-{typ}", "type": typ, "value": value, "origin": "manual",
            "from_name": from_name, "to_name": to_name}


def label_studio_export():
    """What Label Studio's "Export -> JSON" writes for a project with a pairwise, a choices-based
    A/B, a rating, a number and a ranker interface (plus a text area it cannot map)."""
    task = {"inner_id": 1, "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0,
            "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None,
            "project": 3, "updated_by": 7, "file_upload": None, "comment_authors": [], "predictions": [],
            "meta": {}, "created_at": "2024-02-28T09:00:00.000000Z", "updated_at": "2024-03-01T11:00:00.000000Z"}
    pair = {"prompt_id": "p1", "prompt": "写一首关于秋天的诗", "left_id": "c1", "right_id": "c2",
            "left": "秋风起…", "right": "Autumn leaves…"}
    return [
        {**task, "id": 101, "data": pair, "annotations": [
            _ls_annotation(10101, 7, [_ls_result("pairwise", {"selected": "left"}, "comparison", "pairwise")]),
            _ls_annotation(10102, {"id": 8, "email": "b@x.org", "first_name": "B", "last_name": ""},
                           [_ls_result("pairwise", {"selected": "left"}, "comparison", "pairwise")]),
            _ls_annotation(10103, 9, [_ls_result("choices", {"choices": ["right"]})]),
            _ls_annotation(10104, 10, [], cancelled=True),  # skipped task: no label
        ]},
        {**task, "id": 102, "data": {"prompt_id": "p2", "response_id": "c3", "text": "..."}, "annotations": [
            _ls_annotation(10201, 7, [_ls_result("rating", {"rating": 4}, "stars"),
                                      _ls_result("textarea", {"text": ["nice"]}, "comment")]),
            _ls_annotation(10202, 9, [_ls_result("number", {"number": 2}, "score")]),
            _ls_annotation(10203, 11, [_ls_result("rating", {"rating": 9}, "stars")]),  # off the scale
        ]},
        {**task, "id": 103, "data": {"prompt_id": "p3", "items": [{"id": "c5"}, {"id": "c4"}, {"id": "c6"}]},
         "annotations": [
             _ls_annotation(10301, 7, [_ls_result("ranker", {"ranker": {"rank": ["c5", "c4", "c6"]}}, "rank")]),
             _ls_annotation(10302, 9, [_ls_result("ranker", {"ranker": {"rank": ["c5", "c6", "c4"]}}, "rank")]),
             _ls_annotation(10303, 8, [_ls_result("rating", {"rating": 3}, "stars")]),  # no item id in data
             _ls_annotation(10304, 8, ["garbage"]),
         ]},
        "not a task",
    ]


def test_label_studio_export_through_cli_and_api(ws, tmp_path, capsys):
    from dpoflow.flows.workspace import Workspace

    f = tmp_path / "project-3-at-2024-03-01.json"
    f.write_text(json.dumps(label_studio_export(), ensure_ascii=False))
    assert main(["import", "annotations", str(f), "--workspace", str(ws.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "label-studio" and out["rows_in"] == 12 and out["rows_out"] == 7
    assert out["quarantined"] == {"unknown kind": 2, "rating out of scale": 1, "missing items": 1,
                                  "invalid Label Studio task": 1}
    ann = ws.store.read("annotations").to_pylist()
    assert {a["annotator"] for a in ann} == {"7", "b@x.org", "9"}
    assert {a["kind"] for a in ann} == {"pairwise", "rating", "ranking"}
    assert all(a["ts"] is not None and a["ts"].year == 2024 for a in ann)
    pw = judgements(ws, "pairwise")["p1"]
    assert pw["item_ids"] == ["c1", "c2"] and pw["winner"] == "c1" and pw["strength"] == pytest.approx(2 / 3)
    r = judgements(ws, "rating")[("p2", "c3")]
    assert r["rating"] == pytest.approx(3.0) and r["annotators"] == ["7", "9"]
    rank = judgements(ws, "ranking")["p3"]
    assert rank["item_ids"][0] == "c5" and rank["n_annotators"] == 2
    bad = [r for r in ws.store.read("quarantine").to_pylist() if r["reason"] == "unknown kind"]
    assert {json.loads(b["raw"])["task"] for b in bad} == {102, 103}  # the text area and the garbage result

    # the Python entry point on the same file gives the same judgements
    ws2 = Workspace.open(tmp_path / "ws2")
    out2 = import_annotations(ws2, f)
    assert out2["rows_out"] == 7 and out2["quarantined"] == out["quarantined"]

    def key(w):
        return sorted((j["judgement_id"], j["winner"], j["rating"], j["item_ids"])
                      for j in w.store.read("judgements").to_pylist())

    assert key(ws2) == key(ws)


# --- Bradley-Terry -----------------------------------------------------------------------------

def test_bradley_terry_by_hand_and_against_an_independent_fit():
    # two items, A beats B 3 times of 4, no prior: the MLE has s_A / (s_A + s_B) = 3/4, so with
    # geometric mean 1: s_A = sqrt(3), s_B = 1 / sqrt(3)
    s = an.bradley_terry(["A", "B"], {("A", "B"): 3, ("B", "A"): 1}, prior=0.0)
    assert s["A"] == pytest.approx(math.sqrt(3), rel=1e-6) and s["B"] == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    # an item that never loses stays finite with the prior, and the fit is the virtual-item model
    wins = {("A", "B"): 5, ("B", "C"): 3, ("C", "B"): 1, ("A", "C"): 2, ("C", "D"): 4, ("B", "D"): 2}
    items = ["A", "B", "C", "D"]
    s = an.bradley_terry(items, wins, prior=0.5, iterations=5000, tol=1e-12)
    ref = mm_with_virtual_item(items, wins, prior=0.5)
    assert s["A"] > s["B"] > s["C"] > s["D"] and all(math.isfinite(v) for v in s.values())
    assert math.prod(s.values()) == pytest.approx(1.0)
    for i in items:
        assert s[i] / s["D"] == pytest.approx(ref[i] / ref["D"], rel=1e-6)


def test_many_pairwise_votes_become_a_bradley_terry_ranking(ws, tmp_path):
    # prompt p: votes over 3 items (>= bt_min_items). A>B 2-1, B>C 2-0 with a tie, A>C 1-0.
    votes = [("A", "B", "A"), ("A", "B", "A"), ("A", "B", "B"), ("B", "C", "B"), ("B", "C", "B"),
             ("B", "C", "tie"), ("A", "C", "A")]
    rows = [{"annotator": f"a{k}", "prompt_id": "p", "a": x, "b": y, "winner": w} for k, (x, y, w) in enumerate(votes)]
    import_annotations(ws, write_jsonl(tmp_path / "m.jsonl", rows))
    rank = judgements(ws, "ranking")["p"]
    assert rank["item_ids"] == ["A", "B", "C"] and rank["n_annotators"] == 7
    assert rank["agreement"] is None  # no ranking labels to compare with the fitted order
    wins = {("A", "B"): 2, ("B", "A"): 1, ("B", "C"): 2.5, ("C", "B"): 0.5, ("A", "C"): 1}
    ref = mm_with_virtual_item(["A", "B", "C"], wins, prior=0.5)
    assert rank["strength"] == pytest.approx(ref["A"] / (ref["A"] + ref["B"]), rel=1e-6)
    pairs = sorted((j["item_ids"], j["winner"]) for j in ws.store.read("judgements").to_pylist()
                   if j["kind"] == "pairwise")  # the per-pair majorities are still there
    assert pairs == [(["A", "B"], "A"), (["A", "C"], "A"), (["B", "C"], "B")]


# --- agreement statistics ----------------------------------------------------------------------

def test_fleiss_kappa_hand_examples():
    assert an.fleiss_kappa([[2, 0, 0], [0, 2, 0]]) == pytest.approx(1.0)
    # 2 items x 2 raters, one agreement one disagreement: Pbar = 0.5, p = (0.75, 0.25), Pe = 0.625
    assert an.fleiss_kappa([[2, 0, 0], [1, 1, 0]]) == pytest.approx((0.5 - 0.625) / (1 - 0.625))
    # 4 items x 3 raters: P_i = 1, 1/3, 1/3, 1 -> Pbar = 2/3; p = (5, 5, 2)/12 -> Pe = 54/144
    assert an.fleiss_kappa([[3, 0, 0], [2, 1, 0], [0, 1, 2], [0, 3, 0]]) == pytest.approx(
        (2 / 3 - 54 / 144) / (1 - 54 / 144))
    assert an.fleiss_kappa([]) is None and an.fleiss_kappa([[1, 0, 0]]) is None  # one rater: undefined


def test_winner_given_by_an_item_id_that_looks_like_a_side():
    # numeric candidate ids: "1" is the item 1 here, not side a
    row, why = an.normalise_row({"annotator": "z", "a": "2", "b": "1", "winner": "1"})
    assert why is None and row["winner"] == "1" and row["item_ids"] == ["2", "1"]
    row, _ = an.normalise_row({"annotator": "z", "a": "x", "b": "y", "winner": "1"})
    assert row["winner"] == "x"
    row, _ = an.normalise_row({"annotator": "z", "a": "x", "b": "y", "winner": "RIGHT"})
    assert row["winner"] == "y"
