"""Optimistic concurrency in the store: read-modify-writes never lose an update.

Real processes race on one store (local folder or moto's S3 API); each computes a new
version from the one it read and states that version when committing.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dpoflow.storage.store import ConflictError, DatasetStore, StoreError, python_rows
from tests.builders import prompts_table as prompts


@pytest.fixture
def any_store(store_root, monkeypatch) -> DatasetStore:  # noqa: F811
    root, env = store_root
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return DatasetStore(root)


def _parquet_files(root: str, name: str) -> set[str]:
    return {os.path.basename(p) for p in glob.glob(os.path.join(root, "datasets", name, "*.parquet"))}


def test_write_on_a_newer_version_is_a_clean_conflict(any_store):
    store = any_store
    store.write("prompts", prompts(3))
    v1 = store.write("prompts", prompts(4), expected_version=0)
    assert v1.version == 1
    with pytest.raises(ConflictError, match=r"computed from prompts@0.*committed prompts@1"):
        store.write("prompts", prompts(9), expected_version=0)
    with pytest.raises(ConflictError, match="another writer created it"):
        store.write("prompts", prompts(9), expected_version=-1)
    assert store.latest("prompts") == 1 and store.read("prompts").num_rows == 4
    assert store.write("prompts", prompts(5), mode="append",
                       expected_version=1).version == 2
    assert store.read("prompts").num_rows == 9


def test_conflict_after_staging_removes_the_staged_files(tmp_path, monkeypatch):
    """The loser of a race at commit time (past the early check) leaves no Parquet litter."""
    store = DatasetStore(tmp_path / "s")
    store.write("prompts", prompts(3))
    before = _parquet_files(store.root, "prompts")
    real = store._check_base
    monkeypatch.setattr(store, "_check_base", lambda name, expected: None)  # skip the early check
    store.write("prompts", prompts(2), expected_version=0)  # wins
    monkeypatch.setattr(store, "_check_base", real)
    after_win = _parquet_files(store.root, "prompts")
    monkeypatch.setattr(store, "_check_base", lambda name, expected: None)
    with pytest.raises(ConflictError):
        store.write("prompts", prompts(7), expected_version=0)  # files written, commit refused
    assert _parquet_files(store.root, "prompts") == after_win and len(after_win) == len(before) + 1


def test_failed_stream_leaves_no_files(tmp_path):
    store = DatasetStore(tmp_path / "s")
    store.write("prompts", prompts(3))
    before = _parquet_files(store.root, "prompts")

    def batches():
        yield prompts(1500).to_batches()[0]
        yield pa.record_batch({"prompt_id": ["x", None], "prompt": ["a", "b"]})  # null id: contract error

    with pytest.raises(ValueError):
        store.write("prompts", batches())
    assert _parquet_files(store.root, "prompts") == before


RMW = textwrap.dedent("""
    import os, sys, time
    import pyarrow as pa
    from dpoflow.storage.store import ConflictError, DatasetStore
    root, me, other, mode = sys.argv[1:5]
    store = DatasetStore(root)
    mine = pa.table({"prompt_id": [f"{me}-{i}" for i in range(30)], "prompt": [f"label {i}" for i in range(30)]})
    calls = []

    def compute(base):
        calls.append(base)
        old = store.read(base, columns=["prompt_id", "prompt"]) if base else mine.slice(0, 0)
        if len(calls) == 1:  # both processes hold the same base before either commits
            open(os.path.join(root, f"ready-{me}"), "w").close()
            while not os.path.exists(os.path.join(root, f"ready-{other}")):
                time.sleep(0.01)
        return pa.concat_tables([old, mine.cast(old.schema)])

    if mode == "update":
        info = store.update("prompts", compute, stage=me)
        print("done", info.version, len(calls), flush=True)
    else:
        base = store.latest("prompts")
        try:
            info = store.write("prompts", compute(f"prompts@{base}"), expected_version=base, stage=me)
            print("done", info.version, flush=True)
        except ConflictError as exc:
            print("conflict", exc, flush=True)
            sys.exit(3)
