"""The native CPU worker pool (hybrid/_pool.c) and the CPU backend's events from it.

The pool's contract: every chunk of a job runs exactly once, on some thread; the
per-thread times lie inside the call; a Python task's exception reaches the
caller; workers never take SIGINT/SIGTERM; close() joins them. The matmuls it
runs must equal the same call without a pool, bit for bit (each output row is
computed the same way whichever thread computes it), in both wait modes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from hybrid import cpu_kernels as ck
from hybrid._kernels import Pool
from hybrid.backends.cpu import CpuBackend
from hybrid.builder import forms
from hybrid.graph import Cost, Graph, Node
from hybrid.sched import Scheduler, split_graph
from profiler.recorder import Recorder

# spin_ns of each wait mode: workers spinning through the whole test, or asleep between jobs
SPIN_NS = 10**10
MODES = [pytest.param(SPIN_NS, id="spin"), pytest.param(0, id="block")]


@pytest.fixture(params=MODES)
def pool(request):
    p = Pool(3, request.param)
    yield p
    p.close()


def raw_weights(rng, shape, ggml_type) -> np.ndarray:
    """Random GGUF blocks with small fp16 scales (test_kernels.py tests the values; here only
    pooled against unpooled calls are compared, bit for bit)."""
    *lead, n_in = shape
    raw = rng.integers(0, 256, size=(*lead, n_in // 32, ck.TRAITS[ggml_type].block_bytes), dtype=np.uint8)
    raw[..., :2] = np.array([0.01], np.float16).view(np.uint8)
    return raw.reshape(*lead, -1)


def moe_case(rng, ggml_type, n_expert=9, n_out=21, n_in=160, n_tok=7, n_used=3):
    """Expert weights, ids [n_tok, n_used] (distinct per token) and float32 activations."""
    raw = raw_weights(rng, (n_expert, n_out, n_in), ggml_type)
    ids = np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    return raw, ids, rng.standard_normal((n_tok, n_in)).astype(np.float32)


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _threads_settle(want: set[int], timeout: float = 2.0) -> set[int]:
    """This process's threads once they equal `want` (or the timeout passes): a joined
    thread's /proc entry can outlive pthread_join by a moment, as the kernel wakes the
    joiner before it has finished removing the task."""
    deadline = time.monotonic() + timeout
    while (now := _threads()) != want and time.monotonic() < deadline:
        time.sleep(0.001)
    return now


def test_every_task_runs_exactly_once(pool):
    times = np.zeros((3, 3), np.int64)
    for n in (1, 2, 3, 50, 1000):
        ran: list[int] = []
        pool.run_tasks([lambda i=i: ran.append(i) for i in range(n)], times)
        assert sorted(ran) == list(range(n))
        assert times[:, 2].sum() == n
    pool.run_tasks([], times)
    assert not times.any()


def test_every_thread_takes_part_and_times_lie_inside_the_call(pool):
    """Tasks that wait for each other finish only if all three threads run one at once."""
    barrier = threading.Barrier(3, timeout=10)
    times = np.full((3, 3), -1, np.int64)
    before = time.perf_counter_ns()
    pool.run_tasks([barrier.wait] * 3, times)
    after = time.perf_counter_ns()
    first, end, ran = times.T
    assert ran.tolist() == [1, 1, 1]
    assert np.all(before <= first) and np.all(first <= end) and np.all(end <= after)


def test_native_times_lie_inside_the_call(pool):
    rng = np.random.default_rng(0)
    raw, ids, x = moe_case(rng, ck.Q4_0, n_expert=8, n_out=96, n_in=2048, n_tok=2, n_used=6)
    xq = ck.quantize_activations(x)
    out = np.zeros((*ids.shape, 96), np.float32)
    times = np.full((3, 3), -1, np.int64)
    before = time.perf_counter_ns()
    ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, pool=pool, times=times)
    after = time.perf_counter_ns()
    first, end, ran = times.T
    assert ran.sum() >= len(np.unique(ids))                          # at least a chunk per expert
    did = ran > 0
    assert np.all(before <= first[did]) and np.all(first[did] <= end[did]) and np.all(end[did] <= after)
    assert not times[~did].any()                                     # a thread that ran nothing: zeros


def test_a_task_error_reaches_the_caller_and_the_pool_goes_on(pool):
    ran: list[int] = []

    def boom():
        raise ValueError("task failed")
    with pytest.raises(ValueError, match="task failed"):
        pool.run_tasks([boom] + [lambda: ran.append(1)] * 5 + [boom])
    with pytest.raises(TypeError, match="task 1 is not callable"):
        pool.run_tasks([boom, 3])
    ran.clear()
    pool.run_tasks([lambda: ran.append(1)] * 4)
    assert ran == [1] * 4


def test_a_task_may_not_use_its_own_pool(pool):
    rng = np.random.default_rng(1)
    raw, ids, x = moe_case(rng, ck.Q4_0)
    xq = ck.quantize_activations(x)
    out = np.zeros((*ids.shape, raw.shape[1]), np.float32)
    with pytest.raises(RuntimeError, match="already running"):
        pool.run_tasks([lambda: ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, pool=pool)])


def _cpu_seconds(tids: set[int]) -> float:
    """CPU time the threads have used: the scheduler's own count in ns (schedstat), not the clock
    ticks of /proc's stat, which miss a spinner that runs in slivers between sched_yield()s on a
    loaded machine."""
    total = 0
    for tid in tids:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def test_idle_workers_spin_for_spin_ns_then_sleep_and_wake_for_the_next_job():
    """`--poll`'s bound: after a split, workers spin (using CPU) for about spin_ns, then sleep
    (using none), and the next split's job still runs on every thread."""
    before = _threads()
    p = Pool(3, 1_000_000_000)
    workers = _threads() - before
    try:
        times = np.zeros((3, 3), np.int64)
        p.run_tasks([lambda: time.sleep(0.01)] * 6, times)
        p.end_split(np.zeros(3, np.int64))
        used = _cpu_seconds(workers)
        time.sleep(0.5)
        assert _cpu_seconds(workers) - used > 0.005         # spinning inside the bound (a loaded machine
                                                             # gives two spinners less than their 2 x 0.5 s)
        time.sleep(0.7)
        used = _cpu_seconds(workers)
        time.sleep(0.3)
        assert _cpu_seconds(workers) - used < 0.02          # asleep after it
        p.run_tasks([lambda: time.sleep(0.01)] * 6, times)
        assert (times[:, 2] > 0).sum() == 3 and times[:, 2].sum() == 6
    finally:
        p.close()


