"""The raw timeline as a Chrome trace (Trace Event Format), for Perfetto UI and chrome://tracing.

Public API (stable):

    write_trace(timings, attribution, path, graphs=None, force=False) -> TraceSummary
        Stream the trace into `path` (atomically). `graphs`: (first, end) graph ids, a
        window of a long run (either may be None: open), as parsed by parse_graphs.
    trace_events(timings, attribution, graphs=None) -> (iterator of event dicts, TraceSummary)
    parse_graphs(text) -> (first | None, end | None)      "A:B", "A:", ":B" (end exclusive)
    TraceSummary (frozen): n_complete, n_flows, n_counters, n_overlap_moved, graphs (first, last id)

What the file holds (JSON object; `displayTimeUnit` comes before `traceEvents`,
because Perfetto reads it only from the start of the file):
- `M` metadata: process "host" with one thread per host lane (main, splits,
  cpu1.., copies) and one process per device (CUDA0, ACC0) with its stream;
- `X` complete events in microseconds, one per test, graph, split, phase, op,
  copy, wakeup and sync, `cat` = the attribution category the event claims;
- flow events (`s` on the copy, `f` bound to the enclosing split) linking each
  copy to the split that consumes it;
- `C` counters: bytes read per ns (GB/s) per backend, and copy GB/s.

Complete events on one lane must nest, or Perfetto moves them to an overflow
track without saying why; an event that overlaps its neighbour only in part
(device clocks mapped onto the host, say) goes to a lane "<lane> (overlap)"
of its own, and the summary counts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import orjson

from analysis.attribution import Attribution, split_key
from analysis.timeline import COPIES_LANE, draw_category, event_lanes
from analysis.timings import Timings
from profiler.errors import UserError
from profiler.files import atomic_output, check_output_path
from profiler.schema import CATEGORIES, EVENT_TYPES, WEIGHTS_COPY

HOST_PID = 1
US = 1000.0                       # ns per µs: the format's time unit
CHUNK = 1 << 16


@dataclass(frozen=True)
class TraceSummary:
    n_complete: int
    n_flows: int
    n_counters: int
    n_overlap_moved: int
    graphs: tuple


def parse_graphs(text: str) -> tuple[int | None, int | None]:
    first, sep, end = text.partition(":")
    try:
        lo = int(first) if first.strip() else None
        hi = int(end) if end.strip() else None
    except ValueError:
        lo = hi = -1
    if not sep or lo == -1 or (lo is not None and hi is not None and hi <= lo):
        raise UserError(f"--graphs {text}: expected A:B (graph ids A <= id < B; A: or :B leave an end open)")
    return lo, hi


def _window(t: Timings, graphs: tuple | None) -> tuple[np.ndarray, tuple]:
    """Which events fall in the graph window: by graph id, else (no id) by time."""
    ev = t.events
    is_graph = t.of_type("graph")
    ids = ev["graph"][is_graph]
    if graphs is None or ids.size == 0:
        shown = ids
        keep = np.ones(len(ev), dtype=bool)
    else:
        lo, hi = graphs
        chosen = (ids >= (lo if lo is not None else ids.min())) & (ids < (hi if hi is not None else ids.max() + 1))
        if not chosen.any():
            span = f"{lo if lo is not None else ''}:{hi if hi is not None else ''}"
            raise UserError(f"--graphs {span}: no graph of {t.source} in that window "
                            f"(its graphs are {ids.min()}..{ids.max()})")
        shown = ids[chosen]
        g = ev[is_graph][chosen]
        start, end = g["ts"].min(), (g["ts"] + g["dur"]).max()
        overlaps = (ev["ts"] < end) & ((ev["ts"] + ev["dur"] > start) | (ev["ts"] >= start))
        keep = np.where(ev["graph"] >= 0, np.isin(ev["graph"], shown), overlaps)
    return keep, ((int(shown.min()), int(shown.max())) if shown.size else ())


def _nest(lane: np.ndarray, start: np.ndarray, end: np.ndarray, n_lanes: int) -> np.ndarray:
    """Lane per event such that the events of every lane nest; partial overlaps move to lane + n_lanes."""
    out = lane.copy()
    order = np.lexsort((-end, start, lane))
    stack_lane, stack = -1, []
    for i in order.tolist():
        if lane[i] != stack_lane:
            stack_lane, stack = lane[i], []
        s, e = start[i], end[i]
        while stack and stack[-1] <= s:
            stack.pop()
        if stack and e > stack[-1]:
            out[i] = lane[i] + n_lanes          # starts inside the open event, ends after it
        else:
            stack.append(e)
    return out


def trace_events(t: Timings, a: Attribution, graphs: tuple | None = None) -> tuple[Iterator[dict], TraceSummary]:
    ev = t.events
    lanes = event_lanes(t)
    keep, shown = _window(t, graphs)
    n_lanes = len(lanes.names)
    start, end = ev["ts"], ev["ts"] + ev["dur"]
    lane = np.where(keep, lanes.of_event, -1)
    nested = _nest(lane[keep], start[keep], end[keep], n_lanes)
    lane[keep] = nested
    moved = int((nested >= n_lanes).sum())

    # processes: the host and one per device lane; threads numbered within their process
    pid_of, tid_of, meta = _threads(lanes, np.unique(nested))
    cat = draw_category(t, a)
    sel = np.flatnonzero(keep)
    flows = _flows(t, lane, sel)
    counters = _counters(t, keep, lanes, pid_of)
    summary = TraceSummary(n_complete=int(sel.size), n_flows=len(flows), n_counters=sum(c[2].size for c in counters),
                           n_overlap_moved=moved, graphs=shown)

    def events() -> Iterator[dict]:
        yield from meta
        yield from _complete(t, sel, lane, cat, pid_of, tid_of)
        for k, (copy_i, split_i, f_ts) in enumerate(flows):
            base = {"name": "copy → split", "cat": "copy", "id": k}
            yield {**base, "ph": "s", "ts": float(start[copy_i] + ev["dur"][copy_i] / 2) / US,
                   "pid": pid_of[int(lane[copy_i])], "tid": tid_of[int(lane[copy_i])]}
            yield {**base, "ph": "f", "bp": "e", "ts": f_ts / US, "pid": pid_of[int(lane[split_i])],
                   "tid": tid_of[int(lane[split_i])]}
        yield from _counter_events(counters)

    return events(), summary


def _threads(lanes, used: np.ndarray) -> tuple[dict, dict, list]:
    n = len(lanes.names)
    pid_of, tid_of, meta = {}, {}, [
        {"ph": "M", "name": "process_name", "pid": HOST_PID, "tid": 0, "args": {"name": "host"}},
        {"ph": "M", "name": "process_sort_index", "pid": HOST_PID, "tid": 0, "args": {"sort_index": 0}}]
    device_pid = {}
    for k in sorted(used.tolist(), key=lambda k: (k % n, k)):
        base = k % n
        name = lanes.names[base] + (" (overlap)" if k >= n else "")
        if lanes.is_device[base]:
            device = lanes.names[base]
            if device not in device_pid:
                device_pid[device] = HOST_PID + 1 + len(device_pid)
                meta += [{"ph": "M", "name": "process_name", "pid": device_pid[device], "tid": 0,
                          "args": {"name": f"{device} (device)"}},
                         {"ph": "M", "name": "process_sort_index", "pid": device_pid[device], "tid": 0,
                          "args": {"sort_index": device_pid[device]}}]
            pid = device_pid[device]
            name = f"{name} stream" if k < n else name
        else:
            pid = HOST_PID
        pid_of[k], tid_of[k] = pid, k + 1
        meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": k + 1, "args": {"name": name}},
                 {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": k + 1, "args": {"sort_index": k + 1}}]
    return pid_of, tid_of, meta


def _complete(t: Timings, sel: np.ndarray, lane: np.ndarray, cat: np.ndarray, pid_of: dict,
              tid_of: dict) -> Iterator[dict]:
    test_rep = dict(zip(t.tests["ts"].tolist(), t.tests["rep"].tolist()))
    symbols = t.symbols + ("",)                       # id -1 (absent) reads as ""
    for first in range(0, len(sel), CHUNK):          # Python values for one chunk at a time: bounded memory
        rows = sel[first:first + CHUNK]
        ev = t.events[rows]
        c = {f: ev[f].tolist() for f in ev.dtype.names}
        lanes, cats = lane[rows].tolist(), cat[rows].tolist()
        for i in range(len(rows)):
            kind = EVENT_TYPES[c["type"][i]]
            name, args = _describe(kind, c, i, symbols, test_rep)
            if c["graph"][i] >= 0:
                args["graph"] = c["graph"][i]
            if c["split"][i] >= 0:
                args["split"] = c["split"][i]
            yield {"ph": "X", "name": name, "cat": CATEGORIES[cats[i]] if cats[i] >= 0 else kind,
                   "ts": c["ts"][i] / US, "dur": c["dur"][i] / US, "pid": pid_of[lanes[i]], "tid": tid_of[lanes[i]],
                   "args": args}


def _describe(kind: str, c: dict, i: int, sym: tuple, test_rep: dict) -> tuple[str, dict]:
    """The name shown on an event's slice and its args (the fields a reader clicks for)."""
    if kind == "op":
        args = {"tensor": sym[c["name"][i]], "backend": sym[c["backend"][i]], "layer": c["layer"][i],
                "bytes": c["bytes"][i], "n_tokens": c["n_tokens"][i]}
        return sym[c["op"][i]] or sym[c["name"][i]] or "op", args
    if kind == "copy":       # an op-offload upload (kind `weights`) says so
        src, dst = sym[c["src"][i]], sym[c["dst"][i]]
        what = "upload" if sym[c["kind"][i]] == WEIGHTS_COPY else "copy"
        return f"{what} {src}→{dst}", {"tensor": sym[c["name"][i]], "src": src, "dst": dst, "bytes": c["bytes"][i]}
    if kind == "split":
        backend = sym[c["backend"][i]]
        return f"split {c['split'][i]}: {backend}", {"backend": backend, "n_nodes": c["n_nodes"][i],
                                                       "n_inputs": c["n_inputs"][i]}
    if kind == "graph":
        return f"graph {c['graph'][i]}", {"n_tokens": c["n_tokens"][i], "n_past": c["n_past"][i]}
    if kind == "test":
        rep = test_rep.get(c["ts"][i], -1)
        name = sym[c["name"][i]]
        return (f"{name} rep {rep}" if rep >= 0 else name), {"n_tokens": c["n_tokens"][i], "rep": rep}
    if kind in ("sync", "wakeup"):
        backend = sym[c["backend"][i]]
        return f"{kind} {backend}".strip(), {"backend": backend}
    return sym[c["name"][i]] or kind, {}


