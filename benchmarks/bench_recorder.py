"""What profiling costs: the recorder per event, and tg t/s with recording / without.

    .venv/bin/python benchmarks/bench_recorder.py [-m MODEL.gguf] [-n 32] [--rounds 5]

1. Recorder, per event (targets: <= 1 us to record one event):
   - `record`: one `lane.op(...)` call, as an engine's worker makes it;
   - `clock`: one `rec.now()` (an engine reads it about twice per event);
   - `drain+write`: `rec.drain_batches()` plus `TimingsWriter.write_batches` (lines
     formatted natively from the lanes' cells, one flush), paid once per graph for all of its events;
     `drain+write route`: the same for `route` events (a token's 6 expert ids, written through
     orjson), one per MoE layer per graph.
2. Overhead on a real run (target: ratio >= 0.98): one engine generates tokens,
   graphs alternating between recorded (and written to a timings file, as the
   runner does) and not; tg t/s of each is one over its median graph time, and
   the ratio is recorded / not recorded. Also the CPU time per graph of all
   threads, which other processes on a shared machine disturb less, and of a recorded
   graph the time spent copying out its routes and recording them (`record_routes`). Needs
   hybrid.engine; without -m it uses the default model that `hyprof run` makes
   and caches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from profiler.recorder import Recorder
from profiler.sinks import TimingsWriter

# CPU time of this thread: on a shared machine it leaves out the time spent descheduled.
CLOCK = time.thread_time_ns
N_EVENTS = 1000            # a graph's worth: the lanes are drained after each graph
N_REPEATS = 100


def per_event_ns(fn, n: int = N_EVENTS) -> tuple[float, float]:
    """Best and median over N_REPEATS calls of fn(n) -> the ns it timed, per event,
    after as many untimed calls (the first batches are slower, until the allocator
    has its arenas). The machine is shared: the best run is the one least disturbed,
    the median says how disturbed."""
    for _ in range(N_REPEATS):
        fn(n)
    runs = [fn(n) / n for _ in range(N_REPEATS)]
    return min(runs), statistics.median(runs)


def record_ops(rec: Recorder):
    lane = rec.lane("cpu1")

    def run(n: int) -> int:
        op = lane.op
        t0 = CLOCK()
        for i in range(n):
            op(i, 1000, 3, 1, "CPU", "MUL_MAT_ID", "blk.3.ffn_up_exps", 3, 123456, 789012, 1)
        timed = CLOCK() - t0
        rec.discard()
        return timed

    return run


def empty_loop(n: int) -> int:
    t0 = CLOCK()
    for i in range(n):
        pass
    return CLOCK() - t0


def read_clock(rec: Recorder):
    def run(n: int) -> int:
        now = rec.now
        t0 = CLOCK()
        for _ in range(n):
            now()
        return CLOCK() - t0

    return run


def an_op(lane, i: int) -> None:
    lane.op(i, 1000, 3, 1, "CPU", "MUL_MAT_ID", "blk.3.ffn_up_exps", 3, 123456, 789012, 1)


ROUTE = np.array([3, 17, 22, 40, 51, 63])       # a token's experts, 6 of 64 (DeepSeek-V2-Lite)


def a_route(lane, i: int) -> None:
    lane.route(i, 0, 3, i % 26 + 1, 1, ROUTE)


def drain_and_write(rec: Recorder, writer: TimingsWriter, record=an_op):
    """The drain plus the writer for n events recorded just before, as the runner
    does after each graph; only the drain and the write are timed."""
    lane = rec.lane("cpu1")

    def run(n: int) -> int:
        for i in range(n):
            record(lane, i)
        t0 = CLOCK()
        writer.write_batches(rec.drain_batches())
        return CLOCK() - t0

    return run


def bench_recorder() -> None:
    with tempfile.TemporaryDirectory() as d, \
            TimingsWriter(Path(d) / "t.jsonl", {"type": "meta"}) as writer:
        drain = per_event_ns(drain_and_write(Recorder(print_timing=False), writer))
        drain_routes = per_event_ns(drain_and_write(Recorder(print_timing=False), writer, a_route))
    record = per_event_ns(record_ops(Recorder(print_timing=False)))
    clock = per_event_ns(read_clock(Recorder(print_timing=False)))
    loop = per_event_ns(empty_loop)
    print(f"recorder, ns of CPU time per event, best / median of {N_REPEATS} batches of "
          f"{N_EVENTS} (shared machine: the best is the least disturbed):")
    for what, (best, median), note in (
            ("record (lane.op call)", record, "target <= 1000"),
            ("clock (rec.now())", clock, "an engine reads it ~2x per event"),
            ("drain+write", drain, "once per graph, for all its events"),
            ("drain+write route", drain_routes, "a MoE layer's route, once per graph"),
            ("empty loop", loop, "included in the figures above")):
        print(f"  {what:22s} {best:7.0f} / {median:7.0f}   {note}")


def bench_overhead(model: str | None, n_gen: int, rounds: int, threads: int) -> None:
    """tg t/s recorded / not recorded. Graphs alternate between the two within each
    round (which starts with the other one each time), so that both see the same KV
    positions and the same disturbance from the rest of the machine; t/s of each is
    one over its median graph time."""
    try:
        from hybrid import sched
        from hybrid.engine import make_engine
    except ImportError as e:
        print(f"overhead: skipped, no engine ({e})")
        return
    from hyprof.commands.run import default_model

    record_routes, routes_ns = sched.record_routes, []

    def timed_routes(*args) -> None:           # what copying out and recording a graph's routes costs
        t0 = CLOCK()
        record_routes(*args)
        routes_ns.append(CLOCK() - t0)
    sched.record_routes = timed_routes

    path = model or default_model(progress=False)
    rec = Recorder(enabled=True, print_timing=False)
    engine = make_engine(path, threads=threads, n_gpu_layers=99,
                         overrides=[r"\.ffn_.*_exps\.=CPU"], accel="emulated", mla=0, fa=1, fmoe=1,
                         rtr=1, poll=50, recorder=rec)
    graph_ns: dict[bool, list[int]] = {True: [], False: []}
    cpu_ns: dict[bool, list[int]] = {True: [], False: []}     # all threads of the process
    with tempfile.TemporaryDirectory() as d, \
            TimingsWriter(Path(d) / "t.jsonl", {"type": "meta"}) as writer:
        for i_round in range(rounds + 1):             # round 0 warms up
            engine.reset()
            token = 1
            for i in range(n_gen):
                recording = (i + i_round) % 2 == 0
                rec.enabled = recording
                t0, c0 = time.perf_counter_ns(), time.process_time_ns()
                token = engine.eval([token], f"tg{n_gen}")
                writer.write_batches(rec.drain_batches())   # as the runner does after each graph
                if i_round:
                    graph_ns[recording].append(time.perf_counter_ns() - t0)
                    cpu_ns[recording].append(time.process_time_ns() - c0)
        n_events = writer.n_events
    engine.close()
    sched.record_routes = record_routes
    on, off = (1e9 / statistics.median(graph_ns[r]) for r in (True, False))
    mean_on, mean_off = (1e9 / statistics.fmean(graph_ns[r]) for r in (True, False))
    print(f"overhead on tg, {Path(path).name}, -t {threads}, ACC0 emulated, experts on CPU, "
          f"{rounds} rounds of {n_gen} graphs alternating:")
    print(f"  recorded      {on:8.2f} t/s  ({n_events / (rounds + 1) / ((n_gen + 1) // 2):.0f} "
          "events per recorded graph)")
    print(f"  not recorded  {off:8.2f} t/s")
    print(f"  ratio         {on / off:8.3f}   (medians; means give {mean_on / mean_off:.3f}; "
          "target >= 0.98)")
    cpu_on, cpu_off = (statistics.median(cpu_ns[r]) for r in (True, False))
    print(f"  CPU time per graph, all threads: {cpu_on / 1e6:.2f} ms recorded, "
          f"{cpu_off / 1e6:.2f} ms not (ratio {cpu_off / cpu_on:.3f}; less disturbed by "
          "other processes than wall time)")
    routes = statistics.median(routes_ns)
    print(f"  of a recorded graph, its routes (copy out + route events): {routes / 1e3:.1f} us of CPU time "
          f"(median) = {100 * routes / cpu_on:.2f} % of its CPU time; their lines: drain+write route")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", help="GGUF model (default: hyprof run's default model)")
    parser.add_argument("-n", type=int, default=32, help="graphs (tokens) per round")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recorder-only", action="store_true",
                        help="only the per-event figures")
    args = parser.parse_args()
    bench_recorder()
    if not args.recorder_only:
        bench_overhead(args.model, args.n, args.rounds, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
