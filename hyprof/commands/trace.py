"""`hyprof trace`: the raw timeline of a run as a Chrome trace, to open in Perfetto UI or chrome://tracing."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
lanes: process "host" holds the main thread, the splits, each CPU worker (cpu1, ...)
and the copies; each accelerator (CUDA0, ACC0) is a process with its stream.
Event colours follow the attribution category (`cat`); arrows link each copy
to the split that consumes it; counter tracks show the GB/s read per backend.

Open the file at https://ui.perfetto.dev (drag and drop) or chrome://tracing.
JSON traces over a few hundred MB strain a browser: cut a window with --graphs
(graph ids as in `hyprof report --graphs`).

examples:
  hyprof trace timings.jsonl -o trace.json
  hyprof trace timings.jsonl -o window.json --graphs 100:110
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="export a timings file as a Chrome trace (Perfetto UI, chrome://tracing)",
        description="Write every test, graph, split, op, copy, wakeup and sync of a timings file as a "
        "Chrome Trace Event Format file: one lane per host thread and per device, the time "
        "category of each event, copy-to-split arrows and bandwidth counters.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("timings", metavar="TIMINGS", help="timings.jsonl (contract v1) or an ik_llama.cpp log")
    p.add_argument("-o", "--output", required=True, metavar="TRACE.json", help="the trace file to write")
    p.add_argument("--graphs", metavar="A:B",
                   help="only graphs with A <= id < B (and what runs between them); A: or :B leave an end open")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from analysis.attribution import attribute
    from analysis.heap import keep_freed_memory
    from analysis.timings import load_timings
    from analysis.trace import parse_graphs, write_trace
    from profiler.files import check_output_path

    graphs = parse_graphs(args.graphs) if args.graphs is not None else None
    check_output_path(args.output, force=args.force)
    keep_freed_memory()
    timings = load_timings(args.timings)
    for warning in timings.warnings:
        print(f"hyprof: warning: {warning}", file=sys.stderr)
    summary = write_trace(timings, attribute(timings), args.output, graphs=graphs, force=args.force)
    window = f", graphs {summary.graphs[0]}..{summary.graphs[1]}" if summary.graphs else ""
    print(f"hyprof: wrote {args.output}: {summary.n_complete:,} events, {summary.n_flows:,} copy flows, "
          f"{summary.n_counters:,} counter samples{window}", file=sys.stderr)
    if summary.n_overlap_moved:
        print(f"hyprof: warning: {summary.n_overlap_moved:,} events overlapped a neighbour on their lane in "
              f"part; they are on '(overlap)' lanes", file=sys.stderr)
    return 0
