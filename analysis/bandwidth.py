"""Bytes and busy time per group of events: the op, copy, layer, split and backend tables.

Public API (stable):

    event_rep(timings, attribution)  -> repetition (row of attribution.reps) per event, -1 outside all
    event_test(timings, attribution) -> (test index per event, test names in first-seen order)
    time_test(ts, attribution)       -> the same for any times (route events')
    op_table(timings, test_of_event)      -> GROUP rows keyed by (test, op, backend)
    copy_table(timings, test_of_event)    -> GROUP rows keyed by (test, direction "h2d"/"d2h"/"other", src, dst)
    layer_table(timings, test_of_event)   -> GROUP rows keyed by (test, layer, backend)
    backend_table(timings, test_of_event) -> GROUP rows keyed by (test, backend) over all ops
    split_table(timings, test_of_event)   -> SPLIT rows keyed by (test, split, backend)

A GROUP row holds: test, key columns, count, total_ns (sum of durations),
mean_ns, busy_ns (union of the intervals: what the memory bus saw when many
lanes ran at once), bytes, bytes_ub (true: some of those bytes are an upper bound,
an imported batch's experts, so bytes and GBps are at most that), GBps (bytes /
busy_ns; bytes per ns is GB/s) and pct (share of the test's summed durations in
that table). Events outside all
test repetitions are left out.
"""

from __future__ import annotations

import numpy as np

from analysis.attribution import Attribution, copy_direction
from analysis.intervals import busy_ns, window_index
from analysis.timings import Timings

_GROUP_COLUMNS = [("count", np.int64), ("total_ns", np.int64), ("mean_ns", np.float64), ("busy_ns", np.int64),
                  ("bytes", np.int64), ("bytes_ub", np.bool_), ("GBps", np.float64), ("pct", np.float64)]


def event_rep(t: Timings, a: Attribution) -> np.ndarray:
    """Which test repetition (row of `a.reps`) each event belongs to, by its start time (-1: none)."""
    return window_index(t.events["ts"], a.reps["ts_ns"], a.reps["ts_ns"] + a.reps["wall_ns"])


def event_test(t: Timings, a: Attribution) -> tuple[np.ndarray, tuple[str, ...]]:
    """Which test (by name, over all its repetitions) each event belongs to, by its start time (-1: none)."""
    return time_test(t.events["ts"], a)


def time_test(ts: np.ndarray, a: Attribution) -> tuple[np.ndarray, tuple[str, ...]]:
    """Which test each time (an event's start, a route's) falls in, as `event_test`."""
    names = tuple(dict.fromkeys(str(n) for n in a.reps["name"]))
    rep_test = np.array([names.index(str(n)) for n in a.reps["name"]], dtype=np.int64)
    rep = window_index(ts, a.reps["ts_ns"], a.reps["ts_ns"] + a.reps["wall_ns"])
    return np.where(rep >= 0, rep_test[np.maximum(rep, 0)] if len(rep_test) else -1, -1), names


