"""Demo inputs for `dpoflow demo`: one night of prompts, served responses, user events and
human annotations, in English and Chinese, deterministic for a given night number.

The data is small but shaped like production logs: two served variants per prompt at
positions 0 / 1, users who like the helpful variant more often (with position bias and
noise), a bot that likes everything, some malformed events, and a few annotators who mostly
agree. Night N > 1 adds events on the responses that earlier nights produced (so feedback
arrives for what the new model sampled too).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

from dpoflow.tasks.ids import stable_id_one

# (prompt, reference, good answer, weak answer, category)
ITEMS_EN = [
    ("How do I reverse a string in Python?", "Use slicing with a step of minus one: s[::-1].",
     "Use slicing with a step of minus one: s[::-1] returns the reversed string.", "Strings cannot be reversed.", "code"),
    ("What is the capital of France?", "The capital of France is Paris.",
     "The capital of France is Paris.", "France is a country in Europe.", "facts"),
    ("Explain gradient descent in one sentence.",
     "Gradient descent updates parameters in the direction that lowers the loss.",
     "Gradient descent repeatedly updates parameters in the direction that lowers the loss.",
     "It is an algorithm.", "ml"),
    ("Give me a tip for better sleep.", "Go to bed at the same time every day.",
     "Go to bed at the same time every day and avoid screens before sleep.", "Sleep more.", "health"),
    ("What is the difference between a list and a tuple?",
     "Lists are mutable, tuples are immutable.",
     "Lists are mutable and can change, while tuples are immutable once created.", "They are the same.", "code"),
    ("Write a short greeting for a new colleague.", None,
     "Welcome to the team! We are glad you are here, and happy to help you settle in.", "Hi.", "writing"),
    ("What does DPO stand for in machine learning?", "Direct preference optimization.",
     "DPO stands for direct preference optimization, a way to train from preference pairs.",
     "Data processing operation.", "ml"),
    ("Summarize: the weather today is sunny with a light breeze.", "Sunny with a light breeze.",
     "Today is sunny with a light breeze.", "Weather.", "writing"),
]
ITEMS_ZH = [
    ("如何在 Python 中反转字符串？", "使用步长为负一的切片：s[::-1]。",
     "使用步长为负一的切片：s[::-1] 就能得到反转后的字符串。", "字符串不能反转。", "code"),
    ("中国的首都是哪里？", "中国的首都是北京。", "中国的首都是北京。", "中国是一个大国。", "facts"),
    ("用一句话解释梯度下降。", "梯度下降沿着让损失变小的方向更新参数。",
     "梯度下降会反复沿着让损失变小的方向更新参数。", "这是一种算法。", "ml"),
    ("给我一个改善睡眠的建议。", "每天在同一时间睡觉。", "每天在同一时间睡觉，睡前不要看手机。", "多睡觉。", "health"),
    ("列表和元组有什么区别？", "列表是可变的，元组是不可变的。",
     "列表是可变的，可以修改；元组创建后是不可变的。", "它们一样。", "code"),
    ("写一句欢迎新同事的话。", None, "欢迎加入我们的团队！有任何问题都可以随时问我们。", "你好。", "writing"),
    ("机器学习里的 DPO 是什么意思？", "直接偏好优化。", "DPO 是直接偏好优化，用偏好对来训练模型。", "数据处理。", "ml"),
    ("总结：今天天气晴朗，有微风。", "晴朗，有微风。", "今天天气晴朗，有微风。", "天气。", "writing"),
]

# Templated families make the demo big enough for a promotion with evidence (the gate needs 30+
# held-out prompts): the same shape in English and Chinese, a helpful answer and a terse one.
_CAPITALS = [("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"), ("Japan", "Tokyo", "日本", "东京"), ("Italy", "Rome", "意大利", "罗马"),
             ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
             ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"),
             ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Greece", "Athens", "希腊", "雅典"),
             ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"),
             ("Norway", "Oslo", "挪威", "奥斯陆"), ("Poland", "Warsaw", "波兰", "华沙"),
             ("Austria", "Vienna", "奥地利", "维也纳"), ("Thailand", "Bangkok", "泰国", "曼谷"),
             ("Vietnam", "Hanoi", "越南", "河内"), ("Chile", "Santiago", "智利", "圣地亚哥"),
             ("Cuba", "Havana", "古巴", "哈瓦那"), ("Ireland", "Dublin", "爱尔兰", "都柏林"),
             ("Portugal", "Lisbon", "葡萄牙", "里斯本")]
_OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("fast", "slow", "快", "慢"),
              ("up", "down", "上", "下"), ("light", "dark", "明亮", "黑暗"), ("open", "closed", "开", "关"),
              ("early", "late", "早", "晚"), ("happy", "sad", "高兴", "难过"), ("old", "new", "旧", "新"),
              ("full", "empty", "满", "空"), ("strong", "weak", "强", "弱"), ("rich", "poor", "富", "穷"),
              ("high", "low", "高", "低"), ("long", "short", "长", "短"), ("wet", "dry", "湿", "干"),
              ("first", "last", "第一", "最后"), ("left", "right", "左", "右"), ("win", "lose", "赢", "输"),
              ("push", "pull", "推", "拉"), ("inside", "outside", "里面", "外面")]
_ANIMALS = [("dog", "woof", "狗", "汪汪"), ("cat", "meow", "猫", "喵喵"), ("cow", "moo", "牛", "哞哞"),
            ("duck", "quack", "鸭子", "嘎嘎"), ("sheep", "baa", "羊", "咩咩"), ("owl", "hoot", "猫头鹰", "咕咕"),
            ("frog", "croak", "青蛙", "呱呱"), ("lion", "roar", "狮子", "吼吼"), ("horse", "neigh", "马", "嘶嘶"),
            ("bee", "buzz", "蜜蜂", "嗡嗡")]
WEAK_EN, WEAK_ZH = "I am not sure.", "不知道。"


def _families() -> tuple[list[tuple], list[tuple]]:
    en, zh = [], []
    for country, city, country_zh, city_zh in _CAPITALS:
        good = f"The capital of {country} is {city}."
        en.append((f"What is the capital of {country}?", good, good, WEAK_EN, "facts"))
        good_zh = f"{country_zh}的首都是{city_zh}。"
        zh.append((f"{country_zh}的首都是哪里？", good_zh, good_zh, WEAK_ZH, "facts"))
    for word, opposite, word_zh, opposite_zh in _OPPOSITES:
        good = f"The opposite of {word} is {opposite}."
        en.append((f"What is the opposite of {word}?", good, good, WEAK_EN, "language"))
        good_zh = f"{word_zh}的反义词是{opposite_zh}。"
        zh.append((f"{word_zh}的反义词是什么？", good_zh, good_zh, WEAK_ZH, "language"))
    for animal, sound, animal_zh, sound_zh in _ANIMALS:
        good = f"A {animal} says {sound}."
        en.append((f"What sound does a {animal} make?", good, good, WEAK_EN, "facts"))
        good_zh = f"{animal_zh}的叫声是{sound_zh}。"
        zh.append((f"{animal_zh}怎么叫？", good_zh, good_zh, WEAK_ZH, "facts"))
    for k in range(24):
        x, y = 2 + (k * 7) % 13, 1 + (k * 5) % 11
        good = f"{x} plus {y} is {x + y}."
        en.append((f"What is {x} plus {y}?", good, good, WEAK_EN, "math"))
        good_zh = f"{x} 加 {y} 等于 {x + y}。"
        zh.append((f"{x} 加 {y} 等于几？", good_zh, good_zh, WEAK_ZH, "math"))
    return en, zh


def demo_items() -> list[tuple[str, str | None, str, str, str]]:
    """Every demo item (prompt, reference, good answer, weak answer, category): English first."""
    en, zh = _families()
    return ITEMS_EN + en + ITEMS_ZH + zh


def warmup_examples(weak_repeats: int = 2) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the embedded demo model is taught at build time: every demo
    prompt with its helpful answer once and its terse answer `weak_repeats` times, so the
    model answers with words, mostly tersely, and a night of preference training has
    something real to improve (preferring the helpful answer)."""
    out = []
    for prompt, _ref, good, weak, _cat in demo_items():
        out.append((prompt, good))
        out += [(prompt, weak)] * weak_repeats
    return out


