"""What the hybrid path costs: splits, wakeups, copies and overhead per generated token.

Runs tg on a model (default: deepseek-v2-lite-mini Q4_0, made and cached by
`hyprof run`) with the routed experts on the CPU and the rest on the emulated
accelerator ACC0 (`-ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"`), 2 threads, in each wait
mode, and prints per mode: tg t/s, splits and copies per token, bytes copied per
token, the thread wakeup median and p99, and the hybrid overhead as a share of
tg wall time, as `hyprof report` attributes it (everything that is not an op:
wakeup, copies, syncs, scheduling, graph build, sampling). Then the worker pool
alone: the dispatch-to-start latency of a worker, without a model around it.

    .venv/bin/python benchmarks/bench_hybrid.py [-m MODEL.gguf] [-t 2] [-n 32]

ACC0 computes on the same CPU cores as the workers: its times are not GPU times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import orjson
import torch

from analysis.attribution import attribute
from analysis.timings import load_lines
from hybrid.backends.cpu import MIN_SPLIT_BYTES, CpuBackend
from hybrid.engine import Engine
from hybrid.builder import forms
from hybrid.graph import Cost, Graph, Node
from hybrid.sched import Scheduler, split_graph
from profiler.recorder import Recorder
from profiler.schema import OVERHEAD_CATEGORIES
from profiler.sinks import timings_header

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"


def percentile_us(values_ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values_ns), q)) / 1e3 if values_ns else float("nan")


def tg_run(model: str, threads: int, poll: int, n_gen: int, n_prompt: int, rtr: int,
           fmoe: int) -> dict:
    """n_gen recorded tg steps after an unrecorded prompt; the figures of one wait mode."""
    rec = Recorder(enabled=False)
    with Engine(model, threads=threads, poll=poll, accel="emulated", n_gpu_layers=99,
                overrides=[EXPERTS_ON_CPU], rtr=rtr, fmoe=fmoe, recorder=rec) as engine:
        header = engine.header()
        token = engine.eval(list(range(1, n_prompt + 1)), f"pp{n_prompt}")
        for _ in range(2):                      # warm-up steps, not recorded
            token = engine.eval([token], "warmup")
        rec.drain()
        rec.enabled = True
        t0 = rec.now()
        for _ in range(n_gen):
            token = engine.eval([token], f"tg{n_gen}")
        wall_ns = rec.now() - t0
        rec.lane("main").test(t0, wall_ns, {"name": f"tg{n_gen}", "kind": "tg", "n_prompt": 0,
                                            "n_gen": n_gen, "depth": n_prompt, "rep": 0,
                                            "n_tokens": n_gen})
        events = rec.drain()
    meta = timings_header(model=header["model"], config=header["config"],
                          machine={"cpu": "", "cores": 0, "mem_bytes": 0, "gpu": None},
                          peak_bw={}, placement=header["placement"])
    timings = load_lines([orjson.dumps(meta)] + [orjson.dumps(e) for e in events], "bench")
    reps = attribute(timings).reps
    wall = int(reps["wall_ns"][0])
    overhead = sum(int(reps[f"{c}_ns"][0]) for c in OVERHEAD_CATEGORIES)
    by = {}
    for e in events:
        by.setdefault(e["type"], []).append(e)
    wakeups = [e["dur"] for e in by.get("wakeup", [])]
    copies = by.get("copy", [])
    return {
        "poll": poll, "tps": n_gen / (wall_ns / 1e9),
        "splits_per_token": len(by["split"]) / n_gen,
        "cpu_splits_per_token": sum(e["backend"] == "CPU" for e in by["split"]) / n_gen,
        "wakeups_per_token": len(wakeups) / n_gen,
        "wakeup_median_us": percentile_us(wakeups, 50), "wakeup_p99_us": percentile_us(wakeups, 99),
        "copies_per_token": len(copies) / n_gen,
        "copy_bytes_per_token": sum(e["bytes"] for e in copies) / n_gen,
        "overhead_share": overhead / wall,
        "categories_ms_per_token": {c: int(reps[f"{c}_ns"][0]) / 1e6 / n_gen
                                    for c in OVERHEAD_CATEGORIES},
    }


def pool_wakeups(threads: int, poll: int, n: int = 2000) -> list[int]:
    """Dispatch-to-start latency of the workers for n one-op CPU splits, 200 us apart
    (long enough that a blocking worker has gone back to sleep)."""
    rec = Recorder(enabled=True)
    cpu = CpuBackend({}, threads, poll > 0, rec)
    x = Node("INPUT", "x", (), None)
    op = Node("MUL_MAT", "noop", (x,), forms(lambda _, v: v,
                                            lambda _, v, pool, times: pool.run_tasks([lambda: None] * pool.n_threads,
                                                                                     times) or v),
              cost=Cost(MIN_SPLIT_BYTES))    # big enough to split
    graph = Graph([x, op], {"x": x}, op)
    plan = split_graph(graph, lambda _: "CPU")
    sched = Scheduler({"CPU": cpu}, rec)
    value = torch.zeros(1)
    try:
        for i in range(n):
            time.sleep(200e-6)
            sched.compute(graph, plan, {"x": value}, i)
    finally:
        cpu.close()
    return [e["dur"] for e in rec.drain() if e["type"] == "wakeup"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="GGUF file (default: hyprof run's default model)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-p", "--n-prompt", type=int, default=8)
    p.add_argument("-rtr", type=int, default=0, help="repack 4-bit weights at load (as hyprof run)")
    p.add_argument("-fmoe", type=int, default=1, help="fused gate+up expert op (as hyprof run)")
    args = p.parse_args()
    model = args.model
    if model is None:
        from hyprof.commands.run import default_model
        model = default_model(progress=True)

    print(f"model {model}, {args.threads} threads, -rtr {args.rtr} -fmoe {args.fmoe}, "
          f"experts on CPU, the rest on ACC0 (emulated); load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'poll':>4} {'tg t/s':>7} {'splits/tok':>10} {'cpu splits':>10} {'wakeup med us':>13} "
          f"{'p99 us':>7} {'copies/tok':>10} {'KiB/tok':>8} {'overhead':>8}")
    results = [tg_run(model, args.threads, poll, args.n_gen, args.n_prompt, args.rtr, args.fmoe)
               for poll in (0, 1)]
    for r in results:
        print(f"{r['poll']:>4} {r['tps']:>7.2f} {r['splits_per_token']:>10.1f} "
              f"{r['cpu_splits_per_token']:>10.1f} {r['wakeup_median_us']:>13.1f} "
              f"{r['wakeup_p99_us']:>7.1f} {r['copies_per_token']:>10.1f} "
              f"{r['copy_bytes_per_token'] / 1024:>8.1f} {r['overhead_share']:>8.1%}")
    for r in results:
        parts = ", ".join(f"{c} {v:.3f}" for c, v in r["categories_ms_per_token"].items())
        print(f"poll {r['poll']} overhead, ms per token: {parts}")

    print(f"\nworker pool alone ({args.threads} threads), dispatch to start of each worker:")
    for poll in (0, 1):
        w = pool_wakeups(args.threads, poll)
        print(f"  poll {poll}: median {percentile_us(w, 50):6.1f} us   p99 {percentile_us(w, 99):7.1f} us"
              f"   ({len(w)} wakeups; mean {statistics.fmean(w) / 1e3:.1f} us)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
