"""Interval arithmetic on NumPy arrays: unions of busy time, without a loop per event.

Busy time of many lanes (16 CPU workers each running a slice of one matmul) is
the length of the union of their intervals, not the sum: that is what the
memory bus saw, so it is the denominator of every bandwidth figure.

Events arrive sorted by start (Timings.events is), so sorting is mostly a
check; grouping sorts by group only, with a stable radix sort when the group
ids are small, which keeps each group in start order.
"""

from __future__ import annotations

import numpy as np


def _by_start(start: np.ndarray) -> np.ndarray | None:
    """An order that sorts by start, or None when already sorted."""
    if start.size < 2 or not (start[1:] < start[:-1]).any():
        return None
    return np.argsort(start, kind="stable")


def merge(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of [start, end) intervals as sorted, disjoint, non-touching intervals."""
    keep = end > start
    start, end = start[keep].astype(np.int64), end[keep].astype(np.int64)
    if start.size == 0:
        return start, end
    order = _by_start(start)
    if order is not None:
        start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    first = np.empty(start.size, dtype=bool)
    first[0] = True
    first[1:] = start[1:] > reach[:-1]
    heads = np.flatnonzero(first)
    lasts = np.append(heads[1:] - 1, start.size - 1)
    return start[heads], reach[lasts]


def busy_ns(start: np.ndarray, end: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Length of the union of the intervals of each group (groups 0..n_groups-1; others ignored).

    Groups are moved apart on the time axis so that one merge serves them all.
    """
    ok = (group >= 0) & (group < n_groups) & (end > start)
    start, end, group = start[ok], end[ok], group[ok]
    if start.size == 0:
        return np.zeros(n_groups, dtype=np.int64)
    order = _by_start(start)
    if order is not None:
        start, end, group = start[order], end[order], group[order]
    by_group = np.argsort(group.astype(np.uint16) if n_groups <= 1 << 16 else group, kind="stable")
    start, end, group = start[by_group], end[by_group], group[by_group].astype(np.int64)
    lo = int(start.min())
    stride = int(end.max()) - lo + 1
    ms, me = merge(start - lo + group * stride, end - lo + group * stride)
    return np.bincount(ms // stride, weights=(me - ms).astype(np.float64),
                       minlength=n_groups).round().astype(np.int64)


def window_index(x: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Index of the window [start, end) holding each x (windows sorted and disjoint), -1 outside all."""
    if start.size == 0:
        return np.full(x.shape, -1, dtype=np.int64)
    i = np.searchsorted(start, x, side="right") - 1
    return np.where((i >= 0) & (x < end[np.maximum(i, 0)]), i, -1)
