"""GPU slots: a global concurrency limit (`gpu`, one slot per GPU) held around GPU work, so a
manual `train` run and the nightly's `sample` never share one GPU, whichever worker or serve
process runs them. Only stages whose resolved device is CUDA take a slot.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Name of the global concurrency limit GPU stages take a slot of; "" disables the guard.
GPU_LIMIT_ENV = "DPOFLOW_GPU_LIMIT"
GPU_SLOTS_ENV = "DPOFLOW_GPU_SLOTS"  # slots to create the limit with if missing (= GPUs per host)
DEFAULT_GPU_LIMIT = "gpu"


def gpu_limit_name() -> str | None:
    name = os.environ.get(GPU_LIMIT_ENV, DEFAULT_GPU_LIMIT).strip()
    return name or None


_ENSURED: set[str] = set()


def ensure_gpu_limit(name: str | None = None, slots: int | None = None) -> str | None:
    """Create the global concurrency limit if it does not exist yet (an existing one is kept,
    so an operator's ``prefect gcl create gpu --limit 4`` on a 4-GPU host wins)."""
    name = name or gpu_limit_name()
    if not name or name in _ENSURED:
        return name
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    slots = slots or int(os.environ.get(GPU_SLOTS_ENV, "1"))
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another process won the race
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    _ENSURED.add(name)
    return name


@contextlib.contextmanager
def gpu_slot(occupy: int = 1, timeout_s: float | None = None, *, device: str = "cuda") -> Iterator[None]:
    """Hold ``occupy`` slots of the GPU concurrency limit for the duration of the block.

    Wrap only the GPU work of a stage flow (the model load + generate / train loop), never
    the nightly flow as a whole: its GPU subflows take their own slots, and a slot held by
    the parent would deadlock them. Outside a flow run (plain Python, the CLI's local fast
    path) there is no server to ask and the block just runs. ``device`` is the one the stage
    resolved (`dpoflow.tasks.generation.pick_device`): a stage running on CPU has no GPU to guard, so
    its block just runs too. ``occupy`` = GPUs the stage uses (a
    torchrun launch over 4 GPUs takes 4 of a 4-slot limit). ``timeout_s`` bounds the wait
    for a free GPU (``TimeoutError`` after it); ``None`` waits as long as it takes.
    """
    from dpoflow.flows.reporting import flow_run_id

    name = gpu_limit_name()
    if not name or not flow_run_id() or device == "cpu":
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_gpu_limit(name)
    with concurrency(name, occupy=occupy, timeout_seconds=timeout_s, strict=True):
        yield


