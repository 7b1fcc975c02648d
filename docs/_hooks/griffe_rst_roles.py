"""Griffe extension: gradkit's docstring conventions that Google style lacks, made readable by mkdocstrings.

1. Grouped arguments. ``x0, sigma0: the initial mean and step size`` in an ``Args:`` section documents both
   arguments (as numpydoc allows); griffe's Google parser would read one argument named ``"x0, sigma0"`` and warn
   that it is not in the signature. Each name gets its own entry with the shared description.
2. Sphinx roles (``:class:`~gradkit.Pipeline```) become links.

gradkit's docstrings use Sphinx cross-reference roles; mkdocstrings reads Markdown. Each role becomes an optional
mkdocs-autorefs reference: a link when the target has a page on the site, plain code when it does not (a private
helper, a torch class), so a reference to an undocumented object never fails the strict build. ``~`` keeps only the
last component as the title, as in Sphinx. A target without a dot is looked up next to the documented object (its
class, then its module).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:", "Params:", "Other Parameters:", "Keyword Args:",
                 "Keyword Arguments:")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(.*)$")


def split_grouped_args(text: str) -> str:
    """``a, b: desc`` items of argument sections become ``a: desc`` and ``b: desc``."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.strip() not in _ARGS_HEADERS:
            continue
        base = len(line) - len(line.lstrip())
        while i < len(lines):
            item = lines[i]
            if item.strip() and len(item) - len(item.lstrip()) <= base:
                break  # the section ended
            m = _GROUPED.match(item)
            if not m:
                out.append(item)
                i += 1
                continue
            indent, names, annotation, desc = m.groups()
            i += 1
            cont = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                if not lines[i].strip() and (i + 1 >= len(lines) or
                                             len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= len(indent)):
                    break
                cont.append(lines[i])
                i += 1
            for name in (n.strip() for n in names.split(",")):
                out.append(f"{indent}{name}{annotation or ''}:{desc}")
                out.extend(cont)
    return "\n".join(out)


_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)(?:\(\))?`")


class RstRoles(griffe.Extension):
    """Split grouped arguments; rewrite ``:role:`target``` into an optional autorefs reference."""

    def on_object(self, *, obj: Any, loader: Any, **kwargs: Any) -> None:  # noqa: ARG002 (griffe hook)
        doc = obj.docstring
        if doc is None:
            return
        if "," in doc.value:
            doc.value = split_grouped_args(doc.value)
        if ":`" not in doc.value:
            return
        scope = obj if obj.is_class or obj.is_module else obj.parent

        def link(m: re.Match) -> str:
            tilde, target = m.groups()
            title = target.rsplit(".", 1)[-1] if tilde else target
            if "." in target or scope is None:
                identifier = target
            else:
                identifier = f"{scope.path}.{target}"
            return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

        doc.value = _ROLE.sub(link, doc.value)
