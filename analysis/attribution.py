"""Exact wall-time attribution (DESIGN.md, "Attribution").

Public API (stable):

    attribute(timings) -> Attribution

    Attribution (frozen):
        categories      CATEGORIES, in priority order (index = category code)
        event_category  int8 per row of timings.events: the category that event claims (-1: none)
        graphs          structured array, one row per `graph` event: graph, rep (row in reps, -1),
                        ts_ns, wall_ns, n_tokens, n_past, <category>_ns, <category>_busy_ns
        reps            one row per test repetition: name, kind, rep, n_tokens, n_graphs,
                        ts_ns, wall_ns, <category>_ns, <category>_busy_ns
        hidden_ns       int64 [n_reps, n_categories, n_categories]: time category c was active
                        but lost to the higher category w (hidden_ns[r, c, w])
        copy_ns         {"h2d"|"d2h"|"other"|"weights": int64 array per rep}: attributed copy time by
                        direction; "weights" are op-offload uploads (host to device, not in "h2d")

`<category>_ns` of a graph sum exactly to its `wall_ns`, and of a repetition
to its `wall_ns` (time between its graphs is `other`). `<category>_busy_ns` is
the union of the time the category was active inside graphs, won or hidden.
A file without `test` events gets one implicit repetition named "run" spanning
its graphs.

How: every event claims its interval for one category (`claims`, the table of
DESIGN.md); the claims of each category are merged into a union; one sweep
over all boundaries gives each elementary segment the set of active
categories, the lowest code (highest row) wins; segments are summed per window
with `bincount`. No loop per event or per nanosecond.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.intervals import merge, window_index
from analysis.timings import Timings
from profiler.schema import CATEGORIES, EXPERT_TENSOR_MARK, GRAPH_BUILD_PHASES, MAIN_LANE, WEIGHTS_COPY
from profiler.errors import UserError

N_CAT = len(CATEGORIES)
CAT = {c: i for i, c in enumerate(CATEGORIES)}
OTHER = CAT["other"]
SCHED_PHASES = ("split_setup",)
# attributed in this order when they overlap; "weights": op-offload uploads of host weights (h2d)
COPY_DIRECTIONS = ("h2d", "d2h", "other", "weights")
# winner of a set of active categories (a bitmask over the claimable ones): its lowest bit
_WINNER = np.array([OTHER] + [(m & -m).bit_length() - 1 for m in range(1, 1 << OTHER)], dtype=np.int8)

_CAT_COLUMNS = [(f"{c}_ns", np.int64) for c in CATEGORIES] + [(f"{c}_busy_ns", np.int64) for c in CATEGORIES]
GRAPH_DTYPE = np.dtype([("graph", np.int32), ("rep", np.int32), ("ts_ns", np.int64), ("wall_ns", np.int64),
                        ("n_tokens", np.int64), ("n_past", np.int64)] + _CAT_COLUMNS)
REP_DTYPE = np.dtype([("name", "U128"), ("kind", "U8"), ("rep", np.int32), ("n_tokens", np.int64),
                      ("n_graphs", np.int64), ("ts_ns", np.int64), ("wall_ns", np.int64)] + _CAT_COLUMNS)


@dataclass(frozen=True)
class Attribution:
    categories: tuple[str, ...]
    event_category: np.ndarray
    graphs: np.ndarray
    reps: np.ndarray
    hidden_ns: np.ndarray
    copy_ns: dict


def is_cpu_backend(t: Timings, backend: np.ndarray, tid: np.ndarray) -> np.ndarray:
    """An event runs on the CPU when its backend says so; without a backend, when its lane is a CPU lane."""
    cpu_backends = t.ids(lambda s: s.upper().startswith("CPU"))
    cpu_lanes = t.ids(lambda s: s == MAIN_LANE or s.lower().startswith("cpu"))
    return np.where(backend >= 0, np.isin(backend, cpu_backends), np.isin(tid, cpu_lanes))


def claims(t: Timings) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The attribution rule: which category each event's interval claims.

    Returns the category code per event (-1: claims nothing; graph and test
    events are windows, not claims) and extra (start, end, category) claims
    that no single event carries: the join of a CPU split, from the end of its
    last op to the end of the split, is `thread_wakeup`.
    """
    ev = t.events
    cat = np.full(len(ev), -1, dtype=np.int8)
    is_op = t.of_type("op")
    on_cpu = is_cpu_backend(t, ev["backend"], ev["tid"])
    expert = np.isin(ev["name"], t.ids(lambda s: EXPERT_TENSOR_MARK in s))
    cat[is_op & on_cpu & expert] = CAT["cpu_expert_matmul"]
    cat[is_op & on_cpu & ~expert] = CAT["cpu_other"]
    cat[is_op & ~on_cpu] = CAT["gpu_compute"]
    cat[t.of_type("wakeup")] = CAT["thread_wakeup"]
    cat[t.of_type("copy")] = CAT["copy"]
    cat[t.of_type("sync")] = CAT["sync"]
    is_phase = t.of_type("phase")
    is_split = t.of_type("split")
    cat[is_split] = CAT["sched"]
    cat[is_phase & np.isin(ev["name"], t.ids(lambda s: s in SCHED_PHASES))] = CAT["sched"]
    cat[is_phase & np.isin(ev["name"], t.ids(lambda s: s in GRAPH_BUILD_PHASES))] = CAT["graph_build"]

    # join: CPU splits end when the main thread has seen the last worker finish
    cpu_split = is_split & on_cpu
    ops = is_op & on_cpu & (ev["graph"] >= 0) & (ev["split"] >= 0)
    key_ops = split_key(ev["graph"][ops], ev["split"][ops])
    key_splits = split_key(ev["graph"][cpu_split], ev["split"][cpu_split])
    order = np.argsort(key_ops, kind="stable")
    key_sorted, end_sorted = key_ops[order], (ev["ts"] + ev["dur"])[ops][order]
    heads = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]]) if key_sorted.size else np.empty(0, int)
    last_end = np.maximum.reduceat(end_sorted, heads) if heads.size else np.empty(0, np.int64)
    keys = key_sorted[heads]
    pos = np.searchsorted(keys, key_splits)
    found = (pos < keys.size) & (keys[np.minimum(pos, max(keys.size - 1, 0))] == key_splits) if keys.size else \
        np.zeros(key_splits.size, dtype=bool)
    split_start = ev["ts"][cpu_split][found]
    split_end = split_start + ev["dur"][cpu_split][found]
    join_start = np.clip(last_end[pos[found]], split_start, split_end)
    extra = (join_start, split_end, np.full(join_start.size, CAT["thread_wakeup"], dtype=np.int8))
    return cat, extra


