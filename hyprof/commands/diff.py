"""`hyprof diff`: two runs side by side, per test and category, with the ops that changed most."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
Tests are matched by name (pp512, tg128, tg64@pp4096); times are per token, so
runs with different repetitions still compare. Change % is relative to A.

examples:
  hyprof run -ot '\\.ffn_.*_exps\\.=CPU' -o experts-cpu.jsonl
  hyprof run -ot 'blk\\.[0-9]\\.ffn_.*_exps\\.=CUDA0;\\.ffn_.*_exps\\.=CPU' -o some-on-gpu.jsonl
  hyprof diff experts-cpu.jsonl some-on-gpu.jsonl --plots
  hyprof diff fmoe0.jsonl fmoe1.jsonl --json
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diff", help="compare two timings files: t/s and each category per test, ops that changed most",
        description="Compare two runs (say, two placements, or -fmoe 0 against 1): per test, t/s and "
        "each time category in ms/token side by side with the change, the ops whose time "
        "changed most, and (when both recorded routes) how much of each MoE layer's expert usage moved.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A.jsonl", help="the baseline run")
    p.add_argument("b", metavar="B.jsonl", help="the run compared with it")
    p.add_argument("--json", action="store_true", help="print the hyprof-diff/1 JSON instead of tables")
    p.add_argument("--plots", nargs="?", const="", metavar="DIR",
                   help="also draw the paired breakdown chart (default DIR: reports/diff-<A>-vs-<B>/)")
    p.add_argument("--plot-format", choices=("png", "svg", "pdf"), default="png", help="plot file format")
    p.add_argument("--top", type=int, default=10, metavar="N", help="ops to show per test (default: 10)")
    p.add_argument("--force", action="store_true", help="overwrite existing plot files in an explicit DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from analysis.diff import diff_reports, diff_tables
    from analysis.heap import keep_freed_memory
    from analysis.report import build_report
    from analysis.timings import load_timings
    from profiler.errors import UserError
    from profiler.files import check_output_path

    if args.top < 1:
        raise UserError(f"--top {args.top}: must be at least 1")
    plots_dir = None
    if args.plots is not None:
        plots_dir = Path(args.plots) if args.plots else \
            Path("reports") / f"diff-{Path(args.a).stem}-vs-{Path(args.b).stem}"
        check_output_path(plots_dir / f"breakdown-diff.{args.plot_format}", force=args.force or not args.plots,
                          flag="--plots")
    keep_freed_memory()
    reports = []
    for path in (args.a, args.b):
        timings = load_timings(path)
        for warning in timings.warnings:
            print(f"hyprof: warning: {warning}", file=sys.stderr)
        reports.append(build_report(timings))
    diff = diff_reports(*reports, top_ops=args.top)
    if args.json:
        import orjson
        sys.stdout.buffer.write(orjson.dumps(diff.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    else:
        from analysis import render_console
        render_console.render(diff_tables(diff))
    if plots_dir is not None:
        from analysis.plots import write_diff_plot
        path = write_diff_plot(diff, plots_dir, args.plot_format, force=args.force or not args.plots)
        print(f"hyprof: wrote {path}", file=sys.stderr)
    return 0
