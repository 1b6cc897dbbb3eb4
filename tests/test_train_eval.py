"""ref_logps reuse, evaluation metrics, the promotion gate and `dpoflow train` end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dpoflow.flows.workspace import Workspace
from tests.builders import make_pairs


@pytest.fixture
def trained_ws(tmp_path, tiny_model_dir):
    """A workspace with the tiny model registered as production and small dpo_train / dpo_eval."""
    ws = Workspace.open(tmp_path / "ws")
    ws.registry.register(tiny_model_dir, tags=["production"], note="tiny base")
    ws.store.write("dpo_train", make_pairs(16))
    ws.store.write("dpo_eval", make_pairs(6, offset=100))
    return ws


# --- ref_logps ----------------------------------------------------------------------------

def test_ref_logps_reused_without_loading_the_reference(trained_ws):
    from dpoflow.flows.train_steps import ref_logps_for

    ws = trained_ws
    first = ref_logps_for(ws, "dpo_train@0", ws.config.train)
    assert not first.skipped
    table = ws.store.read(first.outputs["ref_logps"])
    assert table.num_rows == 16
    assert (np.asarray(table.column("ref_chosen_logp")) < 0).all()
    assert (np.asarray(table.column("chosen_tokens")) > 1).all()
    prod = ws.registry.version_of("models@production")
    assert set(table.column("ref_model_version").to_pylist()) == {prod}

    # The reference model's files disappear: a rerun (also with another β and loss setting)
    # must still succeed, which it can only do by not loading the model at all.
    shutil.rmtree(ws.registry.local_path("models@production"))
    ws2 = Workspace.open(ws.root, ["train.beta=0.5", "train.lr=1e-4"])
    again = ref_logps_for(ws2, "dpo_train@0", ws2.config.train)
    assert again.skipped and again.outputs == first.outputs
    # ... and forcing the computation really needs the (now missing) model.
    with pytest.raises(FileNotFoundError):
        ref_logps_for(ws2, "dpo_train@0", ws2.config.train, force=True)
    # A tokenization change is a different computation: not reused.
    ws3 = Workspace.open(ws.root, ["train.max_length=64", "train.max_prompt_length=32"])
    with pytest.raises(FileNotFoundError):
        ref_logps_for(ws3, "dpo_train@0", ws3.config.train)


def test_ref_logps_for_a_local_model_folder(tmp_path, tiny_model_dir):
    from dpoflow.flows.train_steps import ref_logps_for
    from dpoflow.tasks.training.ref_logps import resolve_model

    ws = Workspace.open(tmp_path / "ws", [f"train.model={tiny_model_dir}"])
    ws.store.write("dpo_train", make_pairs(4))
    m = resolve_model(ws.registry, str(tiny_model_dir))
    assert m.version.startswith("local:") and m.local is not None
    run = ref_logps_for(ws, "dpo_train", ws.config.train)
    assert ws.store.read(run.outputs["ref_logps"]).column("ref_model_version")[0].as_py() == m.version
    with pytest.raises(ValueError, match="neither a local model folder nor a registered model"):
        resolve_model(ws.registry, "models@production")


# --- evaluation ---------------------------------------------------------------------------

def test_eval_metrics_are_hand_checkable(tiny_model_dir):
    """Policy = the tiny model; stored reference = policy log-probs shifted by known offsets, so
    every reward is β·offset and accuracy, margin and loss can be computed by hand."""
    from dpoflow.flows.config import load_config
    from dpoflow.tasks.training.evaluation import EvalConfig, evaluate_preferences
    from dpoflow.tasks.training.logprobs import compute_ref_logps, load_causal_lm, ref_logps_table
    from dpoflow.tasks.training.tokenization import tokenize_pairs

    cfg = load_config(None, ["train.beta=0.1"]).train
    model, tok = load_causal_lm(tiny_model_dir)
    pairs = make_pairs(6)
    tp = tokenize_pairs(pairs, tok, cfg)
    pol = compute_ref_logps(model, tp, batch_size=4)
    a = np.array([1.0, 2.0, 0.0, 3.0, 0.5, 0.0])  # chosen log-ratio
    b = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 0.0])  # rejected log-ratio
    pol.chosen_logp, pol.rejected_logp = pol.chosen_logp - a, pol.rejected_logp - b
    ref = ref_logps_table(tp, pol, "hand")
    m, per_pair = evaluate_preferences(model, tok, pairs, ref, cfg, EvalConfig())
    assert m["n_pairs"] == 6
    assert m["reward_accuracy"] == pytest.approx(3 / 6)  # pairs 0, 1, 3 (a tie is not a win)
    assert m["reward_margin"] == pytest.approx(0.1 * 1.5 / 6, abs=1e-5)
    expect = np.mean([math.log1p(math.exp(-0.1 * d)) for d in a - b])
    assert m["eval_loss"] == pytest.approx(expect, abs=1e-5)
    assert per_pair.column("correct").to_pylist() == [True, True, False, True, False, False]


def test_win_rate_counts_ties_half_and_skips_unscored():
    from dpoflow.tasks.training.evaluation import win_rate

    r = win_rate(np.array([1.0, 2.0, np.nan, 3.0]), np.array([0.0, 2.0, 1.0, 4.0]))
    assert (r["wins"], r["ties"], r["losses"], r["n_compared"], r["n_unscored"]) == (1, 1, 1, 3, 1)
    assert r["win_rate"] == pytest.approx(0.5)


def test_generation_comparison_of_a_model_with_itself_is_all_ties(tiny_model_dir):
    from dpoflow.tasks.training.evaluation import EvalConfig, generation_comparison
    from dpoflow.tasks.training.logprobs import load_causal_lm

    m = load_causal_lm(tiny_model_dir)
    ecfg = EvalConfig(n_prompts=3, max_new_tokens=6)
    r = generation_comparison(m, m, make_pairs(5), ecfg)
    assert r["n_compared"] + r["n_unscored"] == 3
    assert r["wins"] == r["losses"] == 0
    if r["n_compared"]:
        assert r["win_rate"] == 0.5


def test_training_curves_png(tmp_path):
    from dpoflow.tasks.training.evaluation import plot_training_curves

    hist = [{"step": i, "loss": 0.7 - 0.01 * i, "rewards/accuracies": i / 10, "lr": 1e-5} for i in range(1, 11)]
    p = plot_training_curves(hist, tmp_path / "c.png")
    assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curves([], tmp_path / "none.png") is None


# --- promotion ----------------------------------------------------------------------------

# the gate and decide_and_apply are tested in tests/test_promotion_gate.py and tests/test_model_steps.py


# --- dpoflow train end to end --------------------------------------------------------------

def test_cli_train_end_to_end(trained_ws, capsys):
    from dpoflow.flows.cli import main

    ws = trained_ws
    base = ws.registry.version_of("models@production")
    args = ["train", "--workspace", str(ws.root), "--data", "dpo_train@0", "--eval", "dpo_eval@0", "--json",
            "--set", f"train.model=models@{base}",
            "--set", "train.max_steps=3", "--set", "train.batch_size=4", "--set", "train.lr=1e-3",
            "--set", "train.warmup_steps=0", "--set", "train.eval.n_prompts=2",
            "--set", "train.eval.max_new_tokens=4",
            "--set", "train.ref_logps_in_trainer=false"]  # the stored ref_logps path (β sweeps reuse it)
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    version = out["model_version"]
    assert version != base
    assert not any(out["skipped"].values())

    model = ws.registry.get(version)
    assert "candidate" in model["tags"]
    assert {"dpo_train@0", out["outputs"]["ref_logps"], f"models@{base}"} <= set(model["parents"])
    assert model["config"]["train"]["max_steps"] == 3
    run = ws.store.read(out["outputs"]["train_runs"]).to_pylist()[0]
    assert run["steps"] == 3 and run["model_version"] == version
    assert run["curves"] and Path(run["curves"]).read_bytes()[:4] == b"\x89PNG"
    ev = ws.store.read(out["outputs"]["model_evals"]).to_pylist()[0]
    assert ev["n_pairs"] == 6 and 0 <= ev["reward_accuracy"] <= 1 and ev["baseline_model"] == base
    assert ev["win_rate"] is not None
    assert "# Evaluation of" in Path(ev["report"]).read_text()

    d = out["decision"]
    assert d["model_version"] == version and d["reasons"]
    prod_now = ws.registry.version_of("models@production")
    assert prod_now == (version if d["promoted"] else base)

    # Same command again (policy pinned to the base model): every step is reused, nothing retrains.
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["model_version"] == version
    assert again["skipped"]["ref_logps"] and again["skipped"]["train"]
    # the eval baseline is the production model: re-evaluated only if production moved
    assert again["skipped"]["evaluate"] == (not d["promoted"])
    assert ws.registry.version_of("models@production") == prod_now


def test_train_computes_its_reference_in_process_and_reports(trained_ws, capsys):
    """Reference = starting policy, one process: no ref_logps stage for dpo_train, one model load
    in the training process; the train report has phase timings, the truncated share and a
    warning that the CLI prints, because max_length 24 cuts most pairs."""
    from dpoflow.flows.cli import main

    ws = trained_ws
    assert main(["train", "--workspace", str(ws.root), "--data", "dpo_train@0", "--eval", "none", "--no-promote",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.max_length=24"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "were truncated or dropped" in out and "max_truncated_share" in out
    assert "ref_logps" not in [line.split()[0] for line in out.splitlines() if line.strip()]
    assert not ws.store.exists("ref_logps")
    run = ws.store.read("train_runs@latest").to_pylist()[0]
    summary = json.loads(run["summary"])
    assert run["ref_logps"] is None and summary["ref_logps"] == "computed in the trainer"
    assert {"imports", "load_model", "tokenize", "ref_logps", "setup", "loop", "save",
            "launch_total"} <= set(summary["phases"])  # trained in this process (train.in_process default)
    assert summary["tokenize"]["affected_share"] > 0.2 and summary["warnings"]
    assert summary["phases"]["launch_total"] >= summary["phases"]["loop"] > 0


def test_batch_larger_than_the_data_fails_before_reference_log_probs(trained_ws, capsys):
    from dpoflow.flows.cli import main

    ws = trained_ws
    code = main(["train", "--workspace", str(ws.root), "--data", "dpo_train@0", "--eval", "none",
                 "--set", "train.batch_size=32", "--set", "train.ref_logps_in_trainer=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "dpo_train@0 has 16 pairs, fewer than one global batch of 32" in err
    assert not ws.store.exists("ref_logps") and not ws.store.exists("train_runs")


@pytest.mark.parametrize("in_process", [False, True])
def test_a_failure_in_the_training_process_is_reported_by_its_cause(trained_ws, in_process):
    """12 of 16 pairs have identical completions (dropped at tokenization): training fails, and
    the error names that cause, not just an exit code (the worker's log path with it)."""
    from dpoflow.flows.train_steps import train_pipeline
    from dpoflow.tasks.training.trainer import TrainingError

    pairs = make_pairs(16, offset=200)
    same = pa.array(pairs.column("chosen").to_pylist()[:12] + pairs.column("rejected").to_pylist()[12:])
    trained_ws.store.write("dpo_train", pairs.set_column(pairs.schema.get_field_index("rejected"), "rejected", same))
    ws = Workspace.open(trained_ws.root, ["train.batch_size=8", f"train.in_process={str(in_process).lower()}"])
    tail = "" if in_process else r" .*\(exit code 1; log .*worker.log\)$"
    with pytest.raises(TrainingError, match=r"^dpo_train after tokenization has 4 pairs, fewer than one global "
                                            r"batch of 8" + tail):
        train_pipeline(ws, "dpo_train@1", None, promote=False)


@pytest.mark.parametrize("setting", ["train.lr=.inf", "train.adam_betas=[1.5, 0.999]", "train.loss_weights=[-1]"])
def test_bad_train_settings_fail_at_load(trained_ws, setting, capsys):
    from dpoflow.flows.cli import main

    code = main(["train", "--workspace", str(trained_ws.root), "--eval", "none", "--set", setting])
    assert code == 2 and "invalid config" in capsys.readouterr().err
    assert not trained_ws.store.exists("train_runs") and len(trained_ws.registry.list()) == 1


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


LAUNCHER = """
import sys
from dpoflow.flows.train_steps import train_pipeline
from dpoflow.flows.workspace import Workspace
ws = Workspace.open(sys.argv[1], ["train.max_steps=100000", "train.batch_size=4", "train.checkpoint_every=0",
                                 "train.in_process=false"])
train_pipeline(ws, "dpo_train@0", None, promote=False)
"""


def test_training_group_stops_when_its_launcher_is_killed(trained_ws):
    """SIGKILL of the flow process (or a cancelled run) must not leave training orphaned (the
    child worker, train.in_process=false; in-process training dies with the process)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(trained_ws.root)])
    deadline = time.time() + 180
    while time.time() < deadline and not [p for p in _procs_mentioning("dpoflow.tasks.training.worker")
                                          if str(trained_ws.root) in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]:
        assert proc.poll() is None, "launcher ended before training started"
        time.sleep(0.3)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _procs_mentioning(str(trained_ws.root)):
        time.sleep(0.5)
    assert _procs_mentioning(str(trained_ws.root)) == []


@pytest.mark.parametrize("in_process", [False, True])
def test_training_hard_timeout_kills_the_process_group(trained_ws, in_process):
    """A run past train.launch_timeout_s fails with a clear error and leaves no trainer process:
    the worker is killed; in-process training stops at the next step boundary."""
    from dpoflow.flows.train_steps import train_pipeline
    from dpoflow.tasks.training.trainer import TrainingError

    ws = Workspace.open(trained_ws.root, ["train.max_steps=100000", "train.batch_size=4",
                                          "train.launch_timeout_s=6", "train.checkpoint_every=0",
                                          f"train.in_process={str(in_process).lower()}"])
    with pytest.raises(TrainingError, match="launch_timeout_s"):
        train_pipeline(ws, "dpo_train@0", None, promote=False)
    assert _procs_mentioning(str(ws.root)) == []
    assert ws.registry.version_of("models@production")  # nothing registered or promoted
    assert len(ws.registry.list()) == 1


def test_in_process_training_needs_no_second_interpreter(trained_ws):
    """One local device trains inside the calling process by default (train.in_process): no
    worker process, no second interpreter with torch (the process tree's peak RSS)."""
    from dpoflow.flows.train_steps import train_pipeline

    ws = Workspace.open(trained_ws.root, ["train.max_steps=2", "train.batch_size=4"])
    assert ws.config.train.in_process
    out = train_pipeline(ws, "dpo_train@0", None, promote=False)
    run = ws.store.read(out.outputs["train_runs"]).to_pylist()[0]
    summary = json.loads(run["summary"])
    assert run["steps"] == 2 and summary["ref_logps"] == "computed in the trainer"
    assert "worker_imports" not in summary["phases"] and summary["phases"]["loop"] > 0
    assert summary["phases"]["launch_total"] >= summary["phases"]["imports"]
    assert not list(Path(ws.root).rglob("worker.log"))  # no child process was launched
    assert "candidate" in ws.registry.get(out.model_version)["tags"]