def split_key(graph: np.ndarray, split: np.ndarray) -> np.ndarray:
    """One int64 per (graph, split): split indices restart in every graph."""
    return graph.astype(np.int64) * (1 << 31) + split.astype(np.int64)


def attribute(t: Timings) -> Attribution:
    ev = t.events
    cat, (x_start, x_end, x_cat) = claims(t)
    has = cat >= 0
    c_start = np.concatenate([ev["ts"][has], x_start])
    c_end = np.concatenate([(ev["ts"] + ev["dur"])[has], x_end])
    c_cat = np.concatenate([cat[has], x_cat])

    graph_rows = ev[t.of_type("graph")]
    g_start, g_end = graph_rows["ts"], graph_rows["ts"] + graph_rows["dur"]
    _check_disjoint(g_start, g_end, graph_rows["graph"], "graph", t.source)
    reps = _repetitions(t, graph_rows)
    r_start, r_end = reps["ts_ns"], reps["ts_ns"] + reps["wall_ns"]
    _check_disjoint(r_start, r_end, reps["rep"], "test", t.source)

    unions = [merge(c_start[c_cat == c], c_end[c_cat == c]) for c in range(OTHER)]
    copy_unions = _copy_unions(t)
    # every array here is sorted: a stable sort (timsort) merges the runs
    points = np.sort(np.concatenate([g_start, g_end, r_start, r_end] + [a for u in unions + copy_unions for a in u]),
                     kind="stable")
    points = points[np.r_[True, points[1:] != points[:-1]]] if points.size else points
    seg_start, seg_len = points[:-1], np.diff(points)
    state = _covered(points, unions + copy_unions)
    mask = state & ((1 << OTHER) - 1)
    active = [(mask & (1 << c)) != 0 for c in range(OTHER)]
    winner = _WINNER[mask].astype(np.int64)

    in_graph = window_index(seg_start, g_start, g_end)
    in_rep = window_index(seg_start, r_start, r_end)
    length = seg_len.astype(np.float64)
    winner_in_rep = np.where(in_graph >= 0, winner, OTHER)

    graphs = np.zeros(len(graph_rows), GRAPH_DTYPE)
    graphs["graph"], graphs["ts_ns"], graphs["wall_ns"] = graph_rows["graph"], g_start, graph_rows["dur"]
    graphs["n_tokens"], graphs["n_past"] = graph_rows["n_tokens"], graph_rows["n_past"]
    graphs["rep"] = window_index(g_start, r_start, r_end)
    _fill(graphs, in_graph, winner, active, length)
    _fill(reps, in_rep, winner_in_rep, [a & (in_graph >= 0) for a in active], length)

    hidden = np.zeros((len(reps), N_CAT, N_CAT), dtype=np.int64)
    for c in range(OTHER):
        lost = active[c] & (winner != c) & (in_graph >= 0) & (in_rep >= 0)
        hidden[:, c, :] = _sums(in_rep[lost] * N_CAT + winner[lost], length[lost], len(reps) * N_CAT
                                ).reshape(len(reps), N_CAT)
    copy_ns = {}
    unclaimed = (winner == CAT["copy"]) & (in_graph >= 0) & (in_rep >= 0)
    for d, direction in enumerate(COPY_DIRECTIONS):
        sel = unclaimed & ((state & (1 << (OTHER + d))) != 0)
        copy_ns[direction] = _sums(in_rep[sel], length[sel], len(reps))
        unclaimed &= ~sel
    return Attribution(categories=CATEGORIES, event_category=cat, graphs=graphs, reps=reps,
                       hidden_ns=hidden, copy_ns=copy_ns)


