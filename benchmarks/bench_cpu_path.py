"""Issue 8's scorecard: the CPU path of a hybrid run, measured as a user would measure it.

For each weight type (the deepseek-v2-lite-mini model at Q4_0 and Q8_0, made once
and cached) and each wait mode of the CPU workers (`--poll 50`: spinning,
`--poll 0`: blocking), this runs `hyprof run` (tg, all on the CPU, -t threads)
with a timings file and reads the answer off `hyprof report --json`, the same
figures a user gets. Beside each run, STREAM triad (`profiler.membw`, 3 x 1 GiB)
is taken just before and just after it, so the expert bandwidth is compared with
what the memory system gave in the same minute: this VM's bandwidth moves by up
to 2x between minutes. `--rounds` repeats every configuration in turn (round 1 of
each, then round 2, ...) and each figure is the median over the rounds, the
experts / triad ratio of each round shown beside it. Columns:

  tg t/s              mean over the repetitions
  experts GB/s        CPU expert matmul bytes as stored / their wall time (report)
  triad GB/s          median of the triads before and after the run
  experts / triad     the issue's target: >= 85 % (median of rounds; each round's)
  overhead % of wall  wakeup + copies + sync + scheduling + graph build + other
                      (report; the issue's target: < 5 %)
  wakeup median, p99  per worker and split: the main thread's dispatch to the
                      worker starting (timings' `wakeup` events; target: <= 10 us
                      spinning)

    .venv/bin/python benchmarks/bench_cpu_path.py [--types q4_0,q8_0] [-t 2] [-n 32] [-r 3]
        [--poll 50,0] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from analysis.timings import load_timings
from hyprof.commands.run import cached_model
from profiler.membw import measure_stream

PRESET = "deepseek-v2-lite-mini"
HYPROF = [sys.executable, "-m", "hyprof"]


def triad_GBps(threads: int) -> float:
    return statistics.median(measure_stream(threads, runs=3).triad_samples_GBps)


def hyprof(*args: str) -> str:
    done = subprocess.run([*HYPROF, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"hyprof {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def wakeups_us(timings_path: str) -> np.ndarray:
    t = load_timings(timings_path)
    ev = t.events
    return ev["dur"][ev["type"] == t.type_code("wakeup")] / 1e3


def measure(qtype: str, threads: int, poll: int, n_gen: int, reps: int, workdir: str) -> dict:
    model = cached_model(PRESET, qtype, progress=True)
    timings = os.path.join(workdir, f"{qtype}-poll{poll}.jsonl")
    before = triad_GBps(threads)
    hyprof("run", "-m", model, "-p", "0", "-n", str(n_gen), "-r", str(reps), "-ngl", "0",
           "--accel", "none", "-t", str(threads), "--poll", str(poll), "-o", timings, "--force",
           "--no-progress", "--peak-bw", f"{before:.3f}")
    after = triad_GBps(threads)
    test = json.loads(hyprof("report", timings, "--json"))["tests"][0]
    triad = statistics.median([before, after])
    experts = test["bandwidth"]["cpu_expert_GBps"]
    wake = wakeups_us(timings)
    return {"type": qtype, "poll": poll, "threads": threads, "test": test["name"], "tps": test["tps"],
            "tps_std": test["tps_std"], "experts_GBps": experts, "triad_before_GBps": before,
            "triad_after_GBps": after, "experts_over_triad": experts / triad,
            "overhead_pct": 100 * test["overhead_s"] / test["wall_s"],
            "ms_per_token": test["ms_per_token"],
            "wakeup_median_us": float(np.median(wake)) if wake.size else None,
            "wakeup_p99_us": float(np.percentile(wake, 99)) if wake.size else None}


def median_of_rounds(rounds: list[dict]) -> dict:
    """One configuration's rounds -> one row: each figure's median over the rounds (the
    triads' too), with the per-round experts / triad ratios kept."""
    row = dict(rounds[0])
    for key, value in row.items():
        if isinstance(value, float) and all(r[key] is not None for r in rounds):
            row[key] = float(statistics.median(r[key] for r in rounds))
    row["ms_per_token"] = {k: float(statistics.median(r["ms_per_token"][k] for r in rounds))
                           for k in rounds[0]["ms_per_token"]}
    row["experts_over_triad_rounds"] = [r["experts_over_triad"] for r in rounds]
    return row


def render(rows: list[dict]) -> str:
    lines = ["| weights | poll | test | tg t/s | experts GB/s | triad GB/s (before/after) | experts / triad "
             "| overhead % of wall | wakeup median / p99 us |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        wake = ("-" if r["wakeup_median_us"] is None
                else f"{r['wakeup_median_us']:.1f} / {r['wakeup_p99_us']:.1f}")
        lines.append(f"| {r['type']} | {r['poll']} | {r['test']} | {r['tps']:.2f} ± {r['tps_std']:.2f} | "
                     f"{r['experts_GBps']:.1f} | {r['triad_before_GBps']:.1f} / {r['triad_after_GBps']:.1f} | "
                     f"{100 * r['experts_over_triad']:.0f} % "
                     f"({' '.join(f'{100 * x:.0f}' for x in r['experts_over_triad_rounds'])}) | "
                     f"{r['overhead_pct']:.1f} | {wake} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--types", default="q4_0,q8_0", help="weight types (default: q4_0,q8_0)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--poll", default="50,0", help="wait modes to run (default: 50,0)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default: 3)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be at least 1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hyprof-bench-") as workdir:
        configs = [(qtype, int(poll)) for qtype in args.types.split(",") for poll in args.poll.split(",")]
        rounds = [[measure(qtype, args.threads, poll, args.n_gen, args.repetitions, workdir)
                   for qtype, poll in configs] for _ in range(args.rounds)]
        rows = [median_of_rounds([r[i] for r in rounds]) for i in range(len(configs))]
    load = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(load_before, os.getloadavg()))
    if args.json:
        print(json.dumps({"rows": rows, "loadavg": [load_before, os.getloadavg()]}, indent=1))
    else:
        print(render(rows))
        print(f"\nmodel {PRESET}, all on the CPU, {args.threads} threads; load average {load} "
              f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
