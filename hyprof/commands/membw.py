"""`hyprof membw`: the CPU's peak memory bandwidth (STREAM copy and triad), cached."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "membw", help="measure the CPU's peak memory bandwidth (STREAM copy and triad)",
        description="Measure what the memory system delivers to T threads: STREAM copy "
        "(c = a) and triad (a = b + s*c) over three arrays far larger than the last-level "
        "cache, median of several runs. `hyprof run -o` records the triad figure in the "
        "timings header as the CPU peak, and `hyprof report` states the expert matmul "
        "bandwidth as a fraction of it. Results are cached per CPU model, core count and "
        "thread count; --refresh measures again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1,
                   help="threads, as the run's -t")
    p.add_argument("--array-mib", type=int, default=1024,
                   help="size of each of the three arrays in MiB (at least 4x the L3 cache)")
    p.add_argument("--runs", type=int, default=5, help="runs of each kernel; the median counts")
    p.add_argument("--refresh", action="store_true", help="measure even if a result is cached")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from profiler.errors import UserError
    from profiler.membw import cached_stream

    if args.array_mib < 1:
        raise UserError(f"--array-mib {args.array_mib}: must be >= 1")
    result, cached = cached_stream(args.threads, array_bytes=args.array_mib << 20,
                                   runs=args.runs, refresh=args.refresh,
                                   progress=not args.json)
    if args.json:
        print(json.dumps({**asdict(result), "method": result.method, "cached": cached},
                         indent=2))
        return 0
    print(f"CPU    {result.cpu}, {result.cores} cores, {result.threads} threads")
    print(f"copy   {result.copy_GBps:8.2f} GB/s")
    print(f"triad  {result.triad_GBps:8.2f} GB/s   (the peak `hyprof run` records)")
    print(f"{result.method}" + (" (cached; --refresh measures again)" if cached else ""),
          file=sys.stderr)
    return 0
