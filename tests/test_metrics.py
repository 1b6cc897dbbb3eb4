"""BLEU / ROUGE fast path and `evaluate` modules: equality with sacrebleu / rouge_score,
hand-checked Chinese and mixed-script values, bad input, offline `evaluate.load`."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sacrebleu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from dpoflow.tasks.metrics import fast, metric_path
from dpoflow.tasks.metrics.tokenize import PY_WHITESPACE, bleu_token_strings, rouge_token_strings

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "slow", "big", "small", "red", "blue", "it", "is", "was", "and", "or", "to", "of", "running", "runs", "quickly", "happily", "generously", "connection", "connected", "studies", "studying", "I", "you", "we", "they", "Paris"]
PUNCT = [",", ".", "!", "?", "'s", "-", "(", ")", '"', ":", ";", "1,000", "3.5", "2-3", "&amp;", "&lt;",
         "e.g.", "U.S.", "--", "/", "$5", "100%", "<skipped>", "don't", "x_y"]


def _sentence(rng: random.Random, lo: int = 0, hi: int = 30) -> str:
    toks = [rng.choice(WORDS + PUNCT) for _ in range(rng.randint(lo, hi))]
    sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
    s = sep.join(toks)
    if rng.random() < 0.3:
        s = s.capitalize()
    if rng.random() < 0.3:
        s = s.replace(" ,", ",").replace(" .", ".")
    if rng.random() < 0.1:
        s = s.upper()
    return s + rng.choice(["", "", " ", "\n", "-\n"])


def _english_cases(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    preds = [_sentence(rng) for _ in range(n)]
    refs = []
    for p in preds:
        rs = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.4 and p.split():  # overlapping reference: edit the prediction
                toks = p.split()
                rng.shuffle(toks) if rng.random() < 0.3 else None
                toks = [t if rng.random() < 0.7 else rng.choice(WORDS) for t in toks]
                rs.append(" ".join(toks))
            else:
                rs.append(_sentence(rng, 1, 30))
        refs.append(rs)
    return preds, refs


def test_the_written_out_whitespace_is_what_python_splits_on():
    """PY_WHITESPACE is a literal (no scan at import); it must stay Python's own set."""
    assert "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) == PY_WHITESPACE


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_equals_sacrebleu_and_rouge_score(use_stemmer):
    preds, refs = _english_cases(600, seed=7 + use_stemmer)
    out = fast.compute(preds, refs, use_stemmer=use_stemmer, workers=2, chunk_rows=150)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    checked = 0
    for i, (p, rs) in enumerate(zip(preds, refs, strict=True)):
        rs = [r for r in rs if r.strip()]
        assert rs, "generator always gives a non-blank reference"
        assert abs(out["bleu"][i] - sacrebleu.sentence_bleu(p, rs).score) <= 1e-9, (p, rs)
        multi = scorer.score_multi(rs, p)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert abs(out[key][i] - multi[key].fmeasure) <= 1e-9, (key, p, rs)
        checked += 1
    assert checked == 600
    # the set is varied: some perfect, some zero, many in between
    assert (out["bleu"] == 0).sum() > 10 and ((out["bleu"] > 0) & (out["bleu"] < 100)).sum() > 100


@pytest.mark.parametrize("smooth", ["exp", "floor", "add-k", "none"])
def test_bleu_smoothing_methods_equal_sacrebleu(smooth):
    rng = random.Random(3)
    preds = [" ".join(rng.choice("abcdef") for _ in range(rng.randint(0, 7))) for _ in range(300)]
    refs = [" ".join(rng.choice("abcdef") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    out = fast.compute(preds, refs, ["bleu"], smooth_method=smooth)["bleu"]
    ref = BLEU(smooth_method=smooth, effective_order=True)
    for i in range(300):
        assert abs(out[i] - ref.sentence_score(preds[i], [refs[i]]).score) <= 1e-9


def test_rouge_l_long_texts_multiword_bitvectors():
    """References longer than 64 / 128 tokens exercise the carry across 64-bit words."""
    rng = random.Random(5)
    preds = [" ".join(rng.choice("abcdefg") for _ in range(rng.randint(0, 400))) for _ in range(120)]
    refs = [" ".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 400))) for _ in range(120)]
    out = fast.compute(preds, refs, ["rouge"])["rougeL"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for i in range(120):
        assert abs(out[i] - scorer.score(refs[i], preds[i])["rougeL"].fmeasure) <= 1e-9


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=60))
def test_tokenizers_equal_reference_on_any_ascii(text):
    values, lengths = bleu_token_strings([text])
    assert values.to_pylist() == Tokenizer13a()(text.rstrip()).split()
    from rouge_score import tokenize as rt

    values, _ = rouge_token_strings([text])
    assert values.to_pylist() == rt.tokenize(text, None)


