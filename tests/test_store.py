"""The versioned store, on local disk and on a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from dpoflow.storage.registry import ModelRegistry
from dpoflow.storage.schemas import DatasetNameError, SchemaError
from dpoflow.storage.store import DatasetStore, StoreError
from tests.builders import prompts_table as prompts


@pytest.fixture
def store(store_root, monkeypatch):
    root, env = store_root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return DatasetStore(root)


def test_write_read_time_travel_and_tags(store):
    v0 = store.write("prompts", prompts(3), stage="import")
    v1 = store.write("prompts", prompts(5), stage="import", parents=[])
    assert (v0.version, v1.version) == (0, 1)
    assert store.read("prompts").num_rows == 5
    assert store.read("prompts@latest").num_rows == 5
    assert store.read("prompts@0").column("prompt").to_pylist() == ["prompt 0 你好", "prompt 1 你好", "prompt 2 你好"]
    assert store.info("prompts@1").rows == 5
    store.tag("prompts@0", "golden")
    assert store.read("prompts@golden").num_rows == 3
    store.tag("prompts@1", "golden")  # tags move
    assert store.resolve("prompts@golden").version == 1
    assert [i.version for i in store.log("prompts")] == [1, 0]
    with pytest.raises(StoreError, match="prompts@7 does not exist"):
        store.read("prompts@7")
    with pytest.raises(StoreError, match="no version or tag 'nope'"):
        store.read("prompts@nope")
    with pytest.raises(StoreError, match="does not exist"):
        store.read("candidates")


def test_append_mode_and_streamed_write(store):
    store.write("prompts", prompts(2))
    store.write("prompts", prompts(3, offset=2), mode="append")
    assert store.read("prompts").num_rows == 5
    reader = (b for t in [prompts(4), prompts(4, offset=4)] for b in t.to_batches())
    info = store.write("prompts", reader)
    assert info.rows == 8
    assert sorted(store.read(info.ref).column("prompt_id").to_pylist()) == [f"p{i}" for i in range(8)]


def test_large_versions_roll_over_files_and_empty_versions_keep_the_schema(store, monkeypatch):
    import dpoflow.storage.store as st

    monkeypatch.setattr(st, "ROWS_PER_FILE", 3)
    info = store.write("prompts", prompts(8))
    assert len(store.dataset(info.ref).files) == 3 and info.rows == 8
    assert sorted(store.read(info.ref).column("prompt_id").to_pylist()) == sorted(f"p{i}" for i in range(8))
    empty = store.write("prompts", iter([]))
    assert empty.rows == 0 and store.read(empty.ref).schema.names == store.read(info.ref).schema.names


def test_data_files_dictionary_encode_repeats_and_skip_stats_of_unique_text(tmp_path):
    import pyarrow.parquet as pq

    store = DatasetStore(tmp_path)
    n = 1000
    t = pa.table({"prompt_id": [f"p{i % 10}" for i in range(n)], "prompt": [f"unique text {i}" for i in range(n)]})
    info = store.write("prompts", t)
    (path,) = store.dataset(info.ref).files
    meta = pq.ParquetFile(path).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert cols["prompt_id"].has_dictionary_page and cols["prompt_id"].is_stats_set  # repeats
    assert not cols["prompt"].has_dictionary_page and not cols["prompt"].is_stats_set  # all distinct
    tiny = store.write("prompts", t.slice(0, 3))  # too few rows to judge: the writer's defaults
    (path,) = store.dataset(tiny.ref).files
    assert pq.ParquetFile(path).metadata.row_group(0).column(1).has_dictionary_page
    back = store.read(info.ref).sort_by("prompt")
    assert back.select(["prompt_id", "prompt"]).to_pylist() == t.sort_by("prompt").to_pylist()


def test_lineage_two_levels(store):
    store.write("prompts", prompts(2), stage="import")
    cands = pa.table({"candidate_id": ["c1"], "prompt_id": ["p0"], "prompt": ["x"], "response": ["y"],
                      "origin": ["sampled"], "model_version": ["m1"], "dup_count": [1]})
    store.write("candidates", cands, stage="sample", parents=["prompts@0"], config={"n": 2})
    scores = pa.table({"candidate_id": ["c1"], "prompt_id": ["p0"], **{f: [False] for f in (
        "flag_safety", "flag_pii", "flag_repetition", "flag_length", "flag_refusal", "flag_language",
        "flag_empty")}, "flag_reasons": [[]]})
    store.write("scores", scores, stage="score", parents=["candidates@0", "prompts@0"])
    tree = store.lineage("scores")
    assert tree["ref"] == "scores@0" and tree["stage"] == "score"
    parents = {p["ref"]: p for p in tree["parents"]}
    assert set(parents) == {"candidates@0", "prompts@0"}
    assert parents["candidates@0"]["parents"][0]["ref"] == "prompts@0"
    assert store.info("candidates@0").config == {"n": 2}


def test_schema_errors_name_dataset_column_and_problem(store):
    with pytest.raises(SchemaError, match=r"dataset 'prompts', column 'prompt': required column is missing"):
        store.write("prompts", pa.table({"prompt_id": ["a"]}))
    with pytest.raises(SchemaError, match=r"column 'bogus': unknown column"):
        store.write("prompts", pa.table({"prompt_id": ["a"], "prompt": ["b"], "bogus": [1]}))
    with pytest.raises(SchemaError, match=r"column 'prompt': type int64 cannot be stored as string"):
        store.write("prompts", pa.table({"prompt_id": ["a"], "prompt": [1]}))
    with pytest.raises(SchemaError, match=r"column 'prompt_id': 1 null value"):
        store.write("prompts", pa.table({"prompt_id": ["a", None], "prompt": ["b", "c"]}))
    assert not store.exists("prompts")  # nothing half-written


@pytest.mark.parametrize("name", ["../etc", "/abs", "a/b", "Prompts", "", "x" * 80, "a..b"])
def test_bad_dataset_names(store, name):
    with pytest.raises(DatasetNameError):
        store.write(name, prompts(1))


def test_content_key_skip_and_force(ws):
    from dpoflow.flows.runner import run_stage
    from dpoflow.storage.store import ConflictError
    from dpoflow.tasks.contract import StageResult

    ws.store.write("prompts", prompts(3), stage="import")
    calls = []

    def upper(ctx):
        calls.append(1)
        t = ctx.read("prompts")
        return StageResult(outputs={"shard_upper": t.set_column(1, "prompt", pa.array(
            [s.upper() for s in t.column("prompt").to_pylist()]))})

    first = run_stage(ws, "upper", upper, {"prompts": "prompts@0"}, {"k": 1})
    ws.store.write("prompts", prompts(4), stage="import")
    again = run_stage(ws, "upper", upper, {"prompts": "prompts"}, {"k": 1})  # latest is now @1 ...
    assert not first.skipped and len(calls) == 2 and not again.skipped  # ... so that is new input
    same = run_stage(ws, "upper", upper, {"prompts": "prompts@0"}, {"k": 1})
    assert same.skipped and same.outputs == first.outputs and len(calls) == 2
    changed_cfg = run_stage(ws, "upper", upper, {"prompts": "prompts@0"}, {"k": 2})
    assert not changed_cfg.skipped and len(calls) == 3
    forced = run_stage(ws, "upper", upper, {"prompts": "prompts@0"}, {"k": 1}, force=True)
    assert not forced.skipped and len(calls) == 4 and forced.outputs != first.outputs
    info = ws.store.info(first.outputs["shard_upper"])
    assert info.parents == ["prompts@0"] and info.stage == "upper" and info.content_key == first.content_key

    def rewrite(ctx):  # a read-modify-write of its own input dataset
        return StageResult(outputs={"prompts": ctx.read("prompts")})

    with pytest.raises(ConflictError, match="computed from prompts@0"):
        run_stage(ws, "rewrite", rewrite, {"prompts": "prompts@0"}, {})  # prompts@1 exists: no lost update
    assert ws.store.latest("prompts") == 1
    assert run_stage(ws, "rewrite", rewrite, {"prompts": "prompts"}, {}).outputs["prompts"] == "prompts@2"


WRITER = textwrap.dedent("""
    import sys, time, pyarrow as pa
    from dpoflow.storage.store import DatasetStore
    store = DatasetStore(sys.argv[1])
    n_batches, slow = int(sys.argv[2]), float(sys.argv[3])
    def batches():
        for i in range(n_batches):
            if i == 1:
                print("writing", flush=True)
            time.sleep(slow)
            ids = [f"p{i}-{j}" for j in range(50_000)]
            yield pa.record_batch({"prompt_id": ids, "prompt": ids})
    try:
        info = store.write("prompts", batches(), stage=sys.argv[4])
        print("done", info.version, flush=True)
    except Exception as exc:
        print("failed", type(exc).__name__, exc, flush=True)
