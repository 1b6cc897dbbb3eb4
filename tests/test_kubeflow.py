"""Multi-node launch without a cluster: torchrun's arguments with and without the PET_*
variables a launcher sets, and the Kubeflow Trainer TrainJob request (SDK objects and the
manifest the SDK would send)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.distributed import torchrun_command
from dpoflow.tasks.training.results import TrainingError

SPEC = Path("/workspace/ws/runs/r7/launch/spec.json")
TAIL = ["-m", "dpoflow.tasks.training.worker", str(SPEC)]


def test_torchrun_passes_node_flags_only_without_pet_variables(monkeypatch):
    cfg = TrainConfig(devices=2, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    plain = torchrun_command(cfg, SPEC, 29511, env={})
    assert plain == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2",
                     "--node_rank=1", "--master_addr=10.0.0.5", "--master_port=29511", *TAIL]

    pet = {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    assert torchrun_command(cfg, SPEC, 29511, env=pet) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *TAIL]
    for k, v in {**pet, "PET_NPROC_PER_NODE": "8"}.items():  # the default env is this process's
        monkeypatch.setenv(k, v)
    assert torchrun_command(cfg, SPEC, 29511) == [sys.executable, "-m", "torch.distributed.run", *TAIL]
    monkeypatch.setenv("PET_NNODES", "")  # set but empty: torchrun would not use it either
    assert "--nnodes=2" in torchrun_command(cfg, SPEC, 29511)


def _cfg(**kubeflow) -> TrainConfig:
    return TrainConfig(launcher="kubeflow", nnodes=2, devices=4, launch_timeout_s=7200,
                       kubeflow={"image": "registry.example/dpoflow:1.2", "volume_claim": "dpoflow-ws",
                                 "mount_path": "/workspace", **kubeflow})


def test_trainjob_request_and_manifest_are_built_without_a_cluster():
    pytest.importorskip("kubeflow.trainer")
    from kubeflow.trainer import CustomTrainerContainer

    from dpoflow.tasks.training import kubeflow as kf

    req = kf.trainjob_request(_cfg(memory_per_node="64Gi", env={"NCCL_DEBUG": "WARN"}), SPEC, SPEC.parent.parent)
    assert req.runtime == "torch-distributed" and isinstance(req.trainer, CustomTrainerContainer)
    assert (req.trainer.image, req.trainer.num_nodes) == ("registry.example/dpoflow:1.2", 2)
    assert req.trainer.resources_per_node == {"gpu": 4, "memory": "64Gi"}
    assert req.command == ["python", "-m", "torch.distributed.run", *TAIL]  # layout from the runtime's PET_*

    job = kf.render_trainjob(req, namespace="ml")
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"]["name"] == req.name and job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "dpoflow"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 7200
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["command"] == req.command
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in trainer["env"]
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "dpoflow-workspace", "persistentVolumeClaim": {"claimName": "dpoflow-ws"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dpoflow-workspace", "mountPath": "/workspace"}]

    cpu = kf.trainjob_request(_cfg(gpus_per_node=0), SPEC, SPEC.parent.parent)
    assert cpu.trainer.resources_per_node is None
    assert cpu.command == ["python", "-m", "torch.distributed.run", "--nproc_per_node=4", *TAIL]


def test_trainjob_request_refuses_what_cannot_work():
    pytest.importorskip("kubeflow.trainer")
    from dpoflow.tasks.training import kubeflow as kf

    with pytest.raises(TrainingError, match="needs train.kubeflow.image"):
        kf.trainjob_request(TrainConfig(launcher="kubeflow"), SPEC, SPEC.parent.parent)
    with pytest.raises(TrainingError, match="not below kubeflow.mount_path=/workspace") as err:
        kf.trainjob_request(_cfg(), Path("/home/me/ws/spec.json"), Path("/home/me/ws"))
    assert "\n" not in str(err.value)
    assert kf.job_name(Path("/workspace/ws/runs/Run_2026-11-29T02:00")).startswith("dpoflow-run-2026-11-29t02-00-")


def test_deploy_example_is_what_the_launcher_submits():
    """deploy/kubeflow/trainjob.yaml stays the manifest of the config written in its header."""
    pytest.importorskip("kubeflow.trainer")
    import yaml

    from dpoflow.tasks.training import kubeflow as kf

    path = Path(__file__).resolve().parents[1] / "deploy" / "kubeflow" / "trainjob.yaml"
    example = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "TrainJob")
    cfg = TrainConfig(launcher="kubeflow", nnodes=2, devices=8, strategy="fsdp", kubeflow={
        "image": "registry.example.com/dpoflow:latest", "namespace": "ml", "volume_claim": "dpoflow-workspace",
        "mount_path": "/workspace", "memory_per_node": "256Gi"})
    run = Path("/workspace/ws/runs/nightly-2026-11-29")
    job = kf.render_trainjob(kf.trainjob_request(cfg, run / "launch" / "spec.json", run), namespace="ml")
    example["metadata"].pop("namespace")
    assert example == job