""")


def _race(root: str, mode: str) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", RMW, root, me, other, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def _ids(store: DatasetStore) -> set[str]:
    return set(store.read("prompts", columns=["prompt_id"]).column(0).to_pylist())


def test_two_processes_read_modify_write_one_conflicts_and_a_retry_has_both(tmp_path):
    root = str(tmp_path / "s")
    store = DatasetStore(root)
    store.write("prompts", prompts(5))
    done = _race(root, "plain")
    codes = sorted(p.returncode for p in done)
    assert codes == [0, 3], [p.stderr for p in done]
    loser = next(p for p in done if p.returncode == 3)
    assert "conflict: this write was computed from prompts@0" in loser.stdout
    assert "Traceback" not in loser.stderr
    assert store.latest("prompts") == 1
    # the loser's retry recomputes from the newer version: nothing of either is lost
    me = loser.args[4]  # [python, -c, code, root, me, other, mode]
    base = store.latest("prompts")
    mine = pa.table({"prompt_id": [f"{me}-{i}" for i in range(30)], "prompt": [f"label {i}" for i in range(30)]})
    old = store.read(f"prompts@{base}", columns=["prompt_id", "prompt"])
    store.write("prompts", pa.concat_tables([old, mine.cast(old.schema)]), expected_version=base)
    ids = _ids(store)
    assert {f"a-{i}" for i in range(30)} | {f"b-{i}" for i in range(30)} <= ids and len(ids) == 65


def test_two_processes_update_both_results_present(tmp_path):
    root = str(tmp_path / "s")
    DatasetStore(root).write("prompts", prompts(5))
    done = _race(root, "update")
    assert all(p.returncode == 0 for p in done), [p.stderr for p in done]
    calls = sorted(int(p.stdout.split()[2]) for p in done)
    assert calls == [1, 2]  # the loser recomputed once, from the winner's version
    store = DatasetStore(root)
    assert store.latest("prompts") == 2
    ids = _ids(store)
    assert len(ids) == 65 and {f"a-{i}" for i in range(30)} <= ids and {f"b-{i}" for i in range(30)} <= ids


TAGGER = textwrap.dedent("""
    import sys
    from dpoflow.storage.store import DatasetStore
    store = DatasetStore(sys.argv[1])
    for i in range(40):
        store.tag(f"prompts@{i % 2}", f"{sys.argv[2]}{i % 5}")
    print("ok")
