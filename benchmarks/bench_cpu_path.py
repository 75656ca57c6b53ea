"""Issue 8's scorecard: the CPU path of a hybrid run, against the memory bandwidth of the same seconds.

For each weight type (the deepseek-v2-lite-mini model, or `--preset`'s, e.g.
qwen3-30b-a3b-mini, at Q4_0 and Q8_0, made once and cached) and each wait mode of the CPU workers (`--poll 50`: spinning,
`--poll 0`: blocking), this runs what `hyprof run -p 0 -n N -r R -ngl 0 --accel none
-t T --poll P -o FILE` runs (the same runner, engine and timings writer, in this
process) and reads the answer off the same report as `hyprof report`.

The one addition: STREAM triad (`profiler.membw`, 3 x --triad-mib arrays, made
once; the median of 3 runs) is taken at every repetition's start, as the runner
resets the engine, and once after the last, so each repetition lies between two
triads about a second apart. This VM's
bandwidth moves by up to 2x between minutes and a single triad by more between
seconds, so the experts are compared with what the memory system gave around
them, repetition by repetition, and the ratio reported is the median of those.
Before each triad the engine's workers are left idle past their `--poll` spin,
so they are asleep and take no core from it. `--rounds` repeats every
configuration in turn (round 1 of each, then round 2, ...). Columns:

  tg t/s              mean over every repetition of every round
  experts GB/s        CPU expert matmul bytes as stored / their wall time, median
                      over the repetitions (the report's figure, per repetition)
  triad GB/s          median of the triads
  experts / triad     the issue's target: >= 85 %; median over the repetitions of
                      each one's experts GB/s / the mean of its two triads (the
                      lowest and highest beside it)
  overhead % of wall  wakeup + copies + sync + scheduling + graph build + other
                      (report, all repetitions; the issue's target: < 5 %), and
                      each of those in us per token; `other` includes the runner's
                      `record` phases (handing each graph's events to the timings
                      writer: the profiler's own cost, which a run without -o does
                      not pay), shown apart and also left out in ( )
  wakeup median, p99  per worker and split: the main thread's dispatch to the
                      worker starting (timings' `wakeup` events; target: <= 10 us
                      spinning)

    .venv/bin/python benchmarks/bench_cpu_path.py [--types q4_0,q8_0] [-t 2] [-n 32] [-r 5]
        [--poll 50,0] [--rounds 2] [--triad-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from analysis.attribution import CAT, attribute
from analysis.intervals import window_index
from analysis.report import build_report
from analysis.timings import load_timings
from hybrid.backends.cpu import SPIN_NS_PER_POLL
from hybrid.engine import make_engine
from hybrid.make_model import PRESETS
from hyprof.commands.run import cached_model
from profiler.bench import plan_tests, run_bench, sweep
from profiler.membw import StreamArrays
from profiler.schema import OVERHEAD_CATEGORIES

DEFAULT_PRESET = "deepseek-v2-lite-mini"
EXPERTS = CAT["cpu_expert_matmul"]


class TriadAtReset:
    """An engine of `make_engine` that takes a triad whenever the runner resets it (before
    the warm-up and before each repetition), once its workers have gone to sleep, and then
    evaluates one token, unrecorded, as the runner's warm-up does: without it, each
    repetition's first split would wait milliseconds for its sleeping workers (this VM
    wakes an idle vCPU that slowly), where back-to-back repetitions find them spinning."""

    def __init__(self, engine, poll: int, stream: StreamArrays, triads: list[float]):
        self.engine, self.stream, self.triads = engine, stream, triads
        self.idle_s = poll * SPIN_NS_PER_POLL / 1e9 + 0.05

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def reset(self) -> None:
        time.sleep(self.idle_s)
        self.triads.append(triad_GBps(self.stream))
        self.engine.reset()
        self.engine.eval([0], "warm-up")
        self.engine.reset()


def triad_GBps(stream: StreamArrays) -> float:
    return statistics.median(stream.triad_GBps() for _ in range(3))


def rep_experts_GBps(t, a) -> list[float]:
    """Each repetition's CPU expert bandwidth, as the report computes it for a whole test:
    the bytes of the expert events inside it / the time any of them was running."""
    rep = window_index(t.events["ts"], a.reps["ts_ns"], a.reps["ts_ns"] + a.reps["wall_ns"])
    mine = (a.event_category == EXPERTS) & (rep >= 0)
    nbytes = np.bincount(rep[mine], weights=t.events["bytes"][mine].astype(np.float64), minlength=len(a.reps))
    busy = a.reps["cpu_expert_matmul_busy_ns"]
    return [float(b / ns) if ns else float("nan") for b, ns in zip(nbytes, busy)]


def measure(preset: str, qtype: str, threads: int, poll: int, n_gen: int, reps: int, stream: StreamArrays,
            workdir: str) -> dict:
    model = cached_model(preset, qtype, progress=True)
    timings = os.path.join(workdir, f"{qtype}-poll{poll}.jsonl")
    triads: list[float] = []

    def bracketed(*args, **kwargs):
        return TriadAtReset(make_engine(*args, **kwargs), poll, stream, triads)

    config = sweep(threads=[threads], n_gpu_layers=[0], override_sets=[], accel="none", poll=[poll])
    run_bench(bracketed, model, config, plan_tests(n_prompt=[0], n_gen=[n_gen], pg=[], depths=[0]),
              reps, timings=timings, force=True, peak_bw=lambda _: {}, progress=False)
    triads.append(triad_GBps(stream))
    t = load_timings(timings)
    a = attribute(t)
    test = build_report(t, attribution=a).tests[0]
    experts = rep_experts_GBps(t, a)
    around = [(triads[1 + i], triads[2 + i]) for i in range(reps)]      # [0]: before the warm-up
    ev = t.events
    wake = ev["dur"][ev["type"] == t.type_code("wakeup")] / 1e3
    return {"type": qtype, "poll": poll, "threads": threads, "test": test.name,
            "rep_tps": list(test.rep_tps), "experts_GBps": experts, "triads_GBps": triads[1:],
            "experts_over_triad": [e / statistics.mean(b) for e, b in zip(experts, around)],
            "overhead_ns": test.overhead_ns, "wall_ns": test.wall_ns, "n_tokens": test.n_tokens,
            "overhead_categories_ns": {**{c: test.categories_ns[c] for c in OVERHEAD_CATEGORIES},
                                       "of which recording": test.recording_ns},
            "wakeups_us": wake.tolist()}


def row(rounds: list[dict]) -> dict:
    """One configuration's rounds -> its figures (every repetition of every round pooled)."""
    pooled = {k: [x for r in rounds for x in r[k]]
              for k in ("rep_tps", "experts_GBps", "triads_GBps", "experts_over_triad", "wakeups_us")}
    wake = np.array(pooled["wakeups_us"])
    return {"type": rounds[0]["type"], "poll": rounds[0]["poll"], "threads": rounds[0]["threads"],
            "test": rounds[0]["test"], "tps": statistics.mean(pooled["rep_tps"]),
            "tps_std": statistics.stdev(pooled["rep_tps"]) if len(pooled["rep_tps"]) > 1 else 0.0,
            "experts_GBps": statistics.median(pooled["experts_GBps"]),
            "triad_GBps": statistics.median(pooled["triads_GBps"]),
            "experts_over_triad": statistics.median(pooled["experts_over_triad"]),
            "experts_over_triad_reps": pooled["experts_over_triad"],
            "overhead_pct": 100 * sum(r["overhead_ns"] for r in rounds) / sum(r["wall_ns"] for r in rounds),
            "overhead_us_per_token": {c: sum(r["overhead_categories_ns"][c] for r in rounds) / 1e3
                                      / sum(r["n_tokens"] for r in rounds) for c in rounds[0]["overhead_categories_ns"]},
            "overhead_pct_without_recording": 100 * sum(r["overhead_ns"] - r["overhead_categories_ns"]["of which recording"]
                                                        for r in rounds) / sum(r["wall_ns"] for r in rounds),
            "wakeup_median_us": float(np.median(wake)) if wake.size else None,
            "wakeup_p99_us": float(np.percentile(wake, 99)) if wake.size else None}


