"""``gradkit bench NAME``: every module in this package not starting with ``_`` is a benchmark.

A benchmark module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; it writes
Markdown tables and PNG plots under ``--out`` and prints the tables. Benchmarks measure side by side in one
run and report medians and ratios.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["available"]


def available() -> list[str]:
    """Names of the benchmarks (``gradkit bench <name>``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and not m.ispkg)


def load(name: str):
    return importlib.import_module(f"{__name__}.{name}")
