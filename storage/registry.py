"""The model registry: trained checkpoints as versions with lineage and movable tags.

A model version is a folder under ``<store root>/models/<version>/`` (config, tokenizer and
safetensors weights) plus one row in the ``models`` dataset with its parents (the dataset
versions and parent model it was trained from), metrics and config. Tags such as
``production`` and ``candidate`` live in ``_dpoflow/model_tags.json`` and move atomically.

Only safetensors weights are accepted: pickle-based files (``.bin``, ``.pt``, ``.pkl``...)
can run code when loaded, so the registry refuses them rather than trusting their origin.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpoflow.storage.store import DatasetStore, StoreError

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODEL_PREFIX = "models@"


class ModelRegistry:
    def __init__(self, store: DatasetStore, cache_dir: str | os.PathLike[str] | None = None):
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _tags_path(self) -> str:
        return self.store._meta_path("model_tags.json")

    def _model_uri(self, version: str) -> str:
        return self.store._join("models", version)

    def register(
        self,
        local_dir: str | os.PathLike[str],
        *,
        parents: Iterable[str] = (),
        metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        note: str | None = None,
        tags: Iterable[str] = (),
    ) -> str:
        """Copy a saved checkpoint folder into the registry and record it; return its version."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if not any(p.suffix == ".safetensors" for p in files):
            raise StoreError(f"{local_dir} has no .safetensors weights (save with safe_serialization)")
        unsafe = [p.name for p in files if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:
            raise StoreError(f"refusing pickle-based weight files {unsafe}: only safetensors are accepted")
        digest = hashlib.sha256()
        for p in files:
            if p.suffix == ".safetensors":
                digest.update(p.name.encode())
                digest.update(str(p.stat().st_size).encode())
                with open(p, "rb") as f:
                    digest.update(f.read(1 << 20))
        n = len(self.list())
        version = f"m{n + 1:04d}-{digest.hexdigest()[:8]}"
        target = self._model_uri(version)
        if self.store.remote:
            self.store.fs.put(str(local_dir), target, recursive=True)
        else:
            shutil.copytree(local_dir, target, dirs_exist_ok=True)
        row = {
            "model_version": [version],
            "path": [target],
            "parents": [sorted(set(parents))],
            "metrics": [json.dumps(metrics or {}, default=float)],
            "config": [json.dumps(config or {}, default=str)],
            "created_at": [dt.datetime.now(dt.UTC)],
            "note": [note],
        }
        self.store.write("models", pa.table(row), mode="append", stage="register",
                         parents=[p for p in parents if not p.startswith(MODEL_PREFIX)])
        for t in tags:
            self.tag(version, t)
        return version

    def list(self) -> list[dict[str, Any]]:
        if not self.store.exists("models"):
            return []
        rows = self.store.read("models").to_pylist()
        tags = self.tags()
        for r in rows:
            r["tags"] = sorted(t for t, v in tags.items() if v == r["model_version"])
            r["metrics"] = json.loads(r["metrics"] or "{}")
            r["config"] = json.loads(r["config"] or "{}")
        return rows

    def get(self, ref: str) -> dict[str, Any]:
        version = self.version_of(ref)
        for r in self.list():
            if r["model_version"] == version:
                return r
        raise StoreError(f"model {version!r} is not registered")

    def tags(self) -> dict[str, str]:
        return self.store._read_json(self._tags_path(), {})

    def tag(self, version: str, tag: str) -> None:
        version = self.version_of(version)
        tags = self.tags()
        tags[tag] = version
        self.store._write_json(self._tags_path(), tags)

    def version_of(self, ref: str) -> str:
        """``models@production`` / ``models@latest`` / ``models@m0003-...`` / ``m0003-...`` -> version."""
        sel = ref[len(MODEL_PREFIX):] if ref.startswith(MODEL_PREFIX) else ref
        rows = self.store.read("models", columns=["model_version"]).column(0).to_pylist() \
            if self.store.exists("models") else []
        if sel == "latest":
            if not rows:
                raise StoreError("no model is registered yet")
            return rows[-1]
        if sel in rows:
            return sel
        tags = self.tags()
        if sel in tags:
            return tags[sel]
        raise StoreError(f"no model version or tag {sel!r} (tags: {sorted(tags) or 'none'})")

    def local_path(self, ref: str) -> Path:
        """A local folder holding the model (downloaded to the cache when the store is remote)."""
        version = self.version_of(ref)
        uri = self._model_uri(version)
        if not self.store.remote:
            return Path(uri)
        if self.cache_dir is None:
            raise StoreError("a remote store needs a local cache_dir to load models from")
        local = self.cache_dir / version
        if not (local / ".complete").exists():
            self.store.fs.get(uri, str(local), recursive=True)
            (local / ".complete").touch()
        return local


def is_registry_ref(model: str) -> bool:
    return model.startswith(MODEL_PREFIX)
