"""CUDA0, CUDA1, ...: torch on a CUDA stream, with ops timed on the device itself.

Splits are queued on the backend's own stream and the host goes on (torch kernel
launches are asynchronous), exactly like the emulated ACC0 (hybrid/backends/acc.py),
so the scheduler drives both through one path. Timing must not change what is
timed, so there is no synchronisation per op: each op is bracketed by two CUDA
events, and at the next host synchronize (which the scheduler does anyway,
before it reads a result) their times are read and mapped onto the host clock
through an anchor: an event recorded on the idle stream right after a sync,
whose host time is read at the same moment. Op `ts` = anchor host time + the
anchor-to-op elapsed time; the mapping is redone at every sync, so clock drift
never accumulates.

Copies go through pinned host staging buffers (kept per shape and dtype) and are
synchronous, as ggml's `ggml_backend_tensor_copy` is: the host time of a copy is
its real cost.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from hybrid.sched import map_values
from profiler.recorder import Recorder


class CudaBackend:
    is_device = True
    emulated = False

    def __init__(self, buffers: Mapping[str, Any], recorder: Recorder, index: int = 0):
        self.name = f"CUDA{index}"
        self.device = torch.device("cuda", index)
        self.buffers = buffers
        self.recorder = recorder
        self.lane = recorder.lane(self.name)
        self.stream = torch.cuda.Stream(self.device)
        self._events: list[torch.cuda.Event] = []     # free timing events, reused
        self._timed: list[tuple] = []                 # ops run since the last sync
        self._staging: dict[tuple, torch.Tensor] = {}
        self.stream.synchronize()
        self._anchor = self._record_anchor()

    def compute(self, split, values: dict, graph_id: int, i_split: int) -> None:
        """Queue the split's ops on the stream, each between two timing events."""
        timed, anchor, buffers, stream = self._timed, self._anchor, self.buffers, self.stream
        timing = self.recorder.enabled
        with torch.cuda.stream(stream):
            for node in split.nodes:
                buf = buffers[node.buffer] if node.buffer is not None else None
                args = [values[s] for s in node.srcs]
                if timing:
                    start, end = self._event(), self._event()
                    start.record(stream)
                    values[node] = node.fn(buf, *args)
                    end.record(stream)
                    timed.append((node, graph_id, i_split, start, end, anchor))
                else:
                    values[node] = node.fn(buf, *args)

    def synchronize(self) -> None:
        """Wait for the stream, then turn the device times of its ops into op events."""
        self.stream.synchronize()
        self._flush_timed()
        self._anchor = self._record_anchor()

    def to_device(self, value: Any) -> Any:
        return map_values(self._h2d, value)

    def to_host(self, value: Any) -> Any:
        return map_values(self._d2h, value)

    def close(self) -> None:
        self.stream.synchronize()
        self._timed.clear()
        self._staging.clear()

    # -- timing --------------------------------------------------------------

    def _event(self) -> torch.cuda.Event:
        return self._events.pop() if self._events else torch.cuda.Event(enable_timing=True)

    def _record_anchor(self) -> tuple[torch.cuda.Event, int]:
        """Called on an idle stream: the event completes at (about) the host time read."""
        event = self._event()
        event.record(self.stream)
        return event, self.recorder.now()

    def _flush_timed(self) -> None:
        lane, name, free = self.lane, self.name, self._events
        for node, graph_id, i_split, start, end, (anchor, anchor_ns) in self._timed:
            ts = anchor_ns + int(anchor.elapsed_time(start) * 1e6)
            dur = int(start.elapsed_time(end) * 1e6)
            lane.op(ts, dur, graph_id, i_split, name, node.op, node.name, node.layer,
                    node.n_bytes, node.flops, node.n_tokens)
            free.append(start)
            free.append(end)
        self._timed.clear()
        free.append(self._anchor[0])

    # -- copies ----------------------------------------------------------------

    def _staging_for(self, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.dtype)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf

    def _h2d(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        src = value
        if not value.is_pinned():
            src = self._staging_for(value)
            src.copy_(value)
        out = torch.empty(value.shape, dtype=value.dtype, device=self.device)
        with torch.cuda.stream(self.stream):
            out.copy_(src, non_blocking=True)
        self.stream.synchronize()        # the staging buffer is reused by the next copy
        return out

    def _d2h(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        staging = self._staging_for(value)
        with torch.cuda.stream(self.stream):
            staging.copy_(value, non_blocking=True)
        self.stream.synchronize()
        return staging.clone()
