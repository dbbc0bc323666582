"""A tiny structured document rendered both to Markdown and to HTML, so analysis.md and
the report's analysis section come from the same data and never drift apart.

Blocks: ``Heading``, ``Para``, ``Bullets`` and ``Table``. Inline text may use ``**bold**``
and ```code``` only; everything else is escaped for HTML.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one "l" or "r" per column; default: first left, the rest right

    def right(self, i: int) -> bool:
        return self.align[i] == "r" if i < len(self.align) else i > 0


Block = Heading | Para | Bullets | Table

_INLINE = re.compile(r"\*\*(.+?)\*\*|`(.+?)`")


def inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<strong>{html.escape(m.group(1))}</strong>")
        else:
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        else:
            align = ["---:" if b.right(i) else "---" for i in range(len(b.header))]
            lines = [b.header, align, *b.rows]
            parts.append("\n".join("| " + " | ".join(map(_md_cell, r)) + " |" for r in lines))
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[Block], top_level: int = 2) -> str:
    """HTML for ``blocks``; Markdown level 1 headings become ``<h{top_level}>``."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            n = min(6, b.level - 1 + top_level)
            parts.append(f"<h{n}>{inline_html(b.text)}</h{n}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{inline_html(i)}</li>" for i in b.items)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(table_html(b))
    return "\n".join(parts)


def table_html(t: Table) -> str:
    def cells(row: list[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="num">{inline_html(c)}</{tag}>' if t.right(i)
            else f"<{tag}>{inline_html(c)}</{tag}>"
            for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in t.rows)
    return (
        f'<div class="table-wrap"><table><thead><tr>{cells(t.header, "th")}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )
