"""The CPU backend: torch on the CPU, driven by the engine's own pool of `-t` workers.

Like ggml's CPU thread pool, and for the same reason: the time between handing
work to a thread and the thread running it (the wakeup) is a real cost of hybrid
inference, so it is measured here per worker and split, not guessed.

The main thread works as worker 0; `-t N` adds N-1 daemon worker threads (lanes
`cpu1`, `cpu2`, ...). Torch runs each op single-threaded (the pool is the
parallelism), and releases the GIL inside its kernels, so workers compute at
the same time. A split's ops run in order on the main thread; an op with a
`parallel` form is cut into tasks that all workers take from one shared queue
(a `deque.popleft` is atomic), and the main thread joins them before the next op.

Waiting (`--poll`): between splits a worker blocks on its own lock (`poll 0`,
the OS wakes it) or spins on a generation counter with `os.sched_yield()`,
which releases the GIL (`poll 1`). Inside a split, between ops, workers always
spin, as ggml's barrier does.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any, Callable, Mapping

import torch

from hybrid.graph import Node
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE

CPU = "CPU"


class WorkerPool:
    """`n_threads - 1` worker threads plus the calling (main) thread as worker 0."""

    def __init__(self, n_threads: int, spin: bool, recorder: Recorder):
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.n_threads = n_threads
        self.spin = spin
        self.recorder = recorder
        self.main_lane = recorder.lane(MAIN_LANE)
        # Shared state. Each field has one writer: the main thread, except `_done[i]`
        # (worker i) and `_error` (any worker, read after the join).
        self._tasks: deque[Callable[[], None]] = deque()
        self._op: tuple[Node, int, int] | None = None    # node, graph id, split index
        self._op_gen = 0            # +1 per parallel op handed out
        self._wake_gen = 0          # +1 per split dispatched to the workers
        self._split_open = False
        self._dispatch = (0, 0, 0)  # ts, graph id, split index of the last dispatch
        self._stopping = False
        self._done = [0] * n_threads
        self._error: BaseException | None = None
        self._wake_locks = [threading.Lock() for _ in range(n_threads)]
        self._threads = []
        for i in range(1, n_threads):
            self._wake_locks[i].acquire()
            t = threading.Thread(target=self._worker, args=(i,), name=f"hyprof-cpu{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    # -- main thread -------------------------------------------------------

    def run(self, node: Node, tasks: list[Callable[[], None]], graph_id: int, i_split: int,
            t_start: int) -> None:
        """Run one op's tasks on every worker and join them. `t_start` is when the
        main thread began the op (before cutting it into tasks)."""
        if self.n_threads > 1 and not self._split_open:
            self._dispatch_split(graph_id, i_split)
        self._tasks = deque(tasks)
        self._op = (node, graph_id, i_split)
        self._op_gen += 1
        gen = self._op_gen
        try:
            ran = self._take_tasks()
        except BaseException as e:  # join first: the workers must not run on alone
            self._error, ran = e, False
        rec = self.recorder
        if ran and rec.enabled:
            self.main_lane.op(t_start, rec.now() - t_start, graph_id, i_split, CPU, node.op,
                              node.name, node.layer, node.n_bytes, node.flops, node.n_tokens)
        done, yield_ = self._done, os.sched_yield
        for i in range(1, self.n_threads):
            while done[i] != gen:
                yield_()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def end_split(self) -> None:
        """The split's last op is done: workers go back to waiting between splits."""
        self._split_open = False

    def _dispatch_split(self, graph_id: int, i_split: int) -> None:
        self._dispatch = (self.recorder.now(), graph_id, i_split)
        self._split_open = True
        self._wake_gen += 1
        if not self.spin:
            for lock in self._wake_locks[1:]:
                if lock.locked():   # else the last wake is still pending: it serves
                    lock.release()

    def _take_tasks(self) -> bool:
        tasks, ran = self._tasks, False
        while True:
            try:
                task = tasks.popleft()
            except IndexError:
                return ran
            task()
            ran = True

    def close(self) -> None:
        """Stop and join the workers (also after Ctrl-C, mid-split)."""
        self._stopping = True
        for lock in self._wake_locks[1:]:
            if lock.locked():
                try:
                    lock.release()
                except RuntimeError:   # a worker took it in between
                    pass
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []

    # -- worker threads ----------------------------------------------------

    def _worker(self, i: int) -> None:
        rec = self.recorder
        lane = rec.lane(f"cpu{i}")
        lock, yield_ = self._wake_locks[i], os.sched_yield
        seen_wake = seen_op = 0
        while True:
            # Between splits: block or spin until a split is dispatched.
            if self.spin:
                while self._wake_gen == seen_wake and not self._stopping:
                    yield_()
            else:
                lock.acquire()
            if self._stopping:
                return
            seen_wake = self._wake_gen
            if rec.enabled:
                ts, graph_id, i_split = self._dispatch
                lane.wakeup(ts, rec.now() - ts, graph_id, i_split, CPU)
            # Inside the split: spin from op to op until it ends (or a new one starts).
            while True:
                while (self._op_gen == seen_op and self._split_open
                       and self._wake_gen == seen_wake and not self._stopping):
                    yield_()
                if self._op_gen != seen_op:
                    seen_op = self._op_gen
                    self._work(lane)
                    self._done[i] = seen_op
                else:
                    break

    def _work(self, lane) -> None:
        rec = self.recorder
        t_start = rec.now() if rec.enabled else 0
        try:
            ran = self._take_tasks()
        except BaseException as e:  # handed to the main thread, which raises it
            self._error = e
            return
        if ran and rec.enabled:
            node, graph_id, i_split = self._op
            lane.op(t_start, rec.now() - t_start, graph_id, i_split, CPU, node.op, node.name,
                    node.layer, node.n_bytes, node.flops, node.n_tokens)


class CpuBackend:
    """Runs CPU splits synchronously on the main thread and the worker pool."""

    name = CPU
    is_device = False

    def __init__(self, buffers: Mapping[str, Any], n_threads: int, spin: bool,
                 recorder: Recorder):
        torch.set_num_threads(1)
        self.buffers = buffers
        self.recorder = recorder
        self.lane = recorder.lane(MAIN_LANE)
        self.pool = WorkerPool(n_threads, spin, recorder)

    def compute(self, split, values: dict, graph_id: int, i_split: int) -> None:
        rec, lane, pool, buffers = self.recorder, self.lane, self.pool, self.buffers
        n_tasks = pool.n_threads
        try:
            for node in split.nodes:
                t = rec.now() if rec.enabled else 0
                buf = buffers[node.buffer] if node.buffer is not None else None
                args = [values[s] for s in node.srcs]
                if node.parallel is not None and n_tasks > 1:
                    values[node], tasks = node.parallel(buf, *args, n_tasks)
                    pool.run(node, tasks, graph_id, i_split, t)
                else:
                    values[node] = node.fn(buf, *args)
                    if rec.enabled:
                        lane.op(t, rec.now() - t, graph_id, i_split, CPU, node.op, node.name,
                                node.layer, node.n_bytes, node.flops, node.n_tokens)
        finally:
            pool.end_split()

    def to_device(self, value: Any) -> Any:
        return value

    def to_host(self, value: Any) -> Any:
        return value

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.pool.close()