def _covered(points: np.ndarray, unions: list) -> np.ndarray:
    """Per segment [points[k], points[k+1]): a bit mask, bit i set when inside unions[i] (whose bounds
    are among the points). A union's intervals neither overlap nor touch, so each of its bounds is
    a distinct point: its bit flips there, and a running XOR gives every segment its state."""
    flips = np.zeros(points.size, dtype=np.int16)
    for i, (start, end) in enumerate(unions):
        bit = np.int16(1 << i)
        flips[np.searchsorted(points, start)] ^= bit
        flips[np.searchsorted(points, end)] ^= bit
    return np.bitwise_xor.accumulate(flips)[:-1]


def _fill(table: np.ndarray, window: np.ndarray, winner: np.ndarray, active: list, length: np.ndarray) -> None:
    n = len(table)
    inside = window >= 0
    won = _sums(window[inside] * N_CAT + winner[inside], length[inside], n * N_CAT).reshape(n, N_CAT)
    for c, name in enumerate(CATEGORIES):
        table[f"{name}_ns"] = won[:, c]
        sel = inside & active[c] if c < OTHER else inside & (winner == OTHER)
        table[f"{name}_busy_ns"] = _sums(window[sel], length[sel], n)


def _sums(index: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Exact integer sums per index (float64 holds integers exactly up to 2**53 ns, 104 days)."""
    return np.bincount(index, weights=weights, minlength=n)[:n].round().astype(np.int64)


def _check_disjoint(start, end, ids, what, source) -> None:
    bad = np.flatnonzero(start[1:] < end[:-1])
    if bad.size:
        i = int(bad[0])
        raise UserError(f"{source}: {what} events {ids[i]} and {ids[i + 1]} overlap in time; "
                        f"wall time cannot be attributed")


def _repetitions(t: Timings, graph_rows: np.ndarray) -> np.ndarray:
    """One row per test repetition; without test events, one implicit repetition over all graphs."""
    tests = t.tests
    if len(tests) == 0:
        reps = np.zeros(1 if len(graph_rows) else 0, REP_DTYPE)
        if len(graph_rows):
            start, end = graph_rows["ts"].min(), (graph_rows["ts"] + graph_rows["dur"]).max()
            reps[0] = ("run", "", 0, -1, 0, start, end - start) + (0,) * (2 * N_CAT)
    else:
        reps = np.zeros(len(tests), REP_DTYPE)
        labels = sweep_labels(t.header, tests["config"])
        reps["name"] = [t.sym(i) + labels.get(int(c), "") for i, c in zip(tests["name"], tests["config"])]
        reps["kind"] = [t.sym(i) for i in tests["kind"]]
        reps["rep"], reps["ts_ns"], reps["wall_ns"] = tests["rep"], tests["ts"], tests["dur"]
        reps["n_tokens"] = tests["n_tokens"]
    g_rep = window_index(graph_rows["ts"], reps["ts_ns"], reps["ts_ns"] + reps["wall_ns"])
    inside = g_rep >= 0
    reps["n_graphs"] = np.bincount(g_rep[inside], minlength=len(reps))[:len(reps)]
    graph_tokens = np.bincount(g_rep[inside], weights=np.maximum(graph_rows["n_tokens"][inside], 0),
                               minlength=len(reps))[:len(reps)].astype(np.int64)
    reps["n_tokens"] = np.where(reps["n_tokens"] >= 0, reps["n_tokens"], graph_tokens)
    return reps


# The sweep flags, as llama-bench names its columns.
SWEEP_FLAGS = {"threads": "t", "n_gpu_layers": "ngl", "overrides": "ot", "accel": "accel", "mla": "mla",
               "fa": "fa", "fmoe": "fmoe", "rtr": "rtr", "poll": "poll", "n_ubatch": "ub", "n_cpu_moe": "ncmoe",
               "no_op_offload": "nopo", "op_offload_min_batch": "offload-mb", "op_offload": "op-offload"}


def sweep_labels(header: dict, configs) -> dict:
    """{config index: " [t=2 ngl=99]"}: the flags that tell a sweep's combinations apart, so that
    the same test under two combinations is two tests. Empty when the tests used one combination."""
    used = sorted(set(int(c) for c in configs if c >= 0))
    sweep = header.get("sweep") or []
    if len(used) < 2:
        return {}
    entries = {c: sweep[c] if c < len(sweep) and isinstance(sweep[c], dict) else {} for c in used}
    varying = [k for k in dict.fromkeys(k for e in entries.values() for k in e)
               if len({repr(e.get(k)) for e in entries.values()}) > 1]
    labels = {}
    for c, e in entries.items():
        flags = [f"{SWEEP_FLAGS.get(k, k)}={';'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
                 ((k, e.get(k)) for k in varying)]
        labels[c] = f" [{' '.join(flags) or f'config {c}'}]"
    return labels


def copy_direction(t: Timings, src: np.ndarray, dst: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Index into COPY_DIRECTIONS: a weight upload (a copy of kind `weights`), else host to
    device, device to host, anything else."""
    no_lane = np.full(src.shape, -1)
    src_cpu, dst_cpu = is_cpu_backend(t, src, no_lane), is_cpu_backend(t, dst, no_lane)
    direction = np.where(src_cpu & ~dst_cpu, 0, np.where(~src_cpu & dst_cpu, 1, 2))
    weights = t.id(WEIGHTS_COPY)        # -1, as absent kinds are, when no copy is an upload
    return np.where((kind == weights) & (weights >= 0), COPY_DIRECTIONS.index("weights"), direction)


def _copy_unions(t: Timings) -> list:
    copies = t.events[t.of_type("copy")]
    direction = copy_direction(t, copies["src"], copies["dst"], copies["kind"])
    end = copies["ts"] + copies["dur"]
    return [merge(copies["ts"][direction == d], end[direction == d]) for d in range(len(COPY_DIRECTIONS))]
