"""How well `hyprof advise` predicts: its verified candidates' predicted against measured t/s.

Runs `hyprof advise ... --verify N --json` several times (each calibrates afresh) and prints,
per run and verified candidate, the predicted and measured tg and pp t/s and the error
(predicted / measured - 1), with the load average before and after each run: on a shared
machine the calibration and the verification see different loads, and the errors say more
about that than about the model. Prints the CPU and its SIMD path first.

    .venv/bin/python benchmarks/bench_advise.py                      # issue 22's case
    .venv/bin/python benchmarks/bench_advise.py --runs 5 -- --vram 900MiB --verify 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_ARGS = ["--vram", "700MiB", "--accel", "emulated", "-t", "2", "--verify", "2"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="advise runs (default: 3)")
    p.add_argument("-m", "--model", help="model (default: advise's default, deepseek-v2-lite-mini Q4_0)")
    p.add_argument("advise_args", nargs="*", help=f"after --: advise's flags (default: {' '.join(DEFAULT_ARGS)})")
    args = p.parse_args()
    from hybrid.cpu_kernels import available
    from profiler.machine import host_machine

    machine = host_machine()
    print(f"CPU {machine['cpu']}, {machine['cores']} cores, SIMD path {available()}")
    flags = (["-m", args.model] if args.model else []) + (args.advise_args or DEFAULT_ARGS)
    print(f"hyprof advise {' '.join(flags)} --json, {args.runs} runs")
    errors = []
    for run in range(args.runs):
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-m", "hyprof", "advise", *flags, "--json", "--no-progress"],
                             capture_output=True, text=True, check=True).stdout
        print(f"run {run + 1}: load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
        for c in json.loads(out)["candidates"]:
            if "measured_tg_tps" not in c:
                continue
            errors.append(c["tg_error"])
            print(f"  #{c['rank']} {c['placement'][:60]:60s}  tg {c['tg_tps']:7.2f} predicted "
                  f"{c['measured_tg_tps']:7.2f} measured {100 * c['tg_error']:+6.1f}%   pp {c['pp_tps']:7.1f} "
                  f"predicted {c['measured_pp_tps']:7.1f} measured {100 * c['pp_error']:+6.1f}%")
    if errors:
        worst = max(errors, key=abs)
        print(f"tg error: mean |error| {100 * sum(map(abs, errors)) / len(errors):.1f}%, worst {100 * worst:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
