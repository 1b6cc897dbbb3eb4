"""The stage registry: one record per pipeline stage, the single source of the stage list.

The nightly order, the runner without Prefect (`nightly_direct`, `dpoflow run`), the work
pools and GPU guard of the deployments, the config sections and the inputs `dpoflow run
--input` accepts are all read from here. Entries name their code by import string, so listing
stages or loading the config never imports torch or Prefect.

Adding a stage: its core function in `tasks/`, its schema in `storage/schemas.py`, a flow
module with `run(ws, ...)` and the Prefect flow, and one `Stage` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Input:
    role: str  # the parameter name of the stage's flow and runner
    dataset: str  # the dataset it reads
    optional: bool = False


@dataclass(frozen=True)
class Stage:
    """One stage: where its logic, config, runner and flow live, what it reads and writes.

    core: the stage function (or its factory) in `tasks/`: its module's imports make up the
        stage's code version.
    config: the config model of the section named like the stage.
    run: the stage without Prefect, ``run(ws, *, force=False, **inputs)`` -> StageRun (or an
        object with ``to_dict()`` for the composite `train`).
    flow: the Prefect flow with the same inputs as parameters.
    pool: the work pool its deployment runs on; `gpu` stages take a GPU slot when their
        resolved device is CUDA.
    options: keyword parameters of the runner and flow beyond the inputs (set by the nightly).
    """

    name: str
    core: str
    config: str
    run: str
    flow: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    pool: Literal["cpu", "gpu"] = "cpu"
    options: tuple[str, ...] = ()

    @property
    def core_module(self) -> str:
        return self.core.partition(":")[0]

    def load(self, what: Literal["core", "config", "run", "flow"]) -> Any:
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)

    def input_roles(self) -> list[str]:
        return [i.role for i in self.inputs]


_T, _F = "dpoflow.tasks", "dpoflow.flows"

# In nightly order.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sample", f"{_T}.sampling:make_sample_stage", f"{_T}.sampling:SampleConfig",
          f"{_F}.sample:sample", f"{_F}.sample:sample_flow",
          (Input("prompts", "prompts"), Input("served", "served", True)), ("candidates",), pool="gpu",
          options=("production",)),
    Stage("score", f"{_T}.scoring:score", f"{_T}.scoring:ScoreConfig",
          f"{_F}.score:run_score", f"{_F}.score:score_flow",
          (Input("candidates", "candidates"), Input("prompts", "prompts", True)), ("scores",)),
    Stage("ingest", f"{_T}.feedback:ingest", f"{_T}.feedback:IngestConfig",
          f"{_F}.ingest:run_ingest", f"{_F}.ingest:ingest_flow",
          (Input("candidates", "candidates", True),), ("feedback_events", "signals")),
    Stage("pairs", f"{_T}.pairs:pairs", f"{_T}.pairs:PairsConfig",
          f"{_F}.pairs:run_pairs", f"{_F}.pairs:pairs_flow",
          (Input("candidates", "candidates"), Input("prompts", "prompts", True), Input("scores", "scores", True),
           Input("signals", "signals", True), Input("judgements", "judgements", True),
           Input("pairs_import", "pairs", True)), ("pairs",)),
    Stage("balance", f"{_T}.balance:balance", f"{_T}.balance:BalanceConfig",
          f"{_F}.balance:run_balance", f"{_F}.balance:balance_flow",
          (Input("pairs", "pairs"),), ("dpo_train", "dpo_eval")),
    Stage("train", f"{_T}.training.stage:make_train_stage", f"{_T}.training.config:TrainConfig",
          f"{_F}.train_steps:train_pipeline", f"{_F}.train:train_flow",
          (Input("dpo_train", "dpo_train"), Input("dpo_eval", "dpo_eval", True)),
          ("ref_logps", "train_runs", "model_evals", "promotions"), pool="gpu", options=("promote", "night")),
)}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def stage_flow(name: str) -> Any:
    return stage(name).load("flow")


def config_sections() -> dict[str, type]:
    """Config model of every stage (importing only the config modules, not torch)."""
    return {name: s.load("config") for name, s in STAGES.items()}


def run_direct(ws: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a stage without Prefect: the same functions the flows call; returns its outputs."""
    s = stage(name)
    kw = {role: params.get(role) or None for role in s.input_roles() if role in params}
    extra = {k: params[k] for k in s.options if k in params}  # e.g. train: the nightly promotes
    res = s.load("run")(ws, **kw, force=params.get("force", False), **extra)
    return res.to_dict() if hasattr(res, "to_dict") else res.outputs
