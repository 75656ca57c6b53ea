"""ACC0: an emulated accelerator, so that the whole hybrid path runs without a GPU.

It behaves like a CUDA device to the scheduler: it holds its own copy of the
weights it was given (separate memory, never shared with the CPU backend), it
runs each split asynchronously on its own execution thread (the "stream": splits
run in the order queued), values cross to and from it only by copies, and the
host must synchronize before reading what it computed. It computes with torch on
the CPU, so its figures say nothing about GPUs; every output that used it says
"emulated". Its ops are recorded on its own lane, `ACC0`.

An op offloaded to it (hybrid/offload.py) reads its host weight from staging memory
of its own, into which each upload copies the rows used (`upload`): a memory copy on
the host, so an emulated upload's GB/s are the host's memory bandwidth, not a bus's.

It never spins: a GPU waiting for work, and a host waiting for a GPU, leave the
CPU cores to others, and here the cores it would spin on are the ones the
emulated device and the CPU workers compute on. (`--poll` is a CPU thread-pool
setting, as in llama.cpp.) So its launch latency is a thread wakeup, a few
microseconds to tens, shown as `sync` time with no device op running.
"""

from __future__ import annotations

import threading
from queue import SimpleQueue
from typing import Any, Callable, Mapping

import torch

from hybrid.backends import keep_signals_off_this_thread
from hybrid.offload import split_buffers, staging_key, upload_runs
from hybrid.program import Captures, Program, Step, serial_program
from hybrid.weights import Weight
from profiler.recorder import Recorder


class Fence:
    """The completion of one queued split, like a CUDA event: signalled once by the
    device thread, waited for by the host blocking on a lock. The `done` flag makes
    waiting again harmless (after Ctrl-C interrupted a wait, say), and the wait
    wakes every 50 ms so that Ctrl-C is seen however the signal was delivered."""

    __slots__ = ("_lock", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.done = False

    def signal(self) -> None:
        self.done = True
        self._lock.release()

    def wait(self) -> None:
        while not self.done:
            self._lock.acquire(timeout=0.05)


class AccBackend:
    is_device = True
    emulated = True

    def __init__(self, buffers: Mapping[str, Any], recorder: Recorder, name: str = "ACC0",
                 host: Callable[[str], Any] | None = None, stored: Callable[[str], Weight] | None = None):
        """`host(name)`: a host buffer, `stored(name)`: a stored tensor (the engine's), for the ops
        offloaded here."""
        self.name = name
        self.buffers = buffers
        self.host, self.stored = host, stored
        self._staging: dict[tuple, Weight] = {}   # offloaded weights' memory (`staging_key`)
        self.recorder = recorder
        self._lane = recorder.lane(name)
        self._captures = Captures()             # each program, captured at its first run (on the CPU's memory)
        self._copies: dict[tuple, torch.Tensor] = {}     # copies in and out, kept per node (`_copy`)
        self.begin_op = recorder.now            # the run loop's hook before each op: its start
        self._queue: SimpleQueue = SimpleQueue()
        self._last: Fence | None = None
        self._error: BaseException | None = None   # the first error on the device thread
        self._thread = threading.Thread(target=self._run, name=f"hyprof-{name}", daemon=True)
        self._thread.start()

    def compile(self, split) -> Program:
        return serial_program(split, split_buffers(split, self.buffers, self.host, self._stage))

    def upload(self, name: str, experts: list[int] | None) -> int:
        """Op offload: the rows of stored tensor `name` for `experts` (None: all) into its
        staging memory; the bytes copied."""
        w = self.stored(name)
        dst = self._stage(name).data
        n_bytes = 0
        for e0, e1 in upload_runs(experts, w.shape[0]):
            n_bytes += dst[e0:e1].copy_(w.data[e0:e1]).nbytes
        return n_bytes

    def _stage(self, name: str) -> Weight:
        """The staging weight of stored tensor `name`: zeroed memory of its shape and type, shared
        by the layers' tensors of one role (`staging_key`)."""
        w = self.stored(name)
        key = staging_key(w)
        if key not in self._staging:
            self._staging[key] = Weight(key[0], w.ggml_type, w.shape, torch.zeros_like(w.data))
        return self._staging[key]

    def compute(self, program: Program, values: dict, graph_id: int, i_split: int, n_kv: int) -> None:
        """Queue the program on the device thread and return at once."""
        fence = Fence()
        self._queue.put((program, values, graph_id, i_split, n_kv, fence))
        self._last = fence

    def end_op(self, t: int, step: Step, graph_id: int, i_split: int, n_bytes: int, flops: int) -> None:
        node = step.node
        self._lane.op(t, self.recorder.now() - t, graph_id, i_split, self.name, node.op, node.name, node.layer,
                      n_bytes, flops, node.n_tokens)

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.wait()
            self._last = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def to_device(self, value: Any, node) -> Any:
        return self._copy(value, (node.name,))

    def to_host(self, value: Any, node) -> Any:
        return self._copy(value, (node.name,))

    def _copy(self, value: Any, key: tuple) -> Any:
        """A copy of value (a tensor, or a tuple of them) in memory kept per node name, shape and
        dtype (a node is copied one way, once per graph): the same memory at every evaluation,
        as a real device's staging buffers are, so a captured program reads it in place."""
        if isinstance(value, (tuple, list)):
            return type(value)(self._copy(v, key + (i,)) for i, v in enumerate(value))
        if not isinstance(value, torch.Tensor):
            return value
        key += (tuple(value.shape), value.dtype)
        kept = self._copies.get(key)
        if kept is None:
            kept = self._copies[key] = torch.empty_like(value, memory_format=torch.contiguous_format)
        return kept.copy_(value)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        keep_signals_off_this_thread()
        while (item := self._queue.get()) is not None:
            program, values, graph_id, i_split, n_kv, fence = item
            try:
                self._captures.run(program, values, self, graph_id, i_split, n_kv)
            except BaseException as e:  # raised on the host at its next synchronize
                self._error = self._error or e
            fence.signal()
