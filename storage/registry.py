"""The model registry: trained checkpoints as versions with lineage and movable tags.

A model version is a folder under ``<store root>/models/sha256-<weights hash>/`` (config,
tokenizer and safetensors weights; versions from before were stored under their version name)
plus one row in the ``models`` dataset with its parents (the dataset
versions and parent model it was trained from), metrics and config. Tags such as
``production`` and ``candidate`` live in ``_dpoflow/model_tags.json`` and move atomically,
under a lock with compare-and-set; a promotion writes its record (``_dpoflow/promotions_log.json``)
before it moves the tag, so the two are one logical step.

Only safetensors weights are accepted: pickle-based files (``.bin``, ``.pt``, ``.pkl``...)
can run code when loaded, so the registry refuses them rather than trusting their origin, and
the loaders call `check_weights` so the same rule holds at load time.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpoflow.storage.store import ANY, ConflictError, DatasetStore, StoreError

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODEL_PREFIX = "models@"
WEIGHTS_FOLDER = "sha256-"  # registered folders are named by their weights' content hash
PROMOTIONS_LOG = "promotions_log.json"


class UnsafeWeightsError(StoreError):
    """A model folder holds pickle-based weights (they can run code when loaded)."""


def check_weights(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
    """Refuse to load a model folder whose weights are not safetensors, with a one-line error
    naming the file: the same rule at load time as at registration, so a `.bin` swapped into
    a registered folder never loads. `allow_pickle` (config ``allow_pickle_weights: true``)
    lifts it explicitly. A hub id (no local folder) is checked by the loader itself
    (``use_safetensors=True``)."""
    root = Path(path)
    if allow_pickle or not root.exists():
        return
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    # a training run's resumable state (checkpoints/*.pt, loaded with weights_only) is not a model's weights
    unsafe = [p for p in files if p.suffix in UNSAFE_SUFFIXES and "checkpoints" not in p.relative_to(root).parts] \
        if root.is_dir() else [p for p in files if p.suffix in UNSAFE_SUFFIXES]
    if unsafe:
        raise UnsafeWeightsError(f"refusing to load pickle-based weights {unsafe[0]}: only safetensors are "
                                 "loaded (set allow_pickle_weights: true to load them anyway)")
    if root.is_dir() and (root / "config.json").exists() and not any(p.suffix == ".safetensors" for p in files):
        raise UnsafeWeightsError(f"model folder {root} has no .safetensors weights")


def weights_digest(local_dir: str | os.PathLike[str]) -> str:
    """sha256 over the safetensors files (names and whole contents): the identity of a model
    version, so registering the same weights twice finds the first version."""
    digest = hashlib.sha256()
    for p in sorted(Path(local_dir).rglob("*.safetensors")):
        digest.update(p.relative_to(local_dir).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


class ModelRegistry:
    def __init__(self, store: DatasetStore, cache_dir: str | os.PathLike[str] | None = None):
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._pins: dict[str, str] = {}

    def with_tags(self, pins: dict[str, str]) -> ModelRegistry:
        """A read-only view in which `pins` (tag -> version) override the stored tags: a night
        that resumes after its promotion samples with the model it started from."""
        view = copy.copy(self)
        view._pins = {**self._pins, **pins}
        return view

    def _writable(self) -> None:
        if self._pins:
            raise StoreError(f"this registry view pins tags {self._pins} and is read-only")

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
        """Copy a saved checkpoint folder into the registry and record it; return its version.

        Idempotent: keyed by the weights' content hash, so a rerun (e.g. after a kill right
        after the first registration) finds the existing version instead of adding a
        duplicate; two concurrent registrations never take the same number."""
        self._writable()
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if not any(p.suffix == ".safetensors" for p in files):
            raise StoreError(f"{local_dir} has no .safetensors weights (save with safe_serialization)")
        unsafe = [p.name for p in files if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:
            raise StoreError(f"refusing pickle-based weight files {unsafe}: only safetensors are accepted")
        digest = weights_digest(local_dir)
        folder = WEIGHTS_FOLDER + digest
        target = self.store._join("models", folder)
        if self.find_by_digest(digest) is None:
            # the folder is named by content: a rerun after a kill mid-copy copies the same files
            if self.store.remote:
                self.store.fs.put(str(local_dir), target, recursive=True)
            else:
                shutil.copytree(local_dir, target, dirs_exist_ok=True)
        version = self._record(digest, target, parents, metrics, config, note)
        for t in tags:
            self.tag(version, t)
        return version

    def find_by_digest(self, digest: str) -> str | None:
        """The version registered with these weights, if any."""
        if not self.store.exists("models"):
            return None
        rows = self.store.read("models", columns=["model_version", "path"]).to_pylist()
        return _match(rows, digest)

    def _record(self, digest: str, target: str, parents: Iterable[str], metrics: dict[str, Any] | None,
                config: dict[str, Any] | None, note: str | None) -> str:
        """Append the model's row, numbered after the rows it was computed from (a concurrent
        registration makes the commit a conflict, and the number is taken again)."""
        parents = sorted(set(parents))
        for attempt in range(10):
            base = self.store.latest("models") if self.store.exists("models") else -1
            rows = self.store.read(f"models@{base}", columns=["model_version", "path"]).to_pylist() \
                if base >= 0 else []
            found = _match(rows, digest)
            if found is not None:
                return found
            version = f"m{len(rows) + 1:04d}-{digest[:8]}"
            row = {
                "model_version": [version],
                "path": [target],
                "parents": [parents],
                "metrics": [json.dumps(metrics or {}, default=float)],
                "config": [json.dumps(config or {}, default=str)],
                "created_at": [dt.datetime.now(dt.UTC)],
                "note": [note],
            }
            try:
                self.store.write("models", pa.table(row), mode="append", stage="register", expected_version=base,
                                 parents=[p for p in parents if not p.startswith(MODEL_PREFIX)])
                return version
            except ConflictError:
                if attempt == 9:
                    raise
        raise AssertionError("unreachable")

    def list(self) -> list[dict[str, Any]]:
        if not self.store.exists("models"):
            return []
        rows = sorted(self.store.read("models").to_pylist(), key=lambda r: _order(r["model_version"]))
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
        return {**self._stored_tags(), **self._pins}

    def _stored_tags(self) -> dict[str, str]:
        return self.store._read_json(self._tags_path(), {})

    def tag(self, version: str, tag: str, *, expected: str | None | object = ANY) -> None:
        """Point `tag` at a version; `expected` (compare-and-set): the version the caller saw
        the tag at (None: unset), else ConflictError and the tag stays put."""
        self._writable()
        version = self.version_of(version)

        def move(tags: dict[str, str]) -> dict[str, str]:
            if expected is not ANY and tags.get(tag) != expected:
                raise ConflictError(f"conflict: model tag {tag!r} was expected at {expected}, but is at "
                                    f"{tags.get(tag)}; it was left there")
            return {**tags, tag: version}

        self.store.update_json(self._tags_path(), move)

    # --- promotions: the record and the tag move as one logical step -----------------------

    def promotions_log(self) -> list[dict[str, Any]]:
        return self.store._read_json(self.store._meta_path(PROMOTIONS_LOG), [])

    def promote(self, version: str, tag: str, *, expected: str | None, record: dict[str, Any]) -> None:
        """Move `tag` from `expected` to `version`, recording why first: the record is written
        before the tag moves, so after a kill between the two a rerun finds the record and
        finishes the move (`recorded_promotion`); after a kill past both it finds the move
        done. Nobody ever sees a moved tag without its record."""
        self._writable()
        version = self.version_of(version)
        entry = {**record, "model_version": version, "tag": tag, "previous": expected,
                 "at": dt.datetime.now(dt.UTC).isoformat()}
        with self.store._locked(self._tags_path()):
            current = self._stored_tags().get(tag)
            if current != expected and current != version:
                raise ConflictError(f"conflict: {tag!r} was expected at {expected}, but another writer moved it "
                                    f"to {current}; not promoting {version}")
            log = self.promotions_log()
            if not any(e.get("model_version") == version and e.get("tag") == tag and e.get("previous") == expected
                       for e in log):
                self.store._write_json(self.store._meta_path(PROMOTIONS_LOG), [*log, entry])
            self.store._write_json(self._tags_path(), {**self._stored_tags(), tag: version})

    def recorded_promotion(self, version: str, tag: str) -> dict[str, Any] | None:
        """The newest record of `version` being promoted to `tag`, if any."""
        for e in reversed(self.promotions_log()):
            if e.get("model_version") == version and e.get("tag") == tag:
                return e
        return None

    def version_of(self, ref: str) -> str:
        """``models@production`` / ``models@latest`` / ``models@m0003-...`` / ``m0003-...`` -> version."""
        sel = ref[len(MODEL_PREFIX):] if ref.startswith(MODEL_PREFIX) else ref
        rows = sorted(self.store.read("models", columns=["model_version"]).column(0).to_pylist(), key=_order) \
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

    def _path_of(self, version: str) -> str:
        """Where a version's files are: the folder its row names (by content hash; older
        versions were stored under their version name)."""
        if self.store.exists("models"):
            rows = self.store.read("models", columns=["model_version", "path"]).to_pylist()
            for r in rows:
                if r["model_version"] == version and r["path"]:
                    return str(r["path"])
        return self._model_uri(version)

    def local_path(self, ref: str) -> Path:
        """A local folder holding the model (downloaded to the cache when the store is remote)."""
        version = self.version_of(ref)
        uri = self._path_of(version)
        if not self.store.remote:
            return Path(uri)
        if self.cache_dir is None:
            raise StoreError("a remote store needs a local cache_dir to load models from")
        local = self.cache_dir / version
        if not (local / ".complete").exists():
            self.store.fs.get(uri, str(local), recursive=True)
            (local / ".complete").touch()
        return local


def _order(version: str) -> tuple[int, str]:
    """Registration order (row order is not part of a version): m0002-... before m0010-..."""
    number = version[1:].split("-", 1)[0]
    return (int(number) if number.isdigit() else -1, version)


def _match(rows: list[dict[str, Any]], digest: str) -> str | None:
    for r in rows:
        if posixpath.basename(str(r["path"]).rstrip("/")) == WEIGHTS_FOLDER + digest:
            return r["model_version"]
    return None


def is_registry_ref(model: str) -> bool:
    return model.startswith(MODEL_PREFIX)