def _bleu_hand(p: list[float], bp: float = 1.0) -> float:
    return 100 * bp * math.prod(p) ** (1 / len(p))


def test_chinese_hand_checked():
    # 今 天 天 气 很 好 vs 今 天 天 气 不 错: unigrams 4/6, bigrams 3/5 (今天 天天 天气),
    # trigrams 2/4 (今天天 天天气), 4-grams 1/4 -> 1/3 (今天天气); LCS 4.
    out = fast.compute(["今天天气很好"], ["今天天气不错"])
    assert out["bleu"][0] == pytest.approx(_bleu_hand([4 / 6, 3 / 5, 2 / 4, 1 / 3]), abs=1e-9)
    assert out["bleu"][0] == pytest.approx(50.81327481546149, abs=1e-9)
    assert out["rouge1"][0] == pytest.approx(2 / 3)
    assert out["rouge2"][0] == pytest.approx(3 / 5)
    assert out["rougeL"][0] == pytest.approx(2 / 3)


def test_mixed_script_hand_checked():
    # hyp 我 喜 欢 Python 编 程 / ref 我 喜 欢 python 编 程: BLEU is case-sensitive:
    # 1-grams 5/6, 2-grams 3/5 (我喜 喜欢 编程), 3-grams 1/4 (我喜欢), 4-grams 0/3 -> exp smoothing 1/(2*3).
    out = fast.compute(["我喜欢 Python 编程"], ["我 喜欢 python 编程"])
    assert out["bleu"][0] == pytest.approx(_bleu_hand([5 / 6, 3 / 5, 1 / 4, 1 / 6]), abs=1e-9)
    # ROUGE lowercases: identical token sequences
    assert out["rouge1"][0] == out["rouge2"][0] == out["rougeL"][0] == 1.0
    # CJK punctuation: a BLEU token, a ROUGE separator. BLEU: 你 好 ， 世 界 。 vs 你 好 世 界:
    # 1-grams 4/6, 2-grams 2/5 (你好 世界), 3-grams 0/4 -> 1/(2*4), 4-grams 0/3 -> 1/(4*3)
    out = fast.compute(["你好，世界。"], ["你好世界"])
    assert out["rouge1"][0] == out["rouge2"][0] == out["rougeL"][0] == 1.0  # both are 你 好 世 界
    assert out["bleu"][0] == pytest.approx(_bleu_hand([4 / 6, 2 / 5, 1 / 8, 1 / 12]), abs=1e-9)
    # other scripts are words: Cyrillic, accented Latin, Korean
    out = fast.compute(["привет мир café 안녕하세요"], ["Привет мир café 안녕하세요"])
    assert out["rouge1"][0] == 1.0
    assert out["rouge2"][0] == 1.0


def test_chinese_matches_reference_tools_with_character_tokens():
    """Pure ideographs: our BLEU equals sacrebleu tokenize='zh', ROUGE equals rouge_score with char tokens."""

    class Chars:
        def tokenize(self, text):
            return list(text)

    rng = random.Random(11)
    chars = "今天天气很好不错我们去公园散步吧中国北京上海学习机器模型数据"
    preds = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 25))) for _ in range(200)]
    refs = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 25))) for _ in range(200)]
    out = fast.compute(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Chars())
    for i in range(200):
        assert abs(out["bleu"][i] - sacrebleu.sentence_bleu(preds[i], [refs[i]], tokenize="zh").score) <= 1e-9
        s = scorer.score(refs[i], preds[i])
        for k in ("rouge1", "rouge2", "rougeL"):
            assert abs(out[k][i] - s[k].fmeasure) <= 1e-9


