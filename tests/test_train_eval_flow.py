"""The Prefect `train` flow: steps as subflows / tasks, artifacts published."""

from __future__ import annotations

import pytest

from dpoflow.flows.workspace import Workspace
from tests.builders import make_pairs


@pytest.mark.slow
def test_train_flow_publishes_artifacts(prefect_harness, tmp_path, tiny_model_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from dpoflow.flows.train import train_flow

    ws = Workspace.open(tmp_path / "ws")
    base = ws.registry.register(tiny_model_dir, tags=["production"])
    ws.store.write("dpo_train", make_pairs(8))
    ws.store.write("dpo_eval", make_pairs(4, offset=50))
    overrides = ["train.max_steps=2", "train.batch_size=4", "train.eval.n_prompts=2",
                 "train.eval.max_new_tokens=4", "train.ref_logps_in_trainer=false",  # the ref_logps subflow runs
                 # 2 compared prompts are no evidence: checks off so that the asked-for promotion happens
                 "train.promote.min_win_rate=null", "train.promote.min_reward_accuracy=null",
                 "train.promote.min_reward_margin=null", "train.promote.max_reward_accuracy_drop=null",
                 "train.promote.max_flagged_increase=null"]
    state = train_flow(workspace=str(ws.root), overrides=overrides, promote=True, return_state=True)
    out = state.result()
    assert out["model_version"] and out["model_version"] != base
    assert set(out["outputs"]) >= {"ref_logps", "eval_ref_logps", "train_runs", "model_evals", "promotions"}
    assert out["decision"]["reasons"] and not out["skipped"]["ref_logps"] and out["decision"]["promoted"]
    # the ref_logps subflow says when it reused stored rows (the train summary reports it)
    from dpoflow.flows.train import ref_logps_flow

    kw = {"pairs": ["dpo_train@latest"], "workspace": str(ws.root), "overrides": overrides}
    first, again = ref_logps_flow(**kw), ref_logps_flow(**kw)  # the promoted model is the new reference
    assert not first["dpo_train@latest"]["skipped"] and again["dpo_train@latest"]["skipped"]
    assert again["dpo_train@latest"]["ref_logps"] == first["dpo_train@latest"]["ref_logps"]
    with get_client(sync_client=True) as client:
        keys = {"train-curves", "eval-report", "promotion-decision"}
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
    assert keys <= {a.key for a in arts}
    # The session's Prefect server holds other tests' runs too: find this run's report.
    reports = [a for a in arts if a.key == "eval-report"]
    assert any(f"Evaluation of `{out['model_version']}`" in a.data for a in reports)
    with get_client(sync_client=True) as client:  # this run's training progress, done
        mine = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    progress = [a for a in mine if a.key == "train-progress"]
    assert len(progress) == 1 and progress[0].type == "progress" and float(progress[0].data) == 100.0


def test_training_progress_reads_the_last_metrics_row(tmp_path):
    import json

    from dpoflow.tasks.training.distributed import training_progress

    path = tmp_path / "metrics.jsonl"
    assert training_progress(path) is None  # not started
    # 5 steps an epoch, 3 epochs: step 7 of the trainer's 15 (not guessed back from `epoch`)
    path.write_text("".join(json.dumps({"step": s, "total_steps": 15, "epoch": s / 5, "loss": 0.6}) + "\n"
                            for s in (6, 7)))
    assert training_progress(path) == 7 / 15
    with open(path, "a") as f:
        f.write('{"step": 8, "tot')  # rank 0 is halfway through a row
    assert training_progress(path) is None
