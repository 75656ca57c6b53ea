"""Where each event is drawn: lanes (host threads, devices, splits, copies) and one representative token.

Public API (stable):

    event_lanes(timings) -> Lanes
        The lane of every event, shared by the Gantt chart and the Chrome trace so
        that both pictures of a run put the same event in the same place.
    draw_category(timings, attribution) -> int8 per event
        The category an event is drawn in: the one it claims in the attribution,
        `other` for host phases that claim nothing (sampling), -1 for windows
        (test, graph, split events).
    token_timeline(timings, attribution, test=None) -> TokenTimeline | None
        The events of one representative token: the graph of median wall time of
        a tg test (the first, or `test`), else of the first test with graphs.

    Lanes (frozen): names (display order), is_device (per lane), of_event (lane index per event)
    TokenTimeline (frozen): test, graph, n_tokens, n_past, wall_ns, n_candidates (graphs the median
        was taken over), lanes, is_device, bars (BAR_DTYPE: lane, start_ns and dur_ns relative to
        the graph start, category, type, label), splits (SPLIT_DTYPE: start_ns, dur_ns, split, backend)

Lanes: `main` and the CPU worker lanes (`cpu1`, ...) are host threads; a lane
named after an accelerator (`CUDA0`, `ACC0`) is that device's stream. Split
events get a lane of their own (`splits`): they span the sync, copies and
phases of the main thread, so drawn there they would hide them and would not
nest. Copies get `copies`, the lane that shows the link busy while the
GPU or the CPU waits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from analysis.attribution import CAT, Attribution
from analysis.timings import Timings
from profiler.schema import EVENT_TYPES, MAIN_LANE

SPLITS_LANE = "splits"
COPIES_LANE = "copies"
WINDOW_TYPES = ("test", "graph", "split")

BAR_DTYPE = np.dtype([("lane", np.int32), ("start_ns", np.int64), ("dur_ns", np.int64), ("category", np.int8),
                      ("type", "U8"), ("label", "U64")])
SPLIT_DTYPE = np.dtype([("start_ns", np.int64), ("dur_ns", np.int64), ("split", np.int32), ("backend", "U16")])


@dataclass(frozen=True)
class Lanes:
    names: tuple[str, ...]
    is_device: tuple[bool, ...]
    of_event: np.ndarray


@dataclass(frozen=True)
class TokenTimeline:
    test: str
    graph: int
    n_tokens: int
    n_past: int
    wall_ns: int
    n_candidates: int
    lanes: tuple[str, ...]
    is_device: tuple[bool, ...]
    bars: np.ndarray
    splits: np.ndarray


def _is_host_lane(name: str) -> bool:
    return name in (MAIN_LANE, SPLITS_LANE, COPIES_LANE) or name.lower().startswith("cpu")


def _lane_order(name: str) -> tuple:
    """main, splits, cpu1, cpu2, ..., cpu10 (numbers compared as numbers), devices, copies."""
    rank = {MAIN_LANE: 0, SPLITS_LANE: 1, COPIES_LANE: 4}.get(name, 2 if _is_host_lane(name) else 3)
    return (rank,) + tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def event_lanes(t: Timings) -> Lanes:
    ev = t.events
    tid = ev["tid"].copy()
    main = t.id(MAIN_LANE)
    symbols = list(t.symbols)
    extra = {}

    def lane_id(name: str) -> int:
        i = t.id(name)
        if i < 0:
            i = extra.setdefault(name, len(symbols) + len(extra))
        return i

    # host-thread events without a tid ran on the main thread; ops without one, on their backend's lane
    no_tid = tid < 0
    is_op = t.of_type("op")
    tid[no_tid & is_op] = ev["backend"][no_tid & is_op]
    tid[no_tid & ~is_op] = main if main >= 0 else lane_id(MAIN_LANE)
    tid[t.of_type("split")] = lane_id(SPLITS_LANE)
    tid[t.of_type("copy")] = lane_id(COPIES_LANE)
    tid[tid < 0] = lane_id(MAIN_LANE)          # an op with neither tid nor backend
    symbols += list(extra)

    used = np.unique(tid)
    names = sorted((symbols[i] for i in used), key=_lane_order)
    index = np.full(len(symbols), -1, dtype=np.int32)
    for k, name in enumerate(names):
        index[symbols.index(name)] = k
    return Lanes(names=tuple(names), is_device=tuple(not _is_host_lane(n) for n in names),
                 of_event=index[tid] if len(tid) else np.empty(0, np.int32))


def draw_category(t: Timings, a: Attribution) -> np.ndarray:
    cat = a.event_category.copy()
    cat[(t.of_type("phase")) & (cat < 0)] = CAT["other"]
    for name in WINDOW_TYPES:
        cat[t.of_type(name)] = -1
    return cat


def representative_graph(a: Attribution, test: str | None = None) -> tuple[str, int, int] | None:
    """(test name, row in a.graphs, number of graphs considered): the median-wall graph of a tg test."""
    names = [str(n) for n in a.reps["name"]]
    kinds = dict(zip(names, (str(k) for k in a.reps["kind"])))
    with_graphs = [n for n in dict.fromkeys(names) if np.isin(a.graphs["rep"], _rows_of(a, n)).any()]
    if test is None:
        tg = [n for n in with_graphs if kinds[n] == "tg"]
        test = (tg or with_graphs or [None])[0]
    if test is None:
        return None
    rows = np.flatnonzero(np.isin(a.graphs["rep"], _rows_of(a, test)))
    if rows.size == 0:
        return None
    order = np.argsort(a.graphs["wall_ns"][rows], kind="stable")
    return test, int(rows[order[(rows.size - 1) // 2]]), int(rows.size)


def _rows_of(a: Attribution, test: str) -> np.ndarray:
    return np.flatnonzero(a.reps["name"] == test)


def token_timeline(t: Timings, a: Attribution, test: str | None = None) -> TokenTimeline | None:
    chosen = representative_graph(a, test)
    if chosen is None:
        return None
    name, row, n_candidates = chosen
    g = a.graphs[row]
    start, end = int(g["ts_ns"]), int(g["ts_ns"] + g["wall_ns"])
    ev = t.events
    lanes = event_lanes(t)
    # events of this graph by id; events without one (a phase between splits) by time
    mine = np.where(ev["graph"] >= 0, ev["graph"] == g["graph"], (ev["ts"] >= start) & (ev["ts"] < end))
    typ = ev["type"]
    is_split = mine & (t.of_type("split"))
    drawn = mine & ~np.isin(typ, [t.type_code(w) for w in WINDOW_TYPES])

    cat = draw_category(t, a)[drawn]
    sel = ev[drawn]
    used = np.unique(lanes.of_event[drawn])
    remap = np.full(len(lanes.names), -1, dtype=np.int32)
    remap[used] = np.arange(used.size)
    bars = np.zeros(len(sel), BAR_DTYPE)
    bars["lane"] = remap[lanes.of_event[drawn]]
    bars["start_ns"], bars["dur_ns"], bars["category"] = sel["ts"] - start, sel["dur"], cat
    bars["type"] = [EVENT_TYPES[c] for c in sel["type"]]
    bars["label"] = [t.sym(int(o)) or t.sym(int(n)) for o, n in zip(sel["op"], sel["name"])]

    sp = ev[is_split]
    splits = np.zeros(len(sp), SPLIT_DTYPE)
    splits["start_ns"], splits["dur_ns"], splits["split"] = sp["ts"] - start, sp["dur"], sp["split"]
    splits["backend"] = [t.sym(int(b)) for b in sp["backend"]]
    return TokenTimeline(test=name, graph=int(g["graph"]), n_tokens=int(g["n_tokens"]), n_past=int(g["n_past"]),
                         wall_ns=int(g["wall_ns"]), n_candidates=n_candidates,
                         lanes=tuple(lanes.names[i] for i in used),
                         is_device=tuple(lanes.is_device[i] for i in used), bars=bars, splits=splits)
