"""The event recorder: per-lane buffers that the hot path only appends to.

Call sites guard with one branch, `if rec.enabled: lane.op(...)`, so a disabled
recorder costs nothing else. Timestamps are `perf_counter_ns()` relative to the
recorder's start (`rec.now()`); a lane belongs to one thread (main, cpu1, ...,
or a device lane such as CUDA0 / ACC0). `drain()` hands back every event
recorded so far, merged in time order, as contract-v1 dicts for a sink.

API (stable; the internals may change):
    rec = Recorder(enabled=True); lane = rec.lane("main")
    lane.op(ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens)
    lane.copy(ts, dur, graph, split, src, dst, nbytes, name)
    lane.split(ts, dur, graph, split, backend, n_nodes, n_inputs)
    lane.wakeup(ts, dur, graph, split, backend)
    lane.sync(ts, dur, graph, split, backend)
    lane.phase(ts, dur, graph, name)
    lane.graph(ts, dur, graph, test, n_tokens, n_past)
    lane.test(ts, dur, fields)            # rare: one per test repetition
    rec.drain() -> list[dict]
"""

from __future__ import annotations

import threading
import time


class Lane:
    __slots__ = ("tid", "_rows")

    def __init__(self, tid: str):
        self.tid = tid
        self._rows: list[tuple] = []

    def op(self, ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens):
        self._rows.append(("op", ts, dur, graph, split, backend,
                           {"op": op, "name": name, "layer": layer, "bytes": nbytes,
                            "flops": flops, "n_tokens": n_tokens}))

    def copy(self, ts, dur, graph, split, src, dst, nbytes, name):
        self._rows.append(("copy", ts, dur, graph, split, None,
                           {"src": src, "dst": dst, "bytes": nbytes, "name": name}))

    def split(self, ts, dur, graph, split, backend, n_nodes, n_inputs):
        self._rows.append(("split", ts, dur, graph, split, backend,
                           {"n_nodes": n_nodes, "n_inputs": n_inputs}))

    def wakeup(self, ts, dur, graph, split, backend):
        self._rows.append(("wakeup", ts, dur, graph, split, backend, None))

    def sync(self, ts, dur, graph, split, backend):
        self._rows.append(("sync", ts, dur, graph, split, backend, None))

    def phase(self, ts, dur, graph, name):
        self._rows.append(("phase", ts, dur, graph, None, None, {"name": name}))

    def graph(self, ts, dur, graph, test, n_tokens, n_past):
        self._rows.append(("graph", ts, dur, graph, None, None,
                           {"test": test, "n_tokens": n_tokens, "n_past": n_past}))

    def test(self, ts, dur, fields: dict):
        self._rows.append(("test", ts, dur, None, None, None, dict(fields)))

    def take(self) -> list[tuple]:
        rows, self._rows = self._rows, []
        return rows


class Recorder:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.t0 = time.perf_counter_ns()
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()

    def now(self) -> int:
        return time.perf_counter_ns() - self.t0

    def lane(self, tid: str) -> Lane:
        with self._lock:
            lane = self._lanes.get(tid)
            if lane is None:
                lane = self._lanes[tid] = Lane(tid)
            return lane

    def drain(self) -> list[dict]:
        """Every event recorded since the last drain, as contract-v1 dicts in time order."""
        out = []
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            for type_, ts, dur, graph, split, backend, extra in lane.take():
                ev = {"type": type_, "ts": int(ts), "dur": int(max(dur, 0)), "tid": lane.tid}
                if graph is not None:
                    ev["graph"] = graph
                if split is not None:
                    ev["split"] = split
                if backend is not None:
                    ev["backend"] = backend
                if extra:
                    ev.update(extra)
                out.append(ev)
        out.sort(key=lambda e: (e["ts"], -e["dur"]))
        return out
