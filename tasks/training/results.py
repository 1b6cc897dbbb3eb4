"""What a training run hands back, and its errors: plain Python, no torch, so the launcher (which
never imports torch) and the trainer share them without importing each other.

Public API (stable):

    TrainResult      output_dir, run_dir, metrics (per-step dicts), summary, tokenize_stats.
    TrainingError    the run cannot go on (non-finite steps, incompatible checkpoint, bad data, a
                     failed or timed-out training process); the message is one line first.
    TrainingCancelled  `stop` was set; a checkpoint was written and a rerun resumes from it.
    Phases           wall-clock seconds per start-up / training phase, for the train report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, incompatible checkpoint, bad data)."""


class TrainingCancelled(RuntimeError):
    """`stop` was set; a checkpoint was written and a rerun resumes from it."""


@dataclass
class TrainResult:
    output_dir: Path
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    tokenize_stats: dict = field(default_factory=dict)


class Phases:
    """Seconds spent in each named phase, in order: ``with phases("tokenize"): ...``.

    Why: the fixed start-up of a run (imports, model load, reference log-probs) used to be
    invisible next to the loop's tokens/s; the train report lists it phase by phase.
    """

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __call__(self, name: str) -> _Timed:
        return _Timed(self, name)


class _Timed:
    def __init__(self, phases: Phases, name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.phases.add(self.name, time.perf_counter() - self.t0)