""")


def _writer(root: str, env: dict, n_batches: int, slow: float, tag: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, root, str(n_batches), str(slow), tag],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})


def test_sigkill_mid_write_leaves_previous_version(store_root, monkeypatch):
    root, env = store_root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = DatasetStore(root)
    store.write("prompts", prompts(10))
    proc = _writer(root, env, n_batches=200, slow=0.05, tag="big")
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)  # data files are being written now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = DatasetStore(root)
    assert store.latest("prompts") == 0
    assert store.read("prompts").num_rows == 10
    rerun = store.write("prompts", prompts(20))
    assert rerun.version == 1 and store.read("prompts").num_rows == 20
    assert store.read("prompts@0").num_rows == 10


def test_two_concurrent_writers(store_root, monkeypatch):
    root, env = store_root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    DatasetStore(root).write("prompts", prompts(1))
    procs = [_writer(root, env, n_batches=4, slow=0.05, tag=t) for t in ("a", "b")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    store = DatasetStore(root)
    done = [o for o in outs if "done" in o]
    failed = [o for o in outs if "failed" in o]
    assert len(done) + len(failed) == 2 and done
    for o in failed:
        assert "ConcurrentWriteError" in o
    assert store.latest("prompts") == len(done)
    for v in range(1, store.latest("prompts") + 1):
        assert store.read(f"prompts@{v}").num_rows == 200_000
        assert store.info(f"prompts@{v}").stage in {"a", "b"}
    assert store.read("prompts@0").num_rows == 1


def test_gc_keeps_referenced_versions(store):
    for n in range(1, 7):
        store.write("prompts", prompts(n), stage="import")
    store.tag("prompts@1", "golden")
    store.write("candidates", pa.table({
        "candidate_id": ["c"], "prompt_id": ["p0"], "prompt": ["x"], "response": ["y"], "origin": ["sampled"],
        "model_version": ["m"], "dup_count": [1]}), parents=["prompts@2"], stage="sample")
    removed = store.gc(keep_last=2)
    # kept: @5 @4 (newest two), @1 (tag), @2 (lineage of the kept candidates version)
    assert removed == {"prompts": [0, 3]}
    for v, n in [(1, 2), (2, 3), (4, 5), (5, 6)]:
        assert store.read(f"prompts@{v}").num_rows == n
    with pytest.raises(StoreError, match="removed by 'dpoflow datasets gc'"):
        store.read("prompts@0")
    assert [i.version for i in store.log("prompts")] == [5, 4, 2, 1]
    assert store.gc(keep_last=2) == {}
    store.write("shard_sample_abc", prompts(1))
    assert store.gc(keep_last=2) == {}  # a fresh shard may belong to a running stage
    assert store.gc(keep_last=2, shard_max_age_s=0) == {"shard_sample_abc": [0]}
    assert "shard_sample_abc" not in store.list() and store.read("prompts@1").num_rows == 2


def test_model_registry_safetensors_only(ws, tiny_model_dir, tmp_path):
    reg: ModelRegistry = ws.registry
    v1 = reg.register(tiny_model_dir, parents=["dpo_train@0"], metrics={"acc": 0.5}, tags=["production"])
    assert reg.version_of("models@production") == v1
    assert (reg.local_path("models@production") / "model.safetensors").exists()
    v2 = reg.register(tiny_model_dir, parents=[f"models@{v1}"], tags=["candidate"])
    reg.tag(v2, "production")
    assert reg.version_of("models@production") == v2 and reg.get(v1)["metrics"] == {"acc": 0.5}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(StoreError, match="pickle"):
        reg.register(bad)


def test_import_quarantines_bad_rows(ws, tmp_path):
    from dpoflow.flows.importing import import_dataset

    f = tmp_path / "events.jsonl"
    rows = [
        {"event_id": "e1", "user_id": "u1", "response_id": "r1", "event_type": "like", "ts": "2026-01-01T00:00:00Z"},
        {"event_id": "e2", "user_id": "u1", "response_id": "r1", "event_type": "like", "ts": "yesterday-ish"},
        {"event_id": "e3", "response_id": "r1", "event_type": "like", "ts": "2026-01-01T00:00:00Z"},
        {"event_id": "e4", "user_id": "u2", "response_id": "r2", "event_type": "dwell", "value": "12x",
         "ts": "2026-01-02T00:00:00Z"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    run = import_dataset(ws, "feedback_events", f)
    assert run.report["rows_in"] == 5 and run.report["rows_out"] == 1
    assert ws.store.read("feedback_events").column("event_id").to_pylist() == ["e1"]
    q = ws.store.read(run.outputs["quarantine"]).to_pylist()
    reasons = sorted(r["reason"].split(":")[0] for r in q)
    # events enter through the ingest rules (tasks.feedback), worded as ingest words them
    assert reasons == ["malformed field", "malformed row", "missing field", "unparseable timestamp"]
    assert all(r["dataset"] == "feedback_events" and r["raw"] for r in q)
    again = import_dataset(ws, "feedback_events", f)
    assert again.skipped and ws.store.latest("quarantine") == 0  # same file: nothing added twice
