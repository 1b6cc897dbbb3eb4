"""The stage contract: what the shell hands a stage and what a stage hands back.

A stage is a plain function ``fn(ctx: StageContext) -> StageResult`` over Arrow tables. It
reads its pinned inputs through the context, writes nothing itself, and never imports the
Prefect shell (``flows/``): the shell resolves versions, computes the content key, calls the
stage, writes its outputs with lineage and reports. ``Section`` is the base of every config
section, so the stages' own config models live beside their logic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from dpoflow.storage.registry import ModelRegistry
    from dpoflow.storage.store import DatasetStore


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are documented."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class StageResult:
    """What a stage function returns.

    outputs: dataset name -> table (or RecordBatchReader, streamed to the store).
    quarantine: rejected input rows (QUARANTINE schema), appended to the `quarantine` dataset.
    report: counts for the run report, e.g. {"rows_in": 10, "dropped": {"empty": 2}}.
    metadata: dataset name -> extra metadata stored in that output version's commit.
    """

    outputs: dict[str, Any]
    quarantine: pa.Table | None = None
    report: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StageContext:
    """What one stage run may use: its pinned inputs, its config, the store and registry to
    read (older versions, models), and local folders for scratch work and human artifacts.

    inputs: role -> pinned ``name@version`` (optional roles that are absent are missing).
    options: settings from outside the stage's own section that the shell passes on
    (e.g. the import door's ``on_bad_rows``).
    """

    stage: str
    inputs: dict[str, str]
    config: Any
    logger: logging.Logger
    store: DatasetStore
    registry: ModelRegistry
    scratch_root: Path
    artifacts_root: Path
    flow_run_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[float], None] | None = None

    def read(self, role: str, columns: list[str] | None = None) -> pa.Table:
        return self.store.read(self.inputs[role], columns=columns)

    def has(self, role: str) -> bool:
        return self.inputs.get(role) is not None

    @property
    def artifacts(self) -> Path:
        p = self.artifacts_root / self.stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def scratch(self) -> Path:
        p = self.scratch_root / self.stage
        p.mkdir(parents=True, exist_ok=True)
        return p


StageFn = Callable[[StageContext], StageResult]