def render(rows: list[dict]) -> str:
    lines = ["| weights | poll | test | tg t/s | experts GB/s | triad GB/s | experts / triad "
             "(min - max) | overhead % of wall (without recording) | overhead us / token | wakeup median / p99 us |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        wake = ("-" if r["wakeup_median_us"] is None
                else f"{r['wakeup_median_us']:.1f} / {r['wakeup_p99_us']:.1f}")
        each = r["experts_over_triad_reps"]
        per_token = ", ".join(f"{c} {us:.0f}" for c, us in r["overhead_us_per_token"].items() if us >= 0.5)
        lines.append(f"| {r['type']} | {r['poll']} | {r['test']} | {r['tps']:.1f} ± {r['tps_std']:.1f} | "
                     f"{r['experts_GBps']:.1f} | {r['triad_GBps']:.1f} | "
                     f"{100 * r['experts_over_triad']:.0f} % ({100 * min(each):.0f} - {100 * max(each):.0f}, "
                     f"{sum(x >= 0.85 for x in each)}/{len(each)} >= 85 %) | "
                     f"{r['overhead_pct']:.1f} ({r['overhead_pct_without_recording']:.1f}) | {per_token} | {wake} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                    help=f"the model `hyprof model make` makes (default: {DEFAULT_PRESET})")
    ap.add_argument("--types", default="q4_0,q8_0", help="weight types (default: q4_0,q8_0)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--poll", default="50,0", help="wait modes to run (default: 50,0)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every configuration (default: 2)")
    ap.add_argument("--triad-mib", type=int, default=1024,
                    help="each triad array, MiB (default: 1024; keep it far above the L3 cache)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    for flag, value in (("--rounds", args.rounds), ("-r", args.repetitions), ("--triad-mib", args.triad_mib)):
        if value < 1:
            ap.error(f"{flag} {value}: must be at least 1")
    load_before = os.getloadavg()
    stream = StreamArrays(args.threads, args.triad_mib << 20)
    with tempfile.TemporaryDirectory(prefix="hyprof-bench-") as workdir:
        configs = [(qtype, int(poll)) for qtype in args.types.split(",") for poll in args.poll.split(",")]
        rounds = []
        for i in range(args.rounds):
            rounds.append([])
            for qtype, poll in configs:
                print(f"round {i + 1}/{args.rounds}: {qtype} --poll {poll}", file=sys.stderr, flush=True)
                rounds[-1].append(measure(args.preset, qtype, args.threads, poll, args.n_gen, args.repetitions,
                                          stream, workdir))
        rows = [row([r[i] for r in rounds]) for i in range(len(configs))]
    load = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(load_before, os.getloadavg()))
    if args.json:
        print(json.dumps({"rows": rows, "loadavg": [load_before, os.getloadavg()]}, indent=1))
    else:
        print(render(rows))
        print(f"\nmodel {args.preset}, all on the CPU, {args.threads} threads, {args.rounds} rounds x "
              f"{args.repetitions} repetitions; load average {load} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
