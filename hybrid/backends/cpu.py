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
the OS wakes it: cheap, slow to wake) or spins (`poll 1`: one core busy, fast
to wake). Inside a split, between ops, workers always spin, as ggml's barrier
does, and so does the main thread joining them. Spinning is native and holds no
GIL (hybrid/_spin.c): a Python loop would hold it between checks and stall the
threads doing real work by up to the interpreter's 5 ms switch interval.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Mapping

import numpy as np
import torch

from hybrid._spin import wait_change
from hybrid.backends import keep_signals_off_this_thread
from hybrid.graph import Node
from hybrid.placement import CPU
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE


# An op with a `parallel` form is cut into worker tasks only when it reads at least
# MIN_SPLIT_BYTES of weights or does MIN_SPLIT_FLOPS: below that, handing tasks to a
# worker (GIL handoffs both ways, ~50-150 us on a shared 2-core machine) costs more
# than splitting saves, and the main thread runs the op alone (bench_hybrid.py).
MIN_SPLIT_BYTES = 1 << 20
MIN_SPLIT_FLOPS = 1 << 25

# How long one native spin lasts before the thread looks up (for Ctrl-C on the main
# thread, shutdown on the workers); a change of the counter ends it at once.
SPIN_SLICE_NS = 2_000_000


class WorkerPool:
    """`n_threads - 1` worker threads plus the calling (main) thread as worker 0.

    The main thread changes the shared state (a split dispatched, an op's tasks
    handed out, the split ended, shutdown), then bumps `_seq`; workers wait for
    `_seq` to move and then look at the state. `_seq` and each worker's `done`
    counter live in one NumPy int64 array so that `_spin.wait_change` can spin on
    them without the GIL. Every field has one writer: the main thread, except
    `done[i]` (worker i) and `_error` (any worker, read after the join).
    """

    def __init__(self, n_threads: int, spin: bool, recorder: Recorder):
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.n_threads = n_threads
        self.spin = spin
        self.recorder = recorder
        self.main_lane = recorder.lane(MAIN_LANE)
        self._counters = np.zeros(1 + n_threads, dtype=np.int64)   # [seq, done[1], ...]
        self._seq = 0
        self._tasks: deque[Callable[[], None]] = deque()
        self._op: tuple[Node, int, int] | None = None    # node, graph id, split index
        self._n_tasks = 1           # tasks of the current op
        self._op_gen = 0            # +1 per parallel op handed out
        self._wake_gen = 0          # +1 per split dispatched to the workers
        self._split_open = False
        self._dispatch = (0, 0, 0)  # ts, graph id, split index of the last dispatch
        self._stopping = False
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
        if not self._split_open:
            self._dispatch_split(graph_id, i_split)
        self._tasks = deque(tasks)
        self._n_tasks = len(tasks)
        self._op = (node, graph_id, i_split)
        self._op_gen += 1
        gen = self._op_gen
        self._bump()
        try:
            ran = self._take_tasks()
        except BaseException as e:  # join first: the workers must not run on alone
            self._error, ran = e, 0
        rec = self.recorder
        if ran and rec.enabled:
            self._record(self.main_lane, t_start, ran)
        counters = self._counters
        for i in range(1, self.n_threads):
            seen = int(counters[i])
            while seen != gen:
                seen = wait_change(counters, i, seen, SPIN_SLICE_NS)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def end_split(self) -> None:
        """The split's last op is done: workers go back to waiting between splits."""
        if self._split_open:
            self._split_open = False
            self._bump()

    def _bump(self) -> None:
        self._seq += 1
        self._counters[0] = self._seq

    def _dispatch_split(self, graph_id: int, i_split: int) -> None:
        self._dispatch = (self.recorder.now(), graph_id, i_split)
        self._split_open = True
        self._wake_gen += 1
        self._bump()
        if not self.spin:
            for lock in self._wake_locks[1:]:
                if lock.locked():   # else a wake is still pending, which serves
                    lock.release()

    def _take_tasks(self) -> int:
        """Run tasks until none is left; how many this thread ran."""
        tasks, ran = self._tasks, 0
        while True:
            try:
                task = tasks.popleft()
            except IndexError:
                return ran
            task()
            ran += 1

    def _record(self, lane, t_start: int, ran: int) -> None:
        """One lane's op event: its share of the op's bytes and flops (the tasks it ran),
        so that the lanes of one op add up to the op, not to n_threads times it."""
        node, graph_id, i_split = self._op
        share = ran / self._n_tasks
        lane.op(t_start, self.recorder.now() - t_start, graph_id, i_split, CPU, node.op, node.name,
                node.layer, round(node.n_bytes * share), round(node.flops * share), node.n_tokens)

    def close(self) -> None:
        """Stop and join the workers (also after Ctrl-C, mid-split)."""
        self._stopping = True
        self._bump()
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
        """Look at the state after each move of `_seq`: record the wakeup of a new
        split, run an op's tasks, else wait: spinning natively inside a split or
        with `--poll 1`, blocked on the worker's lock between splits otherwise."""
        keep_signals_off_this_thread()
        rec = self.recorder
        lane = rec.lane(f"cpu{i}")
        lock, counters = self._wake_locks[i], self._counters
        seen_wake = seen_op = 0
        while True:
            seq = int(counters[0])      # read before the state: no wake can be lost
            if self._stopping:
                return
            if self._wake_gen != seen_wake:
                seen_wake = self._wake_gen
                if rec.enabled:
                    ts, graph_id, i_split = self._dispatch
                    lane.wakeup(ts, rec.now() - ts, graph_id, i_split, CPU)
            if self._op_gen != seen_op:
                seen_op = self._op_gen
                self._work(lane)
                counters[i] = seen_op
            elif self._split_open or self.spin:
                wait_change(counters, 0, seq, SPIN_SLICE_NS)
            else:
                lock.acquire()

    def _work(self, lane) -> None:
        rec = self.recorder
        t_start = rec.now() if rec.enabled else 0
        try:
            ran = self._take_tasks()
        except BaseException as e:  # handed to the main thread, which raises it
            self._error = e
            return
        if ran and rec.enabled:
            self._record(lane, t_start, ran)


class CpuBackend:
    """Runs CPU splits synchronously on the main thread and the worker pool."""

    name = CPU
    is_device = False

    def __init__(self, buffers: Mapping[str, Any], n_threads: int, spin: bool,
                 recorder: Recorder):
        self._torch_threads = torch.get_num_threads()   # given back at close()
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
                if node.parallel is not None and n_tasks > 1 and (
                        node.n_bytes >= MIN_SPLIT_BYTES or node.flops >= MIN_SPLIT_FLOPS):
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
        torch.set_num_threads(self._torch_threads)
