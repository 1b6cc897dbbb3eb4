"""Builders shared by the test modules (events, candidates, source files), so that no test
module imports another one."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpoflow.storage.schemas import conform

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


def iso(days: float = 0.0, seconds: float = 0.0) -> str:
    return (T0 + dt.timedelta(days=days, seconds=seconds)).isoformat()


def candidates(ws, ids=("c1", "c2", "c3")) -> None:
    """A `candidates` version holding these candidate ids (for the orphan check)."""
    n = len(ids)
    ws.store.write("candidates", pa.table({
        "candidate_id": list(ids), "prompt_id": ["p"] * n, "prompt": ["q"] * n, "response": list(ids),
        "origin": ["sampled"] * n, "model_version": ["m"] * n, "dup_count": pa.array([1] * n, pa.int32())}))


def ev(eid, user, resp, etype="like", ts=None, **kw) -> dict:
    """One behaviour event as a source row."""
    return {"event_id": eid, "user_id": user, "response_id": resp, "event_type": etype, "ts": ts or iso(), **kw}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sqlite_events(path, rows) -> None:
    """Append event dicts to the `events` table of a SQLite file (created on first use)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT, user_id TEXT, response_id TEXT, "
                "event_type TEXT, value REAL, ts TEXT, position INTEGER, variant TEXT)")
    con.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
                    [(r["event_id"], r["user_id"], r["response_id"], r["event_type"], r.get("value"), r["ts"],
                      r.get("position"), r.get("variant")) for r in rows])
    con.commit()
    con.close()


def quarantine_reasons(ws) -> list[str]:
    return sorted(ws.store.read("quarantine").column("reason").to_pylist()) if ws.store.exists("quarantine") else []


# --- preference pairs the tiny model can learn (trainer tests) ---

HELPFUL = ["Thank you, here is a helpful reply about {t}.", "A good answer about {t} is clear and short.",
        "Here is a clear and correct answer on {t}.", "关于{t}，这是一个有帮助的回答。"]
UNHELPFUL = ["no.", "I cannot help with {t}.", "whatever {t} {t} {t}", "对不起，我不能帮助你。"]
TOPICS = ["weather", "python", "math", "food", "travel", "music", "sport", "books", "天气", "机器学习"]


def pairs_table(n: int = 32, seed: int = 0) -> pa.Table:
    """A small separable preference set: chosen always in the helpful style, rejected not."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        rows.append({"pair_id": f"p{i:03d}", "prompt": f"Tell me about {t}, please ({i}).",
                     "chosen": HELPFUL[rng.integers(len(HELPFUL))].format(t=t),
                     "rejected": UNHELPFUL[rng.integers(len(UNHELPFUL))].format(t=t)})
    return pa.Table.from_pylist(rows)


# --- pairs with ids for the train / evaluate / promote steps ---

_GOOD = ["A clear and correct answer.", "清楚、正确、简洁的回答。", "Python lists are ordered collections.",
         "Binary search halves the range every step.", "北京是中国的首都。", "Drink water and sleep well."]
_BAD = ["no", "不知道", "I cannot help.", "blah blah", "随便", "whatever"]


def make_pairs(n: int, offset: int = 0) -> pa.Table:
    """n preference pairs with distinct prompts (English / Chinese mixed)."""
    idx = np.arange(offset, offset + n)
    prompts = [f"Question {i}: explain item {i}. 问题 {i}" for i in idx]
    chosen = [_GOOD[i % len(_GOOD)] + f" ({i})" for i in idx]
    rejected = [_BAD[i % len(_BAD)] for i in idx]
    return pa.table({
        "pair_id": [f"p{i:04d}" for i in idx], "prompt_id": [f"q{i:04d}" for i in idx], "prompt": prompts,
        "chosen": chosen, "rejected": rejected, "chosen_id": [f"c{i}" for i in idx],
        "rejected_id": [f"r{i}" for i in idx], "source": ["imported"] * n, "strategy": ["imported"] * n,
    })


# --- inputs of the pairs stage ---

def candidates_table(spec: dict[str, list[str]], prompt_text: dict[str, str] | None = None,
               responses: dict[str, str] | None = None) -> pa.Table:
    rows = []
    for p, cids in spec.items():
        for c in cids:
            rows.append({"candidate_id": c, "prompt_id": p, "prompt": (prompt_text or {}).get(p, f"question {p}?"),
                         "response": (responses or {}).get(c, f"answer from {c}"), "origin": "sampled",
                         "model_version": "m1", "dup_count": 1})
    return conform("candidates", pa.Table.from_pylist(rows))


def scores_table(metric: dict[str, float | None] | None = None, reward: dict[str, float | None] | None = None,
           unsafe: set[str] = frozenset(), pii: set[str] = frozenset()) -> pa.Table:
    ids = sorted(set(metric or {}) | set(reward or {}) | set(unsafe) | set(pii))
    rows = [{"candidate_id": c, "prompt_id": "?", "auto_score": (metric or {}).get(c), "reward": (reward or {}).get(c),
             "flag_safety": c in unsafe, "flag_pii": c in pii, "flag_repetition": False, "flag_length": False,
             "flag_refusal": False, "flag_language": False, "flag_empty": False, "flag_reasons": []} for c in ids]
    return conform("scores", pa.Table.from_pylist(rows))


def judgements_table(*rows: dict) -> pa.Table:
    return conform("judgements", pa.Table.from_pylist(list(rows)))


def seed_pairs_inputs(ws, n_prompts: int = 30) -> None:
    spec = {f"p{i}": [f"p{i}c{k}" for k in range(4)] for i in range(n_prompts)}
    texts = {p: (f"问题 {i}：请解释第{i}个概念" if i % 2 else f"question {i}: explain concept number {i}")
             for i, p in enumerate(spec)}
    resp = {c: ("详细的回答 " * (int(c[-1]) + 1) if int(c[1:].split("c")[0]) % 2 else "answer " * (int(c[-1]) + 1))
            + c for cs in spec.values() for c in cs}
    ws.store.write("candidates", candidates_table(spec, texts, resp))
    ws.store.write("scores", scores_table({c: float(c[-1]) for cs in spec.values() for c in cs}, unsafe={"p0c3"}))
    ws.store.write("judgements", judgements_table({"judgement_id": "j1", "kind": "pairwise", "prompt_id": "p1",
                                             "item_ids": ["p1c0", "p1c1"], "winner": "p1c0", "ranks": None,
                                             "rating": None, "strength": 0.9, "n_annotators": 2, "agreement": 1.0,
                                             "annotators": ["x", "y"]}))


# --- store and model registry ---

BUCKET = "dpoflow-test"  # the moto S3 bucket of the store tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts_table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(offset, offset + n)],
                     "prompt": [f"prompt {i} 你好" for i in range(offset, offset + n)]})


GATE_GOOD = {"reward_accuracy": 0.8, "reward_margin": 0.3, "baseline_reward_accuracy": 0.5,
        "wins": 33, "ties": 5, "losses": 2, "n_compared": 40, "flagged_share": 0.0, "baseline_flagged_share": 0.1}


def distinct_model(src: Path, dst: Path, k: int) -> Path:
    """A copy of `src` with different weights (one tensor nudged by `k`): another model version."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3 * k
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert torch.is_tensor(w[name])
    return dst
