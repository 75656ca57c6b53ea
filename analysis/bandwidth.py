"""Bytes and busy time per group of events: the op, copy, layer, split and backend tables.

Public API (stable):

    event_test(timings, attribution) -> (test index per event, test names in first-seen order)
    op_table(timings, test_of_event)      -> GROUP rows keyed by (test, op, backend)
    copy_table(timings, test_of_event)    -> GROUP rows keyed by (test, direction "h2d"/"d2h"/"other", src, dst)
    layer_table(timings, test_of_event)   -> GROUP rows keyed by (test, layer, backend)
    backend_table(timings, test_of_event) -> GROUP rows keyed by (test, backend) over all ops
    split_table(timings, test_of_event)   -> SPLIT rows keyed by (test, split, backend)

A GROUP row holds: test, key columns, count, total_ns (sum of durations),
mean_ns, busy_ns (union of the intervals: what the memory bus saw when many
lanes ran at once), bytes, GBps (bytes / busy_ns; bytes per ns is GB/s) and
pct (share of the test's summed durations in that table). Events outside all
test repetitions are left out.
"""

from __future__ import annotations

import numpy as np

from analysis.attribution import Attribution, copy_direction
from analysis.intervals import busy_ns, window_index
from analysis.timings import Timings

_GROUP_COLUMNS = [("count", np.int64), ("total_ns", np.int64), ("mean_ns", np.float64), ("busy_ns", np.int64),
                  ("bytes", np.int64), ("GBps", np.float64), ("pct", np.float64)]


def event_test(t: Timings, a: Attribution) -> tuple[np.ndarray, tuple[str, ...]]:
    """Which test (by name, over all its repetitions) each event belongs to, by its start time (-1: none)."""
    names = tuple(dict.fromkeys(str(n) for n in a.reps["name"]))
    rep_test = np.array([names.index(str(n)) for n in a.reps["name"]], dtype=np.int64)
    rep = window_index(t.events["ts"], a.reps["ts_ns"], a.reps["ts_ns"] + a.reps["wall_ns"])
    return np.where(rep >= 0, rep_test[np.maximum(rep, 0)] if len(rep_test) else -1, -1), names


def _group(t: Timings, sel: np.ndarray, test: np.ndarray, keys: list[tuple[str, np.ndarray]],
           extra: list[tuple[str, object]] = ()) -> np.ndarray:
    """Group the selected events by (test, *keys); keys are integer columns (symbol ids or numbers)."""
    sel = sel & (test >= 0)
    ev = t.events[sel]
    cols = [test[sel]] + [k[sel] for _, k in keys]
    stacked = np.stack([c.astype(np.int64) for c in cols], axis=1) if len(ev) else np.empty((0, len(cols)), np.int64)
    uniq, inverse = np.unique(stacked, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(uniq)
    dtype = [("test", np.int32)] + [(name, np.int64) for name, _ in keys] + list(extra) + _GROUP_COLUMNS
    out = np.zeros(n, dtype)
    out["test"] = uniq[:, 0]
    for j, (name, _) in enumerate(keys):
        out[name] = uniq[:, j + 1]
    out["count"] = np.bincount(inverse, minlength=n)
    out["total_ns"] = np.bincount(inverse, weights=ev["dur"].astype(np.float64), minlength=n).round()
    out["bytes"] = np.bincount(inverse, weights=ev["bytes"].astype(np.float64), minlength=n).round()
    out["busy_ns"] = busy_ns(ev["ts"], ev["ts"] + ev["dur"], inverse, n)
    out["mean_ns"] = out["total_ns"] / np.maximum(out["count"], 1)
    out["GBps"] = np.where(out["busy_ns"] > 0, out["bytes"] / np.maximum(out["busy_ns"], 1), 0.0)
    test_total = np.bincount(out["test"], weights=out["total_ns"].astype(np.float64))
    out["pct"] = 100.0 * out["total_ns"] / np.maximum(test_total[out["test"]], 1) if n else 0.0
    order = np.lexsort((-out["total_ns"], out["test"]))
    return out[order]


def _of_type(t: Timings, name: str) -> np.ndarray:
    return t.events["type"] == t.type_code(name)


def op_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    return _group(t, _of_type(t, "op"), test, [("op", ev["op"]), ("backend", ev["backend"])])


def layer_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    table = _group(t, _of_type(t, "op"), test, [("layer", ev["layer"]), ("backend", ev["backend"])])
    return table[np.lexsort((table["backend"], table["layer"], table["test"]))]


def backend_table(t: Timings, test: np.ndarray) -> np.ndarray:
    return _group(t, _of_type(t, "op"), test, [("backend", t.events["backend"])])


def copy_table(t: Timings, test: np.ndarray) -> np.ndarray:
    ev = t.events
    direction = copy_direction(t, ev["src"], ev["dst"])
    return _group(t, _of_type(t, "copy"), test,
                  [("direction", direction), ("src", ev["src"]), ("dst", ev["dst"])])


def split_table(t: Timings, test: np.ndarray) -> np.ndarray:
    """Split events per (test, split index, backend), with the ops and copies that name the split.

    Ops and copies are matched by (test, split index): a split index keeps its backend within a test.
    """
    ev = t.events
    table = _group(t, _of_type(t, "split"), test, [("split", ev["split"]), ("backend", ev["backend"])],
                   extra=[("n_nodes_mean", np.float64), ("n_inputs_mean", np.float64),
                          ("op_total_ns", np.int64), ("op_bytes", np.int64), ("copy_bytes", np.int64)])
    rows = _split_key(table["test"], table["split"])
    for column, type_name, value in (("n_nodes_mean", "split", ev["n_nodes"]),
                                     ("n_inputs_mean", "split", ev["n_inputs"]),
                                     ("op_total_ns", "op", ev["dur"]), ("op_bytes", "op", ev["bytes"]),
                                     ("copy_bytes", "copy", ev["bytes"])):
        sel = _of_type(t, type_name) & (test >= 0) & (ev["split"] >= 0)
        sums = _sum_by(rows, _split_key(test[sel], ev["split"][sel]), np.maximum(value[sel], 0))
        table[column] = sums / np.maximum(table["count"], 1) if column.endswith("_mean") else sums.round()
    return table[np.lexsort((table["backend"], table["split"], table["test"]))]


def _split_key(test: np.ndarray, split: np.ndarray) -> np.ndarray:
    return test.astype(np.int64) * (1 << 32) + split.astype(np.int64)


def _sum_by(rows: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each row key, the sum of the values whose key equals it (0 where none)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse.reshape(-1), weights=values.astype(np.float64), minlength=len(uniq))
    pos = np.minimum(np.searchsorted(uniq, rows), max(len(uniq) - 1, 0))
    hit = (uniq[pos] == rows) if len(uniq) else np.zeros(len(rows), dtype=bool)
    return np.where(hit, sums[pos] if len(uniq) else 0.0, 0.0)
