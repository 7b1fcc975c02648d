"""Write training statistics (Pipeline, transform and controller stats) to CSV and, if installed, TensorBoard.

::

    log = gk.logging.StatsLogger("runs/exp1", tensorboard=True)
    for step in ...:
        loss = pipe.step(closure)
        log.log_pipeline(pipe, loss=loss)      # pipe.stats: every stage's stats(), by stage name
    log.close()

What is logged (the same in every sink):

* Python numbers and bools, numpy scalars (``np.float32(1.5)``, ``np.bool_``) and 0-d tensors/arrays: one value;
* 1-d tensors/arrays: one value per element, as ``name/0``, ``name/1``, ... (e.g. GradStats' per-tensor norms);
* NaN and ±Inf are written as they are, to the CSV (``nan``, ``inf``) and to TensorBoard alike: a diverging run
  shows in every sink;
* ``None`` means "no value this step" and is skipped silently;
* anything else (tensors with 2 or more dimensions, strings, complex numbers, ...) is skipped with one warning per
  statistic name and logger: reduce it to a number or a vector where it is produced; gradkit does not guess
  a reduction.

Tensors are read back with one host synchronisation per device per call, however many statistics there are.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["StatsLogger", "flatten_stats"]


def _as_tensor(v: Any) -> torch.Tensor | None:
    """A real tensor for array-like values (tensors, numpy arrays and scalars), else None."""
    if isinstance(v, torch.Tensor):
        t = v
    elif isinstance(v, (np.ndarray, np.generic)) and (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
        t = torch.as_tensor(np.asarray(v))
    else:
        return None
    return None if t.is_complex() else t.detach()


def flatten_stats(stats: Mapping[str, Any], skipped: list[str] | None = None) -> dict[str, float]:
    """``{name: float}`` from a dict of numbers, numpy scalars and 0-/1-d tensors or arrays (see the module doc).

    Args:
        stats: the statistics, ``{name: value}``.
        skipped: if given, the names of the values that cannot be logged are appended to it.
    """
    out: dict[str, float] = {}
    # Tensor values are gathered per device and read back at once; the caller's order is kept.
    order: list[tuple[str, list[str] | None]] = []
    pending: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    slots: dict[torch.device, list[list[str]]] = defaultdict(list)
    for k, v in stats.items():
        if v is None:
            continue
        if isinstance(v, (bool, int, float)):
            out[k] = float(v)
            order.append((k, None))
            continue
        t = _as_tensor(v)
        if t is None or t.ndim > 1:
            if skipped is not None:
                skipped.append(k)
            continue
        names = [k] if t.ndim == 0 else [f"{k}/{i}" for i in range(t.numel())]
        pending[t.device].append(t.reshape(-1).to(torch.float64))
        slots[t.device].append(names)
        order.append((k, names))
    for dev, tensors in pending.items():
        values = iter(torch.cat(tensors).tolist())  # one synchronisation per device
        for names in slots[dev]:
            out.update((n, next(values)) for n in names)
    return {n: out[n] for k, names in order for n in (names if names is not None else [k])}


class StatsLogger:
    """Append statistics to ``<logdir>/stats.csv`` (long format: step, name, value) and optionally TensorBoard.

    The CSV is long format so that statistics appearing later (e.g. after a warm-up) need no new columns.
    ``tensorboard=True`` uses ``torch.utils.tensorboard`` when the ``tensorboard`` package is installed, and warns
    (once) and continues with CSV only when it is not.

    Args:
        logdir: the directory of ``stats.csv`` and the TensorBoard event files (created if needed).
        csv_file: write ``stats.csv``. Default True.
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package). Default False.
    """

    def __init__(self, logdir: str | os.PathLike, *, csv_file: bool = True, tensorboard: bool = False):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._csv = None
        self._writer = None
        self._warned: set[str] = set()
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
        skipped: list[str] = []
        flat = {f"{prefix}{k}": v for k, v in flatten_stats(stats, skipped).items()}
        new = [f"{prefix}{k}" for k in skipped if f"{prefix}{k}" not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"StatsLogger: not logging {new}: only numbers and 0-/1-d tensors or arrays are logged "
                          "(reduce the statistic where it is produced); warned once per name", RuntimeWarning,
                          stacklevel=2)
        for k, v in flat.items():
            if self._csv is not None:
                self._csv.writerow([step, k, repr(v)])
            if self._writer is not None:
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