EVENT_TYPES_POS = ["like", "favourite", "copy", "share"]
EVENT_TYPES_NEG = ["dislike", "regenerate", "report"]


def prompt_id(prompt: str) -> str:
    """Same id as the import stage derives for a prompt without messages."""
    return stable_id_one(prompt, "", prefix="p-")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, default=str))
            f.write("\n")
    return path


def default_base_time() -> dt.datetime:
    """Night 1 of the demo: UTC midnight 60 days ago. Relative to today, so the demo's events
    stay inside the ingest window (no "stale ts" a year on, no "future ts" after 60 nights),
    and the same all day, so files written twice on one day are equal."""
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - dt.timedelta(days=60)


def demo_night(out_dir: str | Path, night: int, *, base_time: dt.datetime | None = None,
               extra_response_ids: list[str] | None = None) -> dict[str, Path]:
    """Write one night's input files into `out_dir`; return {kind: path}.

    `extra_response_ids`: ids of candidates from earlier nights that users now react to.
    """
    out = Path(out_dir)
    rng = random.Random(1000 + night)
    t0 = (base_time or default_base_time()) + dt.timedelta(days=night - 1)
    items = demo_items()
    n_en = len(ITEMS_EN) + len(_families()[0])
    prompts, served, events, annotations = [], [], [], []
    for i, (prompt, ref, good, weak, cat) in enumerate(items):
        lang = "zh" if i >= n_en else "en"
        prompts.append({"prompt": prompt, "reference": ref, "category": cat, "language": lang})
        pid = prompt_id(prompt)
        variants = [(good, "helpful"), (weak, "terse")]
        if rng.random() < 0.5:
            variants.reverse()  # randomised order: lets the ingest stage estimate position bias
        for pos, (text, variant) in enumerate(variants):
            rid = f"r-n{night}-{i:02d}-{variant}"
            served.append({"response_id": rid, "prompt_id": pid, "prompt": prompt, "response": text,
                           "model_version": "served-v1", "served_at": (t0 + dt.timedelta(minutes=i)).isoformat(),
                           "position": pos, "variant": variant})
            p_pos = (0.75 if variant == "helpful" else 0.25) * (1.0 if pos == 0 else 0.7)
            for u in range(rng.randint(4, 9)):
                user = f"u{rng.randint(1, 40):03d}"
                kind = rng.choice(EVENT_TYPES_POS) if rng.random() < p_pos else rng.choice(EVENT_TYPES_NEG)
                ts = t0 + dt.timedelta(minutes=i + 1, seconds=u * 7)
                events.append({"event_id": f"e-n{night}-{rid}-{u}", "user_id": user, "response_id": rid,
                               "event_type": kind, "ts": ts.isoformat(), "position": pos, "surface": "chat"})
                if variant == "helpful" and rng.random() < 0.5:
                    events.append({"event_id": f"e-n{night}-{rid}-{u}-dwell", "user_id": user, "response_id": rid,
                                   "event_type": "dwell", "value": rng.randint(8000, 30000),
                                   "ts": (ts + dt.timedelta(seconds=3)).isoformat(), "position": pos})
        a, b = f"r-n{night}-{i:02d}-helpful", f"r-n{night}-{i:02d}-terse"
        for k, annotator in enumerate(["ann-a", "ann-b", "ann-c"]):
            winner = a if (rng.random() < 0.85 or k == 0) else b
            annotations.append({"kind": "pairwise", "prompt_id": pid, "annotator": annotator,
                                "a": a, "b": b, "winner": winner})
    for rid in extra_response_ids or []:
        for u in range(rng.randint(2, 5)):
            kind = rng.choice(EVENT_TYPES_POS + EVENT_TYPES_NEG)
            events.append({"event_id": f"e-n{night}-{rid}-{u}", "user_id": f"u{rng.randint(1, 40):03d}",
                           "response_id": rid, "event_type": kind,
                           "ts": (t0 + dt.timedelta(hours=2, seconds=u)).isoformat()})
    # A bot that likes everything, fast, and a few malformed rows: the ingest stage must cope.
    for k, r in enumerate(served):
        events.append({"event_id": f"e-n{night}-bot-{k}", "user_id": "bot-1", "response_id": r["response_id"],
                       "event_type": "like", "ts": (t0 + dt.timedelta(seconds=k)).isoformat()})
    events += [
        {"event_id": f"e-n{night}-bad-1", "user_id": "u001", "response_id": "r-unknown", "event_type": "like",
         "ts": t0.isoformat()},
        {"event_id": f"e-n{night}-bad-2", "user_id": "u002", "response_id": served[0]["response_id"],
         "event_type": "teleport", "ts": t0.isoformat()},
        {"event_id": f"e-n{night}-bad-3", "user_id": "u003", "response_id": served[1]["response_id"],
         "event_type": "like", "ts": "not a time"},
    ]
    return {
        "prompts": _write_jsonl(out / "prompts.jsonl", prompts),
        "served": _write_jsonl(out / "served.jsonl", served),
        "events": _write_jsonl(out / "events" / f"events-night{night}.jsonl", events),
        "annotations": _write_jsonl(out / "annotations.jsonl", annotations),
    }
