"""MkDocs hook: pages made of README sections, so the README stays the one copy of its prose.

A page writes ``<!-- readme: The data path -->`` to include the README section under the heading
``## The data path`` (up to the next heading of the same or a higher level), with its headings shifted so the
section's own heading becomes the page title (``<!-- readme[2]: Ten lines -->``: a level-2 heading instead).
``<!-- readme: @intro -->`` includes the text between the README's
title and its first ``##`` heading. A heading that is not in the README fails the build (the reference is
broken), as ``mkdocs build --strict`` fails on any broken link inside the included text.

Links from the README into ``docs/`` (the benchmark figures) are rewritten relative to the including page; links
to other repository files become plain code text, since the site holds only ``docs/``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

_DIRECTIVE = re.compile(r"<!--\s*readme(?:\[(\d)\])?:\s*(.+?)\s*-->")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _lines_outside_code(text: str) -> list[tuple[str, bool]]:
    """Each line with a flag: True when the line is inside a fenced code block (its ``#`` is not a heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append((line, True))
        else:
            out.append((line, fenced))
    return out


def _section(readme: str, title: str, top: int = 1) -> str:
    lines = _lines_outside_code(readme)
    headings = [(i, len(m.group(1)), m.group(2)) for i, (line, code) in enumerate(lines)
                if not code and (m := _HEADING.match(line))]
    if title == "@intro":
        start = next(i for i, level, _ in headings if level == 1) + 1
        end = next((i for i, level, _ in headings if level == 2), len(lines))
        return "\n".join(line for line, _ in lines[start:end])
    found = [(i, level) for i, level, text in headings if text == title]
    if not found:
        known = ", ".join(repr(t) for _, level, t in headings if level == 2)
        raise ValueError(f"README.md has no heading {title!r} (included by a docs page); level-2 headings: {known}")
    start, level = found[0]
    end = next((i for i, lv, _ in headings if i > start and lv <= level), len(lines))
    shift = level - top
    body = []
    for line, code in lines[start:end]:
        m = None if code else _HEADING.match(line)
        body.append(f"{'#' * (len(m.group(1)) - shift)} {m.group(2)}" if m else line)
    return "\n".join(body)


def _relink(text: str, page_src: str) -> str:
    page_dir = posixpath.dirname(page_src)

    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{label}]({posixpath.relpath(target[len('docs/'):], page_dir or '.')})"
        return f"`{label}`" if not bang else label
    return _LINK.sub(fix, text)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs hook signature)
    if "<!-- readme" not in markdown:
        return markdown
    readme = (Path(config["docs_dir"]).parent / "README.md").read_text(encoding="utf-8")
    src = page.file.src_uri
    return _DIRECTIVE.sub(lambda m: _relink(_section(readme, m.group(2), int(m.group(1) or 1)), src), markdown)
