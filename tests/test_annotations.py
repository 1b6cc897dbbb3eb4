"""Human annotations: JSONL / CSV / Label Studio imports, aggregation, agreement, reliability."""

from __future__ import annotations

import json

import pytest

from flows.cli_feedback import import_annotations
from tasks import annotations as an


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_kind(ws, kind):
    return [j for j in ws.store.read("judgements").to_pylist() if j["kind"] == kind]


def test_jsonl_pairwise_majority_and_reliability(ws, tmp_path):
    rows = [{"annotator": "ann1", "prompt_id": "p1", "a": "x", "b": "y", "winner": "a"},
            {"annotator": "ann2", "prompt_id": "p1", "a": "y", "b": "x", "winner": "x"},
            {"annotator": "ann3", "prompt_id": "p1", "a": "x", "b": "y", "winner": "b"},
            {"annotator": "ann1", "prompt_id": "p2", "a": "u", "b": "v", "winner": "tie"},
            {"annotator": "ann2", "prompt_id": "p2", "a": "u", "b": "v", "winner": "tie"},
            {"annotator": "ann3", "prompt_id": "p2", "a": "u", "b": "v", "winner": "nobody"},  # quarantined
            {"prompt_id": "p2", "a": "u", "b": "v", "winner": "a"}]  # no annotator: quarantined
    out = import_annotations(ws, write_jsonl(tmp_path / "a.jsonl", rows))
    assert out["rows_in"] == 7 and out["rows_out"] == 5
    assert out["quarantined"] == {"invalid winner": 1, "missing annotator": 1}
    pw = {j["prompt_id"]: j for j in by_kind(ws, "pairwise")}
    assert pw["p1"]["winner"] == "x" and pw["p1"]["strength"] == pytest.approx(2 / 3)
    assert pw["p1"]["agreement"] == pytest.approx(2 / 3) and pw["p1"]["n_annotators"] == 3
    assert pw["p2"]["winner"] == "tie" and pw["p2"]["agreement"] == 1.0
    stats = ws.store.info("judgements").extra["annotators"]
    assert stats["ann1"]["reliability"] == 1.0 and stats["ann3"]["reliability"] == 0.0  # its p2 label was bad
    # re-importing the same file changes nothing
    again = import_annotations(ws, tmp_path / "a.jsonl")
    assert again["skipped"] and again["judgements"] == out["judgements"]


def test_csv_ratings_mean_and_rankings_bradley_terry(ws, tmp_path):
    (tmp_path / "r.csv").write_text(
        "annotator,prompt_id,item_id,rating,ranking\n"
        "a1,p1,c1,5,\n a2,p1,c1,3,\na3,p1,c1,4,\na1,p1,c2,abc,\n"
        "a1,p9,,,c1>c2>c3\na2,p9,,,c1>c3>c2\na3,p9,,,c2>c1>c3\na4,p9,,,c1\n")
    out = import_annotations(ws, tmp_path / "r.csv")
    assert out["quarantined"] == {"invalid rating": 1, "invalid ranking": 1}
    (rating,) = by_kind(ws, "rating")
    assert rating["rating"] == pytest.approx(4.0) and rating["item_ids"] == ["c1"]
    assert rating["agreement"] == pytest.approx(1 - (2 / 3) / 2)
    (rank,) = by_kind(ws, "ranking")
    assert rank["item_ids"][0] == "c1" and rank["item_ids"][-1] == "c3" and rank["ranks"] == [1, 2, 3]
    assert 0.5 < rank["strength"] < 1


def test_label_studio_export(ws, tmp_path):
    tasks = [
        {"id": 1, "data": {"prompt_id": "p1", "left_id": "c1", "right_id": "c2"}, "annotations": [
            {"id": 11, "completed_by": 7, "result": [{"type": "pairwise", "value": {"selected": "left"}}]},
            {"id": 12, "completed_by": {"email": "b@x.org"}, "result": [{"type": "pairwise", "value": {"selected": "left"}}]},
            {"id": 13, "completed_by": 9, "was_cancelled": True, "result": []}]},
        {"id": 2, "data": {"prompt_id": "p1", "item_id": "c1"}, "annotations": [
            {"id": 21, "completed_by": 7, "result": [{"type": "rating", "value": {"rating": 4}}]},
            {"id": 22, "completed_by": 8, "result": [{"type": "textarea", "value": {"text": ["hm"]}}]}]},
        {"id": 3, "data": {"prompt_id": "p3"}, "annotations": [
            {"id": 31, "completed_by": 7, "result": [{"type": "ranker", "value": {"ranker": {"rank": ["c5", "c4"]}}}]}]},
    ]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    out = import_annotations(ws, tmp_path / "ls.json")
    assert out["format"] == "label-studio" and out["rows_out"] == 4
    assert out["quarantined"] == {"unknown kind": 1}
    ann = ws.store.read("annotations").to_pylist()
    assert {a["annotator"] for a in ann} == {"7", "b@x.org"}
    (pw,) = by_kind(ws, "pairwise")
    assert pw["winner"] == "c1" and pw["n_annotators"] == 2
    assert by_kind(ws, "ranking")[0]["item_ids"] == ["c5", "c4"]


def test_bradley_terry_hand_example_and_many_pairwise_votes(ws, tmp_path):
    # A beats B 3 of 4, B beats C 3 of 4, A beats C 4 of 4: order A > B > C
    wins = {("A", "B"): 3, ("B", "A"): 1, ("B", "C"): 3, ("C", "B"): 1, ("A", "C"): 4}
    s = an.bradley_terry(["A", "B", "C"], wins, prior=0.0)
    assert s["A"] > s["B"] > s["C"]
    # the MM fixed point: W_i = sum_j n_ij s_i / (s_i + s_j)
    n = {("A", "B"): 4, ("B", "C"): 4, ("A", "C"): 4}
    for i in "ABC":
        w_i = sum(v for (x, _), v in wins.items() if x == i)
        exp = sum(c * s[i] / (s[i] + s[j if x == i else x]) for (x, j), c in n.items() if i in (x, j))
        assert exp == pytest.approx(w_i, rel=1e-6)
    rows = [{"annotator": f"a{k}", "prompt_id": "p", "a": x, "b": y, "winner": "a"}
            for k, (x, y) in enumerate([("A", "B"), ("B", "C"), ("A", "C"), ("A", "B")])]
    import_annotations(ws, write_jsonl(tmp_path / "m.jsonl", rows))
    (rank,) = by_kind(ws, "ranking")
    assert rank["item_ids"] == ["A", "B", "C"] and rank["prompt_id"] == "p"
    assert len(by_kind(ws, "pairwise")) == 3


def test_fleiss_kappa_hand_example():
    assert an.fleiss_kappa([[2, 0, 0], [0, 2, 0]]) == pytest.approx(1.0)
    # 2 items x 2 raters, one agreement one disagreement: P=0.5, p=(0.75,0.25) Pe=0.625 -> -1/3
    assert an.fleiss_kappa([[2, 0, 0], [1, 1, 0]]) == pytest.approx((0.5 - 0.625) / (1 - 0.625))


def test_cli_import_annotations(ws, tmp_path, capsys):
    from flows.cli import main

    write_jsonl(tmp_path / "a.jsonl", [{"annotator": "z", "item_id": "c1", "rating": 2}])
    assert main(["import", "annotations", str(tmp_path / "a.jsonl"), "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["judgements"].startswith("judgements@")
    assert main(["import", "annotations", str(tmp_path / "nope.txt"), "--workspace", str(ws.root)]) == 2
