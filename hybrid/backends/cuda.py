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

Programs hold no host synchronisation: the weights were dequantised once at load
(`hybrid.weights.for_gpu`), and MUL_MAT_ID selects its experts on the device
(`hybrid.builder._experts_on_device`), its expert count read with the op times.

An op offloaded here (hybrid/offload.py) reads a float32 copy of its host weight in device
memory, into which each upload puts the rows used: copied from the file's map into a pinned
staging buffer, sent asynchronously on the stream as the stored (quantised) bytes, the bus's
real load, and dequantised there (`upload`).

Copies go through pinned host staging buffers (kept per node name, shape and dtype: a
copy to the host is read there in place) and are synchronous, as ggml's
`ggml_backend_tensor_copy` is: the host time of a copy is
its real cost.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from gguf.constants import GGMLQuantizationType

from hybrid import quants
from hybrid.offload import split_buffers, staging_key, upload_runs
from hybrid.program import Program, Step, run_program, serial_program
from hybrid.sched import map_values
from hybrid.weights import Weight
from profiler.recorder import Recorder


class CudaBackend:
    is_device = True
    emulated = False

    def __init__(self, buffers: Mapping[str, Any], recorder: Recorder, index: int = 0,
                 host: Callable[[str], Any] | None = None, stored: Callable[[str], Weight] | None = None):
        """`host(name)`: a host buffer, `stored(name)`: a stored tensor (the engine's), for the ops
        offloaded here."""
        self.name = f"CUDA{index}"
        self.device = torch.device("cuda", index)
        self.buffers = buffers
        self.host, self.stored = host, stored
        # offloaded weights (`staging_key`): (float32 Weight the op reads, stored bytes on the device,
        # pinned host staging of the stored bytes)
        self._uploads: dict[tuple, tuple[Weight, torch.Tensor, torch.Tensor]] = {}
        self.recorder = recorder
        self.lane = recorder.lane(self.name)
        self.stream = torch.cuda.Stream(self.device)
        self._events: list[torch.cuda.Event] = []     # free timing events, reused
        self._timed: list[tuple] = []                 # ops run since the last sync
        self._staging: dict[tuple, torch.Tensor] = {}
        self.stream.synchronize()
        self._anchor = self._record_anchor()

    def compile(self, split) -> Program:
        return serial_program(split, split_buffers(split, self.buffers, self.host, self._stage))

    def upload(self, name: str, experts: list[int] | None) -> int:
        """Op offload: the rows of stored tensor `name` for `experts` (None: all), each run through
        the pinned staging buffer and sent on the stream, then dequantised into the float32 weight
        the op reads; waits for the stream (the host's time is the upload's). The bytes sent."""
        w = self.stored(name)
        dense, raw, pinned = self._staging_of(name)
        n_bytes = 0
        with torch.cuda.stream(self.stream):
            for e0, e1 in upload_runs(experts, w.shape[0]):
                pinned[e0:e1].copy_(w.data[e0:e1])
                raw[e0:e1].copy_(pinned[e0:e1], non_blocking=True)
                dense.data[e0:e1] = quants.dequantize(raw[e0:e1], w.ggml_type).reshape(dense.data[e0:e1].shape)
                n_bytes += pinned[e0:e1].nbytes
        self.stream.synchronize()       # the pinned buffer is refilled by the next upload
        return n_bytes

    def _stage(self, name: str) -> Weight:
        return self._staging_of(name)[0]

    def _staging_of(self, name: str) -> tuple[Weight, torch.Tensor, torch.Tensor]:
        w = self.stored(name)
        key = staging_key(w)
        if key not in self._uploads:
            dense = torch.zeros(w.shape, dtype=torch.float32, device=self.device)
            self._uploads[key] = (Weight(key[0], int(GGMLQuantizationType.F32), w.shape, dense),
                                  torch.zeros_like(w.data, device=self.device),
                                  torch.empty(w.data.shape, dtype=w.data.dtype, pin_memory=True))
        return self._uploads[key]

    def compute(self, program: Program, values: dict, graph_id: int, i_split: int, n_kv: int) -> None:
        """Queue the program's ops on the stream, each between two timing events."""
        with torch.cuda.stream(self.stream):
            run_program(program, values, self, graph_id, i_split, n_kv)

    def begin_op(self) -> torch.cuda.Event:
        start = self._event()
        start.record(self.stream)
        return start

    def end_op(self, start: torch.cuda.Event, step: Step, graph_id: int, i_split: int, n_bytes: int,
               flops: int) -> None:
        end = self._event()
        end.record(self.stream)
        self._timed.append((step.node, graph_id, i_split, start, end, self._anchor, n_bytes, flops))

    def synchronize(self) -> None:
        """Wait for the stream, then turn the device times of its ops into op events."""
        self.stream.synchronize()
        self._flush_timed()
        self._anchor = self._record_anchor()

    def to_device(self, value: Any, node) -> Any:
        return map_values(self._h2d, value)

    def to_host(self, value: Any, node) -> Any:
        """Into pinned host memory kept per node name, shape and dtype (no further copy): the
        same memory at every evaluation, so the CPU's captured program reads it in place."""
        return map_values(lambda t: self._d2h(t, node.name), value)

    def close(self) -> None:
        self.stream.synchronize()
        self._timed.clear()
        self._staging.clear()
        self._uploads.clear()

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
        for node, graph_id, i_split, start, end, (anchor, anchor_ns), n_bytes, flops in self._timed:
            ts = anchor_ns + int(anchor.elapsed_time(start) * 1e6)
            dur = int(start.elapsed_time(end) * 1e6)
            # n_bytes: a device scalar where it counts the experts MUL_MAT_ID used, read now
            lane.op(ts, dur, graph_id, i_split, name, node.op, node.name, node.layer, int(n_bytes), flops,
                    node.n_tokens)
            free.append(start)
            free.append(end)
        self._timed.clear()
        free.append(self._anchor[0])

    # -- copies ----------------------------------------------------------------

    def _staging_for(self, t: torch.Tensor, name: str = "") -> torch.Tensor:
        key = (name, tuple(t.shape), t.dtype)
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

    def _d2h(self, value: Any, name: str) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        staging = self._staging_for(value, name)
        with torch.cuda.stream(self.stream):
            staging.copy_(value, non_blocking=True)
        self.stream.synchronize()
        return staging
