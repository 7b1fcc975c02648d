"""Helpers shared by the benchmarks: timing and the machine line (tables, plots, progress: ``gradkit._report``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .._report import markdown_table, out_dir, progress, pyplot, write

__all__ = ["machine", "markdown_table", "median_time", "out_dir", "progress", "pyplot", "write"]


def median_time(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls.

    Args:
        fn: The call to time.
        warmup: Untimed calls first. Default 3.
        repeats: Timed calls (at least). Default 20.
        min_time: Keep timing until this many seconds have passed. Default 0.
    """
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


def proc_status(key: str) -> int:
    """A size from ``/proc/self/status`` in bytes (``"VmHWM"``: this process's peak resident set; Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def load_note() -> str:
    """``", load average 1.2"`` (the 1-minute load when the run ends), so a reader can tell a contended run's
    times from a quiet one's; empty where the OS does not report it."""
    try:
        return f", load average {os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return ""


def in_fresh_process(module: str, func: str, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``module.func(*args)`` run in a fresh Python process; returns the JSON it printed on its last line.

    A fresh process per measurement keeps one run's allocations (and the allocator's retained heap) out of the next
    one's peak resident set.

    Args:
        module: the module to import in the child (e.g. ``"gradkit.bench.sources"``).
        func: the function of that module to call; it returns something JSON-serialisable.
        *args: its arguments (Python literals: they are written into the child's code with ``repr``).
        env: the child's environment (default: this process's).
    """
    call = ", ".join(repr(a) for a in args)
    code = f"import json; from {module} import {func}; print(json.dumps({func}({call})))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{module}.{func}{args} failed in its subprocess:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])
