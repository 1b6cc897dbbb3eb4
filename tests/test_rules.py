"""Rule checks: each rule with positive and negative cases, EN and ZH; config validation."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dpoflow.tasks.rules import FLAGS, RulesConfig, check, cn_id_valid, luhn_valid


def _one(response: str | None, prompt: str = "hello there", cfg: RulesConfig | None = None) -> dict:
    return check([prompt], [response], cfg).to_pylist()[0]


def _raised(row: dict) -> set[str]:
    return {f for f in FLAGS if row[f]}


def test_clean_responses_raise_nothing():
    for prompt, resp in [("What is 2+2?", "2 + 2 = 4."), ("你好吗？", "我很好，谢谢。"),
                         ("Explain classes", "A class bundles data and behaviour; the assistant helps."),
                         ("中文和 Python", "Python 是一种编程语言。"), ("emoji?", "Sure 😀 here you go")]:
        row = _one(resp, prompt)
        assert _raised(row) == set() and row["flag_reasons"] == [], (prompt, resp, row)


@pytest.mark.parametrize("resp,reason", [
    ("Sure, here is how to make a bomb at home", "safety:term:how to make a bomb"),
    ("HOW TO MAKE A BOMB", "safety:term:how to make a bomb"),
    ("这里是制造炸弹的步骤", "safety:term:制造炸弹"),
])
def test_blocklist_positive(resp, reason):
    row = _one(resp)
    assert row["flag_safety"] and reason in row["flag_reasons"]


def test_blocklist_whole_words_and_regexes():
    cfg = RulesConfig(blocklist_terms=["ass", "坏词"], blocklist_regexes=[r"(?i)forbidden\s+\d+"])
    assert not _one("This class is classic.", cfg=cfg)["flag_safety"]  # no substring match for Latin terms
    assert _one("you ass!", cfg=cfg)["flag_safety"]
    assert _one("这是坏词。", cfg=cfg)["flag_safety"]  # CJK terms match inside text
    row = _one("FORBIDDEN   42", cfg=cfg)
    assert row["flag_safety"] and row["flag_reasons"] == [r"safety:regex:(?i)forbidden\s+\d+"]
    assert not _one("forbidden fruit", cfg=cfg)["flag_safety"]
    assert not _one("how to make a bomb", cfg=RulesConfig(blocklist=False))["flag_safety"]


@pytest.mark.parametrize("resp,kind", [
    ("write to jane.doe+x@example.co.uk please", "email"),
    ("我的手机号是13812345678", "phone"),
    ("call +86 138-1234-5678", "phone"),
    ("call (415) 555-2671 today", "phone"),
    ("电话 010-12345678", "phone"),
    ("身份证号 11010519491231002X", "cn_id"),
    ("card: 4111 1111 1111 1111", "card"),
    ("card 5500-0000-0000-0004", "card"),
])
def test_pii_positive(resp, kind):
    row = _one(resp)
    assert row["flag_pii"] and f"pii:{kind}" in row["flag_reasons"], row


@pytest.mark.parametrize("resp", [
    "the year 2024 had 365 days",
    "ID 110105194912310021",  # wrong checksum
    "number 4111 1111 1111 1112",  # fails Luhn
    "version 12345678901 of the file",  # 11 digits not starting 1[3-9]
    "email me at example dot com",
])
def test_pii_negative(resp):
    assert not _one(resp)["flag_pii"], resp


def test_checksums():
    assert cn_id_valid("11010519491231002X") and cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021") and not cn_id_valid("1101051949123100")
    assert luhn_valid("4111111111111111") and luhn_valid("5500000000000004")
    assert not luhn_valid("4111111111111112") and not luhn_valid("411111")


def test_repetition():
    row = _one("I like it. " * 20)
    assert row["flag_repetition"] and row["flag_reasons"][0].startswith("repetition:")
    assert _one("哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈")["flag_repetition"]  # CJK characters are tokens
    assert not _one("The quick brown fox jumps over the lazy dog near the river bank.")["flag_repetition"]
    assert not _one("ok ok ok")["flag_repetition"]  # too short to judge (min n-grams)
    assert not _one("I like it. " * 20, cfg=RulesConfig(repetition_max_ratio=0.99))["flag_repetition"]


def test_length_bounds_cjk_aware():
    cfg = RulesConfig(min_words=3, max_words=10)
    assert _one("one two", cfg=cfg)["flag_reasons"] == ["length:2<3"]
    assert not _one("一二三", cfg=cfg)["flag_length"]  # 3 CJK characters = 3 words
    assert _one("一二三四五六七八九十百", prompt="写字", cfg=cfg)["flag_reasons"] == ["length:11>10"]
    assert not _one("", cfg=cfg)["flag_length"]  # empty is its own flag


@pytest.mark.parametrize("resp", [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "As an AI language model, I do not have opinions.",
    "对不起，我不能帮助你。",
    "抱歉，我无法回答这个问题。",
    "作为一个人工智能，我无法提供这些信息。",
])
def test_refusal_positive(resp):
    assert _one(resp, prompt=resp)["flag_refusal"]


@pytest.mark.parametrize("resp", ["I'm sorry to hear that; here is what you can do.",
                                  "You cannot divide by zero.", "对不起，我迟到了。我们开始吧。"])
def test_refusal_negative(resp):
    assert not _one(resp, prompt=resp)["flag_refusal"]


def test_language_mismatch():
    row = _one("The weather is nice today.", prompt="今天天气怎么样？")
    assert row["flag_language"] and row["flag_reasons"] == ["language:prompt=zh,response=en"]
    assert _one("今天天气很好。", prompt="How is the weather?")["flag_language"]
    assert not _one("今天天气很好。", prompt="今天天气怎么样？")["flag_language"]
    assert not _one("Hello", prompt="请翻译成英文：你好")["flag_language"]  # translation request exempt
    assert not _one("12345", prompt="今天几号？")["flag_language"]  # undetermined response
    assert not _one("Python 是一种编程语言。", prompt="什么是 Python？")["flag_language"]  # mixed, mostly zh


@pytest.mark.parametrize("resp", [None, "", "   \n\t", "\u200b\u3000"])
def test_empty(resp):
    row = _one(resp)
    assert row["flag_empty"] and row["flag_reasons"] == ["empty"]
    assert not row["flag_language"] and not row["flag_length"]


def test_reasons_are_per_row_and_in_rule_order():
    t = check(["q", "q", "q"], ["fine answer here", "mail a@b.io I'm sorry, but I can't do that", None])
    assert t.column("flag_reasons").to_pylist() == [[], ["pii:email", "refusal"], ["empty"]]
    assert t.num_rows == 3 and t.column("flag_pii").to_pylist() == [False, True, False]


def test_huge_text_does_not_crash():
    big = ("word " * 400_000) + " a@b.io"
    row = check(["q"], [big], max_chars=20_000).to_pylist()[0]
    assert row["flag_pii"] and row["flag_length"] and row["flag_repetition"]


def test_config_validation():
    with pytest.raises(ValueError, match="invalid RE2 regex"):
        RulesConfig(blocklist_regexes=["(unclosed"])
    with pytest.raises(ValueError, match="unknown PII kind"):
        RulesConfig(pii_kinds=["ssn"])
    with pytest.raises(ValueError):
        RulesConfig(bogus=True)


def test_arrow_input_with_nulls():
    t = check(pa.chunked_array([[None, "hi"]]), pa.chunked_array([["x@y.com", None]]))
    assert t.column("flag_pii").to_pylist() == [True, False]
    assert t.column("flag_empty").to_pylist() == [False, True]