""")


def test_concurrent_tag_writers_lose_no_tag(tmp_path):
    root = str(tmp_path / "s")
    store = DatasetStore(root)
    store.write("prompts", prompts(1))
    store.write("prompts", prompts(2))
    procs = [subprocess.Popen([sys.executable, "-c", TAGGER, root, t], stdout=subprocess.PIPE, text=True)
             for t in ("x", "y", "z")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert set(store.tags("prompts")) == {f"{t}{i}" for t in "xyz" for i in range(5)}


def test_tag_compare_and_set(any_store):
    store = any_store
    store.write("prompts", prompts(1))
    store.write("prompts", prompts(2))
    store.tag("prompts@0", "production", expected=None)
    with pytest.raises(ConflictError, match="expected at None"):
        store.tag("prompts@1", "production", expected=None)
    store.tag("prompts@1", "production", expected=0)
    assert store.resolve("prompts@production").version == 1


def test_append_unique_is_idempotent(any_store):
    store = any_store
    q = pa.table({"prompt_id": ["a", "b", "a"], "prompt": ["x", "y", "x"]})
    assert store.append_unique("prompts", q, key=["prompt_id", "prompt"]).rows == 2
    assert store.append_unique("prompts", q, key=["prompt_id", "prompt"]) is None  # a rerun adds nothing
    more = pa.table({"prompt_id": ["a", "c"], "prompt": ["x", "z"]})
    assert store.append_unique("prompts", more, key=["prompt_id", "prompt"]).rows == 3
    assert sorted(store.read("prompts").column("prompt_id").to_pylist()) == ["a", "b", "c"]


@pytest.mark.parametrize("ref", ["prompts@²", "prompts@1²", "prompts@a b", "prompts@-1", "prompts@@", "prompts@x/y"])
def test_bad_refs_are_one_line_errors(any_store, ref):
    store = any_store
    store.write("prompts", prompts(1))
    with pytest.raises(StoreError, match="invalid ref") as err:
        store.read(ref)
    assert "\n" not in str(err.value)


def test_year_minus_one_timestamp_reads_and_shows(tmp_path):
    store = DatasetStore(tmp_path / "s")
    micros = int((dt.datetime(1, 1, 1, tzinfo=dt.UTC) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds()
                 ) * 10**6 - 731 * 86400 * 10**6  # 1 January of year -1 (year 0 is a leap year)
    served = pa.table({"response_id": ["r1", "r2"], "prompt_id": ["p", "p"], "prompt": ["q", "q"],
                       "response": ["a", "b"], "model_version": ["m", "m"],
                       "served_at": pa.array([micros, 0], pa.timestamp("us", tz="UTC"))})
    store.write("served", served)
    rows = store.head("served", 100)
    assert rows[0]["served_at"].startswith("-0001") and rows[1]["served_at"].startswith("1970-01-01")
    whole = python_rows(store.read("served"))
    assert whole[1]["served_at"] == "1970-01-01 00:00:00.000000Z"  # a column with one bad time is all text
    assert python_rows(store.read("served").slice(1))[0]["served_at"].year == 1970
    assert python_rows(pa.table({"t": pa.array([0], pa.timestamp("us", tz="UTC"))}))[0]["t"].year == 1970


def test_remove_litter_of_killed_writers(tmp_path):
    store = DatasetStore(tmp_path / "s")
    store.write("prompts", prompts(3))
    keys = os.path.join(store.root, "_dpoflow", "keys")
    os.makedirs(keys, exist_ok=True)
    stale_tmp = os.path.join(keys, "abc.json.1234.tmp")
    fresh_tmp = os.path.join(keys, "def.json.5678.tmp")
    orphan = os.path.join(store.root, "datasets", "prompts", "part-orphan.snappy.parquet")
    for p in (stale_tmp, fresh_tmp, orphan):
        with open(p, "w") as f:
            f.write("x")
    old = time.time() - 7200
    os.utime(stale_tmp, (old, old))
    os.utime(orphan, (old, old))
    assert store.remove_litter(max_age_s=3600) == {"tmp": 1, "parquet": 1}
    assert not os.path.exists(stale_tmp) and not os.path.exists(orphan) and os.path.exists(fresh_tmp)
    assert store.read("prompts").num_rows == 3  # the committed files stay


def _labels(path: Path, who: str) -> Path:
    rows = [{"annotator": f"ann-{who}", "prompt_id": f"{who}-{i}", "a": f"{who}-x{i}", "b": f"{who}-y{i}",
             "winner": "a"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_concurrent_annotation_imports_keep_both_files(tmp_path):
    """Two `dpoflow import annotations` processes at once, three rounds: each ends with its
    labels in, or with a one-line conflict (no traceback) whose retry gets them in."""
    from dpoflow.flows.workspace import Workspace

    root = tmp_path / "ws"
    cmd = [sys.executable, "-m", "dpoflow", "import", "annotations"]
    for rnd in range(3):
        files = [_labels(tmp_path / f"{w}{rnd}.jsonl", f"{w}{rnd}") for w in ("a", "b")]
        procs = [subprocess.Popen([*cmd, str(f), "--workspace", str(root)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for f in files]
        for f, p in zip(files, procs, strict=True):
            out, err = p.communicate(timeout=300)
            if p.returncode != 0:
                assert "conflict" in (out + err) and "Traceback" not in err, err
                retry = subprocess.run([*cmd, str(f), "--workspace", str(root)], capture_output=True, text=True,
                                       timeout=300)
                assert retry.returncode == 0, retry.stderr
    ann = Workspace.open(root).store.read("annotations", columns=["prompt_id"]).column(0).to_pylist()
    assert {f"{w}{r}-{i}" for w in "ab" for r in range(3) for i in range(30)} <= set(ann)
