"""GPU slots: a global concurrency limit (`gpu`, one slot per GPU) held around GPU work, so a
manual `train` run and the nightly's `sample` never share one GPU, whichever worker or serve
process runs them. Only stages whose resolved device is CUDA take a slot, and a slot is a
lease that a dead holder cannot keep (see `gpu_slot`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

log = logging.getLogger("dpoflow")

# Name of the global concurrency limit GPU stages take a slot of; "" disables the guard.
GPU_LIMIT_ENV = "DPOFLOW_GPU_LIMIT"
GPU_SLOTS_ENV = "DPOFLOW_GPU_SLOTS"  # slots to create the limit with if missing (= GPUs per host)
DEFAULT_GPU_LIMIT = "gpu"
GPU_LEASE_ENV = "DPOFLOW_GPU_LEASE_S"  # seconds a lease lasts without renewal
DEFAULT_LEASE_S = 60.0


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


def lease_seconds() -> float:
    """How long a slot outlives a holder that stopped renewing it (a killed process)."""
    return float(os.environ.get(GPU_LEASE_ENV, DEFAULT_LEASE_S))


def _leases_dir() -> Path:
    """Where this host records the leases its processes hold (beside the Prefect home)."""
    from prefect.settings import get_current_settings

    d = Path(get_current_settings().home) / "dpoflow-gpu-leases"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def release_dead_holders(client: Any) -> list[str]:
    """Release the leases of holders on this host whose process is gone.

    A real server's repossessor frees an expired lease by itself (`lease_seconds()` after
    the last renewal); Prefect's temporary server runs no such service, so there a killed
    run's slot would stay taken forever. Every acquirer therefore first releases the leases
    that processes of this host recorded and no longer renew. Returns the released ids."""
    released = []
    for rec in sorted(_leases_dir().glob("*.json")):
        try:
            info = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if info.get("host") != socket.gethostname() or _alive(int(info.get("pid", 0))):
            continue
        with contextlib.suppress(Exception):  # already expired and revoked: nothing to release
            client.release_concurrency_slots_with_lease(UUID(info["lease_id"]))
        rec.unlink(missing_ok=True)
        released.append(info["lease_id"])
    return released


def _acquire(client: Any, name: str, occupy: int, timeout_s: float | None) -> UUID:
    """A lease on `occupy` slots of `name`; waits while the limit is full (423 from the API)."""
    from prefect.exceptions import PrefectHTTPStatusError

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        release_dead_holders(client)
        try:
            resp = client.increment_concurrency_slots_with_lease(
                names=[name], slots=occupy, mode="concurrency", lease_duration=lease_seconds())
            return UUID(resp.json()["lease_id"])
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            wait = float(exc.response.headers.get("Retry-After", 1.0))
        if deadline is not None and time.monotonic() + wait > deadline:
            raise TimeoutError(f"no free slot of the {name!r} concurrency limit within {timeout_s:.0f} s")
        time.sleep(min(max(wait, 0.2), 5.0))


@contextlib.contextmanager
def _renewed(client_factory: Any, lease_id: UUID) -> Iterator[None]:
    """Renew the lease every third of its duration while the block runs."""
    stop = threading.Event()

    def renew() -> None:
        with client_factory() as client:
            while not stop.wait(lease_seconds() / 3):
                try:
                    client.renew_concurrency_lease(lease_id, lease_seconds())
                except Exception as exc:  # noqa: BLE001 - the work goes on; the lease may lapse
                    log.warning("dpoflow: could not renew GPU lease %s: %s", lease_id, exc)

    t = threading.Thread(target=renew, name="dpoflow-gpu-lease", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


@contextlib.contextmanager
def gpu_slot(occupy: int = 1, timeout_s: float | None = None, *, device: str) -> Iterator[None]:
    """Hold ``occupy`` slots of the GPU concurrency limit for the duration of the block.

    Wrap only the GPU work of a stage flow (the model load + generate / train loop), never
    the nightly flow as a whole: its GPU subflows take their own slots, and a slot held by
    the parent would deadlock them. Outside a flow run (plain Python, the CLI's local fast
    path) there is no server to ask and the block just runs. ``device`` is the one the stage
    resolved (`dpoflow.tasks.generation.pick_device`): only a CUDA device takes a slot.
    ``occupy`` = GPUs the stage uses (a torchrun launch over 4 GPUs takes 4 of a 4-slot
    limit). ``timeout_s`` bounds the wait for a free GPU (``TimeoutError`` after it);
    ``None`` waits as long as it takes.

    The slot is a lease renewed while this process lives: a killed holder's slot is freed by
    the next acquirer on the same host at once, and by the server after `lease_seconds()`.
    """
    from dpoflow.flows.reporting import flow_run_id

    name = gpu_limit_name()
    if not name or not flow_run_id() or not device.startswith("cuda"):
        yield
        return
    from prefect.client.orchestration import get_client

    ensure_gpu_limit(name)
    with get_client(sync_client=True) as client:
        lease_id = _acquire(client, name, occupy, timeout_s)
        record = _leases_dir() / f"{lease_id}.json"
        record.write_text(json.dumps({"lease_id": str(lease_id), "pid": os.getpid(),
                                      "host": socket.gethostname(), "limit": name}))
        try:
            with _renewed(lambda: get_client(sync_client=True), lease_id):
                yield
        finally:
            with contextlib.suppress(Exception):
                client.release_concurrency_slots_with_lease(lease_id)
            record.unlink(missing_ok=True)
