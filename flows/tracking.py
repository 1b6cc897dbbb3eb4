"""Optional experiment tracking (`train.report_to`): the trainer's metrics rows, as TRL users
know them from `report_to`, streamed to TensorBoard or MLflow while training runs.

The launcher process reads the rows the trainer appends to its metrics.jsonl (every few
seconds, see `reporting.training_progress`) and hands the new ones to a `Tracker`; the
trainer itself stays free of tracking clients. Off by default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "total_steps") and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class Tracker:
    """Logs metrics rows (`step` + numbers) to one tracking backend, each row once."""

    def __init__(self, kind: str, log_dir: str | Path, run_name: str) -> None:
        if kind not in TRACKERS:
            raise ValueError(f"train.report_to={kind!r}: use one of none, {', '.join(TRACKERS)}")
        self.kind, self.run_name, self.logged = kind, run_name, 0
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.log_dir = Path(log_dir) / run_name
                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            else:
                import mlflow

                self._run = mlflow.start_run(run_name=run_name)
                self._mlflow = mlflow
        except ImportError as exc:
            raise ValueError(f"train.report_to={kind} needs the {kind} package (pip install {kind}): {exc}") from None

    def log(self, rows: list[dict[str, Any]]) -> None:
        """Log the rows past those already logged (the caller passes the whole history)."""
        for row in rows[self.logged:]:
            step = int(row.get("step") or 0)
            values = _scalars(row)
            if self.kind == "tensorboard":
                for k, v in values.items():
                    self._writer.add_scalar(f"train/{k}", v, step)
            else:
                self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
        self.logged = max(self.logged, len(rows))
        if self.kind == "tensorboard":
            self._writer.flush()

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._writer.close()
        else:
            self._mlflow.end_run()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics.jsonl (a half-written last line is left for next time)."""
    import json

    rows = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step"):
            rows.append(row)
    return rows
