"""The progress bar (profiler/progress.py): few redraws, no step lost."""

from __future__ import annotations

import rich.progress

from profiler import progress


def test_the_bar_takes_changes_at_most_every_min_update_and_loses_none(monkeypatch):
    """A token's advance must not cost a redraw each (hyprof run advances per token, inside the
    wall time it measures): changes inside MIN_UPDATE_S are held and given at the next update
    or at the end, so the bar still ends at every step and the last description."""
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    updates = []
    real_update = rich.progress.Progress.update

    def update(self, task, **changes):
        if changes:
            updates.append(changes)
        return real_update(self, task, **changes)
    monkeypatch.setattr(rich.progress.Progress, "update", update)

    with progress.progress_bar(100, "start") as advance:
        for step in range(50):
            advance(description=f"step {step}")
            clock[0] += progress.MIN_UPDATE_S / 10           # ten advances per update interval
    assert 5 <= len(updates) <= 7                            # ~50 / 10, plus the first and the last
    assert sum(u.get("advance", 0) for u in updates) == 50
    assert updates[-1]["description"] == "step 49"
    with progress.progress_bar(10, "set") as advance:
        advance(completed=3)
        advance(completed=7, total=20)                       # held, then given at the end
    assert updates[-1] == {"advance": 0, "completed": 7, "total": 20}
