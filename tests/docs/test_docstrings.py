"""Every public class and function of gradkit documents itself and each of its arguments (Google style).

The reference site (``make docs``) is generated from these docstrings by mkdocstrings; ``mkdocs build --strict``
fails on an argument documented but absent from the signature, and this test fails on the converse: a public
class or function without a docstring, or with an argument its ``Args:`` section does not describe.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe", reason="griffe (installed with mkdocstrings-python, the docs extra) parses "
                             "the Google-style docstrings")

# The packages with an API page on the docs site (docs/api/*.md). Integrations are optional extras: their modules
# are checked when the framework they glue imports.
PUBLIC_MODULES = ["gradkit", "gradkit.sources", "gradkit.transforms", "gradkit.optim", "gradkit.control",
                  "gradkit.search", "gradkit.search.spaces", "gradkit.search.functions", "gradkit.distributed",
                  "gradkit.logging", "gradkit.guide", "gradkit.integrations", "gradkit.integrations.lightning",
                  "gradkit.integrations.transformers", "gradkit.integrations.diffusers"]


def _public_objects():
    seen: set[int] = set()
    for name in PUBLIC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not exc.name.startswith("gradkit"):
                continue  # the optional framework is not installed: nothing of this module can be used either
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # the package does not exist (yet)
            raise
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            if not getattr(obj, "__module__", "").startswith("gradkit"):
                continue
            seen.add(id(obj))
            yield f"{obj.__module__}.{obj.__qualname__}", obj


def _documented_args(doc: str) -> set[str]:
    parsed = griffe.Docstring(inspect.cleandoc(doc), parser="google").parse()
    names: set[str] = set()
    for section in parsed:
        if section.kind.value in ("parameters", "other parameters"):
            for p in section.value:
                names.update(n.strip().lstrip("*") for n in p.name.split(","))
    return names


def _missing(obj) -> str | None:
    own_doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    if not own_doc or not own_doc.strip():
        return "no docstring"
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    wanted = [p.name for p in sig.parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "cls")]
    if not wanted:
        return None
    docs = own_doc
    if inspect.isclass(obj) and "__init__" in vars(obj) and target.__doc__:
        docs = docs + "\n\n" + inspect.cleandoc(target.__doc__)
    logging.getLogger("griffe").setLevel(logging.ERROR)
    documented = _documented_args(docs)
    absent = [n for n in wanted if n not in documented]
    if absent:
        return f"Args: section does not describe {', '.join(absent)}"
    return None


def public_api_gaps() -> dict[str, str]:
    """``{qualified name: what is missing}`` over the public API."""
    return {name: why for name, obj in _public_objects() if (why := _missing(obj))}


def test_every_public_class_and_function_documents_every_argument():
    gaps = public_api_gaps()
    assert not gaps, "undocumented public API (Google style: a docstring with an Args: section naming every " \
        "argument):\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(gaps.items()))


def test_every_public_module_has_a_reference_page():
    api = Path(__file__).resolve().parents[2] / "docs" / "api"
    rendered = {m.group(1) for page in api.glob("*.md")
                for m in re.finditer(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M)}
    missing = []
    for name in PUBLIC_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue  # an optional framework, or a package not written yet
        if name != "gradkit" and name not in rendered:
            missing.append(name)
    assert not missing, f"no docs/api/*.md page renders {missing} (add a '::: module' line)"


def test_every_readme_section_is_a_page():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    sections = [m.group(1).strip() for m in re.finditer(r"^## (.+)$", readme, flags=re.M)]
    included = {m.group(1).strip() for page in (root / "docs").glob("*.md")
                for m in re.finditer(r"<!--\s*readme(?:\[\d\])?:\s*(.+?)\s*-->", page.read_text(encoding="utf-8"))}
    missing = [s for s in sections if s not in included and s != "Documentation"]  # that one describes the site
    assert not missing, f"README sections without a docs page (add '<!-- readme: Title -->' to a docs/*.md): {missing}"
