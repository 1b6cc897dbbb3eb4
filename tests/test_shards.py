"""Shards that travel: the spec is small plain data, and a fresh process that gets only the
spec (no tables, no closures) opens the store itself and generates the same candidates."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from dpoflow.flows.sample import sample
from dpoflow.flows.workspace import Workspace
from dpoflow.tasks import sampling, shards

ORDER = [("_row", "ascending"), ("_grid", "ascending"), ("_ret", "ascending")]


pytestmark = pytest.mark.usefixtures("restore_torch_threads")  # the stage sets cpu_threads=1 here


def test_spec_pickles_and_a_fresh_process_reproduces_the_shard(tmp_path, tiny_model_dir):
    overrides = [f"sample.samplers=[{{model: '{tiny_model_dir}', n: 2, max_new_tokens: 12, temperature: [0.9, 1.3], "
                 "seed: 5}]", "sample.shard_size=3", "sample.cpu_threads=1"]
    ws = Workspace.open(tmp_path / "ws", overrides)
    ids = [f"q{i}" for i in range(7)] + ["q3"]  # a duplicated id: the first row is the prompt
    texts = [f"第{i}个问题：为什么天空是蓝色的？ question {i}" for i in range(7)] + ["a later duplicate"]
    ws.store.write("prompts", pa.table({"prompt_id": ids, "prompt": texts}))
    seen: list[shards.ShardSpec] = []

    def recording(specs, on_batch):
        seen.extend(specs)
        yield from sampling.inline_runner()(specs, on_batch)

    run = sample(ws, shard_runner=recording)
    assert run.report["shards"] == 3 and [s.n_prompts for s in seen] == [3, 3, 1]

    spec = dataclasses.replace(seen[1], name=seen[1].name + "_again")
    blob = pickle.dumps(spec)
    assert len(blob) < 4096 and "为什么".encode() not in blob  # ids travel, prompt texts do not
    assert pickle.loads(blob) == spec
    (tmp_path / "spec.pkl").write_bytes(blob)
    script = textwrap.dedent("""
        import json, pickle, sys
        from dpoflow.tasks.sampling import run_shard_spec
        spec = pickle.load(open(sys.argv[1], "rb"))
        print(json.dumps(run_shard_spec(spec)))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spec.pkl")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["reused"] is False and info["pid"] != os.getpid() and info["generated_tokens"] > 0
    here = ws.store.read(seen[1].name).sort_by(ORDER)
    there = ws.store.read(info["ref"]).sort_by(ORDER)
    assert there.num_rows == 3 * 2 * 2
    assert there.column("prompt_id").to_pylist()[:4] == ["q3"] * 4
    assert there.equals(here)

    # a second run of the same spec finds the committed shard: it is never written twice
    again = sampling.run_shard_spec(spec)
    assert again["reused"] is True and again["ref"] == info["ref"]
    assert ws.store.latest(spec.name) == 0
