"""The library does not depend on its benchmarks: nothing outside ``gradkit/bench`` imports ``gradkit.bench``.

Checked two ways: statically (every import statement in ``src/gradkit`` and ``tests``, outside the benchmark
package and its own tests in ``tests/bench``) and at run time (importing every library module in a fresh
interpreter leaves ``gradkit.bench`` unloaded). The one allowed importer is the command-line front end
``gradkit/cli.py``, and only inside a function (the ``gradkit bench`` command), never at module level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gradkit"
TESTS = ROOT / "tests"
BENCH = "gradkit.bench"
# file (relative to ROOT) -> may import gradkit.bench inside functions only
FUNCTION_LEVEL_ALLOWED = {"src/gradkit/cli.py"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_bench(name: str) -> bool:
    return name == BENCH or name.startswith(BENCH + ".")


def bench_imports(source: str, module: str = "", is_package: bool = False) -> list[tuple[int, bool]]:
    """``(line, at_module_level)`` of every import of ``gradkit.bench`` in ``source``.

    ``module`` is the dotted name of the file (resolves relative imports); imports by string through
    ``importlib.import_module("gradkit.bench...")`` / ``__import__`` count too.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    hits: list[tuple[int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                if any(_is_bench(a.name) for a in child.names):
                    hits.append((child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if _is_bench(target) or any(_is_bench(f"{target}.{a.name}") for a in child.names):
                    hits.append((child.lineno, top))
            elif isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant):
                func = child.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                arg = child.args[0].value
                if fname in ("import_module", "__import__") and isinstance(arg, str) and _is_bench(arg):
                    hits.append((child.lineno, top))
            visit(child, inner)

    visit(tree, True)
    return hits


def _files():
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "bench") not in path.parents:
            yield path, _module_name(path), path.name == "__init__.py"
    for path in sorted(TESTS.rglob("*.py")):
        if (TESTS / "bench") not in path.parents:
            yield path, "", False


def test_checker_finds_every_spelling():
    snippets = {
        "import gradkit.bench": True,
        "import gradkit.bench._common as c": True,
        "from gradkit.bench import sources": True,
        "from gradkit import bench": True,
        "import importlib\nimportlib.import_module('gradkit.bench.optimizers')": True,
        "from gradkit import benchmarks_are_elsewhere, data": False,
        "import gradkit.data": False,
    }
    for code, expected in snippets.items():
        assert bool(bench_imports(code)) == expected, code
    # relative spellings inside the package
    assert bench_imports("from .bench._common import x", "gradkit.demo")
    assert bench_imports("from . import bench", "gradkit.cli")
    assert bench_imports("from ..bench import lm", "gradkit.optim.adam")
    assert bench_imports("from .. import bench", "gradkit.optim", is_package=True)
    assert not bench_imports("from .. import bench", "gradkit.optim.sub.mod")  # gradkit.optim.bench
    assert bench_imports("from . import bench", "gradkit", is_package=True)
    assert not bench_imports("from .data import digits", "gradkit.models")
    # function-level imports are reported as such
    assert bench_imports("def f():\n    from gradkit import bench\n") == [(2, False)]


def test_nothing_outside_bench_imports_bench():
    offenders = []
    for path, module, is_pkg in _files():
        rel = path.relative_to(ROOT).as_posix()
        for line, top in bench_imports(path.read_text(), module, is_pkg):
            if rel in FUNCTION_LEVEL_ALLOWED and not top:
                continue
            offenders.append(f"{rel}:{line}")
    assert not offenders, "gradkit.bench imported outside the benchmarks: " + ", ".join(offenders)


def test_importing_the_library_leaves_bench_unloaded():
    modules = [m for path, m, _ in _files() if m.startswith("gradkit") and m != "gradkit.__main__"]
    assert "gradkit.optim.adam" in modules and not any(_is_bench(m) for m in modules)
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except ImportError:  # an optional extra that is not installed
                pass
        loaded = sorted(k for k in sys.modules if k == "{BENCH}" or k.startswith("{BENCH}."))
        print("LOADED", loaded)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("command", [["list"], ["--version"]])
def test_cli_without_bench_does_not_load_bench(command):
    code = (f"import sys\nfrom gradkit.cli import main\ntry:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(k for k in sys.modules if k.startswith('{BENCH}')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout, res.stdout[-2000:]