def test_spin_ns_must_not_be_negative():
    with pytest.raises(ValueError, match="spin_ns must be >= 0"):
        Pool(2, -1)


@pytest.mark.parametrize("spin", [SPIN_NS, 0])
def test_close_joins_the_workers_whose_signals_are_blocked(spin):
    before = _threads()
    p = Pool(4, spin)
    workers = _threads() - before
    assert len(workers) == 3
    blocked = {1 << (signal.SIGINT - 1), 1 << (signal.SIGTERM - 1)}
    for tid in workers:
        with open(f"/proc/self/task/{tid}/status") as f:
            mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        assert all(mask & bit for bit in blocked), tid
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGINT}   # the caller's mask is kept
    p.run_tasks([lambda: None] * 10)             # workers that ran Python tasks hold thread states
    p.close()
    assert _threads_settle(before) == before
    p.close()                                    # idempotent
    with pytest.raises(ValueError, match="closed"):
        p.run_tasks([])


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the run inherited: a test run that a
    non-interactive shell started in the background inherits SIGINT ignored, and Python then
    installs no handler, so Ctrl-C would raise nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_close_after_ctrl_c_in_a_task(python_sigint):
    """Ctrl-C lands in the main thread's own task: the others stop taking tasks, the
    KeyboardInterrupt comes out of run_tasks after the join, and close() still joins."""
    before = _threads()
    p = Pool(3, False)
    started = threading.Event()

    def interrupted():
        started.wait(5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)                            # the handler raises in here, on the main thread
    main = threading.get_ident()

    def task():
        if threading.get_ident() == main:
            interrupted()
        else:
            started.set()
            time.sleep(0.001)
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        p.run_tasks([task] * 200)
    assert time.perf_counter() - t < 4
    p.close()
    assert _threads_settle(before) == before


