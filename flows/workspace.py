"""A workspace: the folder a user points `--workspace` at.

It holds the pipeline config (``dpoflow.yaml``), the dataset store (``store/`` unless the
config names another root such as ``s3://bucket/prefix``), and human-facing outputs
(``artifacts/``: plots, reports, data cards). Opening one never starts Prefect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoflow.storage.registry import ModelRegistry
from dpoflow.storage.store import DatasetStore

DEFAULT_WORKSPACE = "./dpoflow-workspace"
CONFIG_NAME = "dpoflow.yaml"


@dataclass
class Workspace:
    root: Path
    config: Any  # flows.config.PipelineConfig
    store: DatasetStore
    registry: ModelRegistry

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, overrides: list[str] | dict | None = None,
             config_path: str | os.PathLike[str] | None = None) -> Workspace:
        from dpoflow.flows.config import load_config

        root = Path(root or os.environ.get("DPOFLOW_WORKSPACE") or DEFAULT_WORKSPACE).resolve()
        root.mkdir(parents=True, exist_ok=True)
        path = Path(config_path) if config_path else root / CONFIG_NAME
        config = load_config(path if path.exists() else None, overrides)
        store_root = config.storage.root or str(root / "store")
        store = DatasetStore(store_root, config.storage.options() or None)
        registry = ModelRegistry(store, cache_dir=root / "cache" / "models")
        return cls(root=root, config=config, store=store, registry=registry)

    @property
    def artifacts(self) -> Path:
        p = self.root / "artifacts"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def scratch(self) -> Path:
        """Local working space (checkpoints in progress, shard outputs, caches)."""
        p = self.root / "work"
        p.mkdir(parents=True, exist_ok=True)
        return p
