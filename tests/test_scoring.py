"""The `score` stage: references, null metrics, caps, invalid UTF-8, extra metrics, reward,
auto_score, the Prefect flow and the `metrics compute` command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu

from dpoflow.flows.workspace import Workspace
from dpoflow.storage.schemas import SCORES, conform
from dpoflow.tasks.metrics import metric_path
from dpoflow.tasks.reward import RewardConfig, score_rewards
from dpoflow.tasks.scoring import ExtraMetric, ScoreConfig, repair_utf8, score_table


def _candidates(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    return pa.table({
        "candidate_id": [r[0] for r in rows], "prompt_id": [r[1] for r in rows],
        "prompt": [r[2] for r in rows], "response": [r[3] for r in rows],
        "origin": ["sampled"] * len(rows), "model_version": ["m0"] * len(rows),
        "dup_count": pa.array([1] * len(rows), pa.int32()),
    })


PROMPTS = pa.table({
    "prompt_id": ["p1", "p2", "p3", "p4", "p1"],
    "prompt": ["Say hi", "说你好", "q", "no ref", "duplicate id"],
    "reference": ["hi there friend", None, "the answer", None, "IGNORED"],
    "references": pa.array([None, ["你好", "你好啊", ""], ["the answer", "an answer"], [], None],
                           pa.list_(pa.string())),
})


def test_score_table_contract_references_and_nulls():
    cands = _candidates([("c1", "p1", "Say hi", "hi there"), ("c2", "p2", "说你好", "你好呀"),
                         ("c3", "p3", "q", "an answer"), ("c4", "p4", "no ref", "whatever"),
                         ("c5", "p9", "unknown prompt", "text"), ("c6", "p1", "Say hi", "")])
    table, report = score_table(cands, PROMPTS, ScoreConfig())
    assert conform("scores", table).schema == SCORES
    rows = {r["candidate_id"]: r for r in table.to_pylist()}
    assert rows["c1"]["bleu"] == pytest.approx(sacrebleu.sentence_bleu("hi there", ["hi there friend"]).score)
    assert rows["c2"]["bleu"] == pytest.approx(55.03212081491043)  # closest ref 你好啊 (3 chars)
    assert rows["c3"]["rouge1"] == 1.0  # best of the merged references
    for cid in ("c4", "c5"):  # no reference -> null metrics, never 0
        assert all(rows[cid][k] is None for k in ("bleu", "rouge1", "rouge2", "rougeL", "auto_score"))
    assert rows["c6"]["bleu"] == 0.0 and rows["c6"]["flag_empty"] and rows["c6"]["auto_score"] < 0
    assert report["no_reference"] == 2 and report["duplicate_prompt_ids"] == 1
    assert report["flagged"]["flag_empty"] == 1
    # auto_score: default weights bleu .25 (scaled /100), rougeL .25, reward absent
    r1 = rows["c1"]
    assert r1["auto_score"] == pytest.approx((0.25 * r1["bleu"] / 100 + 0.25 * r1["rougeL"]) / 0.5)


def test_without_prompts_everything_null_but_flags():
    cands = _candidates([("c1", "p1", "Say hi", "hi"), ("c2", "p1", "Say hi", "mail me: a@b.io")])
    table, report = score_table(cands, None, ScoreConfig())
    assert table.column("bleu").null_count == 2 and table.column("auto_score").null_count == 2
    assert table.column("flag_pii").to_pylist() == [False, True]
    assert report["no_reference"] == 2


def test_cap_and_invalid_utf8_are_counted():
    cands = _candidates([("c1", "p1", "Say hi", "hi there " * 5000)])
    table, report = score_table(cands, PROMPTS, ScoreConfig(max_chars=100))
    assert report["truncated"] == 1 and table.column("bleu")[0].as_py() is not None
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 3, 7], np.int32).tobytes()),
                                                  pa.py_buffer(b"ok\xffgood")])
    fixed, n_bad = repair_utf8(bad)
    assert n_bad == 1 and fixed.to_pylist() == ["ok\ufffd", "good"]
    cands = _candidates([("c1", "p1", "Say hi", "x"), ("c2", "p1", "Say hi", "y")])
    cands = cands.set_column(cands.schema.get_field_index("response"), "response", bad)
    table, report = score_table(cands, PROMPTS, ScoreConfig())
    assert report["invalid_utf8"] == 1 and table.num_rows == 2


def test_config_composes_and_validates():
    from dpoflow.flows.config import load_config

    cfg = load_config(overrides=["score.use_stemmer=true", "score.auto_score.weights={bleu: 1.0}"])
    assert cfg.score.use_stemmer and cfg.score.auto_score.weights == {"bleu": 1.0}
    with pytest.raises(ValueError):
        ScoreConfig(metrics=["bertscore"])
    with pytest.raises(ValueError):
        ScoreConfig(bleu_smooth_method="nope")


_AGG_ONLY = textwrap.dedent('''
    import datasets
    import evaluate


    class AggOnly(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(description="mean length ratio", citation="", features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}))

        def _compute(self, predictions, references):
            return {"ratio": sum(len(p) / max(len(r[0]), 1) for p, r in zip(predictions, references)) / len(predictions)}
''')


def test_extra_metrics_by_local_path(tmp_path):
    (tmp_path / "agg_only").mkdir()
    (tmp_path / "agg_only" / "agg_only.py").write_text(_AGG_ONLY)
    cfg = ScoreConfig(extra_metrics={
        "bleu_again": ExtraMetric(path=metric_path("bleu"), key="bleu", kwargs={"use_aggregator": False}),
        "ratio": ExtraMetric(path=str(tmp_path / "agg_only")),  # aggregate only -> one call per row
    })
    cands = _candidates([("c1", "p1", "Say hi", "hi there"), ("c2", "p4", "no ref", "x")])
    table, _ = score_table(cands, PROMPTS, cfg)
    extra = table.column("extra_metrics").to_pylist()
    assert dict(extra[0])["bleu_again"] == pytest.approx(table.column("bleu")[0].as_py())
    assert dict(extra[0])["ratio"] == pytest.approx(len("hi there") / len("hi there friend"))
    assert extra[1] is None  # no reference -> no extra metrics


def test_reward_model_tiny_classifier(tiny_classifier_dir):
    cfg = RewardConfig(model=str(tiny_classifier_dir), batch_size=3, device="cpu")
    prompts = ["Say hi", "说你好", "q", "q", None]
    responses = ["hi there", "你好呀，很高兴认识你", "a much longer answer " * 5, "x", None]
    batched = score_rewards(prompts, responses, cfg)
    assert np.isfinite(batched[:4]).all() and np.isnan(batched[4])
    single = score_rewards(prompts, responses, cfg.model_copy(update={"batch_size": 1}))
    np.testing.assert_allclose(batched[:4], single[:4], rtol=1e-4, atol=1e-5)  # padding does not matter
    assert len(set(np.round(batched[:4], 6))) > 1  # the model actually looks at the text
    cands = _candidates([("c1", "p1", "Say hi", "hi there"), ("c2", "p4", "no ref", "x")])
    cfg_all = ScoreConfig(reward=cfg)
    table, _ = score_table(cands, PROMPTS, cfg_all)
    rewards = table.column("reward").to_numpy(zero_copy_only=False)
    assert np.isfinite(rewards).all()
    auto = table.column("auto_score").to_pylist()
    assert auto[1] == pytest.approx(1 / (1 + np.exp(-rewards[1])))  # only the reward is available


@pytest.mark.slow
def test_score_flow_writes_versioned_scores(ws, prefect_harness):
    from dpoflow.flows.score import score_flow

    ws.store.write("prompts", PROMPTS.slice(0, 4))
    ws.store.write("candidates", _candidates([("c1", "p1", "Say hi", "hi there"), ("c2", "p2", "说你好", "你好")]))
    out = score_flow(workspace=str(ws.root))
    assert out["scores"].startswith("scores@")
    scores = ws.store.read(out["scores"])
    assert scores.num_rows == 2 and scores.column("rouge1").to_pylist()[1] == 1.0
    again = score_flow(workspace=str(ws.root))  # unchanged inputs/config/code -> reused
    assert again["scores"] == out["scores"]
    changed = score_flow(workspace=str(ws.root), overrides=["score.use_stemmer=true"])
    assert changed["scores"] != out["scores"]


def test_run_score_without_prompts_dataset(ws):
    from dpoflow.flows.score import run_score

    ws.store.write("candidates", _candidates([("c1", "p1", "Say hi", "hi there")]))
    run = run_score(ws)
    scores = ws.store.read(run.outputs["scores"])
    assert scores.column("bleu").null_count == 1 and run.report["no_reference"] == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpoflow.flows.cli_metrics", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_jsonl_and_parquet(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"prediction": "the cat sat", "reference": "the cat sat on the mat"}),
             json.dumps({"prediction": "今天天气很好", "reference": ["今天天气不错", "天气很好"]}, ensure_ascii=False),
             json.dumps({"prediction": None, "reference": "x"}),
             json.dumps({"prediction": "no ref", "reference": None})]
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prediction": "bad \xff bytes", "reference": "bad bytes"}\n')
    out = tmp_path / "out.parquet"
    res = _cli("metrics", "compute", "--metrics", "bleu,rouge", "--input", str(src), "--output", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["rows"] == 5 and summary["scored"] == 3 and summary["invalid_utf8"] == 1
    t = pq.read_table(out)
    assert t.column("bleu")[0].as_py() == pytest.approx(sacrebleu.sentence_bleu("the cat sat", ["the cat sat on the mat"]).score)
    assert t.column("rouge1")[1].as_py() > 0.6 and t.column("rougeL")[2].as_py() is None
    assert t.column("bleu")[3].as_py() is None
    # parquet in, jsonl out, list references
    pq.write_table(pa.table({"prediction": ["a b c"], "reference": [["a b c", "x"]]}), tmp_path / "in.parquet")
    res = _cli("metrics", "compute", "--metrics", "rouge", "--input", str(tmp_path / "in.parquet"),
               "--output", str(tmp_path / "o.jsonl"))
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert row["rougeL"] == 1.0 and "bleu" not in row


def test_cli_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prediction": "a", "reference": "a"}\nnot json\n')
    res = _cli("metrics", "compute", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert res.returncode == 2 and "bad.jsonl:2: not valid JSON" in res.stderr
    (tmp_path / "nocol.jsonl").write_text('{"pred": "a"}\n')
    res = _cli("metrics", "compute", "--input", str(tmp_path / "nocol.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert res.returncode == 2 and "missing column 'prediction'" in res.stderr


def test_reward_shards_inline_commit_once_and_match_the_pure_function(ws, tiny_classifier_dir):
    """The stage scores rewards in committed shards (rows of the pinned candidates); the result
    equals score_table's (same batches), a rerun for another reason reuses every shard, a
    forced run recomputes them; a worker reads its rows across the version's files."""
    from dpoflow.flows.score import run_score
    from dpoflow.tasks.scoring import read_rows

    rows = [(f"c{i}", "p1", "Say hi", f"hi there {'friend ' * (i % 3)}") for i in range(7)]
    ws.store.write("candidates", _candidates(rows[:4]))
    ws.store.write("candidates", _candidates(rows[4:]), mode="append")  # a version of two files
    in_read_order = ws.store.read("candidates@1").column("candidate_id").to_pylist()
    assert sorted(in_read_order) == [f"c{i}" for i in range(7)]
    assert read_rows(ws.store, "candidates@1", 2, 6, ["candidate_id"]).column("candidate_id").to_pylist() == \
        in_read_order[2:6]
    reward = [f"score.reward.model={tiny_classifier_dir}", "score.reward.shard_size=3", "score.reward.device=cpu"]
    run = run_score(Workspace.open(ws.root, reward))
    scores = ws.store.read(run.outputs["scores"])
    cfg = ScoreConfig(reward=RewardConfig(model=str(tiny_classifier_dir), shard_size=3, device="cpu"))
    pure, _ = score_table(ws.store.read("candidates@1"), None, cfg)
    assert scores.column("reward").equals(pure.column("reward"))
    assert run.report["reward_shards"] == 3 and run.report["reward_shards_reused"] == 0
    shards = [n for n in ws.store.list() if n.startswith("shard_reward_")]
    again = run_score(Workspace.open(ws.root, [*reward, "score.use_stemmer=true"]))
    assert again.report["reward_shards_reused"] == 3 and all(ws.store.latest(n) == 0 for n in shards)
    forced = run_score(Workspace.open(ws.root, reward), force=True)
    assert forced.report["reward_shards_reused"] == 0 and all(ws.store.latest(n) == 1 for n in shards)
