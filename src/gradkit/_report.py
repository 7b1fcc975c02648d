"""Reporting helpers shared by the demo and the benchmarks: Markdown tables, output files, plots, progress bars.

Private: the demo (part of the library) and :mod:`gradkit.bench` both use these; neither imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "out_dir", "progress", "pyplot", "write"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats get 3 significant digits (NaN prints as "–").

    Args:
        header: Column titles.
        rows: One sequence of cells per row.
    """
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
    """``path`` as a directory, created with its parents when missing.

    Args:
        path: Directory to create.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write(path: Path, text: str) -> None:
    """Write ``text`` (one trailing newline) to ``path`` and say so.

    Args:
        path: File to write.
        text: Its content.
    """
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
    """A progress bar (rich when installed, else a closing line): ``with progress(n, "x") as bar: bar.advance()``.

    Args:
        total: Number of units of work.
        description: Label shown beside the bar.
    """
    try:
        import rich  # noqa: F401

        return _RichProgress(total, description)
    except ImportError:
        return _PlainProgress(total, description)
