"""The event recorder: per-lane buffers that the hot path only appends to.

Call sites guard with one branch, `if rec.enabled: lane.op(...)`, so a disabled
recorder costs nothing else. Timestamps are `perf_counter_ns()` relative to the
recorder's start (`rec.now()`); a lane belongs to one thread (main, cpu1, ...,
or a device lane such as CUDA0 / ACC0). `drain()` hands back every event
recorded so far, merged in time order, as contract-v1 dicts for a sink.

API (stable; the internals may change):
    rec = Recorder(enabled=True, print_timing=None); lane = rec.lane("main")
    lane.op(ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens)
    lane.copy(ts, dur, graph, split, src, dst, nbytes, name, kind)   # kind None: activations
    lane.split(ts, dur, graph, split, backend, n_nodes, n_inputs)
    lane.wakeup(ts, dur, graph, split, backend)
    lane.sync(ts, dur, graph, split, backend)
    lane.phase(ts, dur, graph, name)
    lane.graph(ts, dur, graph, test, n_tokens, n_past)
    lane.test(ts, dur, fields)            # rare: one per test repetition
    lane.route(ts, dur, graph, layer, n_tokens, experts)   # experts: int array [n_tokens * n_expert_used]
    pool_op(lanes, times, t0, ts, ...)    # an op a worker pool shared, as events on its lanes
    rec.next_graph() -> int               # a graph id unique over the recorder's life
    rec.drain() -> list[dict]
    rec.drain_batches() -> list[Batch]    # the same as recorded, per lane, for the timings writer
    rec.discard()                         # forget what was recorded (warm-up runs)

Why it looks like this: recording must cost well under a microsecond per event
(benchmarks/bench_recorder.py measures it), so recording is one native append of
the event's values to its lane (profiler/_lanes.c): no dict, no lock. Turning
them into dicts or JSON lines, and sorting them, is paid at the drain, once per
graph, between graphs (where a report counts it as `other`).

`drain()` must be called while the lanes are quiet (between graphs): lanes take
no lock, one thread appends to each.
"""

from __future__ import annotations

import os
import threading
import time
from itertools import count
from operator import itemgetter

import numpy as np
import orjson

from profiler import _lanes

# Per event type, the columns a lane stores, in the order the lane method takes them.
# Names are the contract-v1 field names (profiler/schema.py), except `nbytes` -> `bytes`.
COLUMNS = {
    "op": ("ts", "dur", "graph", "split", "backend", "op", "name", "layer", "bytes", "flops",
           "n_tokens"),
    "copy": ("ts", "dur", "graph", "split", "src", "dst", "bytes", "name", "kind"),
    "split": ("ts", "dur", "graph", "split", "backend", "n_nodes", "n_inputs"),
    "wakeup": ("ts", "dur", "graph", "split", "backend"),
    "sync": ("ts", "dur", "graph", "split", "backend"),
    "phase": ("ts", "dur", "graph", "name"),
    "graph": ("ts", "dur", "graph", "test", "n_tokens", "n_past"),
    "test": ("ts", "dur", "fields"),
    "route": ("ts", "dur", "graph", "layer", "n_tokens", "experts"),
}

OPTIONAL_FIELDS = ("graph", "split", "backend", "kind")     # fields that may not apply (a copy's kind:
                                                            # None for activations, the default)
STRING_FIELDS = frozenset({"backend", "op", "name", "src", "dst", "test", "kind"})   # the rest count something
OBJECT_FIELDS = frozenset({("test", "fields"), ("route", "experts")})    # kept as given, written by orjson


def _line_fields(kind: str) -> tuple:
    """What a line of this event type has before each value, and how the value is written
    (profiler/_lanes.c): the type first, then the values, as `event_dict` orders them."""
    names = COLUMNS[kind]
    prefixes = [b'{"type":' + orjson.dumps(kind) + b","] + [b","] * (len(names) - 1)
    return tuple((prefix + orjson.dumps(name) + b":",
                  (_lanes.OBJECT if (kind, name) in OBJECT_FIELDS else
                   _lanes.STR if name in STRING_FIELDS else 0)
                  | (_lanes.OPTIONAL if name in OPTIONAL_FIELDS else 0))
                 for prefix, name in zip(prefixes, names))


_lanes.configure(tuple((kind, _line_fields(kind)) for kind in COLUMNS))

