"""``gradkit bench literature``: paper claims reproduced at CPU scale.

Each experiment is a module in :mod:`gradkit.bench.experiments` defining ``NAME`` (short id), ``CLAIM`` (the
paper's sentence being checked, with the paper title) and ``run(out: Path, quick: bool) -> str`` returning a
Markdown section (table + the PNG it wrote). The command runs the selected experiments and writes
``literature.md`` with every section.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time

from . import experiments
from ._common import machine, out_dir, write

HELP = "paper claims reproduced at small scale (table + plots per experiment)"


def available() -> list[str]:
    """Names of the experiments (modules of :mod:`gradkit.bench.experiments`).

    Args:
    """
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--only", default=None, help=f"comma-separated experiments (default all): {', '.join(available())}")
    p.add_argument("--quick", action="store_true", help="smaller budgets, for a smoke run")


def run(args: argparse.Namespace) -> int:
    """Run the selected experiments and write ``literature.md``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    names = available() if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown experiment(s) {unknown}; available: {available()}")
        return 2
    out = out_dir(args.out)
    sections = [f"Machine: {machine()}. Command: `gradkit bench literature"
                f"{' --only ' + args.only if args.only else ''}{' --quick' if args.quick else ''}`."]
    for name in names:
        mod = importlib.import_module(f"{experiments.__name__}.{name}")
        print(f"== {name}: {mod.CLAIM}")
        t0 = time.perf_counter()
        section = mod.run(out, args.quick)
        print(section)
        sections.append(f"### {name}\n\n*Claim:* {mod.CLAIM}\n\n{section}\n\n({time.perf_counter() - t0:.0f} s)")
    write(out / "literature.md", "\n\n".join(sections))
    return 0
