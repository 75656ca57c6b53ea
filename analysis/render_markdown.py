"""Write the report tables as a markdown document. Computes nothing.

    render(tables) -> str
"""

from __future__ import annotations

from analysis.tables import Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def render(tables: list[Table]) -> str:
    out = []
    for i, table in enumerate(tables):
        out.append(f"{'#' if i == 0 else '##'} {table.title}\n")
        columns = table.columns if any(table.columns) else ("", "")
        out.append("| " + " | ".join(_cell(c) for c in columns) + " |")
        out.append("|" + "|".join(":---" if j == 0 else "---:" for j in range(len(columns))) + "|")
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
        out.append("")
        out += [f"- {note}" for note in table.notes]
        if table.notes:
            out.append("")
    return "\n".join(out)