# One thread's events: `lane.op(...)` etc. append one completed event, in `COLUMNS` order, as
# 64-bit cells with interned strings; `take()` hands them on as a `Batch` (profiler/_lanes.c).
# Measured here: ~0.13 us per event warm, as the tuple per event it replaced; the drain and the
# timings writer then read contiguous cells, not a tuple and an int object per value.
Lane = _lanes.Lane
Batch = _lanes.Batch

# pool_op(lanes, times, t0, ts, graph, split, backend, op, name, layer, nbytes, flops, n_tokens):
# an op shared by a CPU worker pool, as an op event on each lane whose thread ran chunks of it
# (times: int64 [len(lanes), 3], per thread its first claim, end, and chunks run, in ns of the
# clock whose t0 is given), with its share of nbytes and flops (chunks it ran / all chunks,
# rounded down), so that the lanes add up to the op; lane 0 (the caller's) from ts, the op's
# start, the others from their first chunk. One native call: made in Python after each op,
# these events cost ~5 us of cold Python per op, a third of the scheduler's time in tg.
pool_op = _lanes.pool_op


def event_dict(kind: str, tid: str, values: tuple) -> dict:
    """One event as its contract-v1 dict: an optional common field (`graph`, `split`, `backend`)
    that is None does not apply and is left out; a `dur` below zero is written as 0; a route's
    experts are a list."""
    if kind == "test":
        ts, dur, fields = values
        return {"type": "test", "ts": int(ts), "dur": max(int(dur), 0), "tid": tid, **fields}
    ev = {"type": kind, "ts": int(values[0]), "dur": max(int(values[1]), 0)}
    for name, value in zip(COLUMNS[kind][2:], values[2:]):
        if value is not None or name not in OPTIONAL_FIELDS:
            ev[name] = value
    if kind == "route":                 # the ids as recorded (a NumPy array) -> a JSON list
        ev["experts"] = np.asarray(ev["experts"]).tolist()
    ev["tid"] = tid
    return ev


def dicts_in_time_order(batches: list[Batch]) -> list[dict]:
    """The batches' events as contract-v1 dicts, by ts, an outer event before the events
    it contains (the longer first at one ts), then in batch and recording order."""
    out = [event_dict(kind, batch.tid, values) for batch in batches for kind, values in batch.rows()]
    out.sort(key=itemgetter("dur"), reverse=True)    # stable: by ts, then longest first
    out.sort(key=itemgetter("ts"))
    return out


class Recorder:
    """Owns the lanes and the run's clock; `drain()` merges what the lanes hold.

    `print_timing` (default: the HYPROF_PRINT_TIMING=1 environment variable) also
    prints every event on stderr as it is recorded, and turns recording on.
    """

    def __init__(self, enabled: bool = True, print_timing: bool | None = None):
        if print_timing is None:
            print_timing = os.environ.get("HYPROF_PRINT_TIMING", "0") not in ("", "0")
        self.print_timing = print_timing
        self.enabled = enabled or print_timing
        self.t0 = time.perf_counter_ns()
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()
        self._graph_ids = count()

    def now(self) -> int:
        return time.perf_counter_ns() - self.t0

    def next_graph(self) -> int:
        """The id of the next graph. Every engine of a run shares the recorder, so ids
        taken here stay unique in the timings file across a sweep."""
        return next(self._graph_ids)

    def lane(self, tid: str) -> Lane:
        with self._lock:
            lane = self._lanes.get(tid)
            if lane is None:
                if self.print_timing:
                    from profiler.sinks import PrintingLane
                    lane = PrintingLane(tid)
                else:
                    lane = Lane(tid)
                self._lanes[tid] = lane
            return lane

    def drain(self) -> list[dict]:
        """Every event recorded since the last drain, as contract-v1 dicts in time order
        (outer events before the events they contain)."""
        return dicts_in_time_order(self.drain_batches())

    def drain_batches(self) -> list[Batch]:
        """Every event recorded since the last drain, one batch per lane that has any (the
        timings writer turns them into lines without making a dict per event)."""
        return [batch for batch in map(Lane.take, self._all_lanes()) if batch is not None]

    def discard(self) -> None:
        """Forget every event recorded since the last drain (warm-up runs)."""
        for lane in self._all_lanes():
            lane.clear()

    def _all_lanes(self) -> list[Lane]:
        with self._lock:
            return list(self._lanes.values())
