"""The CPU backend: the engine's own pool of `-t` native worker threads, plus torch on the CPU.

Like ggml's CPU thread pool, and for the same reason: the time between handing
work to a thread and the thread running it (the wakeup) is a real cost of hybrid
inference, so it is measured here per worker and split, not guessed.

The pool is native (`hybrid._kernels.Pool`, hybrid/_pool.c): the main thread
works as thread 0 and `-t N` adds N-1 pthreads (lanes `cpu1`, `cpu2`, ...). A
split's ops run in order on the main thread; an op with a `parallel` form that is
worth sharing (decided when the split is compiled, from the op's cost) is given
the pool, and the main thread returns from it when its last chunk is done. The
work is either native (the quantised matmuls of hybrid/cpu_kernels.py:
rows cut into chunks that threads claim in C, no GIL anywhere) or a list of
Python tasks (torch fallbacks), which pool threads run one at a time, each
taking the GIL for its task. Torch runs single-threaded (the pool is the
parallelism).

Waiting (`--poll`): inside a split, between ops, workers always spin, as ggml's
barrier does; between splits they spin for up to `poll` x SPIN_NS_PER_POLL (cores
busy, fast to wake) and then sleep, at once with `poll 0` (the OS wakes them at the
next split: cheap, slow to wake). A split ends when every worker has seen it, so
each worker's wakeup is known; that wait is the split's join, which the report
counts as thread wakeup.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from hybrid._kernels import Pool
from hybrid.graph import Node
from hybrid.placement import CPU
from hybrid.program import Captures, Program, Step
from profiler.recorder import Recorder, pool_op
from profiler.schema import MAIN_LANE


# An op with a `parallel` form is shared by the pool only when it reads at least
# MIN_SPLIT_BYTES of weights (one expert's, for MUL_MAT_ID) or does MIN_SPLIT_FLOPS, or
# attends over the KV cache (its cost grows with the depth): below that, the main thread runs it
# alone. A native dispatch costs about a microsecond and the kernels stream ~10-20 GB/s
# per thread, so a 64 KiB matmul (~4 us) already gains; below it, an op is mostly its
# Python around the call (bench_hybrid.py). Python tasks (torch fallbacks) cost more per
# handoff, but only run where the native kernels do not, which is not the speed path.
MIN_SPLIT_BYTES = 1 << 16
MIN_SPLIT_FLOPS = 1 << 20
# ... or when it works on a batch of at least MIN_SPLIT_TOKENS tokens: a prompt's elementwise ops
# (ADD, GLU, MUL) read no weights and do few flops, but stream MBs of activations that one
# thread reads cold at ~10 GB/s (a cold [64, 2048] ADD: ~135 us).
MIN_SPLIT_TOKENS = 16
# Idle workers spin `--poll` x this between splits, then sleep: 0.1 s at the default 50, far
# longer than the gap between a token's graphs (~0.2 ms), far shorter than a user's pause.
# ggml counts 128K pause rounds per poll level instead: 3.5 ms a level on the Zen 4 here.
SPIN_NS_PER_POLL = 2_000_000


class CpuBackend:
    """Runs CPU splits synchronously on the main thread and the worker pool."""

    name = CPU
    is_device = False

    def __init__(self, buffers: Mapping[str, Any], n_threads: int, poll: int,
                 recorder: Recorder):
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self._torch_threads = torch.get_num_threads()   # given back at close()
        torch.set_num_threads(1)
        self.buffers = buffers
        self.recorder = recorder
        self.n_threads = n_threads
        self.pool = Pool(n_threads, poll * SPIN_NS_PER_POLL)
        self.begin_op = recorder.now            # the run loop's hook before each op: its start
        self.lanes = (recorder.lane(MAIN_LANE),) + tuple(recorder.lane(f"cpu{i}") for i in range(1, n_threads))
        self._times = np.zeros((n_threads, 3), np.int64)     # per op: first claim, end, chunks
        self._wakes = np.zeros(n_threads, np.int64)          # per split: when each worker saw it
        self._captures = Captures()                           # each program, captured at its first run

    def compile(self, split) -> Program:
        """The split's ops with their buffers bound, each shared by the pool or run by the
        main thread alone (`_worth_sharing`); captured at its first run (`Captures`)."""
        return Program.of(tuple(self._step(node) for node in split.nodes), split.inputs)

    def _step(self, node: Node) -> Step:
        forms = node.make(self.buffers[node.buffer] if node.buffer is not None else None)
        if forms.parallel is not None and self.n_threads > 1 and _worth_sharing(node):
            return Step(node, forms.parallel, (self.pool, self._times), pooled=True, capture=forms.capture)
        return Step(node, forms.serial, capture=forms.capture)

    def compute(self, program: Program, values: dict, graph_id: int, i_split: int, n_kv: int) -> None:
        try:
            self._captures.run(program, values, self, graph_id, i_split, n_kv)
        finally:
            dispatch = self.pool.end_split(self._wakes)
            if dispatch and self.recorder.enabled:
                self._record_wakeups(dispatch, graph_id, i_split)

    def end_op(self, t: int, step: Step, graph_id: int, i_split: int, n_bytes: int, flops: int) -> None:
        """An op event per thread that ran chunks of a pooled op, with its share; else one."""
        node, rec = step.node, self.recorder
        if step.pooled:
            pool_op(self.lanes, self._times, rec.t0, t, graph_id, i_split, CPU, node.op, node.name, node.layer,
                    n_bytes, flops, node.n_tokens)
        else:
            self.lanes[0].op(t, rec.now() - t, graph_id, i_split, CPU, node.op, node.name, node.layer, n_bytes,
                             flops, node.n_tokens)

    def _record_wakeups(self, dispatch: int, graph_id: int, i_split: int) -> None:
        """Per worker, the split's dispatch until the worker saw it (and claimed its first chunk)."""
        t0 = self.recorder.t0
        for i, wake in enumerate(self._wakes.tolist()[1:], start=1):
            self.lanes[i].wakeup(dispatch - t0, wake - dispatch, graph_id, i_split, CPU)

    def to_device(self, value: Any, node: Node) -> Any:
        return value

    def to_host(self, value: Any, node: Node) -> Any:
        return value

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.pool.close()
        torch.set_num_threads(self._torch_threads)


def _worth_sharing(node: Node) -> bool:
    c = node.cost
    return (c.bytes + c.bytes_per_expert >= MIN_SPLIT_BYTES or c.flops >= MIN_SPLIT_FLOPS
            or c.bytes_per_kv > 0 or node.n_tokens >= MIN_SPLIT_TOKENS)