@pytest.mark.parametrize("ggml_type", [ck.Q4_0, ck.Q8_0])
@pytest.mark.parametrize("n_tok", [1, 7])
def test_pooled_matmuls_equal_the_call_without_a_pool(pool, ggml_type, n_tok):
    """gate/up (one input per token), fused gate+up, down (one input per slot), a row range
    and a plain MUL_MAT: rows cut into chunks of (expert, 16-row blocks) across threads."""
    rng = np.random.default_rng(n_tok)
    gate, ids, x = moe_case(rng, ggml_type, n_expert=8, n_out=300, n_in=256, n_tok=n_tok, n_used=6)
    up = raw_weights(rng, gate.shape[:2] + (256,), ggml_type)
    per_slot = rng.standard_normal((ids.size, 256)).astype(np.float32)
    cases = [(x, None, 0, 300), (x, up, 0, 300), (per_slot, None, 0, 300), (x, None, 37, 211), (x, up, 37, 211)]
    for xs, w_up, r0, r1 in cases:
        xq = ck.quantize_activations(xs)
        want = np.full((*ids.shape, 300), np.nan, np.float32)
        ck.mul_mat_id(gate, ggml_type, xq, ids, want, r0, r1, w_up=w_up)
        got = np.full_like(want, np.nan)
        times = np.zeros((3, 3), np.int64)
        ck.mul_mat_id(gate, ggml_type, xq, ids, got, r0, r1, w_up=w_up, pool=pool, times=times)
        np.testing.assert_array_equal(got, want)
        assert times[:, 2].sum() > 1
    xq = ck.quantize_activations(x)
    want, got = (np.full((n_tok, 300), np.nan, np.float32) for _ in range(2))
    ck.mul_mat(gate[2], ggml_type, xq, want)
    ck.mul_mat(gate[2], ggml_type, xq, got, pool=pool)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ggml_type", [ck.Q4_0, ck.Q8_0])
def test_fused_up_chunks_finish_their_gate_chunks_rows(pool, ggml_type):
    """Fused gate+up cut into many chunks: each up chunk applies silu(gate) * up to its rows
    once its gate chunk (maybe another thread's) is done, so the result is the serial call's."""
    rng = np.random.default_rng(8)
    gate, ids, x = moe_case(rng, ggml_type, n_expert=8, n_out=512, n_in=2048, n_tok=1, n_used=6)
    up = raw_weights(rng, gate.shape[:2] + (2048,), ggml_type)
    want, got = (np.full((*ids.shape, 512), np.nan, np.float32) for _ in range(2))
    ck.mul_mat_id(gate, ggml_type, x, ids, want, w_up=up)
    times = np.zeros((3, 3), np.int64)
    for _ in range(5):
        ck.mul_mat_id(gate, ggml_type, x, ids, got, w_up=up, pool=pool, times=times)
        np.testing.assert_array_equal(got, want)
    assert times[:, 2].sum() > 2 * 6 + 2           # gate and up: chunks start and end inside experts


