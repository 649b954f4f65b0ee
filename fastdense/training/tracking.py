"""What a run records: metrics.jsonl (one JSON object per event, rank 0) and, with
``run.tensorboard``, the same numbers as TensorBoard scalars.

The one place for JSON number handling: JSON has no NaN / inf, so a non-finite float is
written as ``null`` (:func:`json_float`, :func:`json_value`) and read back as NaN
(:func:`from_json_float`). Checkpoint state and summary.json use the same helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "MetricsWriter", "from_json_float", "json_float", "json_value", "progress_bar"]

METRICS_FILE = "metrics.jsonl"


def json_float(v: float | None) -> float | None:
    """``v`` as a JSON number: None (null) for None, NaN and ±inf."""
    return None if v is None or not math.isfinite(v) else float(v)


def from_json_float(v: float | None) -> float:
    """The inverse of :func:`json_float`: null → NaN."""
    return float("nan") if v is None else float(v)


def json_value(v: Any) -> Any:
    """``v`` with every float inside (dicts, lists, tuples) made JSON-safe by :func:`json_float`."""
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, dict):
        return {k: json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    return v


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl``; with ``tensorboard`` (and the package
    installed) also writes ``train/<key>`` scalars of "train" records and ``reward/<tag>`` of
    "round" / "eval" records, at the record's step."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, console=None):
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if console is not None:
                    console.print("run.tensorboard: tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: json_value(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is None:
            return
        if record.get("event") == "train":
            for k, v in clean.items():
                if isinstance(v, float) and k != "seconds":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        elif record.get("event") in ("round", "eval"):
            tag = record.get("tag", "round")
            value = record.get("reward_mean", record.get("reward"))
            if isinstance(value, float):
                self.tb.add_scalar(f"reward/{tag}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def progress_bar(console, enabled: bool):
    """The training progress bar (rank 0): round, updates done, loss, reward, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("reward {task.fields[reward]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
