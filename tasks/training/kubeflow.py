"""Multi-node training as a Kubeflow Trainer `TrainJob` (``train.launcher: kubeflow``).

Why a TrainJob: on Kubernetes, Kubeflow Trainer (v2, Python client ``kubeflow`` 0.5) is how
torchrun is started on several nodes. Its ``torch-distributed`` runtime creates one pod per
node and sets the ``PET_*`` variables (nnodes, node rank, rendezvous address) that torchrun
reads, so the command here carries no node flags (see distributed.torchrun_command).

The launcher writes the worker spec (config, data, model path) exactly as for a local launch,
then submits a `CustomTrainerContainer` (our image runs our worker module with that spec; a
`CustomTrainer` would ship a Python function instead), follows node-0's logs into the flow
run's logger, waits for Complete / Failed, and deletes the TrainJob in a ``finally`` (also on
timeout or cancellation). The spec, data, checkpoints and result live in the run folder, which
must be on a volume the nodes mount at the same path (``volume_claim`` at ``mount_path``).

The request is plain SDK objects built without a cluster (:func:`trainjob_request`);
:func:`render_trainjob` turns it into the TrainJob manifest the SDK would send.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from dpoflow.tasks.contract import Section
from dpoflow.tasks.training.results import TrainingCancelled, TrainingError

log = logging.getLogger("dpoflow.train")

WORKER_MODULE = "dpoflow.tasks.training.worker"
NODE_STEP = "node-0"  # the torch-distributed runtime's first node (rank 0 logs the metrics)
# torchrun flags the torch-distributed runtime supplies as PET_* variables in every node pod
RUNTIME_PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class KubeflowConfig(Section):
    image: str | None = Field(None, description="container image with dpoflow installed (required for "
                              "launcher: kubeflow), e.g. the one built from deploy/Dockerfile")
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime that starts torchrun per node")
    namespace: str | None = Field(None, description="Kubernetes namespace (None: the kube-config context's)")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node, one process each (None: "
                                      "train.devices; 0: CPU nodes running train.devices gloo processes)")
    cpu_per_node: str | None = Field(None, description="CPU request per node, e.g. '8'")
    memory_per_node: str | None = Field(None, description="memory request per node, e.g. '64Gi'")
    volume_claim: str | None = Field(None, description="PersistentVolumeClaim holding the workspace, mounted in "
                                     "every node at mount_path (the run folder must be below it)")
    mount_path: str = Field("/workspace", description="where the nodes (and this process) see the shared volume")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the training nodes")
    poll_s: int = Field(5, ge=1, description="seconds between TrainJob status polls")
    keep_job: bool = Field(False, description="keep the finished TrainJob (default: deleted, also on failure)")

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("kubeflow.mount_path must be an absolute path")
        return v.rstrip("/") or "/"


@dataclass
class TrainJobRequest:
    """What `TrainerClient.train` receives: runtime name, trainer and options (SDK objects)."""

    name: str
    runtime: str
    trainer: Any  # kubeflow.trainer.CustomTrainerContainer
    options: list[Any] = field(default_factory=list)
    command: list[str] = field(default_factory=list)


def job_name(run_dir: Path) -> str:
    """A valid, recognisable TrainJob name from the run folder (DNS-1035 label)."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"dpoflow-{Path(run_dir).name}".lower()).strip("-")[:50].rstrip("-")
    import hashlib

    suffix = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    name = f"{base}-{suffix}"
    assert _NAME.match(name), name
    return name


def node_gpus(cfg: Any) -> int:
    g = cfg.kubeflow.gpus_per_node
    return cfg.devices if g is None else g


def node_command(cfg: Any, spec_path: Path) -> list[str]:
    """torchrun in a node pod: the runtime's PET_* variables give the node layout. GPU nodes
    run one process per GPU (the runtime's count); CPU nodes run train.devices processes."""
    from dpoflow.tasks.training.commands import torchrun_command

    pet = [k for k in RUNTIME_PET if node_gpus(cfg) or k != "PET_NPROC_PER_NODE"]
    cmd = torchrun_command(cfg, spec_path, 0, env={k: "from the runtime" for k in pet})
    return ["python", *cmd[1:]]  # the image's interpreter, not this one's path


def _check_shared(kcfg: KubeflowConfig, *paths: Path) -> None:
    if kcfg.volume_claim is None:
        return
    for p in paths:
        if not str(Path(p).resolve()).startswith(kcfg.mount_path.rstrip("/") + "/"):
            raise TrainingError(f"{p} is not below kubeflow.mount_path={kcfg.mount_path}: the training nodes "
                                "would not see it (put the workspace on the shared volume)")


