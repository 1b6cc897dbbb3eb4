"""The list of pipeline stages: where each stage's config section and Prefect flow live.

Entries are import strings so that listing stages or loading the config never imports
torch or Prefect. Each stage module owns its config model and its flow.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel

# stage name -> (config model "module:Class", flow "module:function"), in nightly order.
STAGES: dict[str, tuple[str, str]] = {
    "sample": ("dpoflow.tasks.sampling:SampleConfig", "dpoflow.flows.sample:sample_flow"),
    "score": ("dpoflow.tasks.scoring:ScoreConfig", "dpoflow.flows.score:score_flow"),
    "ingest": ("dpoflow.tasks.feedback:IngestConfig", "dpoflow.flows.ingest:ingest_flow"),
    "pairs": ("dpoflow.tasks.pairs:PairsConfig", "dpoflow.flows.pairs:pairs_flow"),
    "balance": ("dpoflow.tasks.balance:BalanceConfig", "dpoflow.flows.balance:balance_flow"),
    "train": ("dpoflow.tasks.training.config:TrainConfig", "dpoflow.flows.train:train_flow"),
}


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_sections() -> dict[str, tuple[type[BaseModel], Any]]:
    """Config model of every stage (importing only the config modules, not torch)."""
    return {name: (_load(cfg), None) for name, (cfg, _) in STAGES.items()}


def stage_flow(name: str):
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return _load(STAGES[name][1])
