"""The event recorder: per-lane buffers that the hot path only appends to.

Call sites guard with one branch, `if rec.enabled: lane.op(...)`, so a disabled
recorder costs nothing else. Timestamps are `perf_counter_ns()` relative to the
recorder's start (`rec.now()`); a lane belongs to one thread (main, cpu1, ...,
or a device lane such as CUDA0 / ACC0). `drain()` hands back every event
recorded so far, merged in time order, as contract-v1 dicts for a sink.

API (stable; the internals may change):
    rec = Recorder(enabled=True, print_timing=None); lane = rec.lane("main")
    lane.op(ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens)
    lane.copy(ts, dur, graph, split, src, dst, nbytes, name)
    lane.split(ts, dur, graph, split, backend, n_nodes, n_inputs)
    lane.wakeup(ts, dur, graph, split, backend)
    lane.sync(ts, dur, graph, split, backend)
    lane.phase(ts, dur, graph, name)
    lane.graph(ts, dur, graph, test, n_tokens, n_past)
    lane.test(ts, dur, fields)            # rare: one per test repetition
    rec.next_graph() -> int               # a graph id unique over the recorder's life
    rec.drain() -> list[dict]
    rec.drain_tables() -> list[EventTable]   # the same as rows per lane and type, for the timings writer
    rec.discard()                         # forget what was recorded (warm-up runs)
    rec.on_drain(hook)                    # hook() records buffered measurements at each drain

Why it looks like this: recording must cost well under a microsecond per event
(benchmarks/bench_recorder.py measures it), so recording is one append of a
tuple to the lane's list for that event type: no dict, no lookup, no lock.
Turning the rows into dicts or JSON lines, and sorting them, is paid at the
drain, once per graph, between graphs (where a report counts it as `other`).

`drain()` must be called while the lanes are quiet (between graphs): lanes take
no lock, one thread appends to each.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from itertools import count
from operator import itemgetter

# Per event type, the columns a lane stores, in the order the lane method takes them.
# Names are the contract-v1 field names (profiler/schema.py), except `nbytes` -> `bytes`.
COLUMNS = {
    "op": ("ts", "dur", "graph", "split", "backend", "op", "name", "layer", "bytes", "flops",
           "n_tokens"),
    "copy": ("ts", "dur", "graph", "split", "src", "dst", "bytes", "name"),
    "split": ("ts", "dur", "graph", "split", "backend", "n_nodes", "n_inputs"),
    "wakeup": ("ts", "dur", "graph", "split", "backend"),
    "sync": ("ts", "dur", "graph", "split", "backend"),
    "phase": ("ts", "dur", "graph", "name"),
    "graph": ("ts", "dur", "graph", "test", "n_tokens", "n_past"),
    "test": ("ts", "dur", "fields"),
}

OPTIONAL_FIELDS = ("graph", "split", "backend")     # common fields that may not apply
_SLOTS = tuple((kind, f"_{kind}") for kind in COLUMNS)   # each type's list in a Lane


class Lane:
    """One thread's event buffers: per event type, a list of row tuples.

    Each method appends one completed event as a tuple in `COLUMNS` order, and the
    drain hands the lists on as they are. Measured here, this costs about
    half of storing each field into preallocated column lists (0.11 vs 0.23 us per
    event with warm caches, 0.7 vs 1.3 us right after a matmul has evicted them:
    one fresh tuple touches fewer cache lines than eleven columns).
    """

    __slots__ = ("tid", "_op", "_copy", "_split", "_wakeup", "_sync", "_phase", "_graph",
                 "_test")

    def __init__(self, tid: str):
        self.tid = tid
        self._op: list[tuple] = []
        self._copy: list[tuple] = []
        self._split: list[tuple] = []
        self._wakeup: list[tuple] = []
        self._sync: list[tuple] = []
        self._phase: list[tuple] = []
        self._graph: list[tuple] = []
        self._test: list[tuple] = []

    def op(self, ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens):
        self._op.append((ts, dur, graph, split, backend, op, name, layer, nbytes, flops,
                         n_tokens))

    def copy(self, ts, dur, graph, split, src, dst, nbytes, name):
        self._copy.append((ts, dur, graph, split, src, dst, nbytes, name))

    def split(self, ts, dur, graph, split, backend, n_nodes, n_inputs):
        self._split.append((ts, dur, graph, split, backend, n_nodes, n_inputs))

    def wakeup(self, ts, dur, graph, split, backend):
        self._wakeup.append((ts, dur, graph, split, backend))

    def sync(self, ts, dur, graph, split, backend):
        self._sync.append((ts, dur, graph, split, backend))

    def phase(self, ts, dur, graph, name):
        self._phase.append((ts, dur, graph, name))

    def graph(self, ts, dur, graph, test, n_tokens, n_past):
        self._graph.append((ts, dur, graph, test, n_tokens, n_past))

    def test(self, ts, dur, fields: dict):
        self._test.append((ts, dur, dict(fields)))

    def take(self) -> list["EventTable"]:
        """This lane's events since the last take, one table per event type; the lane
        starts empty again."""
        tables = []
        for kind, slot in _SLOTS:
            rows = getattr(self, slot)
            if rows:
                setattr(self, slot, [])
                tables.append(EventTable(kind, self.tid, rows))
        return tables

    def clear(self) -> None:
        for _, slot in _SLOTS:
            setattr(self, slot, [])


@dataclass(frozen=True, slots=True)
class EventTable:
    """One lane's events of one type, as the rows the lane recorded (values in
    `COLUMNS[kind]` order): what a drain hands to the sinks, which format them.

    An optional common field (`graph`, `split`, `backend`) that is None does not
    apply to that event and is left out of it; a `dur` below zero is written as 0.
    """

    kind: str
    tid: str
    rows: list[tuple]

    def to_dicts(self) -> list[dict]:
        """The events as contract-v1 dicts (unsorted)."""
        if self.kind == "test":
            return [{"type": "test", "ts": int(t), "dur": max(int(d), 0), "tid": self.tid, **f}
                    for t, d, f in self.rows]
        names = COLUMNS[self.kind]
        events = []
        for row in self.rows:
            ev = {"type": self.kind, "ts": int(row[0]), "dur": max(int(row[1]), 0)}
            for name, value in zip(names[2:], row[2:]):
                if value is not None or name not in OPTIONAL_FIELDS:
                    ev[name] = value
            ev["tid"] = self.tid
            events.append(ev)
        return events


def dicts_in_time_order(tables: list[EventTable]) -> list[dict]:
    """The tables' events as contract-v1 dicts, by ts, an outer event before the events
    it contains (the longer first at one ts)."""
    out = [ev for table in tables for ev in table.to_dicts()]
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
        self._drain_hooks: list = []

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

    def on_drain(self, hook, remove: bool = False) -> None:
        """Call `hook()` at the start of every drain (and discard): a producer that keeps
        what it measured in its own form during a graph (the CPU backend: each pool op's
        per-thread times) records it as events then, off the hot path. `remove` forgets it."""
        with self._lock:
            if remove:
                self._drain_hooks.remove(hook)
            else:
                self._drain_hooks.append(hook)

    def _lanes_after_hooks(self) -> list[Lane]:
        with self._lock:
            hooks = list(self._drain_hooks)
        for hook in hooks:
            hook()
        with self._lock:
            return list(self._lanes.values())

    def drain(self) -> list[dict]:
        """Every event recorded since the last drain, as contract-v1 dicts in time order
        (outer events before the events they contain)."""
        return dicts_in_time_order(self.drain_tables())

    def drain_tables(self) -> list[EventTable]:
        """Every event recorded since the last drain, as rows per lane and type (the
        timings writer turns them into lines without making a dict per event)."""
        return [table for lane in self._lanes_after_hooks() for table in lane.take()]

    def discard(self) -> None:
        """Forget every event recorded since the last drain (warm-up runs)."""
        for lane in self._lanes_after_hooks():
            lane.clear()
