"""report.html: one self-contained page (PNGs as data URIs, inline CSS, no scripts).

A Content-Security-Policy meta tag forbids every fetch except data: images and the inline
style, so the page cannot make a network request even if a future edit slips one in.
"""

from __future__ import annotations

import base64
import html
import struct
from dataclasses import dataclass, field
from pathlib import Path

from normlab.reports.doc import Block, inline_html, to_html

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1.2rem 1.2rem 3rem;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.7rem; margin: 0.4rem 0; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.08rem; margin-top: 1.5rem; }
code { font: 0.92em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
nav { font-size: .92rem; margin: .8rem 0; }
nav a { margin-right: 1rem; }
.meta { color: #555; font-size: .92rem; }
.notice { border-left: 4px solid #d08700; background: #fff7e6; padding: .6rem .9rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; margin: .6rem 0; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .3rem .45rem; text-align: left;
  vertical-align: top; }
th { background: #f6f6f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
h4 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
figure { margin: 1rem 0; page-break-inside: avoid; break-inside: avoid; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .88rem; color: #444; margin-top: .3rem; }
.pair { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.pair figure { margin: .4rem 0; }
.pair .wide { flex: 1 1 100%; }
.pair .narrow { flex: 0 1 560px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav { display: none; }
  h2 { page-break-after: avoid; break-after: avoid; }
  table, .pair { page-break-inside: avoid; break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


@dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""
    css_class: str = ""


@dataclass
class Section:
    anchor: str
    title: str
    html: str = ""
    parts: list[str] = field(default_factory=list)


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def figure_html(image: Image) -> str:
    data = image.path.read_bytes()
    width, height = png_size(data)
    b64 = base64.b64encode(data).decode("ascii")
    cls = f' class="{image.css_class}"' if image.css_class else ""
    caption = f"<figcaption>{inline_html(image.caption)}</figcaption>" if image.caption else ""
    return (f'<figure{cls}><img src="data:image/png;base64,{b64}" alt="{html.escape(image.alt)}"'
            f' width="{width}" height="{height}">{caption}</figure>')


def blocks_html(blocks: list[Block]) -> str:
    return to_html(blocks, top_level=3)


def page_html(title: str, header: list[Block], notice: list[str], sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    notice_html = ""
    if notice:
        items = "".join(f"<li>{inline_html(n)}</li>" for n in notice)
        notice_html = f'<div class="notice"><ul>{items}</ul></div>'
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>\n{s.html}\n'
        + "\n".join(s.parts) + "</section>"
        for s in sections
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{to_html(header)}
{notice_html}
<nav>{nav}</nav>
{body}
</body>
</html>
"""
