"""Griffe extension: Sphinx roles in gradkit's docstrings (``:class:`~gradkit.Pipeline```) become links.

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

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)(?:\(\))?`")


class RstRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring into an optional autorefs reference."""

    def on_object(self, *, obj: Any, loader: Any, **kwargs: Any) -> None:  # noqa: ARG002 (griffe hook)
        doc = obj.docstring
        if doc is None or ":`" not in doc.value:
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
