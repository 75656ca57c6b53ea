"""A rich progress bar on stderr for long work, or nothing when it is turned off.

stdout stays for results (tables, JSON), so the bar never mixes with them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True,
                 unit: str = "") -> Iterator[Callable[..., None]]:
    """Yield `advance(description=None, completed=None, total=None)`: with no
    `completed`, one more step is done; otherwise that many of `total`."""
    if not enabled:
        yield lambda description=None, completed=None, total=None: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(description: str | None = None, completed: int | None = None,
                    total: int | None = None) -> None:
            changes = {"description": description, "completed": completed, "total": total}
            bar.update(task, advance=1 if completed is None else None,
                       **{k: v for k, v in changes.items() if v is not None})

        yield advance
