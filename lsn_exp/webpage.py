"""One self-contained HTML page from the report's Markdown: tables, lists, headings, and every PNG embedded.

Only the Markdown the report writes is understood (``#`` headings, ``|`` tables, ``- `` items, ``![alt](png)``
figures, `` `code` ``); everything is escaped, and a missing image becomes a note instead of a broken link.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{color:#666;font-size:12px}code{background:#f4f4f4;padding:0 3px}"""


def inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows
             if not re.fullmatch(r"\|?[\s:|-]+\|?", row.strip())]
    head, body = cells[0], cells[1:]
    return ("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</tbody></table>")


def figure(alt: str, src: str, base: Path) -> str:
    path = (base / src) if not Path(src).is_absolute() else Path(src)
    if not path.is_file():
        return f"<p><em>missing figure {html.escape(src)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def render(markdown: str, base: Path, title: str) -> str:
    """The page for ``markdown`` whose image paths are relative to ``base``."""
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(table(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        heading = re.match(r"^(#{1,4}) (.*)$", line)
        image = IMAGE.match(line.strip())
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif image:
            out.append(figure(image.group("alt"), image.group("src"), base))
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(out)}</body></html>\n")


def write(markdown_path: Path, title: str) -> Path:
    """``report.md`` -> ``report.html`` beside it."""
    path = markdown_path.with_suffix(".html")
    path.write_text(render(markdown_path.read_text(), markdown_path.parent, title), encoding="utf-8")
    return path
