"""Write training statistics (Pipeline, transform and controller stats) to CSV and, if installed, TensorBoard.

::

    log = gk.logging.StatsLogger("runs/exp1", tensorboard=True)
    for step in ...:
        loss = pipe.step(closure)
        log.log_pipeline(pipe, loss=loss)      # pipe.stats: every stage's stats(), by stage name
    log.close()

Values may be Python numbers, 0-d tensors (converted here, which is where the host synchronisation happens) or
1-d tensors (expanded as ``name/0``, ``name/1``, ...). Other values are ignored.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["StatsLogger", "flatten_stats"]


def flatten_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """``{name: float}`` from a dict of numbers, bools and 0-/1-d tensors."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            if v.ndim == 0:
                out[k] = float(v)
            elif v.ndim == 1:
                out.update({f"{k}/{i}": float(x) for i, x in enumerate(v.tolist())})
        elif isinstance(v, (bool, int, float)):
            out[k] = float(v)
    return out


class StatsLogger:
    """Append statistics to ``<logdir>/stats.csv`` (long format: step, name, value) and optionally TensorBoard.

    The CSV is long format so that statistics appearing later (e.g. after a warm-up) need no new columns.
    ``tensorboard=True`` uses ``torch.utils.tensorboard`` when the ``tensorboard`` package is installed, and warns
    (once) and continues with CSV only when it is not.
    """

    def __init__(self, logdir: str | os.PathLike, *, csv_file: bool = True, tensorboard: bool = False):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._csv = None
        self._writer = None
        if csv_file:
            path = self.logdir / "stats.csv"
            new = not path.exists() or path.stat().st_size == 0
            self._file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
            self._csv = csv.writer(self._file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.logdir))
            except ImportError as exc:
                warnings.warn(f"StatsLogger: TensorBoard unavailable ({exc}); logging to CSV only", RuntimeWarning,
                              stacklevel=2)

    @property
    def tensorboard(self) -> bool:
        return self._writer is not None

    def log(self, step: int, stats: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        """Write one step's statistics; returns the flattened values written."""
        flat = {f"{prefix}{k}": v for k, v in flatten_stats(stats).items()}
        for k, v in flat.items():
            if self._csv is not None:
                self._csv.writerow([step, k, repr(v)])
            if self._writer is not None and math.isfinite(v):
                self._writer.add_scalar(k, v, step)
        return flat

    def log_pipeline(self, pipe: Any, loss: torch.Tensor | float | None = None) -> dict[str, float]:
        """Log ``pipe.stats`` (every stage's statistics, keyed ``<stage name>/<statistic>``) and optionally the loss."""
        stats: dict[str, Any] = dict(pipe.stats)
        if loss is not None:
            stats["loss"] = loss
        return self.log(pipe.steps, stats)

    def flush(self) -> None:
        if self._csv is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._file.close()
            self._csv = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
