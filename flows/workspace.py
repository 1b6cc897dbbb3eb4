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


class WorkspaceError(ValueError):
    """The workspace folder is missing, is a file or cannot be created."""


@dataclass
class Workspace:
    root: Path
    config: Any  # flows.config.PipelineConfig
    store: DatasetStore
    registry: ModelRegistry

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, overrides: list[str] | dict | None = None,
             config_path: str | os.PathLike[str] | None = None, *, create: bool = True) -> Workspace:
        """Open (and with `create`, make) the workspace folder. Read-only commands pass
        ``create=False``: a mistyped path is then an error, not a new empty workspace."""
        from dpoflow.flows.config import load_config

        root = Path(root or os.environ.get("DPOFLOW_WORKSPACE") or DEFAULT_WORKSPACE).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"workspace {root} is a file, not a folder")
        if not root.is_dir():
            if not create:
                raise WorkspaceError(f"no workspace at {root} (create one with `dpoflow demo` or `dpoflow import`, "
                                     "or pass --workspace)")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WorkspaceError(f"cannot create workspace {root}: {exc.strerror or exc}") from None
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
