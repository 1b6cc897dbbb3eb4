"""The demo shows a real improvement: a warmed-up model that answers with words, and a night
whose promotion passes the gate on decisive wins; broken byte sequences are flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from dpoflow.tasks.demo_data import WEAK_EN, demo_items


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from dpoflow.tasks.tiny_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model") / "m")


def _greedy(model_dir: Path, prompts: list[str]) -> list[str]:
    from dpoflow.tasks.generation import GenParams, generate_responses, load_model

    model, tok = load_model(str(model_dir))
    res = generate_responses(model, tok, prompts, GenParams(n=1, temperature=0.0, max_new_tokens=24, seed=0),
                             keys=[f"p{i}" for i in range(len(prompts))])
    return [r.generations[0].text for r in res]


def test_warmed_up_model_answers_with_words(demo_model):
    meta = json.loads((demo_model / "dpoflow_model.json").read_text())
    assert meta["last_loss"] < meta["first_loss"] / 5
    items = demo_items()[::8]
    texts = _greedy(demo_model, [i[0] for i in items])
    known = {i[2] for i in demo_items()} | {i[3] for i in demo_items()}
    assert sum(t in known for t in texts) >= 0.8 * len(texts)  # the demo corpus' own answers
    assert all(t.strip() and "\ufffd" not in t for t in texts[:10])
    assert texts.count(WEAK_EN) >= 3  # mostly terse at first: something for the nights to improve


def test_broken_bytes_are_flagged_with_a_reason():
    from dpoflow.tasks.rules import check

    flags = check(pa.array(["q", "问", "q"]), pa.array(["a fine answer", "列表是可变\ufffd阘\ufffd是", None]))
    assert flags.column("flag_encoding").to_pylist() == [False, True, False]
    assert "encoding:broken_bytes" in flags.column("flag_reasons")[1].as_py()


@pytest.mark.slow
def test_demo_night_promotes_on_real_wins(tmp_path, demo_model, monkeypatch):
    import shutil

    from dpoflow.flows import demo
    from dpoflow.flows.nightly import nightly_direct
    from dpoflow.flows.workspace import Workspace
    from dpoflow.tasks.demo_data import demo_night
    from dpoflow.tasks.tiny_model import build_demo_model

    # the module's warmed-up model stands in for the build inside _ensure_model (same function)
    monkeypatch.setattr("dpoflow.tasks.tiny_model.build_demo_model",
                        lambda out, seed=0: Path(shutil.copytree(demo_model, out)))
    assert build_demo_model is not None
    root = tmp_path / "ws"
    root.mkdir()
    (root / "dpoflow.yaml").write_text(yaml.safe_dump(demo.demo_config(root)))
    ws = Workspace.open(root)
    base = demo._ensure_model(ws)
    demo_night(root / "inbox", 1)
    out = nightly_direct(str(root))
    d = out["train"]["decision"]
    text = "\n".join(demo.evidence_lines(Workspace.open(root), out["train"]))
    print(text)
    assert d["promoted"], text
    assert Workspace.open(root).registry.version_of("models@production") == d["model_version"] != base
    row = ws.store.read(out["train"]["outputs"]["model_evals"]).to_pylist()[0]
    both = json.loads(row["metrics"])
    gen, m = both["generation"], both["metrics"]
    assert gen["n_compared"] >= 30 and gen["wins"] > 2 * gen["losses"]  # decisive wins, not ties
    assert m["reward_accuracy"] > m["baseline_reward_accuracy"]  # held-out reward accuracy up
    assert any(r.startswith("pass generation comparison") and "Wilson lower bound" in r for r in d["reasons"])
    assert "evidence:" in text and "wins" in text and "PROMOTED" in text
