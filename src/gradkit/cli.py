"""The ``gradkit`` command: ``demo``, ``bench NAME``, ``list``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "methods"]

# The packages whose public classes are methods, in data-path order.
_STAGES = ("sources", "transforms", "optim", "control", "search", "search.spaces", "guide")


def methods() -> list[tuple[str, str, str]]:
    """(stage, class name, paper title) for every public class with a ``paper`` attribute."""
    rows = []
    for stage in _STAGES:
        try:
            mod = importlib.import_module(f"gradkit.{stage}")
        except ImportError:
            continue
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            paper = getattr(obj, "paper", "")
            if isinstance(obj, type) and isinstance(paper, str) and paper:
                rows.append((stage, name, paper))
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = methods()
    width = max(len(f"{s}.{n}") for s, n, _ in rows)
    for stage, name, paper in rows:
        print(f"{stage + '.' + name:<{width}}  {paper}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    return args.bench_module.run(args)


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The ``gradkit`` argument parser.

    Args:
        with_bench: Load the benchmark modules (:mod:`gradkit.bench`) to build the ``bench`` sub-commands. The
            CLI is the only place outside the benchmarks that imports them, and only when a ``bench`` command
            (or the help) is asked for. Default True.
    """
    from . import __version__
    from .demo import add_arguments as demo_arguments

    parser = argparse.ArgumentParser(prog="gradkit", description="Train and steer PyTorch models with exact, "
                                     "estimated or no gradients.")
    parser.add_argument("--version", action="version", version=f"gradkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a digits MLP through the gradkit Pipeline and compare methods")
    demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="every method with its paper")
    p.set_defaults(func=_cmd_list)

    if not with_bench:
        sub.add_parser("bench", help="benchmarks (gradkit bench -h lists them)")
        return parser
    from . import bench

    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(bench.available()))
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in bench.available():
        mod = bench.load(name)
        bp = bsub.add_parser(name, help=getattr(mod, "HELP", ""))
        bp.add_argument("--out", default=f"bench-out/{name}", help="directory for Markdown tables and PNG plots")
        mod.add_arguments(bp)
        bp.set_defaults(func=_cmd_bench, bench_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradkit`` command.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with_bench = not argv or "bench" in argv or argv[0] in ("-h", "--help")
    args = build_parser(with_bench).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
