"""pairs -> balance through the store: idempotence, lineage, artifacts, data card, TRL / HF loading."""

from __future__ import annotations

import pyarrow.parquet as pq

from dpoflow.flows.balance import run_balance
from dpoflow.flows.pairs import run_pairs
from tests.builders import seed_pairs_inputs as _seed


def test_pairs_then_balance_in_the_store_is_idempotent(ws, tmp_path):
    _seed(ws)
    run = run_pairs(ws)
    assert set(run.outputs) == {"pairs"} and not run.skipped
    info = ws.store.info(run.outputs["pairs"])
    assert any(p.startswith("scores@") for p in info.parents) and any(p.startswith("judgements@") for p in info.parents)
    assert not any(p.startswith("signals@") for p in info.parents)  # absent input is simply skipped
    pairs1 = ws.store.read(run.outputs["pairs"])
    assert "human" in pairs1.column("source").to_pylist()
    assert "p0c3" not in pairs1.column("chosen_id").to_pylist()
    again = run_pairs(ws)
    assert again.skipped and again.outputs == run.outputs  # same input + config -> same version
    forced = run_pairs(ws, force=True)
    assert ws.store.read(forced.outputs["pairs"]).column("pair_id").to_pylist() == pairs1.column("pair_id").to_pylist()

    bal = run_balance(ws, run.outputs["pairs"])
    train = ws.store.read(bal.outputs["dpo_train"])
    evals = ws.store.read(bal.outputs["dpo_eval"])
    rep = bal.report
    assert rep["input_pairs"] == pairs1.num_rows == rep["kept"] + sum(rep["dropped"].values())
    assert train.num_rows + evals.num_rows == rep["kept"]
    assert not set(train.column("group_id").to_pylist()) & set(evals.column("group_id").to_pylist())
    meta = ws.store.info(bal.outputs["dpo_train"])
    card = meta.extra.get("data_card")
    files = rep["artifacts"]
    assert any(f.endswith("funnel.png") for f in files) and any(f.endswith("distributions.png") for f in files)
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
        assert head.startswith(b"\x89PNG") or f.endswith(".md")
    text = (ws.artifacts / "balance" / "data_card.md").read_text(encoding="utf-8")
    assert "# Preference data card" in text and str(rep["train"]) in text
    assert card == text  # the card is stored with the dpo_train version itself
    assert run_balance(ws, run.outputs["pairs"]).skipped

    # TRL / HF interop: the parquet loads with datasets' parquet builder with TRL's columns
    import datasets

    path = tmp_path / "train.parquet"
    pq.write_table(train, path)
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names) and len(ds) == train.num_rows
    assert isinstance(ds[0]["prompt"], str)


def test_flows_run_under_prefect(ws, prefect_harness):
    from dpoflow.flows.balance import balance_flow
    from dpoflow.flows.pairs import pairs_flow

    _seed(ws, 12)
    out = pairs_flow(workspace=str(ws.root), overrides=["pairs.strategy=best_vs_rest"])
    p = ws.store.read(out["pairs"])
    assert set(p.column("strategy").to_pylist()) <= {"best_vs_rest", "pairwise"} and p.num_rows > 0
    res = balance_flow(pairs=out["pairs"], workspace=str(ws.root), overrides=["balance.eval_fraction=0.3"])
    assert set(res) == {"dpo_train", "dpo_eval"}
    total = ws.store.read(res["dpo_train"]).num_rows + ws.store.read(res["dpo_eval"]).num_rows
    assert 0 < total <= p.num_rows