def test_default_tools_fail_on_chinese_but_we_do_not():
    """Why the CJK rule exists: rouge_score drops Chinese, 13a makes one token per sentence."""
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    assert scorer.score("今天天气不错", "今天天气很好")["rouge1"].fmeasure == 0.0
    assert fast.compute(["今天天气很好"], ["今天天气不错"])["rouge1"][0] > 0.6


def test_bad_input_documented_results():
    preds = [None, "", "   ", "hello", "hello", "hello", "great 😀", "x" * 10]
    refs = ["ref", "a reference", "a reference", None, "", [None, "", "hello"], "great", []]
    out = fast.compute(preds, refs)
    assert np.isnan(out["bleu"][0]) and np.isnan(out["rougeL"][0])  # null prediction -> null
    assert out["bleu"][1] == 0.0 and out["rouge1"][1] == 0.0  # empty prediction -> 0
    assert out["bleu"][2] == 0.0
    assert np.isnan(out["bleu"][3]) and np.isnan(out["rouge1"][4])  # no usable reference -> null
    assert out["bleu"][5] == pytest.approx(sacrebleu.sentence_bleu("hello", ["hello"]).score, abs=1e-9)
    assert out["rouge1"][5] == 1.0  # blank entries of a list ignored
    assert out["rouge1"][6] == 1.0  # emoji separates words in ROUGE
    assert out["bleu"][6] == pytest.approx(50.0)  # ... and is a token in BLEU (13a): p1=1/2, p2=exp-smoothed 1/2
    assert np.isnan(out["bleu"][7])
    assert fast.compute([], [])["bleu"].shape == (0,)


def test_workers_and_chunks_do_not_change_numbers():
    preds, refs = _english_cases(300, seed=1)
    a = fast.compute(preds, refs, workers=1, chunk_rows=10_000)
    b = fast.compute(preds, refs, workers=2, chunk_rows=37)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_arrow_inputs_and_length_mismatch():
    out = fast.compute(pa.chunked_array([["a b c"], ["d"]]), pa.array([["a b c"], ["d"]]))
    assert list(out["rouge1"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        fast.compute(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="smooth_method"):
        fast.compute(["a"], ["a"], smooth_method="bogus")


def test_evaluate_modules_equal_fast_path():
    from dpoflow.tasks.metrics import load_metric

    preds, refs = _english_cases(40, seed=2)
    preds += ["今天天气很好", "我喜欢 Python 编程"]
    refs += [["今天天气不错"], ["我 喜欢 python 编程", "我爱编程"]]
    fast_out = fast.compute(preds, refs)
    bleu = load_metric("bleu").compute(predictions=preds, references=refs, use_aggregator=False)
    rouge = load_metric("rouge").compute(predictions=preds, references=refs, use_aggregator=False)
    assert np.allclose(bleu["bleu"], fast_out["bleu"], atol=0, rtol=0)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert np.allclose(rouge[k], fast_out[k], atol=0, rtol=0)
    agg = load_metric("rouge").compute(predictions=preds, references=refs)
    assert agg["rouge1"] == pytest.approx(float(np.mean(fast_out["rouge1"])))
    single = load_metric("bleu").compute(predictions=["今天天气很好"], references=["今天天气不错"])
    assert single["bleu"] == pytest.approx(50.81327481546149, abs=1e-9)


def test_evaluate_load_offline_in_subprocess(tmp_path):
    """Network unreachable (offline flags, dead endpoint and proxies): loading by path still works."""
    code = (
        "import evaluate, sys\n"
        f"b = evaluate.load({metric_path('bleu')!r}); r = evaluate.load({metric_path('rouge')!r})\n"
        "x = b.compute(predictions=['今天天气很好'], references=[['今天天气不错']])['bleu']\n"
        "y = r.compute(predictions=['the cat'], references=['the cat sat'])['rouge1']\n"
        "print(round(x, 6), round(y, 6))\n"
    )
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": dead,
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "",
           "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["50.813275", "0.8"]
    assert Path(tmp_path / "modules").exists()
