"""Draw the report tables in the terminal with rich. Computes nothing.

    render(tables, console=None) -> None
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from analysis.tables import Table


def render(tables: list[Table], console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        header = any(table.columns)
        console.print(table.title, style="bold", highlight=False, markup=False)
        rich = RichTable(box=box.SIMPLE_HEAD, show_header=header)
        for i, column in enumerate(table.columns):
            rich.add_column(column, justify="left" if i == 0 or not header else "right", no_wrap=i == 0)
        for row in table.rows:
            rich.add_row(*row)
        console.print(rich)
        for note in table.notes:
            console.print(f"  {note}", highlight=False, markup=False)
        if table.notes:
            console.print()