def _flows(t: Timings, lane: np.ndarray, sel: np.ndarray) -> list[tuple[int, int, int]]:
    """(copy row, split row, time to bind in the split) for each shown copy whose split is shown."""
    ev = t.events
    shown = np.zeros(len(ev), dtype=bool)
    shown[sel] = True
    copies = np.flatnonzero(shown & (t.of_type("copy")) & (ev["split"] >= 0))
    splits = np.flatnonzero(shown & (t.of_type("split")))
    split_keys = split_key(ev["graph"][splits], ev["split"][splits])
    copy_keys = split_key(ev["graph"][copies], ev["split"][copies])
    order = np.argsort(split_keys, kind="stable")
    pos = np.searchsorted(split_keys[order], copy_keys)
    out = []
    for ci, ck, p in zip(copies.tolist(), copy_keys.tolist(), pos.tolist()):
        if p < splits.size and split_keys[order[p]] == ck:
            si = int(splits[order[p]])
            s0, s1 = int(ev["ts"][si]), int(ev["ts"][si] + ev["dur"][si])
            bind = min(max(int(ev["ts"][ci] + ev["dur"][ci]), s0), max(s1 - 1, s0))
            out.append((ci, si, bind))
    return out


def _counters(t: Timings, keep: np.ndarray, lanes, pid_of: dict) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """Bandwidth over time, (track name, pid, ts, GB/s) per track: the bytes per ns of every running
    op (copy), summed per backend, one value per instant at which it changes."""
    ev = t.events
    tracks = []
    lane_index = {name: k for k, name in enumerate(lanes.names)}
    for kind, track in (("op", "read GB/s"), ("copy", "copy GB/s")):
        sel = keep & (t.of_type(kind)) & (ev["bytes"] > 0) & (ev["dur"] > 0)
        group = ev["backend"][sel] if kind == "op" else np.zeros(sel.sum(), dtype=np.int32)
        for g in np.unique(group).tolist():
            rows = ev[sel][group == g]
            name = t.sym(g) if kind == "op" else COPIES_LANE
            k = lane_index.get(name)
            pid = pid_of.get(k, HOST_PID) if k is not None and lanes.is_device[k] else HOST_PID
            rate = rows["bytes"] / rows["dur"]
            ts = np.concatenate([rows["ts"], rows["ts"] + rows["dur"]])
            step = np.concatenate([rate, -rate])
            order = np.argsort(ts, kind="stable")
            ts, level = ts[order], np.cumsum(step[order])
            last = np.r_[ts[1:] != ts[:-1], True]          # one value per instant: the level after it
            tracks.append((f"{track} {name}" if kind == "op" else track, pid, ts[last],
                           np.maximum(level[last], 0).round(6)))
    return tracks


def _counter_events(tracks) -> Iterator[dict]:
    for name, pid, ts, level in tracks:
        for x, v in zip(ts.tolist(), level.tolist()):
            yield {"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": x / US, "args": {"GB/s": v}}


def write_trace(t: Timings, a: Attribution, path: str | os.PathLike, graphs: tuple | None = None,
                force: bool = False) -> TraceSummary:
    check_output_path(path, force=force)
    events, summary = trace_events(t, a, graphs)
    head = {"displayTimeUnit": "ns",
            "otherData": {"source": t.source, "tool": "hyprof trace", "model": t.header.get("model"),
                          "config": t.header.get("config"), "machine": t.header.get("machine")}}
    with atomic_output(path, "wb", force=force) as f:
        f.write(orjson.dumps(head)[:-1] + b',"traceEvents":[\n')
        dumps, write = orjson.dumps, f.write
        write(dumps(next(events)))                    # there is always metadata: the host process
        for e in events:
            write(b",\n")
            write(dumps(e))
        write(b"\n]}\n")
    return summary
