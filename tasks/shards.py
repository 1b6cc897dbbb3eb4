"""Sampling shards that travel: a small picklable spec and what a worker needs to open it
(its store, its prompts, its model). The entry point that runs one, `sampling.run_shard_spec`,
lives with the stage, which imports this module and never the other way round.

Why a spec and not a closure: a shard may run in this process, in a Prefect task, or on a
Ray worker on another machine. Everything a worker needs is named, not captured: the store
root (a folder on shared disk or ``s3://...``), the pinned prompts version and the shard's
prompt ids, the sampler config, its seed (inside the config) and the resolved model. The
worker opens the store itself, reads only its prompts, generates, and commits its own
dataset (``shard_sample_<key>``). Seeds are per candidate (tasks.generation), so where a
shard ran does not change its text.

Exactly once: a shard's dataset is committed with ``expected_version=-1`` (it must not
exist yet), so a retried or duplicated shard that finds its output already committed
reuses it instead of writing it twice. Secrets never travel: S3 keys come from the
worker's own environment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from dpoflow.storage.store import DatasetStore
    from dpoflow.tasks.sampling import ModelSpec

SECRET_OPTIONS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the sample stage, as plain data (pickles in well under a kilobyte per prompt)."""

    label: str  # sampler name + chunk number, the Prefect task run's name
    name: str  # dataset its finished output is committed as
    store_root: str  # folder (shared disk) or s3:// URI
    store_options: tuple[tuple[str, str], ...]  # non-secret store settings (endpoint, region)
    prompts_ref: str  # pinned name@version
    prompt_ids: tuple[str, ...]
    rows: tuple[int, ...]  # the prompts' positions in the driver's checked table (output order)
    sampler: int  # index into config["samplers"]
    config: dict[str, Any]  # the sample section as JSON
    model: ModelSpec
    device: str  # resolved on the driver (cpu | cuda); part of the shard key
    model_cache: str | None = None  # where a worker downloads registry models when the store is remote
    flow_run_id: str | None = None
    reuse: bool = True  # False (a forced run): recompute a shard that is already committed

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)


def travelling_options(options: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in options.items() if k not in SECRET_OPTIONS))


def open_store(spec: ShardSpec) -> DatasetStore:
    """The worker's own handle on the store: its environment supplies any keys."""
    from dpoflow.storage.store import DatasetStore, storage_options_from_env

    return DatasetStore(spec.store_root, {**storage_options_from_env(spec.store_root), **dict(spec.store_options)})


def shard_prompts(store: DatasetStore, spec: ShardSpec) -> pa.Table:
    """The shard's prompts (prompt_id, prompt, messages?) in spec order with `_row`, read with a
    filter on the ids so a worker never loads the whole prompts dataset. A duplicated id
    keeps its first row, as the driver's check did."""
    names = store.dataset(spec.prompts_ref).schema.names
    cols = [c for c in ("prompt_id", "prompt", "messages") if c in names]
    found = store.read(spec.prompts_ref, columns=cols, filter=pc.field("prompt_id").isin(list(spec.prompt_ids)))
    pos = pc.index_in(pa.array(spec.prompt_ids, pa.string()), found.column("prompt_id"))  # first match per id
    if pos.null_count:
        missing = pc.filter(pa.array(spec.prompt_ids, pa.string()), pc.is_null(pos)).to_pylist()[:3]
        raise LookupError(f"shard {spec.label}: prompt ids {missing} not found in {spec.prompts_ref}")
    return found.take(pos).append_column("_row", pa.array(np.asarray(spec.rows, dtype=np.int64)))


def resolved_model(spec: ShardSpec, store: DatasetStore) -> ModelSpec:
    """The model folder on this machine: the driver's path when it is visible here (shared
    disk), else the pinned registry version downloaded to the worker's cache."""
    from dataclasses import replace

    from dpoflow.storage.registry import ModelRegistry, is_registry_ref

    if Path(spec.model.load).is_dir() or not is_registry_ref(spec.model.ref):
        return spec.model
    cache = spec.model_cache or os.path.join(os.path.expanduser("~"), ".cache", "dpoflow", "models")
    path = ModelRegistry(store, cache_dir=cache).local_path(spec.model.version)  # pinned, not the moving tag
    return replace(spec.model, load=str(path))


def worker_identity() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def commit_shard(store: DatasetStore, name: str, table: pa.Table, *, reuse: bool, extra: dict[str, Any],
                 **write_kw: Any) -> dict[str, Any]:
    """Commit a finished shard exactly once (a forced run, `reuse` False, on top of the old one):
    a duplicate run that lost the race to commit reuses the winner's version instead."""
    from dpoflow.storage.store import ConflictError

    base = -1 if reuse else (store.latest(name) if store.exists(name) else -1)
    try:
        info = store.write(name, table, extra=extra, expected_version=base, **write_kw)
    except ConflictError:
        return reused_shard(store, name)
    return {"ref": info.ref, "reused": False, **extra}


def reused_shard(store: DatasetStore, name: str) -> dict[str, Any]:
    """What a run of an already committed shard returns: its recorded counters, marked reused."""
    info = store.info(name)
    return {**info.extra, "ref": info.ref, "reused": True, **worker_identity()}


# --- runners -----------------------------------------------------------------------------------

class ShardRunner(Protocol):
    """Runs shard specs somewhere and yields ``(spec, info)`` as each one finishes.

    `on_batch(prompts)` is progress inside a shard; only runners in this process call it."""

    def __call__(self, specs: Sequence[ShardSpec], on_batch: Callable[[int], None]
                 ) -> Iterable[tuple[ShardSpec, dict[str, Any]]]: ...
