"""The balance stage: cleaning, near-duplicate clusters, caps, mixes, length band, token budget, split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dpoflow.storage.schemas import PAIRS
from dpoflow.tasks.balance import BalanceConfig, balance_pairs, cluster_prompts, load_tokenizer, to_trl
from dpoflow.tasks.text import normalize, unit_length

NO_LEN = {"length_control": False}


def make_pairs(rows: list[dict]) -> pa.Table:
    out = []
    for i, r in enumerate(rows):
        base = {"pair_id": f"pair{i:05d}", "prompt_id": f"p{i}", "prompt": f"prompt number {i}",
                "chosen": f"good answer {i}", "rejected": f"bad reply {i} x", "chosen_id": f"c{i}",
                "rejected_id": f"r{i}", "margin": 1.0, "source": "metrics", "strategy": "all_pairs"}
        base.update(r)
        out.append({name: base.get(name) for name in PAIRS.names})
    return pa.Table.from_pylist(out, schema=PAIRS)


def assert_funnel(rep: dict) -> None:
    assert rep["input_pairs"] == rep["kept"] + sum(rep["dropped"].values())
    assert rep["kept"] == rep["train"] + rep["eval"]
    for f in rep["funnel"]:
        assert f["in"] == f["dropped"] + f["out"]


def test_cjk_aware_lengths_and_normalisation():
    assert unit_length(pa.array(["你好世界", "hello world", "用 Python 写代码", ""])).tolist() == [4, 2, 5, 0]
    assert normalize(pa.array(["  ＡＢＣ　１ \n x "])).to_pylist() == ["ABC 1 x"]


def test_empty_identical_and_exact_duplicates_dropped_with_reasons():
    t = make_pairs([
        {"chosen": "   ", "rejected": "x"},
        {"chosen": "same  answer", "rejected": " same answer\n"},
        {"chosen": "ＡＢＣ", "rejected": "ABC"},  # identical after NFKC
        {"prompt": "dup prompt", "chosen": "A", "rejected": "B"},
        {"prompt": "dup  prompt", "chosen": "A ", "rejected": "B", "prompt_id": "other"},
        {},
    ])
    train, evals, rep, _ = balance_pairs(t, BalanceConfig(near_dup=False, eval_fraction=0.0, **NO_LEN))
    assert rep["dropped"]["empty"] == 1 and rep["dropped"]["identical"] == 2 and rep["dropped"]["duplicate"] == 1
    assert train.num_rows == 2 and evals.num_rows == 0
    assert "pair00003" in train.column("pair_id").to_pylist()  # the smallest pair id of duplicates is kept
    assert_funnel(rep)


def test_near_duplicate_clusters_cjk_and_english():
    texts = pa.array([
        "请用简单的话解释二分查找是如何工作的，并给出一个例子",
        "请用简单的话解释二分查找是如何工作的，并给出一个例子吧",  # one character added
        "今天天气很好，我们去公园散步吧，顺便买点水果回家",
        "Please explain how a binary search works in simple terms and give a short example in Python "
        "that sorts a list first and then finds the position of a number in it",
        "Please explain how a binary search works in simple terms and give a short example in Python "
        "that sorts the list first and then finds the position of a number in it",  # one word changed
        "Write a haiku about the autumn moon over the river at night",
        "",
    ])
    lab = cluster_prompts(normalize(texts), BalanceConfig())
    assert lab[0] == lab[1] and lab[3] == lab[4]
    assert len({lab[0], lab[2], lab[3], lab[5], lab[6]}) == 5


def test_cluster_cap_and_split_by_cluster():
    zh = "请用简单的话解释二分查找是如何工作的并给出一个例子"
    rows = [{"prompt_id": f"q{i}", "prompt": zh + "吧" * (i % 2), "pair_id": f"pz{i}", "margin": float(i)}
            for i in range(6)]
    rows += [{"prompt_id": f"u{i}"} for i in range(20)]
    t = make_pairs(rows)
    train, evals, rep, _ = balance_pairs(t, BalanceConfig(max_pairs_per_cluster=2, **NO_LEN))
    kept = pa.concat_tables([train, evals])
    zrows = [r for r in kept.to_pylist() if r["prompt_id"].startswith("q")]
    assert len(zrows) == 2 and sorted(r["margin"] for r in zrows) == [4.0, 5.0]  # largest margins kept
    assert len({r["group_id"] for r in zrows}) == 1  # one group for the whole cluster
    assert rep["dropped"]["cluster_cap"] == 4 and rep["near_dup_clusters"] == 1
    assert_funnel(rep)


def test_prompt_cap():
    rows = [{"prompt_id": "same", "prompt": "one prompt", "margin": float(i)} for i in range(5)]
    train, evals, rep, _ = balance_pairs(make_pairs(rows), BalanceConfig(max_pairs_per_prompt=3, **NO_LEN))
    assert train.num_rows + evals.num_rows == 3 and rep["dropped"]["prompt_cap"] == 2
    assert sorted(pa.concat_tables([train, evals]).column("margin").to_pylist()) == [2.0, 3.0, 4.0]


def test_mix_by_language_and_other_values():
    rows = [{"language": "zh"} for _ in range(30)] + [{"language": "en"} for _ in range(90)] + \
           [{"language": None} for _ in range(10)]
    cfg = BalanceConfig(near_dup=False, mix={"language": {"zh": 0.5, "en": 0.5}}, **NO_LEN)
    train, evals, rep, _ = balance_pairs(make_pairs(rows), cfg)
    kept = pa.concat_tables([train, evals])
    langs = kept.column("language").to_pylist()
    assert langs.count("zh") == 30 and langs.count("en") == 30 and None not in langs
    assert rep["dropped"]["mix:language"] == 70
    cfg = BalanceConfig(near_dup=False, mix={"language": {"zh": 0.5, "*": 0.5}}, **NO_LEN)
    _, _, rep, _ = balance_pairs(make_pairs(rows), cfg)
    assert rep["kept"] == 60  # en + unknown share the other half
    assert_funnel(rep)


@pytest.mark.parametrize("longer_share", [0.9, 0.1])
def test_length_band_is_met_by_subsampling(longer_share):
    n = 400
    rows = []
    for i in range(n):
        longer = i < longer_share * n
        long_txt, short_txt = f"a much longer answer with many words number {i}", f"short {i}"
        rows.append({"chosen": long_txt if longer else short_txt, "rejected": short_txt if longer else long_txt})
    cfg = BalanceConfig(near_dup=False, length_max_drop=0.9)
    train, evals, rep, _ = balance_pairs(make_pairs(rows), cfg)
    lb = rep["length_bias"]
    assert lb["chosen_longer_before"] == pytest.approx(longer_share)
    assert 0.45 <= lb["chosen_longer_after"] <= 0.55 and lb["band_met"]
    kept = pa.concat_tables([train, evals])
    lc, lr = unit_length(kept.column("chosen")), unit_length(kept.column("rejected"))
    assert (lc > lr).mean() == pytest.approx(lb["chosen_longer_after"])
    assert rep["dropped"]["length_bias"] > 0
    assert_funnel(rep)


def test_length_band_counts_chinese_by_characters():
    # chosen is longer in CJK units although it has fewer whitespace "words" and fewer bytes... of words
    rows = [{"chosen": "这是一个非常详细而且有帮助的回答", "rejected": "good answer ok"} for _ in range(20)]
    _, _, rep, _ = balance_pairs(make_pairs(rows), BalanceConfig(near_dup=False, length_control=False))
    assert rep["length_bias"]["chosen_longer_before"] == 1.0


def test_token_budget_with_the_project_tokenizer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [{"chosen": "short answer"}, {"chosen": "一个很长的回答 " * 80}, {}]
    cfg = BalanceConfig(near_dup=False, tokenizer=str(tiny_model_dir), max_tokens=60, **NO_LEN)
    train, evals, rep, _ = balance_pairs(make_pairs(rows), cfg, tokenizer=tok)
    assert rep["dropped"]["over_token_budget"] == 1 and train.num_rows + evals.num_rows == 2
    # not configured: skipped and said so
    _, _, rep, _ = balance_pairs(make_pairs(rows), BalanceConfig(near_dup=False, max_tokens=60, **NO_LEN))
    assert "over_token_budget" not in rep["dropped"] and "skipped" in rep["token_budget"]


def test_split_is_grouped_deterministic_and_stable():
    rows = [{"prompt_id": f"p{i // 3}", "prompt": f"distinct prompt {i // 3} about topic {i // 3 * 7}",
             "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(900)]
    cfg = BalanceConfig(eval_fraction=0.2, **NO_LEN)
    train, evals, rep, _ = balance_pairs(make_pairs(rows), cfg)
    tg, eg = set(train.column("group_id").to_pylist()), set(evals.column("group_id").to_pylist())
    assert not (tg & eg) and len(eg) > 20 and len(tg) > 150  # no leakage; roughly 20% of groups in eval
    assert not (set(train.column("prompt_id").to_pylist()) & set(evals.column("prompt_id").to_pylist()))
    side = {p: "eval" for p in evals.column("prompt_id").to_pylist()} | \
        {p: "train" for p in train.column("prompt_id").to_pylist()}
    # a later run with other rows added and some removed: every prompt keeps its side
    more = [{"prompt_id": f"new{i}", "prompt": f"another new prompt {i} on subject {i * 13}"} for i in range(300)]
    t2 = make_pairs(rows[300:] + more)
    train2, evals2, _, _ = balance_pairs(t2, cfg)
    for p in train2.column("prompt_id").to_pylist():
        assert side.get(p, "train") == "train"
    for p in evals2.column("prompt_id").to_pylist():
        assert side.get(p, "eval") == "eval"
    again, _, _, _ = balance_pairs(make_pairs(rows), cfg)
    assert again.equals(train)
    assert_funnel(rep)


def test_to_trl_plain_and_conversational():
    t = make_pairs([{}, {"prompt_messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}], "prompt": "hi"}])
    train, _, _, _ = balance_pairs(t, BalanceConfig(near_dup=False, eval_fraction=0.0, **NO_LEN))
    conv = to_trl(train).to_pylist()
    by_id = {r["pair_id"]: r for r in conv}
    assert by_id["pair00001"]["prompt"][0] == {"role": "system", "content": "be brief"}
    assert by_id["pair00000"]["prompt"] == [{"role": "user", "content": "prompt number 0"}]
    assert by_id["pair00000"]["chosen"] == [{"role": "assistant", "content": "good answer 0"}]
    plain = to_trl(train.filter(pa.compute.is_null(train.column("prompt_messages"))))
    assert plain.column("prompt").type == pa.string()
    from dpoflow.tasks.pair_kernels import as_views  # texts as views (build_pairs' output): strings for TRL

    views = train.filter(pa.compute.is_null(train.column("prompt_messages")))
    views = views.set_column(views.schema.get_field_index("chosen"), "chosen", as_views(views.column("chosen")))
    assert to_trl(views).column("chosen").type == pa.string()
    assert to_trl(views).column("chosen").to_pylist() == plain.column("chosen").to_pylist()


def test_balance_keeps_string_views_through_the_split():
    """Texts that come in as string views (build_pairs' output) leave as views, equal to the strings."""
    from dpoflow.tasks.pair_kernels import as_views

    t = make_pairs([{}, {}, {"chosen": "", "rejected": "x"}])
    v = t
    for c in ("prompt", "chosen", "rejected"):
        v = v.set_column(v.schema.get_field_index(c), c, as_views(v.column(c)))
    cfg = BalanceConfig(near_dup=False, eval_fraction=0.5, **NO_LEN)
    a = balance_pairs(t, cfg)
    b = balance_pairs(v, cfg)
    assert b[0].schema.field("chosen").type == pa.string_view()
    for x, y in zip(a[:2], b[:2], strict=True):
        assert x.to_pylist() == y.to_pylist()
    assert a[2]["dropped"] == b[2]["dropped"]


def test_empty_input_is_fine():
    train, evals, rep, _ = balance_pairs(make_pairs([]), BalanceConfig())
    assert train.num_rows == evals.num_rows == 0 and rep["kept"] == 0


def test_minhash_is_deterministic():
    from dpoflow.tasks.balance import minhash

    texts = pa.array(["同一个句子", "the same sentence here"])
    assert np.array_equal(minhash(texts), minhash(texts))
