"""The Prefect `train` flow: steps as subflows / tasks, artifacts published."""

from __future__ import annotations

import pytest

from flows.workspace import Workspace
from tests.test_train_eval import make_pairs


@pytest.mark.slow
def test_train_flow_publishes_artifacts(prefect_harness, tmp_path, tiny_model_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import train_flow

    ws = Workspace.open(tmp_path / "ws")
    base = ws.registry.register(tiny_model_dir, tags=["production"])
    ws.store.write("dpo_train", make_pairs(8))
    ws.store.write("dpo_eval", make_pairs(4, offset=50))
    overrides = ["train.max_steps=2", "train.batch_size=4", "train.eval.n_prompts=2",
                 "train.eval.max_new_tokens=4"]
    out = train_flow(workspace=str(ws.root), overrides=overrides)
    assert out["model_version"] and out["model_version"] != base
    assert set(out["outputs"]) >= {"ref_logps", "eval_ref_logps", "train_runs", "model_evals", "promotions"}
    assert out["decision"]["reasons"]
    with get_client(sync_client=True) as client:
        keys = {"train-curves", "eval-report", "promotion-decision"}
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
    assert keys <= {a.key for a in arts}
    # The session's Prefect server holds other tests' runs too: find this run's report.
    reports = [a for a in arts if a.key == "eval-report"]
    assert any(f"Evaluation of `{out['model_version']}`" in a.data for a in reports)
