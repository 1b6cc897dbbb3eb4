"""Benchmark: candidates/s of BLEU + ROUGE-1/2/L on English and Chinese pairs.

(a) the score stage's fast path (tasks.metrics.fast.compute, all cores)
(b) the `evaluate` modules (tasks/metrics/bleu, tasks/metrics/rouge) called once per candidate
(c) plain loops over sacrebleu.sentence_bleu + rouge_score.RougeScorer
Same data; scores are checked to be identical (|diff| <= 1e-9). Chinese pairs are pure
ideographs so that (c) can use sacrebleu tokenize='zh' and a per-character rouge_score
tokenizer, which then agree with our CJK rule. (b) is slow (ms per call): it runs on the
first --b-size pairs of each language and its rate is reported from those.

    python benchmarks/bench_scoring.py               # 100,000 pairs (50,000 EN + 50,000 ZH)
    python benchmarks/bench_scoring.py --quick       # 2,000 pairs, seconds
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EN_WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by", "at", "from", "this", "be", "are", "not", "or", "have", "an", "they", "you", "model", "data", "answer", "question", "good", "clear", "short", "python", "list", "string", "function", "value", "return", "error", "learn", "train", "test", "run", "fast", "slow", "cat", "dog", "sat", "mat", "weather", "today", "sunny", "river", "moon", "city", "capital"]
ZH_CHARS = "今天天气很好我们去公园散步吧请用简单的话解释二分查找是如何工作一个回答应该清楚正确简洁谢谢你问题这有帮助北京中国首都上海国际化大城市机器学习模型从数据规律"


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """n pairs, half English sentences, half Chinese; references overlap their prediction."""
    rng = random.Random(seed)
    preds, refs, lang = [], [], []
    for i in range(n):
        zh = i % 2 == 1
        units = list(ZH_CHARS) if zh else EN_WORDS
        join = "" if zh else " "
        k = rng.randint(8, 40) if zh else rng.randint(5, 30)
        ref = [rng.choice(units) for _ in range(k)]
        pred = [t if rng.random() < 0.7 else rng.choice(units) for t in ref]
        if rng.random() < 0.3:
            pred = pred[: rng.randint(1, len(pred))]
        p, r = join.join(pred), join.join(ref)
        if not zh:
            p, r = p.capitalize() + ".", r.capitalize() + "."
        preds.append(p)
        refs.append(r)
        lang.append("zh" if zh else "en")
    return preds, refs, lang


def run_fast(preds, refs, workers):
    from dpoflow.tasks.metrics.fast import compute

    return compute(preds, refs, workers=workers)


def run_evaluate(preds, refs):
    from dpoflow.tasks.metrics import load_metric

    bleu, rouge = load_metric("bleu"), load_metric("rouge")
    out = {k: np.zeros(len(preds)) for k in ("bleu", "rouge1", "rouge2", "rougeL")}
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        out["bleu"][i] = bleu.compute(predictions=[p], references=[[r]], use_aggregator=False)["bleu"][0]
        res = rouge.compute(predictions=[p], references=[[r]], use_aggregator=False)
        for k in ("rouge1", "rouge2", "rougeL"):
            out[k][i] = res[k][0]
    return out


class _Chars:
    def tokenize(self, text):
        return [c for c in text if not c.isspace()]


def run_loops(preds, refs, lang):
    import sacrebleu
    from rouge_score import rouge_scorer

    en = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    zh = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Chars())
    out = {k: np.zeros(len(preds)) for k in ("bleu", "rouge1", "rouge2", "rougeL")}
    for i, (p, r, lg) in enumerate(zip(preds, refs, lang, strict=True)):
        out["bleu"][i] = sacrebleu.sentence_bleu(p, [r], tokenize="zh" if lg == "zh" else "13a").score
        s = (zh if lg == "zh" else en).score(r, p)
        for k in ("rouge1", "rouge2", "rougeL"):
            out[k][i] = s[k].fmeasure
    return out


def max_diff(a, b, idx=None):
    return max(float(np.max(np.abs((a[k] if idx is None else a[k][idx]) - b[k]))) if len(b[k]) else 0.0
               for k in b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000, help="pairs (half English, half Chinese)")
    ap.add_argument("--b-size", type=int, default=1_000, help="pairs for (b), from the start of the data")
    ap.add_argument("--workers", type=int, default=None, help="threads for (a) (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="size 2000, b-size 200")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.b_size = 2_000, 200
    preds, refs, lang = make_pairs(args.size)
    print(f"pairs: {args.size} ({lang.count('en')} EN + {lang.count('zh')} ZH), cores: {os.cpu_count()}")

    run_fast(preds[:100], refs[:100], 1)  # warm imports
    t = time.perf_counter()
    a = run_fast(preds, refs, args.workers)
    ta = time.perf_counter() - t

    t = time.perf_counter()
    c = run_loops(preds, refs, lang)
    tc = time.perf_counter() - t

    nb = min(args.b_size, args.size)
    run_evaluate(preds[:2], refs[:2])  # module load / cache outside the timing
    t = time.perf_counter()
    b = run_evaluate(preds[:nb], refs[:nb])
    tb = time.perf_counter() - t

    ra, rb, rc = args.size / ta, nb / tb, args.size / tc
    rows = [("(a) fast path", args.size, ta, ra, "-"),
            ("(b) evaluate per candidate", nb, tb, rb, f"{max_diff(a, b, np.arange(nb)):.1e}"),
            ("(c) sacrebleu + rouge_score loops", args.size, tc, rc, f"{max_diff(a, c):.1e}")]
    print("\n| method | pairs | seconds | candidates/s | max |diff| vs (a) |\n|---|---:|---:|---:|---:|")
    for name, n, sec, rate, diff in rows:
        print(f"| {name} | {n:,} | {sec:.2f} | {rate:,.0f} | {diff} |")
    print(f"\nspeed-up of (a): {ra / rb:.0f}x vs (b), {ra / rc:.1f}x vs (c)")
    ok = max_diff(a, b, np.arange(nb)) <= 1e-9 and max_diff(a, c) <= 1e-9
    print("identical scores (|diff| <= 1e-9):", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
