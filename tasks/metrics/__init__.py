"""Metrics: CJK-aware sentence BLEU / ROUGE (a vectorised fast path plus `evaluate` modules).

``evaluate.load(metric_path("bleu"))`` works with no network: the module scripts live in
this package (``tasks/metrics/bleu/bleu.py``, ``tasks/metrics/rouge/rouge.py``) and compute
with :mod:`dpoflow.tasks.metrics.fast`, so the module, the stage and the CLI give the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOCAL_MODULES = ("bleu", "rouge")


def metric_path(name: str) -> str:
    """Folder of a metric module shipped with dpoflow ("bleu" or "rouge")."""
    if name not in LOCAL_MODULES:
        raise KeyError(f"no local metric module {name!r}; local: {', '.join(LOCAL_MODULES)}")
    return str(HERE / name)


def load_metric(name_or_path: str, **kwargs: Any):
    """`evaluate.load` that prefers dpoflow's own modules and local paths over the Hub.

    "bleu" / "rouge" load the shipped modules (offline); an existing path loads that script
    or folder; anything else is passed to ``evaluate.load`` (Hub, needs network or cache).
    """
    import evaluate

    if name_or_path in LOCAL_MODULES:
        return evaluate.load(metric_path(name_or_path), **kwargs)
    if os.path.exists(name_or_path):
        return evaluate.load(str(Path(name_or_path).resolve()), **kwargs)
    return evaluate.load(name_or_path, **kwargs)