def groups(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(group index of each row, the distinct key rows in order): a dense index when the keys allow."""
    if not columns[0].size:
        return np.zeros(0, dtype=np.int64), np.empty((0, len(columns)), dtype=np.int64)
    lows = [int(c.min()) for c in columns]
    dims = tuple(int(c.max()) - lo + 1 for c, lo in zip(columns, lows))
    shifted = [c.astype(np.int64) - lo for c, lo in zip(columns, lows)]
    if np.prod(dims, dtype=np.float64) > 1 << 24:
        uniq, inverse = np.unique(np.stack(shifted, axis=1), axis=0, return_inverse=True)
        return inverse.reshape(-1), uniq + lows
    flat = np.ravel_multi_index(shifted, dims)
    present = np.flatnonzero(np.bincount(flat, minlength=int(np.prod(dims))))
    index = np.full(int(np.prod(dims)), -1, dtype=np.int64)
    index[present] = np.arange(present.size)
    return index[flat], np.stack(np.unravel_index(present, dims), axis=1) + lows


def _group(t: Timings, sel: np.ndarray, test: np.ndarray, keys: list[tuple[str, np.ndarray]],
           extra: list[tuple[str, object]] = ()) -> np.ndarray:
    """Group the selected events by (test, *keys); keys are integer columns (symbol ids or numbers)."""
    sel = np.flatnonzero(sel & (test >= 0))
    ts, dur, nbytes, ub = (t.events[f][sel] for f in ("ts", "dur", "bytes", "bytes_ub"))   # the columns, not whole rows
    inverse, uniq = groups([test[sel]] + [k[sel] for _, k in keys])
    n = len(uniq)
    dtype = [("test", np.int32)] + [(name, np.int64) for name, _ in keys] + list(extra) + _GROUP_COLUMNS
    out = np.zeros(n, dtype)
    out["test"] = uniq[:, 0]
    for j, (name, _) in enumerate(keys):
        out[name] = uniq[:, j + 1]
    out["count"] = np.bincount(inverse, minlength=n)
    out["total_ns"] = np.bincount(inverse, weights=dur.astype(np.float64), minlength=n).round()
    out["bytes"] = np.bincount(inverse, weights=nbytes.astype(np.float64), minlength=n).round()
    out["bytes_ub"] = np.bincount(inverse, weights=(ub > 0) & (nbytes > 0), minlength=n) > 0
    out["busy_ns"] = busy_ns(ts, ts + dur, inverse, n)
    out["mean_ns"] = out["total_ns"] / np.maximum(out["count"], 1)
    out["GBps"] = np.where(out["busy_ns"] > 0, out["bytes"] / np.maximum(out["busy_ns"], 1), 0.0)
    test_total = np.bincount(out["test"], weights=out["total_ns"].astype(np.float64))
    out["pct"] = 100.0 * out["total_ns"] / np.maximum(test_total[out["test"]], 1) if n else 0.0
    order = np.lexsort((-out["total_ns"], out["test"]))
    return out[order]


def op_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    return _group(t, t.of_type("op"), test, [("op", ev["op"]), ("backend", ev["backend"])])


def layer_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    table = _group(t, t.of_type("op"), test, [("layer", ev["layer"]), ("backend", ev["backend"])])
    return table[np.lexsort((table["backend"], table["layer"], table["test"]))]


def backend_table(t: Timings, test: np.ndarray) -> np.ndarray:
    return _group(t, t.of_type("op"), test, [("backend", t.events["backend"])])


def copy_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    direction = copy_direction(t, ev["src"], ev["dst"], ev["kind"])
    return _group(t, t.of_type("copy"), test,
                  [("direction", direction), ("src", ev["src"]), ("dst", ev["dst"])])


def split_table(t: Timings, test: np.ndarray) -> np.ndarray:
    """Split events per (test, split index, backend), with the ops and copies that name the split.

    Ops and copies are matched by (test, split index): a split index keeps its backend within a test.
    """
    ev = t.events
    table = _group(t, t.of_type("split"), test, [("split", ev["split"]), ("backend", ev["backend"])],
                   extra=[("n_nodes_mean", np.float64), ("n_inputs_mean", np.float64),
                          ("op_total_ns", np.int64), ("op_bytes", np.int64), ("copy_bytes", np.int64)])
    for column, type_name, value in (("n_nodes_mean", "split", ev["n_nodes"]),
                                     ("n_inputs_mean", "split", ev["n_inputs"]),
                                     ("op_total_ns", "op", ev["dur"]), ("op_bytes", "op", ev["bytes"]),
                                     ("copy_bytes", "copy", ev["bytes"])):
        sel = t.of_type(type_name) & (test >= 0) & (ev["split"] >= 0)
        sums = _sums_per_row(table, test[sel], ev["split"][sel], np.maximum(value[sel], 0))
        table[column] = sums / np.maximum(table["count"], 1) if column.endswith("_mean") else sums.round()
    return table[np.lexsort((table["backend"], table["split"], table["test"]))]


def _sums_per_row(table: np.ndarray, test: np.ndarray, split: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each (test, split) row of the table, the sum of the values of the events with that key."""
    index, uniq = groups([np.concatenate([table["test"], test]), np.concatenate([table["split"], split])])
    sums = np.bincount(index[len(table):], weights=values.astype(np.float64), minlength=len(uniq))
    return sums[index[:len(table)]]
