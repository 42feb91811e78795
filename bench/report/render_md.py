"""The report as Markdown: a table of contents, sections with anchors, figures as files next to it."""
from __future__ import annotations

from attnbench.report.model import Cell, Code, Plot, Section, Table, Text


def _md_cell(cell) -> str:
    text = cell.text if isinstance(cell, Cell) else str(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], files_dir: str) -> str:
    """Markdown with figures referenced as ``files_dir/<name>.png``."""
    out = [f"# {title}", "", *[f"- [{s.title}](#{s.anchor})" for s in sections], ""]
    for section in sections:
        out += [f'<a id="{section.anchor}"></a>', f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                out += [block.text, ""]
            elif isinstance(block, Code):
                out += ["```", block.text, "```", ""]
            elif isinstance(block, Plot):
                out += [f"![{block.alt}]({files_dir}/{block.name}.png)", ""]
                if block.caption:
                    out += [f"*{block.caption}*", ""]
            elif isinstance(block, Table):
                if block.collapsed:
                    out += [f"<details><summary>{block.caption}</summary>", ""]
                elif block.caption:
                    out += [f"*{block.caption}*", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                out.append("|" + "---|" * len(block.header))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out += ["", "</details>", ""] if block.collapsed else [""]
    return "\n".join(out)
