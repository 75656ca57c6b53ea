"""`hyprof import ik LOG -o timings.jsonl`: another engine's timing log as a timings file.

(The module is not called `import`: that is a Python keyword.)
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="convert another engine's timing log into a timings file",
        description="Convert a timing log written by another engine into the hyprof "
        "timings file (contract v1), so that `hyprof report`, `trace` and `diff` work on it "
        "as on our own runs. `hyprof report LOG` also accepts such a log directly.")
    engines = p.add_subparsers(dest="engine", metavar="ENGINE")
    ik = engines.add_parser(
        "ik", help="ik_llama.cpp built with IK_PRINT_TIMING (stdout, e.g. of llama-bench)",
        description="Read the stdout of an ik_llama.cpp program built with IK_PRINT_TIMING set "
        "to 1 (for example `llama-bench ... > run.log 2>&1`): per-op lines `OP(node): N us`, "
        "`ggml_barrier(...)`, `ggml_backend_sched_eval(.1.)`, tensor_set/get copies and the "
        "decode phases, plus llama-bench's table. Each decode becomes a graph, each llama-bench "
        "repetition a test carrying the table's t/s. Durations are laid end to end in log order; "
        "lines of other programs are skipped and counted. --explain prints how each kind of "
        "line is classified.",
        epilog="Example: hyprof import ik bench.log --model model.gguf -o reports/bench.jsonl && "
        "hyprof report reports/bench.jsonl")
    ik.add_argument("log", nargs="?", metavar="LOG", help="the IK_PRINT_TIMING log")
    ik.add_argument("-o", "--output", metavar="TIMINGS", help="timings file to write (.jsonl)")
    ik.add_argument("--model", metavar="FILE.gguf",
                    help="the model file the log ran: its tensor table gives each expert op the bytes it "
                    "read (the log has none), for the report's CPU expert GB/s; a batch's figure is an "
                    "upper bound (bytes_ub), as the log does not say which experts it used")
    ik.add_argument("--force", action="store_true", help="overwrite TIMINGS if it exists")
    ik.add_argument("--explain", action="store_true",
                    help="print the line classification rules (and convert if LOG and -o are given)")
    ik.set_defaults(func=run_ik)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_ik(args: argparse.Namespace) -> int:
    from analysis import ik_log
    from profiler.errors import UserError
    from profiler.files import atomic_output, check_output_path

    if args.explain:
        print(ik_log.explain())
        if args.log is None and args.output is None:
            return 0
    if args.log is None:
        raise UserError("import ik: LOG is required (the IK_PRINT_TIMING log to convert)")
    if args.output is None:
        raise UserError("import ik: -o TIMINGS is required (where to write the timings file)")
    if not os.path.isfile(args.log):
        raise UserError(f"{args.log}: no such file")
    check_output_path(args.output, args.force)
    if not ik_log.looks_like_ik_log(args.log):
        raise UserError(f"{args.log}: no IK_PRINT_TIMING lines (OP(name): N us, ggml_barrier(...), "
                        "graph_compute(...)) in its first MiB; is it ik_llama.cpp output built "
                        "with IK_PRINT_TIMING=1?")
    model = None
    if args.model is not None:
        from analysis.model_bytes import read_model
        model = read_model(args.model)
    scan = ik_log.scan(args.log)
    n_events = 0
    with atomic_output(args.output, force=args.force) as f:
        for line in ik_log.convert(args.log, scan, model):
            f.write(line)
            f.write("\n")
            n_events += 1
    s = scan.stats
    tests = ", ".join(dict.fromkeys(r.test for r in scan.rows)) or "none"
    print(f"{args.output}: {n_events - 1} events, {s.graphs} graphs, llama-bench tests: {tests}",
          file=sys.stderr)
    skipped = ", ".join(f"{v} {k}" for k, v in sorted(s.skipped.items()) if k != "blank")
    print(f"read {s.lines} lines: {s.timing_lines} timing lines, {s.table_lines} table lines"
          + (f", skipped {skipped}" if skipped else ""), file=sys.stderr)
    for what, n in (("graphs without graph_compute (truncated log?)", s.graphs_incomplete),
                    ("graphs outside any llama-bench repetition (warm-ups included)", s.graphs_without_test),
                    ("containers shorter than their children (stretched)", s.stretched),
                    ("CUDA graphs without op lines (set GGML_CUDA_DISABLE_GRAPHS=1 for per-op "
                     "times; their GPU time is filed as scheduler time)", s.cuda_splits_without_ops)):
        if n:
            print(f"note: {n} {what}", file=sys.stderr)
    for row in s.rows_unmatched:
        print(f"warning: llama-bench row at {row}: graphs do not split into warm-up + repetitions; "
              "left without a test", file=sys.stderr)
    return 0