def trainjob_request(cfg: Any, spec_path: Path, run_dir: Path, model_path: Path | str | None = None
                     ) -> TrainJobRequest:
    """Build the TrainJob request for `cfg` (TrainConfig with launcher: kubeflow); no cluster needed."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (
        ActiveDeadlineSeconds,
        ContainerPatch,
        JobSpecPatch,
        JobTemplatePatch,
        Labels,
        Name,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )
    from kubeflow.trainer.options.kubernetes import JobSetSpecPatch, JobSetTemplatePatch

    kcfg: KubeflowConfig = cfg.kubeflow
    if not kcfg.image:
        raise TrainingError("train.launcher=kubeflow needs train.kubeflow.image (an image with dpoflow installed)")
    _check_shared(kcfg, spec_path, run_dir, *([Path(model_path)] if model_path else []))
    gpus = node_gpus(cfg)
    resources: dict[str, Any] = {"gpu": gpus} if gpus else {}
    if kcfg.cpu_per_node:
        resources["cpu"] = kcfg.cpu_per_node
    if kcfg.memory_per_node:
        resources["memory"] = kcfg.memory_per_node
    env = {"PYTHONUNBUFFERED": "1", **kcfg.env}
    trainer = CustomTrainerContainer(image=kcfg.image, num_nodes=cfg.nnodes, resources_per_node=resources or None,
                                     env=env)
    name = job_name(run_dir)
    command = node_command(cfg, spec_path)
    options: list[Any] = [Name(name=name), Labels(labels={"app.kubernetes.io/managed-by": "dpoflow",
                                                          "dpoflow/stage": "train"}),
                          TrainerCommand(command=command), ActiveDeadlineSeconds(int(cfg.launch_timeout_s))]
    if kcfg.volume_claim:
        pod = PodSpecPatch(volumes=[{"name": "dpoflow-workspace", "persistentVolumeClaim": {
            "claimName": kcfg.volume_claim}}], containers=[ContainerPatch(name="node", volume_mounts=[
                {"name": "dpoflow-workspace", "mountPath": kcfg.mount_path}])])
        node = ReplicatedJobPatch(name="node", template=JobTemplatePatch(spec=JobSpecPatch(
            template=PodTemplatePatch(spec=pod))))
        options.append(RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[node])))))
    return TrainJobRequest(name=name, runtime=kcfg.runtime, trainer=trainer, options=options, command=command)


def render_trainjob(request: TrainJobRequest, namespace: str = "default") -> dict[str, Any]:
    """The TrainJob manifest the SDK sends for `request`, built by the SDK's own code path
    with the runtime described here instead of read from a cluster (dry run, tests, docs)."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.types import types

    sent: list[dict] = []

    class _Record:  # stands for the Kubernetes API: keeps the body instead of POSTing it
        def create_namespaced_custom_object(self, group, version, ns, plural, body):  # noqa: ANN001
            sent.append(body)

    class _Offline(KubernetesBackend):
        def __init__(self) -> None:  # no kube-config, no cluster
            self.namespace = namespace
            self.custom_api = _Record()

        def get_runtime(self, name: str) -> Any:
            trainer = types.RuntimeTrainer(trainer_type=types.TrainerType.CUSTOM_TRAINER, framework="torch",
                                           image=request.trainer.image)
            return types.Runtime(name=name, trainer=trainer, kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME)

    _Offline().train(runtime=request.runtime, trainer=request.trainer, options=request.options)
    return sent[0]


def run_trainjob(cfg: Any, spec_path: Path, run_dir: Path, *, model_path: Path | str | None = None,
                 logger: logging.Logger | None = None, stop: threading.Event | None = None) -> str:
    """Submit the TrainJob, stream node-0's log into `logger`, wait for it, delete it in a
    finally. Returns the job name; raises TrainingError on a failed job, TrainingCancelled when
    `stop` is set."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    logger = logger or log
    request = trainjob_request(cfg, spec_path, run_dir, model_path)
    client = TrainerClient(KubernetesBackendConfig(namespace=cfg.kubeflow.namespace))
    name = client.train(runtime=request.runtime, trainer=request.trainer, options=request.options)
    logger.info("TrainJob %s submitted: %d nodes, runtime %s, image %s", name, cfg.nnodes, request.runtime,
                cfg.kubeflow.image)
    try:
        threading.Thread(target=_follow, args=(client, name, logger), name="trainjob-logs", daemon=True).start()

        def check_stop(_job: Any) -> None:
            if stop is not None and stop.is_set():
                raise TrainingCancelled(f"training cancelled; TrainJob {name} deleted; rerun to resume")

        job = client.wait_for_job_status(name, status={"Complete", "Failed"}, timeout=int(cfg.launch_timeout_s),
                                         polling_interval=cfg.kubeflow.poll_s, callbacks=[check_stop])
        if job.status != "Complete":
            raise TrainingError(f"TrainJob {name} ended {job.status}; see its node logs above")
        return name
    finally:
        if not cfg.kubeflow.keep_job:
            try:
                client.delete_job(name)
            except Exception as exc:  # noqa: BLE001 - report, never hide the training error
                logger.warning("could not delete TrainJob %s: %s", name, str(exc).splitlines()[0] if str(exc) else exc)


def _follow(client: Any, name: str, logger: logging.Logger) -> None:
    try:
        for line in client.get_job_logs(name, step=NODE_STEP, follow=True):
            logger.info("[%s] %s", name, line.rstrip())
    except Exception as exc:  # noqa: BLE001 - logs are best effort; the status decides
        logger.warning("stopped following TrainJob %s logs: %s", name, exc)


def launched_result(result: Path, run_dir: Path, t_start: float, on_progress: Any = None) -> Any:
    """The result rank 0 wrote to the shared run folder (`result`), as distributed.launch
    returns it."""
    import json
    import time

    from dpoflow.tasks.training.results import TrainResult

    if not result.exists():
        raise TrainingError(f"the TrainJob completed but wrote no {result}: is the run folder on the "
                            "shared volume (train.kubeflow.volume_claim / mount_path)?")
    if on_progress is not None:
        on_progress(1.0)
    res = json.loads(result.read_text())
    summary = res["summary"]
    summary.setdefault("phases", {})["launch_total"] = round(time.perf_counter() - t_start, 3)
    return TrainResult(output_dir=Path(res["output_dir"]), run_dir=run_dir, metrics=res["metrics"],
                       summary=summary, tokenize_stats=res["tokenize_stats"])
