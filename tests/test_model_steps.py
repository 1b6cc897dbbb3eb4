"""Idempotent model steps: registration keyed by content, promotion record + tag move as one
logical step, safetensors only at load time. Kills are real SIGKILLs of child processes at the
named points; each rerun must end where an uninterrupted run ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpoflow.flows.workspace import Workspace
from dpoflow.storage.registry import UnsafeWeightsError, check_weights
from tests.builders import GATE_GOOD as GOOD
from tests.builders import distinct_model

# A child that registers a model and runs the gate, SIGKILLing itself right after `point`.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from dpoflow.flows.workspace import Workspace
    from dpoflow.storage.store import DatasetStore
    from dpoflow.tasks.training.promotion import PromoteConfig, decide_and_apply, register_candidate

    root, model_dir, point, metrics = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    write, write_json = DatasetStore.write, DatasetStore._write_json

    def killing_write(self, name, *a, **kw):
        info = write(self, name, *a, **kw)
        if name == "models" and point == "registered":
            os.kill(os.getpid(), signal.SIGKILL)
        return info

    def killing_write_json(self, path, obj):
        write_json(self, path, obj)
        if (point == "recorded" and path.endswith("promotions_log.json")) or (
                point == "tag_moved" and path.endswith("model_tags.json") and obj.get("production") != base):
            os.kill(os.getpid(), signal.SIGKILL)

    DatasetStore.write, DatasetStore._write_json = killing_write, killing_write_json
    ws = Workspace.open(root)
    base = ws.registry.tags().get("production")
    version = register_candidate(ws.registry, model_dir, parents=["dpo_train@0"], metrics={"acc": 1})
    d = decide_and_apply(ws.registry, version, metrics, PromoteConfig())
    print(json.dumps(d.to_dict()))
""")


def _run(root: Path, model_dir: Path, point: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(root), str(model_dir), point, json.dumps(GOOD)],
                          capture_output=True, text=True, timeout=300)


def _lineage(ws: Workspace) -> dict:
    reg = ws.registry
    rows = sorted((r["model_version"], tuple(r["parents"]), r["path"].rsplit("/", 1)[-1]) for r in reg.list())
    return {"models": rows, "tags": reg.tags(),
            "promotions": [(e["model_version"], e["previous"], e["reasons"]) for e in reg.promotions_log()]}


@pytest.fixture
def base_ws(tmp_path, tiny_model_dir):
    def make(name: str) -> Workspace:
        ws = Workspace.open(tmp_path / name)
        ws.registry.register(tiny_model_dir, tags=["production"], note="base")
        return ws
    return make


@pytest.fixture(scope="module")
def new_model(tmp_path_factory, tiny_model_dir) -> Path:
    return distinct_model(tiny_model_dir, tmp_path_factory.mktemp("new") / "m", 1)


def test_register_same_weights_twice_finds_the_first_version(base_ws, tiny_model_dir, new_model):
    ws = base_ws("ws")
    reg = ws.registry
    base = reg.version_of("models@production")
    assert reg.register(tiny_model_dir, note="again") == base  # content-keyed: no duplicate
    v = reg.register(new_model, parents=["dpo_train@0"])
    assert v.startswith("m0002-") and reg.register(new_model) == v
    assert [r["model_version"] for r in reg.list()] == [base, v]
    assert (reg.local_path(v) / "model.safetensors").exists()


@pytest.mark.parametrize("point", ["registered", "recorded", "tag_moved"])
def test_kill_at_model_step_then_rerun_equals_uninterrupted(base_ws, new_model, point):
    clean = base_ws("clean")
    done = _run(clean.root, new_model, "none")
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    assert expected["promoted"] and expected["previous_production"] == clean.registry.list()[0]["model_version"]

    killed = base_ws("killed")
    first = _run(killed.root, new_model, point)
    assert first.returncode == -9, first.stderr  # really killed at the point
    rerun = _run(killed.root, new_model, "none")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout) == expected  # the same decision, not a second promotion
    killed = Workspace.open(killed.root)
    assert _lineage(killed) == _lineage(Workspace.open(clean.root))  # same versions, tags and record
    again = _run(killed.root, new_model, "none")  # one more rerun changes nothing
    assert json.loads(again.stdout) == expected and _lineage(Workspace.open(killed.root)) == _lineage(killed)


def test_pickle_weights_are_refused_at_load_time(tmp_path, tiny_model_dir, base_ws):
    from dpoflow.tasks.generation import load_model
    from dpoflow.tasks.training.logprobs import load_causal_lm

    ws = base_ws("ws")
    folder = ws.registry.local_path("models@production")
    check_weights(folder)  # the registered folder is fine
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")  # swapped in after registration
    with pytest.raises(UnsafeWeightsError, match=r"refusing to load pickle-based weights .*pytorch_model\.bin") as e:
        load_model(str(folder))
    assert "\n" not in str(e.value) and "allow_pickle_weights: true" in str(e.value)
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        load_causal_lm(folder)
    check_weights(folder, allow_pickle=True)  # explicitly allowed

    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil_copy(f, only_pt / f.name)
    (only_pt / "model.pt").write_bytes(b"x")
    with pytest.raises(UnsafeWeightsError, match="model.pt"):
        check_weights(only_pt)
    (only_pt / "model.pt").unlink()
    with pytest.raises(UnsafeWeightsError, match="no .safetensors"):
        check_weights(only_pt)


def shutil_copy(a: Path, b: Path) -> None:
    import shutil

    if a.is_dir():
        shutil.copytree(a, b)
    else:
        shutil.copy2(a, b)
