"""Interoperability with TRL data: `dpoflow import dpo_train FILE` takes TRL's prompt / chosen /
rejected rows as they are, with the same derived ids as `import pairs`."""

from __future__ import annotations

import json

from dpoflow.flows.workspace import Workspace

TRL_ROWS = [
    {"prompt": "What is the capital of China?", "chosen": "Beijing.", "rejected": "Shanghai."},
    {"prompt": "用一句话介绍机器学习。", "chosen": "机器学习让计算机从数据中学习规律。", "rejected": "不知道。"},
    {"prompt": "2 + 2 = ?", "chosen": "4", "rejected": "5"},
]


def test_import_dpo_train_from_trl_rows_derives_ids_like_pairs(tmp_path, capsys):
    from dpoflow.flows.cli import main

    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRL_ROWS))
    ws_root = tmp_path / "ws"
    assert main(["import", "dpo_train", str(path), "--workspace", str(ws_root)]) == 0
    assert main(["import", "pairs", str(path), "--workspace", str(ws_root)]) == 0
    capsys.readouterr()
    ws = Workspace.open(ws_root)
    train = ws.store.read("dpo_train@latest").to_pylist()
    pairs = ws.store.read("pairs@latest").to_pylist()
    assert len(train) == 3  # before, every row was quarantined as "missing prompt_id"
    assert not ws.store.exists("quarantine") or ws.store.read("quarantine").num_rows == 0
    keys = ("pair_id", "prompt_id", "chosen_id", "rejected_id", "prompt", "chosen", "rejected")
    assert [{k: r[k] for k in keys} for r in train] == [{k: r[k] for k in keys} for r in pairs]
    assert all(r["pair_id"] and r["source"] == "imported" for r in train)
    assert len({r["pair_id"] for r in train}) == 3