def guided_cut(n_units: int, n_threads: int, guide: int = 2, most: int = 16) -> list[int]:
    """Chunk sizes in units, as hybrid/_kernels.c cuts them (`guided_chunks`)."""
    sizes, left = [], n_units
    while left:
        sizes.append(min(left, max(1, min(most, left // (guide * n_threads)))))
        left -= sizes[-1]
    return sizes


def test_matmul_chunks_are_guided():
    """Threads claim long runs of rows first (up to 16 units of ~64 KiB), then shorter ones
    toward the end: 4096 rows of 2048 Q4_0 weights are 64 units of 64 rows, cut for 2 threads
    into 16 + 12 + 9 + ... + 1 units, every row computed once."""
    rng = np.random.default_rng(5)
    w = raw_weights(rng, (4096, 2048), ck.Q4_0)
    x = torch.from_numpy(rng.standard_normal((1, 2048)).astype(np.float32))
    want = ck.matmul(torch.from_numpy(w), ck.Q4_0, x)
    pool, times = Pool(2, True), np.zeros((2, 3), np.int64)
    try:
        got = ck.matmul(torch.from_numpy(w), ck.Q4_0, x, pool=pool, times=times)
    finally:
        pool.close()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    sizes = guided_cut(4096 // 64, 2)
    assert sizes[:4] == [16, 12, 9, 6] and sum(sizes) == 64
    assert times[:, 2].sum() == len(sizes)


def test_engine_forms_equal_their_serial_run(pool):
    rng = np.random.default_rng(3)
    gate, ids, x = moe_case(rng, ck.Q4_0, n_expert=8, n_out=64, n_in=256, n_tok=5, n_used=6)
    x, ids = torch.from_numpy(x), torch.from_numpy(ids).long()
    for run, cols in ((lambda **kw: ck.matmul(torch.from_numpy(gate[1]), ck.Q4_0, x, **kw), slice(None)),
                      (lambda **kw: ck.mul_mat_experts(gate, ck.Q4_0, x, ids, gate[::-1].copy(), **kw)[0],
                       slice(None)),
                      (lambda **kw: ck.mul_mat_experts(gate, ck.Q4_0, x, ids, rows=(16, 48), **kw)[0],
                       slice(16, 48))):
        want = run()
        got = run(pool=pool, times=np.zeros((3, 3), np.int64))
        np.testing.assert_array_equal(got.numpy()[..., cols], want.numpy()[..., cols])


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="n_threads"):
        Pool(0, True)
    p = Pool(2, True)
    rng = np.random.default_rng(4)
    raw, ids, x = moe_case(rng, ck.Q4_0)
    xq = ck.quantize_activations(x)
    out = np.zeros((*ids.shape, raw.shape[1]), np.float32)
    try:
        with pytest.raises(ValueError, match=r"times: expected int64 \[n_threads=2, 3\]"):
            ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, pool=p, times=np.zeros((3, 3), np.int64))
        with pytest.raises(ValueError, match="without a pool"):
            ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, times=np.zeros((2, 3), np.int64))
        with pytest.raises(TypeError, match="Pool"):
            ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, pool=object())
        with pytest.raises(ValueError, match="wake_ns"):
            p.end_split(np.zeros(3, np.int64))
    finally:
        p.close()


@pytest.mark.parametrize("poll", [50, 0])
def test_backend_events_share_the_op_and_time_each_wakeup(poll):
    """A native MUL_MAT_ID on a 3-thread CPU backend: the lanes' op events add up to the op's
    bytes, each lies inside its split, and each worker has one wakeup per split, from the
    dispatch, which lies after the split's start."""
    rng = np.random.default_rng(5)
    gate, ids, x = moe_case(rng, ck.Q4_0, n_expert=8, n_out=512, n_in=512, n_tok=1, n_used=6)
    inp, sel = Node("INPUT", "x", (), None), Node("INPUT", "ids", (), None)
    n_bytes = 6 * gate[0].nbytes
    parallel = lambda w, x, ids, pool, times: ck.mul_mat_experts(w, ck.Q4_0, x, ids, pool=pool,  # noqa: E731
                                                                  times=times)[0]
    serial = lambda w, x, ids: parallel(w, x, ids, None, None)               # noqa: E731
    exps = Node("MUL_MAT_ID", "blk.0.ffn_up_exps", (inp, sel), forms(serial, parallel), buffer="w",
                cost=Cost(n_bytes, 10**6))
    graph = Graph([inp, sel, exps], {"x": inp, "ids": sel}, exps)
    rec = Recorder(enabled=True)
    cpu = CpuBackend({"w": gate}, 3, poll, rec)
    inputs = {"x": torch.from_numpy(x), "ids": torch.from_numpy(ids)}
    try:
        sched = Scheduler({"CPU": cpu}, rec)
        plan = split_graph(graph, lambda _: "CPU")
        for g in range(3):
            out = sched.compute(graph, plan, inputs, g)
    finally:
        cpu.close()
    want = np.zeros((*ids.shape, 512), np.float32)
    ck.mul_mat_id(gate, ck.Q4_0, ck.quantize_activations(x), ids, want)
    np.testing.assert_array_equal(out.numpy(), want)
    events = rec.drain()
    splits = {e["graph"]: e for e in events if e["type"] == "split"}
    for g, split in splits.items():
        ops = [e for e in events if e["type"] == "op" and e["graph"] == g]
        assert sum(e["bytes"] for e in ops) == pytest.approx(n_bytes, abs=len(ops))
        assert {e["tid"] for e in ops} <= {"main", "cpu1", "cpu2"}
        wakeups = [e for e in events if e["type"] == "wakeup" and e["graph"] == g]
        assert sorted(e["tid"] for e in wakeups) == ["cpu1", "cpu2"]
        for e in ops + wakeups:
            assert split["ts"] <= e["ts"] and e["ts"] + e["dur"] <= split["ts"] + split["dur"], e
            assert e["dur"] >= 0
