"""The pairs stage on hand-built rankings: policies, strategies, ties, contradictions, safety."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dpoflow.storage.schemas import PAIRS, conform
from dpoflow.tasks.pairs import PairsConfig, build_pairs
from tests.builders import candidates_table as candidates
from tests.builders import judgements_table as judgements
from tests.builders import scores_table as scores

# --- builders (also used by test_balance*) ----------------------------------------------------


def signals(values: dict[str, float], confidence: float = 1.0) -> pa.Table:
    rows = [{"candidate_id": c, "behaviour_score": v, "confidence": confidence, "n_users": 3, "n_events": 5}
            for c, v in values.items()]
    return conform("signals", pa.Table.from_pylist(rows))


def judgement(kind: str, items: list[str], winner: str | None = None, ranks: list[int] | None = None,
              rating: float | None = None, strength: float | None = None, jid: str | None = None) -> dict:
    return {"judgement_id": jid or f"j-{kind}-{'-'.join(items)}-{winner}", "kind": kind, "prompt_id": None,
            "item_ids": items, "winner": winner, "ranks": ranks, "rating": rating, "strength": strength,
            "n_annotators": 1, "agreement": None, "annotators": ["ann"]}


def pairs_of(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("chosen_id").to_pylist(), table.column("rejected_id").to_pylist(), strict=True))


def assert_funnel(report: dict) -> None:
    """Every considered pair is kept or dropped with a reason (single_candidate counts prompts)."""
    pair_drops = sum(v for k, v in report["dropped"].items() if k not in ("single_candidate", "duplicate_candidate"))
    assert report["considered"] == report["kept"] + pair_drops


FOUR = {"p1": ["a", "b", "c", "d"]}
DISTINCT = {"a": 0.9, "b": 0.6, "c": 0.4, "d": 0.1}


# --- strategies --------------------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "expected"), [
    ("all_pairs", [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]),
    ("best_vs_worst", [("a", "d")]),
    ("best_vs_rest", [("a", "b"), ("a", "c"), ("a", "d")]),
    ("adjacent", [("a", "b"), ("b", "c"), ("c", "d")]),
])
def test_strategies_on_a_clear_ranking(strategy, expected):
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(strategy=strategy), scores=scores(DISTINCT))
    assert pairs_of(out) == expected
    assert set(out.column("strategy").to_pylist()) == {strategy}
    assert set(out.column("source").to_pylist()) == {"metrics"}
    assert_funnel(rep)


def test_records_scores_margin_and_stable_ids():
    out, _, _ = build_pairs(candidates(FOUR), PairsConfig(strategy="best_vs_worst"), scores=scores(DISTINCT))
    row = out.to_pylist()[0]
    assert row["chosen_score"] == pytest.approx(0.9) and row["rejected_score"] == pytest.approx(0.1)
    assert row["margin"] == pytest.approx(0.8)
    assert row["chosen"] == "answer from a" and row["rejected"] == "answer from d"
    assert row["prompt"] == "question p1?"
    again, _, _ = build_pairs(candidates(FOUR), PairsConfig(strategy="all_pairs"), scores=scores(DISTINCT))
    again = conform("pairs", again)  # plain strings: Arrow has no take kernel for string views yet
    ids = dict(zip(pairs_of(again), again.sort_by([("chosen_id", "ascending"), ("rejected_id", "ascending")])
                   .column("pair_id").to_pylist(), strict=True))
    assert ids[("a", "d")] == row["pair_id"]  # the id depends on (prompt, chosen, rejected) only
    assert out.schema.names == PAIRS.names
    # texts are string views into the candidates (no copies); the contract takes them as strings
    assert {f.name for f in out.schema if f.type == pa.string_view()} == {"prompt", "chosen", "rejected"}
    assert conform("pairs", out).schema == PAIRS
    assert conform("pairs", out).column("chosen").to_pylist() == out.column("chosen").to_pylist()


def test_best_vs_random_lower_is_seeded_per_prompt():
    spec = {f"p{i}": [f"p{i}{x}" for x in "abcde"] for i in range(40)}
    sc = scores({c: 1.0 - "abcde".index(c[-1]) * 0.2 for cs in spec.values() for c in cs})
    cfg = PairsConfig(strategy="best_vs_random_lower", seed=7)
    out1, _, rep = build_pairs(candidates(spec), cfg, scores=sc)
    assert out1.num_rows == 40
    assert all(c.endswith("a") for c in out1.column("chosen_id").to_pylist())  # best is always chosen
    assert len({c[-1] for c in out1.column("rejected_id").to_pylist()}) > 1  # the lower one varies
    # reproducible, and a prompt's pick does not depend on which other prompts are present
    sub = {k: v for k, v in list(spec.items())[:10]}
    out2, _, _ = build_pairs(candidates(sub), cfg, scores=sc)
    assert set(pairs_of(out2)) <= set(pairs_of(out1))
    out3, _, _ = build_pairs(candidates(spec), PairsConfig(strategy="best_vs_random_lower", seed=8), scores=sc)
    assert pairs_of(out3) != pairs_of(out1)


def test_best_vs_mean_minus_k_std():
    sc = scores({"a": 1.0, "b": 0.9, "c": 0.8, "d": 0.0})
    out, _, _ = build_pairs(candidates(FOUR), PairsConfig(strategy="best_vs_mean_minus_k_std", k_std=1.0), scores=sc)
    assert pairs_of(out) == [("a", "d")]  # only d is below mean - 1 std
    out, _, _ = build_pairs(candidates(FOUR), PairsConfig(strategy="best_vs_mean_minus_k_std", k_std=-1.0),
                            scores=sc, )
    assert pairs_of(out) == [("a", "b"), ("a", "c"), ("a", "d")]


# --- ties, single candidates, margins, caps ------------------------------------------------------

def test_ties_single_candidates_and_all_equal_scores():
    spec = {"p1": ["a", "b", "c"], "p2": ["e"], "p3": ["f", "g", "h"]}
    sc = scores({"a": 0.5, "b": 0.5, "c": 0.2, "e": 1.0, "f": 0.3, "g": 0.3, "h": 0.3})
    out, _, rep = build_pairs(candidates(spec), PairsConfig(), scores=sc)
    assert pairs_of(out) == [("a", "c"), ("b", "c")]
    assert rep["dropped"]["tie"] == 1 + 3  # a~b, and every pair of the all-equal prompt
    assert rep["dropped"]["single_candidate"] == 1
    assert all(c != r for c, r in pairs_of(out))  # never a response paired with itself
    assert_funnel(rep)


def test_no_signal_at_all_is_a_tie_not_a_guess():
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig())
    assert out.num_rows == 0 and rep["dropped"]["tie"] == 6
    assert_funnel(rep)


def test_min_margin_and_per_source_override():
    sc = scores({"a": 0.9, "b": 0.85, "c": 0.4, "d": 0.1})
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(min_margin=0.1), scores=sc)
    assert ("a", "b") not in pairs_of(out) and rep["dropped"]["below_min_margin"] == 1
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(min_margin=0.1, min_margin_by_source={"metrics": 0.0}),
                              scores=sc)
    assert ("a", "b") in pairs_of(out)
    assert_funnel(rep)


def test_cap_per_prompt_keeps_largest_margins():
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(max_pairs_per_prompt=2), scores=scores(DISTINCT))
    assert pairs_of(out) == [("a", "c"), ("a", "d")]  # margins 0.5 and 0.8
    assert rep["dropped"]["cap"] == 4
    assert_funnel(rep)


# --- policies ------------------------------------------------------------------------------------

def test_priority_lower_source_only_breaks_ties():
    # human ratings: a=5, b=5 (tie), c=1; reward prefers c over everything, then b over a.
    j = judgements(judgement("rating", ["a"], rating=5), judgement("rating", ["b"], rating=5),
                   judgement("rating", ["c"], rating=1))
    sc = scores(reward={"a": 0.1, "b": 0.5, "c": 0.9})
    out, _, rep = build_pairs(candidates({"p1": ["a", "b", "c"]}), PairsConfig(), scores=sc, judgements=j)
    rows = {(r["chosen_id"], r["rejected_id"]): r for r in out.to_pylist()}
    assert set(rows) == {("a", "c"), ("b", "c"), ("b", "a")}
    assert rows[("a", "c")]["source"] == "human" and rows[("b", "a")]["source"] == "reward"
    assert rows[("a", "c")]["margin"] == pytest.approx(4.0)
    assert rep["contradictions_resolved"] == 2  # reward disagreed with human on (a,c) and (b,c)


def test_priority_order_is_configurable():
    sc = scores(metric={"a": 0.9, "b": 0.1}, reward={"a": -1.0, "b": 1.0})
    out, _, _ = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(), scores=sc)
    assert pairs_of(out) == [("b", "a")]  # reward outranks metrics by default
    out, _, _ = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(priority=["metrics"]), scores=sc)
    assert pairs_of(out) == [("a", "b")]


def test_behaviour_signals_and_confidence_floor():
    sg = signals({"a": 0.2, "b": 0.8}, confidence=0.3)
    sc = scores(reward={"a": 1.0, "b": 0.0})
    out, _, _ = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(), scores=sc, signals=sg)
    assert pairs_of(out) == [("b", "a")] and out.column("source").to_pylist() == ["behaviour"]
    out, _, _ = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(min_signal_confidence=0.5), scores=sc,
                            signals=sg)
    assert pairs_of(out) == [("a", "b")] and out.column("source").to_pylist() == ["reward"]


def test_weighted_policy_sums_normalised_sources():
    # behaviour prefers a strongly, reward prefers b; the weights decide.
    sg = signals({"a": 1.0, "b": 0.0, "c": 0.5})
    sc = scores(reward={"a": 0.0, "b": 1.0, "c": 0.4})
    cands = candidates({"p": ["a", "b", "c"]})
    out, _, _ = build_pairs(cands, PairsConfig(policy="weighted", weights={"behaviour": 3, "reward": 1}),
                            scores=sc, signals=sg)
    assert ("a", "b") in pairs_of(out)
    row = next(r for r in out.to_pylist() if (r["chosen_id"], r["rejected_id"]) == ("a", "b"))
    assert row["source"] == "behaviour" and row["margin"] > 0
    assert row["margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])
    out, _, _ = build_pairs(cands, PairsConfig(policy="weighted", weights={"behaviour": 1, "reward": 3}),
                            scores=sc, signals=sg)
    assert ("b", "a") in pairs_of(out)


def test_human_ranking_best_first_and_explicit_ranks():
    j = judgements(judgement("ranking", ["c", "a", "b"]))
    out, _, _ = build_pairs(candidates({"p": ["a", "b", "c"]}), PairsConfig(), judgements=j)
    assert pairs_of(out) == [("a", "b"), ("c", "a"), ("c", "b")]
    j = judgements(judgement("ranking", ["c", "a", "b"], ranks=[3, 1, 1]))  # a ~ b tie, c last
    sc = scores(reward={"a": 0.0, "b": 1.0, "c": 5.0})
    out, _, rep = build_pairs(candidates({"p": ["a", "b", "c"]}), PairsConfig(), judgements=j, scores=sc)
    assert pairs_of(out) == [("a", "c"), ("b", "a"), ("b", "c")]  # reward broke the human tie a ~ b


# --- explicit pairwise labels and contradictions --------------------------------------------------

def test_pairwise_labels_become_pairs_whatever_the_strategy():
    j = judgements(judgement("pairwise", ["c", "b"], winner="c", strength=0.75))
    out, _, _ = build_pairs(candidates(FOUR), PairsConfig(strategy="best_vs_worst"), scores=scores(DISTINCT),
                            judgements=j)
    rows = {(r["chosen_id"], r["rejected_id"]): r for r in out.to_pylist()}
    assert set(rows) == {("a", "d"), ("c", "b")}
    assert rows[("c", "b")]["source"] == "human" and rows[("c", "b")]["strategy"] == "pairwise"
    assert rows[("c", "b")]["margin"] == pytest.approx(0.75)


@pytest.mark.parametrize("policy", ["priority", "weighted"])
def test_contradiction_resolved_by_policy_or_dropped(policy):
    j = judgements(judgement("pairwise", ["a", "b"], winner="b"))
    sc = scores(reward={"a": 1.0, "b": 0.0})
    out, _, rep = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(policy=policy), scores=sc, judgements=j)
    assert pairs_of(out) == [("b", "a")] and out.column("source").to_pylist() == ["human"]
    assert rep["contradictions_resolved"] == 1
    out, _, rep = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(policy=policy, contradictions="drop"),
                              scores=sc, judgements=j)
    assert out.num_rows == 0 and rep["dropped"]["contradiction"] == 1
    assert_funnel(rep)


def test_humans_disagreeing_fall_back_to_lower_sources():
    j = judgements(judgement("pairwise", ["a", "b"], winner="a", jid="j1"),
                   judgement("pairwise", ["b", "a"], winner="b", jid="j2"))
    sc = scores(reward={"a": 0.0, "b": 1.0})
    out, _, rep = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(), scores=sc, judgements=j)
    assert pairs_of(out) == [("b", "a")] and out.column("source").to_pylist() == ["reward"]
    assert rep["pairwise_conflicts"] == 1
    out, _, rep = build_pairs(candidates({"p": ["a", "b"]}), PairsConfig(contradictions="drop"), scores=sc,
                              judgements=j)
    assert out.num_rows == 0 and rep["dropped"]["contradiction"] == 1


def test_bad_judgements_are_quarantined_not_dropped_silently():
    j = judgements(judgement("pairwise", ["a", "b"], winner="zz"), judgement("pairwise", ["a"], winner="a"),
                   judgement("pairwise", ["a", "x1"], winner="a"),  # x1: candidate of another prompt
                   judgement("pairwise", ["a", "b"], winner="a", jid="good"))
    cands = candidates({"p": ["a", "b"], "q": ["x1", "x2"]})
    out, q, rep = build_pairs(cands, PairsConfig(), judgements=j)
    assert pairs_of(out) == [("a", "b")]
    reasons = sorted(q.column("reason").to_pylist())
    assert len(reasons) == 3 and any("different prompts" in r for r in reasons)
    assert all("j-pairwise" in raw for raw in q.column("raw").to_pylist())


# --- safety ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["all_pairs", "best_vs_worst", "best_vs_rest", "adjacent",
                                      "best_vs_random_lower", "best_vs_mean_minus_k_std"])
def test_unsafe_best_candidate_is_never_chosen(strategy):
    sc = scores(DISTINCT, unsafe={"a"}, pii={"b"})
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(strategy=strategy, k_std=0.0), scores=sc)
    assert not ({"a", "b"} & set(out.column("chosen_id").to_pylist()))
    if strategy in ("best_vs_worst", "best_vs_rest", "best_vs_random_lower", "best_vs_mean_minus_k_std"):
        assert set(out.column("chosen_id").to_pylist()) <= {"c"}  # the best *safe* candidate
    assert out.num_rows >= 1
    assert_funnel(rep)


# --- imported pairs, prompt info --------------------------------------------------------------------

def test_imported_pairs_pass_through_with_safety_and_dedup():
    base = {"prompt_id": "p1", "prompt": "question p1?", "margin": None, "strategy": "external"}
    imp = conform("pairs", pa.Table.from_pylist([
        {**base, "pair_id": "x1", "chosen": "A", "rejected": "D", "chosen_id": "a", "rejected_id": "d", "source": "x"},
        {**base, "pair_id": "x2", "chosen": "B", "rejected": "C", "chosen_id": "zz1", "rejected_id": "zz2", "source": "x"},
        {**base, "pair_id": "x3", "chosen": "B", "rejected": "C", "chosen_id": "zz1", "rejected_id": "zz2", "source": "x"},
        {**base, "pair_id": "x4", "chosen": "U", "rejected": "C", "chosen_id": "u", "rejected_id": "c", "source": "x"},
    ]))
    sc = scores(DISTINCT, unsafe={"u"})
    out, _, rep = build_pairs(candidates(FOUR), PairsConfig(strategy="best_vs_worst"), scores=sc, imported=imp)
    assert out.num_rows == 2  # generated (a, d) + imported (zz1, zz2); duplicates and unsafe dropped
    assert sorted(out.column("source").to_pylist()) == ["imported", "metrics"]
    assert rep["dropped"]["duplicate"] == 2 and rep["dropped"]["unsafe_chosen"] == 1
    assert len(set(out.column("pair_id").to_pylist())) == 2
    assert {out.schema.field(c).type for c in ("prompt", "chosen", "rejected")} == {pa.string_view()}  # one type
    assert sorted(out.column("chosen").to_pylist()) == ["B", "answer from a"]
    assert_funnel(rep)


def test_prompt_category_language_and_messages_attached():
    prompts = conform("prompts", pa.Table.from_pylist([
        {"prompt_id": "p1", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "category": "chat",
         "language": "en"}]))
    cands = candidates({"p1": ["a", "b"], "p2": ["c", "d"]}, prompt_text={"p1": "hi", "p2": "今天天气怎么样？"})
    sc = scores({"a": 1, "b": 0, "c": 1, "d": 0})
    out, _, _ = build_pairs(cands, PairsConfig(), prompts=prompts, scores=sc)
    rows = {r["prompt_id"]: r for r in out.to_pylist()}
    assert rows["p1"]["category"] == "chat" and rows["p1"]["prompt_messages"] == [{"role": "user", "content": "hi"}]
    assert rows["p2"]["language"] == "zh" and rows["p2"]["category"] is None  # guessed when prompts lack it


def test_config_rejects_unknown_sources():
    with pytest.raises(ValueError):
        PairsConfig(priority=["humans"])
    with pytest.raises(ValueError):
        PairsConfig(weights={"rewards": 1.0})


@pytest.mark.parametrize("policy", ["priority", "weighted"])
@pytest.mark.parametrize("strategy", ["all_pairs", "best_vs_worst", "adjacent", "best_vs_random_lower",
                                      "best_vs_mean_minus_k_std"])
def test_batches_of_prompts_give_the_same_pairs(monkeypatch, policy, strategy):
    """Pairs are decided a batch of whole prompts at a time: any batch size, the same table and report."""
    import dpoflow.tasks.pairs as pairs_mod

    groups = {f"p{i}": [f"p{i}-{k}" for k in range(i % 5 + 1)] for i in range(9)}
    ids = [c for cs in groups.values() for c in cs]
    sc = scores(reward={c: float((7 * i) % 5) for i, c in enumerate(ids)}, unsafe={ids[5]})
    sg = signals({c: float((3 * i) % 4) for i, c in enumerate(ids[::2])})
    j = judgements(judgement("pairwise", ["p4-1", "p4-3"], winner="p4-3", strength=0.5),
                   judgement("pairwise", ["p8-0", "p8-2"], winner="p8-0", jid="j2"),
                   judgement("ranking", ["p3-2", "p3-0", "p3-1"]))
    cfg = PairsConfig(policy=policy, strategy=strategy, max_pairs_per_prompt=3)
    want, _, want_rep = build_pairs(candidates(groups), cfg, scores=sc, signals=sg, judgements=j)
    assert want.num_rows >= 8
    for batch in (1, 4):
        monkeypatch.setattr(pairs_mod, "PAIR_BATCH", batch)
        got, _, rep = build_pairs(candidates(groups), cfg, scores=sc, signals=sg, judgements=j)
        assert got.equals(want) and rep == want_rep
