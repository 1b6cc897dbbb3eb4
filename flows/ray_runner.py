"""Shards on a Ray cluster through Prefect: the `ray` config section and the RayTaskRunner setup.

Why Ray through prefect-ray: every shard stays a Prefect task run (visible in the UI, with
its logs and state), while Ray places it on a worker with the CPUs / GPU it asks for
(`remote_options`, Ray sets CUDA_VISIBLE_DEVICES). GPU shards reuse their worker process
(``max_calls=0``), so the model is loaded once per worker, not once per shard.

`address: local` starts a private cluster for the run (and stops it after); any other
address joins an existing cluster and is checked first, so a wrong or dead address is one
line of error, never a silent fall-back to a local cluster. Ray is imported only when a
run uses it (``pip install 'dpoflow[ray]'``).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import Field, field_validator

from dpoflow.tasks.contract import Section

_ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


class RayConfig(Section):
    address: str = Field("local", description="local: start a private Ray cluster for the run (stopped after); "
                         "ray://host:10001 (Ray client) or host:6379 (on a cluster node): join that cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all); ignored when joining")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local cluster (None: all visible)")
    object_store_mb: int | None = Field(None, ge=80, description="object store of a local cluster in MiB "
                                        "(None: Ray's default, 30% of memory); shards pass only small specs")
    cpus_per_shard: float = Field(1.0, gt=0, description="CPUs Ray reserves for one shard task")
    gpus_per_shard: float = Field(0.0, ge=0, description="GPUs per shard task (0: CPU shards; 1: one GPU each, "
                                  "the worker and its loaded model are reused across shards)")
    retries: int = Field(1, ge=0, description="retries of a shard whose task fails or whose worker dies "
                         "(a committed shard is never written twice)")
    dashboard: bool = Field(False, description="start the Ray dashboard with a local cluster")
    connect_timeout_s: float = Field(10.0, gt=0, description="how long to try reaching a cluster address")

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        v = v.strip()
        if v != "local" and not _ADDRESS.match(v):
            raise ValueError(f"ray.address must be 'local', 'ray://host:port' or 'host:port', not {v!r}")
        return v


class RayUnavailable(RuntimeError):
    """The configured Ray cluster cannot be used (a one-line reason)."""


def check_address(cfg: RayConfig) -> None:
    """Fail fast, in one line, when a cluster address does not answer (no local fall-back)."""
    if cfg.address == "local":
        return
    m = _ADDRESS.match(cfg.address)
    assert m is not None  # validated
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        with socket.create_connection((host, port), timeout=cfg.connect_timeout_s):
            pass
    except OSError as exc:
        raise RayUnavailable(f"ray.address {cfg.address!r} is unreachable ({exc.strerror or exc}); start the "
                             "cluster or set ray.address: local") from None


def init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """`ray.init` settings: resources only for a cluster we start; joining takes the cluster's."""
    if cfg.address != "local":
        return {}
    kw: dict[str, Any] = {"include_dashboard": cfg.dashboard}
    if cfg.num_cpus is not None:
        kw["num_cpus"] = cfg.num_cpus
    if cfg.num_gpus is not None:
        kw["num_gpus"] = cfg.num_gpus
    if cfg.object_store_mb is not None:
        kw["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    return kw


def shard_options(cfg: RayConfig) -> dict[str, Any]:
    """`remote_options` of one shard task. GPU tasks would get a fresh worker per call by
    default (max_calls=1); 0 keeps the worker and its model. A dead worker is retried by Ray."""
    opts: dict[str, Any] = {"num_cpus": cfg.cpus_per_shard, "max_retries": cfg.retries}
    if cfg.gpus_per_shard > 0:
        opts.update(num_gpus=cfg.gpus_per_shard, max_calls=0)
    return opts


def worker_device(device: str, cfg: RayConfig, setting: str = "sample.device") -> str:
    """The device shards run on: what the Ray tasks ask for, not what this process sees."""
    runner = setting.split(".", 1)[0] + ".runner"
    if cfg.gpus_per_shard > 0:
        if device == "cpu":
            raise ValueError(f"{setting}=cpu contradicts ray.gpus_per_shard > 0")
        return "cuda"
    if device.startswith("cuda"):
        raise ValueError(f"{setting}={device} needs ray.gpus_per_shard > 0 with {runner}=ray")
    return "cpu"


def check_vllm(specs: Sequence[Any], cfg: RayConfig) -> None:
    """vLLM on Ray is one engine per GPU worker (kept by the reused worker process across its
    shards): an engine takes most of its GPU's memory (gpu_memory_utilization), so two on one
    GPU (a fractional gpus_per_shard) or one on a CPU worker cannot work; say so before the
    cluster starts instead of silently sampling with transformers on CPU workers."""
    backends = {s.config["samplers"][s.sampler].get("backend") for s in specs
                if isinstance(getattr(s, "config", None), dict) and "samplers" in s.config}
    if "vllm" in backends and (cfg.gpus_per_shard < 1 or cfg.gpus_per_shard != int(cfg.gpus_per_shard)):
        raise ValueError(f"backend: vllm with sample.runner=ray needs a whole number of GPUs per shard "
                         f"(ray.gpus_per_shard >= 1, not {cfg.gpus_per_shard}): one vLLM engine per GPU worker")


def _flush_prefect(timeout_s: float = 15.0) -> None:
    """Send what a worker's Prefect client still holds (the task run's final state goes out as an
    event after the task function returns); a worker stopped with the cluster loses the rest."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout_s, at_exit=False)


def _flushing_runner_class() -> type:
    from prefect_ray import RayTaskRunner

    class FlushingRayTaskRunner(RayTaskRunner):
        """RayTaskRunner whose task wrapper, on the worker, flushes the task run's states and
        logs before the shard counts as done, so none is lost when the cluster stops."""

        @staticmethod
        def _run_prefect_task(*args: Any, **kwargs: Any) -> Any:
            try:
                return RayTaskRunner._run_prefect_task(*args, **kwargs)
            finally:
                _flush_prefect()

    return FlushingRayTaskRunner


def task_runner(cfg: RayConfig) -> Any:
    """A RayTaskRunner for this config (a private cluster for `local`)."""
    try:
        runner_class = _flushing_runner_class()
    except ImportError as exc:
        raise RayUnavailable("runner=ray needs Ray: pip install 'dpoflow[ray]'") from exc
    check_address(cfg)
    return runner_class(address=cfg.address, init_kwargs=init_kwargs(cfg))


def submit_all(cfg: RayConfig, task: Any, calls: Sequence[tuple[Any, dict[str, Any]]]
               ) -> Iterator[tuple[Any, Any]]:
    """Submit every ``(key, parameters)`` as a task run on the cluster, then yield
    ``(key, result)`` in completion order. Tasks still pending when the caller stops (an
    error, a cancelled flow run) are cancelled, so nothing keeps running unowned."""
    import ray
    from prefect import states
    from prefect_ray.context import remote_options

    runner = task_runner(cfg)
    api = _api_for_workers(cfg)
    with _sigterm_kept():
        try:
            runner.__enter__()
        except Exception as exc:  # noqa: BLE001 - any failure to start or join is one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RayUnavailable(f"ray.address {cfg.address!r}: cannot start or join Ray: {first}") from None
    pending: dict[Any, tuple[Any, Any]] = {}
    try:
        with api, remote_options(**shard_options(cfg)):  # the settings travel with each task run
            for key, params in calls:
                fut = runner.submit(task, params)
                pending[fut.wrapped_future] = (key, fut)
        while pending:
            with _signal_unwrapped():
                ready, _ = ray.wait(list(pending), num_returns=1)
            key, fut = pending.pop(ready[0])
            try:
                with _signal_unwrapped():
                    result = fut.result()
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.LocalRayletDiedError) as exc:
                # its worker died past ray.retries: the task run can never report again
                _mark_final([fut.task_run_id], states.Crashed, f"the Ray worker died: {type(exc).__name__}")
                raise
            yield key, result
    finally:
        running = ray.wait(list(pending), num_returns=len(pending), timeout=0)[1] if pending else []
        for ref in running:
            ray.cancel(ref, force=True)
        runner.__exit__(None, None, None)
        _mark_final([pending[ref][1].task_run_id for ref in running], states.Cancelled, "the flow run stopped")


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handler across `ray.init`, which replaces it twice: abseil's
    failure handler at the C level (it aborts the process, skipping atexit handlers such as the
    stop of Prefect's temporary server) and a Python handler that calls sys.exit. Prefect's own
    handler is what turns the SIGTERM that `serve` or a worker sends on Cancel into a Cancelled
    flow run; under Ray's the run ended Crashed. (A cancel during ray.init still does.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:  # None: set outside Python, nothing of ours to restore
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _signal_unwrapped() -> Iterator[None]:
    """Ray's blocking calls run Python's signal handlers but drop what they raise (other than
    KeyboardInterrupt / SystemExit) into a SystemError; raise the handler's own exception
    (Prefect's TerminationSignal on a cancel), so the flow engine sees the cancel."""
    try:
        yield
    except SystemError as exc:
        raised = exc.__context__
        if raised is not None and not isinstance(raised, Exception):
            raise raised from None
        raise


def _api_for_workers(cfg: RayConfig) -> Any:
    """Settings that give the workers this process's Prefect API. Each task run carries the
    driver's settings; without an explicit URL (Prefect's temporary server) a worker would
    start a server of its own, so the temporary server's address is set for the submissions.
    A loopback address cannot serve a remote cluster: that is an error, not a lost UI."""
    from urllib.parse import urlparse

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if not url:
        with get_client(sync_client=True) as client:
            url = str(client.api_url)
    host = urlparse(url).hostname or ""
    if cfg.address != "local" and (host in ("localhost", "::1") or host.startswith("127.")):
        raise RayUnavailable(f"Ray workers on {cfg.address} cannot reach the Prefect API at {url}: set "
                             "PREFECT_API_URL to a server they can reach")
    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: url})


def _mark_final(task_run_ids: list[Any], state: Callable[..., Any], message: str) -> None:
    """Task runs whose workers were stopped or died never report again: record them as
    Cancelled / Crashed so none stays Running in the UI (one that never started has no run)."""
    if not task_run_ids:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for run_id in task_run_ids:
            try:
                client.set_task_run_state(run_id, state(message=message), force=True)
            except Exception:  # noqa: BLE001, S112 - not created yet on the server: nothing to mark
                continue


def ray_shard_runner(cfg: RayConfig, task: Any) -> Callable[..., Iterator[tuple[Any, dict]]]:
    """A shard runner (tasks.shards.ShardRunner; sampling or reward specs) that runs each spec
    as `task` on Ray."""

    def run(specs: Sequence[Any], on_batch: Callable[[int], None]) -> Iterator[tuple[Any, dict]]:
        check_vllm(specs, cfg)
        yield from submit_all(cfg, task, [(s, {"label": s.label, "spec": s}) for s in specs])

    return run
