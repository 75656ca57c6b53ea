"""A rich progress bar on stderr for long work, or nothing when it is turned off.

stdout stays for results (tables, JSON), so the bar never mixes with them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

# The bar takes changes at most this often (it redraws at 10 Hz): an update costs ~40 us,
# and `hyprof run` advances once per generated token, inside the wall time it measures.
MIN_UPDATE_S = 0.1


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
        pending: dict = {"advance": 0}      # changes not yet given to the bar
        last = 0.0

        def advance(description: str | None = None, completed: int | None = None,
                    total: int | None = None) -> None:
            nonlocal last
            if completed is None:
                pending["advance"] += 1
            else:
                pending["advance"], pending["completed"] = 0, completed
            if description is not None:
                pending["description"] = description
            if total is not None:
                pending["total"] = total
            now = time.monotonic()
            if now - last >= MIN_UPDATE_S:
                last = now
                bar.update(task, **pending)
                pending.clear()
                pending["advance"] = 0

        yield advance
        bar.update(task, **pending)
