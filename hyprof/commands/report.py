"""`hyprof report`: where every nanosecond of a run went, from its timings file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
categories (every nanosecond of a test goes to exactly one; when several overlap,
the one higher in this list wins and the report shows what was hidden):
  cpu_expert_matmul  a CPU worker runs an op on an expert tensor (name has _exps)
  cpu_other          a CPU worker runs any other op
  gpu_compute        a device op runs (the main thread waits or idles)
  thread_wakeup      dispatch until a worker runs; join after the last finishes
  copy               activation copies between backends (h2d / d2h)
  sync               waiting on a backend with no device op running
  sched              split setup and the rest of a split
  graph_build        graph_build / set_inputs phases
  other              everything else (sampling, Python between graphs)
overhead = thread_wakeup + copy + sync + sched + graph_build + other.

t/s: as llama-bench's, the mean ± sample standard deviation over the repetitions
of each one's tokens / wall time (the figure `hyprof run` prints for the same
runs); the what-if t/s project each repetition's wall, then take the same mean.
ms/token: a test's time summed over its repetitions, over its tokens.

bandwidth: bytes read over the union of busy time (many lanes at once count
once), so CPU expert GB/s compares with the machine's STREAM triad peak
(`hyprof membw`, recorded in the timings header; --peak-bw overrides it).

examples:
  hyprof report timings.jsonl
  hyprof report timings.jsonl --layers --splits --peak-bw 64
  hyprof report timings.jsonl --json > report.json
  hyprof report timings.jsonl --md            (writes reports/timings.md)
  hyprof report timings.jsonl --plots         (writes reports/timings/*.png)
  hyprof report ik.log --model model.gguf     (an ik_llama.cpp IK_PRINT_TIMING log, with the
                                               bytes its expert ops read taken from the model)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="attribute the wall time of a timings file: categories, ops, bandwidth, what-if",
        description="Read a timings file (from `hyprof run -o`, or an ik_llama.cpp IK_PRINT_TIMING "
        "log) and show, per test: t/s, where the wall time went (each category in s, %% and "
        "ms/token), the op timing breakdown, copies, the CPU expert bandwidth against the "
        "machine's peak, what t/s would be without the overhead or at peak bandwidth, and (when the "
        "run recorded routes) which experts the tokens chose and what keeping the hottest, or an LRU "
        "cache of them, on the GPU would move off the CPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("timings", metavar="TIMINGS", help="timings.jsonl (contract v1) or an ik_llama.cpp log")
    p.add_argument("--json", action="store_true", help="print the hyprof-report/1 JSON instead of tables")
    p.add_argument("--md", nargs="?", const="", metavar="FILE",
                   help="also write a markdown report (default: reports/<TIMINGS name>.md)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --md FILE or --plots files")
    p.add_argument("--plots", nargs="?", const="", metavar="DIR",
                   help="also draw the breakdown, timeline, ops, bandwidth, depth and experts plots "
                   "(default DIR: reports/<TIMINGS name>/)")
    p.add_argument("--plot-format", choices=("png", "svg", "pdf"), default="png", help="plot file format (default: png)")
    p.add_argument("--model", metavar="FILE.gguf",
                   help="for an imported log: the model file it ran, whose tensor table gives each expert op "
                   "the bytes it read (a log has none), so the report shows the CPU expert GB/s; a batch's "
                   "figure is an upper bound (≤), as its log does not say which experts it used")
    p.add_argument("--peak-bw", type=float, metavar="GBPS",
                   help="the CPU's peak memory bandwidth in GB/s (default: the one measured in the header)")
    p.add_argument("--layers", action="store_true", help="also show ops per layer and backend")
    p.add_argument("--splits", action="store_true", help="also show each split index: backend, time, nodes, copies")
    p.add_argument("--graphs", action="store_true", help="also show every graph (one row per evaluation)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from analysis.report import build_report
    from analysis.tables import report_tables
    from analysis.heap import keep_freed_memory
    from profiler.errors import UserError
    from profiler.files import atomic_output, check_output_path

    if args.peak_bw is not None and not args.peak_bw > 0:
        raise UserError(f"--peak-bw {args.peak_bw}: must be a positive number of GB/s")
    md_path = None
    if args.md is not None:
        md_path = Path(args.md) if args.md else Path("reports") / (Path(args.timings).stem + ".md")
        check_output_path(md_path, force=args.force or not args.md, flag="--md")

    plots_dir = None
    if args.plots is not None:
        from analysis.plots import plot_paths
        plots_dir = Path(args.plots) if args.plots else Path("reports") / Path(args.timings).stem
        for path in plot_paths(plots_dir, args.plot_format).values():
            check_output_path(path, force=args.force or not args.plots, flag="--plots")

    model = None
    if args.model is not None:
        from analysis.model_bytes import read_model
        model = read_model(args.model)
    keep_freed_memory()
    timings = _load_with_progress(args.timings, model)
    from analysis.attribution import attribute
    attribution = attribute(timings)
    report = build_report(timings, peak_bw=args.peak_bw, attribution=attribution)
    tables = report_tables(report, layers=args.layers, splits=args.splits, graphs=args.graphs) \
        if not args.json or md_path is not None else []

    if args.json:  # the tables carry the warnings; JSON keeps stdout clean, so they go to stderr
        import orjson
        for warning in timings.warnings:
            print(f"hyprof: warning: {warning}", file=sys.stderr)
        sys.stdout.buffer.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    else:
        from analysis import render_console
        from rich.console import Console
        console = Console() if sys.stdout.isatty() else Console(width=160)   # piped: wide rather than cut
        render_console.render(tables, console)
    if md_path is not None:
        from analysis import render_markdown
        text = render_markdown.render(tables)
        with atomic_output(md_path, force=args.force or not args.md, flag="--md") as f:
            f.write(text)
        print(f"hyprof: wrote {md_path}", file=sys.stderr)
    if plots_dir is not None:
        from analysis.plots import write_plots
        paths = write_plots(timings, report, attribution, plots_dir, args.plot_format,
                            force=args.force or not args.plots)
        print(f"hyprof: wrote {len(paths)} plots to {plots_dir}/: " + ", ".join(p.name for p in paths),
              file=sys.stderr)
    return 0


def _load_with_progress(path: str, model):
    """Load the timings, with a progress bar on stderr for files that take a while."""
    import os

    from analysis.timings import load_timings
    from profiler.progress import progress_bar

    size = os.path.getsize(path) if os.path.isfile(path) else 0
    with progress_bar(max(size >> 20, 1), f"reading {Path(path).name}", unit="MiB",
                      enabled=size > 64 << 20 and sys.stderr.isatty()) as advance:
        return load_timings(path, progress=lambda done: advance(completed=done >> 20), model=model)
