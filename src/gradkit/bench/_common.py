"""Helpers shared by the benchmarks: timing, machine description, Markdown tables, plots, progress."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "markdown_table", "median_time", "out_dir", "progress", "pyplot", "write"]


def median_time(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    """One line naming this machine: CPU model, cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def out_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write(path: Path, text: str) -> None:
    path.write_text(text.rstrip() + "\n")
    print(f"wrote {path}")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'gradkit[demo]')")
        return None


class _PlainProgress:
    def __init__(self, total: int, description: str):
        self.total, self.description, self.done = total, description, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        print(f"{self.description}: {self.done}/{self.total} done", flush=True)
        return False

    def advance(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        if description:
            self.description = description


class _RichProgress:
    def __init__(self, total: int, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=False)
        self._task = self._p.add_task(description, total=total)

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        kw = {"description": description} if description else {}
        self._p.update(self._task, advance=n, **kw)


def progress(total: int, description: str):
    """A progress bar (rich when installed, else a closing line): ``with progress(n, "x") as bar: bar.advance()``."""
    try:
        import rich  # noqa: F401

        return _RichProgress(total, description)
    except ImportError:
        return _PlainProgress(total, description)
