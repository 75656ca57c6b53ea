"""How long `hyprof model make` takes per --type: gguf-py's quantisers (q4_0) beside hyprof's
NumPy ones (the mixes), rounds alternated so that a shared machine's load falls on both.

Prints per round and type the wall and CPU seconds of writing the preset (generation, the
quantisation and the write), the load average around it, and the CPU first. The
quantisers are single-threaded NumPy: wall time is CPU time unless the machine is busy.

    .venv/bin/python benchmarks/bench_model_make.py                  # deepseek-v2-lite-mini, q4_0 vs q4_k_m
    .venv/bin/python benchmarks/bench_model_make.py --types q4_0 iq4_xs q6_k --rounds 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v2-lite-mini")
    p.add_argument("--types", nargs="+", default=["q4_0", "q4_k_m"], help="--type values (default: q4_0 q4_k_m)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    from hybrid.make_model import make_model
    from profiler.machine import cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; preset {args.preset}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for qtype in args.types:
                path = Path(tmp) / f"{qtype}.gguf"
                load = os.getloadavg()[0]
                wall, cpu = time.perf_counter(), time.process_time()
                make_model(path, args.preset, qtype, force=True)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                print(f"round {r + 1} {qtype:7s} {wall:6.1f} s wall {cpu:6.1f} s CPU  "
                      f"{path.stat().st_size / 2**30:.2f} GiB  load {load:.2f} -> {os.getloadavg()[0]:.2f}")
                path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
