"""`hyprof run`: a llama-bench run of the hybrid engine that also records every event."""

from __future__ import annotations

import argparse
import os
import sys

from profiler.errors import UserError

DEFAULT_PRESET = "deepseek-v2-lite-mini"
DEFAULT_QTYPE = "q4_0"

EPILOG = """\
tests (as llama-bench):
  pp<N>        prompt processing: N tokens in one batch            (-p N)
  tg<N>        text generation: N evaluations of one token         (-n N)
  pp<P>+tg<G>  a prompt then generation, timed together            (-pg P,G)
  X@pp<D>      test X after an untimed prompt of D tokens (depth)  (-d D)
Each test runs once to warm up, then -r times from an empty KV cache; t/s is
the mean ± standard deviation over those repetitions.

sweeps: -t, -p, -n, -d, -ngl, -ncmoe, -ub, -mla, -fa, -fmoe, -rtr, -nopo,
--op-offload-min-batch take comma lists (or repeat the flag); every combination of the
engine flags is one table row per test.
-ot follows llama-bench: `;` separates the rules of one set, `,` (or another
-ot) starts another set to sweep, an empty -ot "" is the empty set. A piece
without '=' belongs to the next rule, so a regex may hold `,` or `;`:
  -ot "\\.ffn_.*_exps\\.=CPU"         one set, one rule
  -ot "exps=CPU;blk\\.0\\.=CPU"       one set, two rules
  -ot "blk\\.\\d{1,2}\\.=CPU"         one set, one rule (the `,` is the regex's)
  -ot "exps=CPU" -ot ""             two sets: experts on CPU, then none

op offload (as llama.cpp's scheduler): with experts on the CPU (-ot, -ncmoe), a matmul on
a host weight whose batch (a ubatch's tokens, -ub) is at least the minimum (32, or
GGML_OP_OFFLOAD_MIN_BATCH, or --op-offload-min-batch) runs on the accelerator, which first
uploads the experts the batch uses: a prompt's experts cross the bus, a token's run on the
CPU. --op-offload ik takes ik_llama.cpp's rule (also batch x n_expert_used >= minimum x
n_expert); -nopo 1 turns it off. `hyprof report` shows the uploads and the batch where
offloading starts to pay.
  hyprof run -p 64 -n 4 -ngl 99 -ot "\\.ffn_.*_exps\\.=CPU" --accel emulated \\
      --op-offload-min-batch 16,32,64,128 -o t.jsonl

timings: -o FILE writes the header (model, config, machine, placement, the
CPU's peak bandwidth from `hyprof membw`, cached) and every event of every
measured repetition, flushed after each graph; Ctrl-C keeps every completed
graph. Read it with `hyprof report FILE`. HYPROF_PRINT_TIMING=1 prints each
op, copy, wakeup, split, sync and phase on stderr as it completes.

examples:
  hyprof run -p 64 -n 16 -r 3 --accel emulated -ot "\\.ffn_.*_exps\\.=CPU" -o t.jsonl
  hyprof run -m model.gguf -t 1,2 -n 32 -p 0 --output csv
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="benchmark a model like llama-bench and record every event",
        description="Benchmark hybrid CPU+accelerator inference of a MoE model with "
        "llama-bench's tests and flags, print the t/s table, and (with -o) record the "
        "timings file that `hyprof report` attributes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="FILE.gguf",
                   help=f"model file (default: {DEFAULT_PRESET} at {DEFAULT_QTYPE.upper()}, "
                   "made once and cached)")
    p.add_argument("-p", "--n-prompt", type=_ints, action="append", metavar="N[,N]",
                   help="prompt tokens per pp test (default: 512)")
    p.add_argument("-n", "--n-gen", type=_ints, action="append", metavar="N[,N]",
                   help="generated tokens per tg test (default: 128)")
    p.add_argument("-pg", type=_pair, action="append", default=[], metavar="PP,TG",
                   help="a prompt+generation test (repeatable)")
    p.add_argument("-d", "--n-depth", type=_ints, action="append", metavar="N[,N]",
                   help="KV cache depth before each test (default: 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N",
                   help="measured repetitions per test (default: 5)")
    p.add_argument("-t", "--threads", type=_ints, action="append", metavar="N[,N]",
                   help=f"CPU threads (default: {os.cpu_count()})")
    p.add_argument("-ngl", "--n-gpu-layers", type=_ints, action="append", metavar="N[,N]",
                   help="last N repeating layers (and output) on the accelerator (default: 99)")
    p.add_argument("-ncmoe", "--n-cpu-moe", type=_ints, action="append", metavar="N[,N]",
                   help="keep the routed experts of the first N layers on the CPU, as an -ot rule tried "
                   "before the -ot ones (default: 0)")
    p.add_argument("-ub", "--ubatch-size", type=_ints, action="append", metavar="N[,N]",
                   help="ubatch: a prompt longer than N tokens runs as several graphs of at most N "
                   "(default: 512)")
    p.add_argument("-nopo", "--no-op-offload", type=_switches, action="append", metavar="0|1",
                   help="1: no op offload, a host weight's ops stay on the CPU whatever the batch (default: 0)")
    p.add_argument("--op-offload-min-batch", type=_ints, action="append", metavar="N[,N]",
                   help="the smallest batch whose ops on host weights are offloaded (default: "
                   "GGML_OP_OFFLOAD_MIN_BATCH, else 32)")
    p.add_argument("--op-offload", choices=("llama.cpp", "ik"), default="llama.cpp",
                   help="the op-offload rule: llama.cpp's (batch >= minimum) or ik_llama.cpp's (also "
                   "batch x n_expert_used >= minimum x n_expert) (default: llama.cpp)")
    p.add_argument("-ot", "--override-tensor", action="append", default=[],
                   metavar="REGEX=BACKEND[;...][,...]",
                   help="placement rules overriding -ngl, first match wins (see below)")
    p.add_argument("--accel", choices=("auto", "cuda", "emulated", "none"), default="auto",
                   help="accelerator: a CUDA GPU, the emulated ACC0, or none (default: auto, "
                   "CUDA if present else emulated)")
    p.add_argument("-mla", type=_switches, action="append", metavar="0|1",
                   help="multi-head latent attention (default: 0)")
    p.add_argument("-fa", type=_switches, action="append", metavar="0|1",
                   help="flash attention: kq, softmax and kqv as one FLASH_ATTN_EXT op, its heads shared "
                   "by the CPU threads (default: 1, as ik_llama.cpp)")
    p.add_argument("-fmoe", type=_switches, action="append", metavar="0|1",
                   help="fused MoE up/gate (default: 1)")
    p.add_argument("-rtr", type=_switches, action="append", metavar="0|1",
                   help="repack 4-bit weights at load into torch's int4 pack (default: 0; slow to load, "
                   "and the native kernels on the GGUF blocks, which the engine repacks itself where that wins, are faster)")
    p.add_argument("--poll", type=_ints, action="append", metavar="0..100",
                   help="worker polling level: idle CPU workers spin up to N x 2 ms between splits "
                   "before sleeping, as ggml's --poll (default: 50)")
    p.add_argument("-o", dest="timings", metavar="TIMINGS.jsonl",
                   help="write every event of every measured repetition here")
    p.add_argument("--force", action="store_true", help="overwrite an existing timings file")
    p.add_argument("--output", choices=("md", "json", "csv"), default="md",
                   help="result table format on stdout (default: md)")
    p.add_argument("--peak-bw", type=float, metavar="GBPS",
                   help="CPU peak memory bandwidth for the header, instead of measuring it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrid.placement import override_sets
    from profiler.bench import run_bench, sweep, plan_tests
    from profiler.bench_output import RENDERERS
    from profiler.sinks import check_timings_path

    tests = plan_tests(n_prompt=_flat(args.n_prompt, [512]), n_gen=_flat(args.n_gen, [128]),
                      pg=args.pg, depths=_flat(args.n_depth, [0]))
    configs = sweep(threads=_flat(args.threads, [os.cpu_count() or 1]),
                    n_gpu_layers=_flat(args.n_gpu_layers, [99]),
                    override_sets=override_sets(args.override_tensor), accel=args.accel,
                    mla=_flat(args.mla, [0]), fa=_flat(args.fa, [1]), fmoe=_flat(args.fmoe, [1]),
                    rtr=_flat(args.rtr, [0]), poll=_flat(args.poll, [50]),
                    n_ubatch=_flat(args.ubatch_size, [512]), n_cpu_moe=_flat(args.n_cpu_moe, [0]),
                    no_op_offload=_flat(args.no_op_offload, [0]),
                    op_offload_min_batch=_flat(args.op_offload_min_batch, [None]), op_offload=args.op_offload)
    if any(c.threads < 1 for c in configs):
        raise UserError("-t: thread counts must be >= 1")
    if any(c.n_ubatch < 1 for c in configs):
        raise UserError("-ub: ubatch sizes must be >= 1")
    if any(c.n_cpu_moe < 0 for c in configs):
        raise UserError("-ncmoe: layer counts must be >= 0")
    if any(c.op_offload_min_batch is not None and c.op_offload_min_batch < 1 for c in configs):
        raise UserError("--op-offload-min-batch: minimum batches must be >= 1")
    if not any(c.op_offload_min_batch for c in configs):
        from hybrid.offload import min_batch_from_env
        min_batch_from_env()        # a bad GGML_OP_OFFLOAD_MIN_BATCH is told before any work
    if any(not 0 <= c.poll <= 100 for c in configs):
        raise UserError("--poll: levels must be in 0..100")
    if args.timings is not None:
        check_timings_path(args.timings, args.force)
    model = args.model or default_model(progress=not args.no_progress)
    if not os.path.isfile(model):
        raise UserError(f"-m {model}: no such file")

    from hybrid.engine import make_engine

    try:
        results = run_bench(make_engine, model, configs, tests, args.repetitions,
                            timings=args.timings, force=args.force,
                            peak_bw=_peak_bw(args.peak_bw, not args.no_progress),
                            seed=args.seed, progress=not args.no_progress)
    except KeyboardInterrupt:
        if args.timings and os.path.exists(args.timings):
            print(f"hyprof: {args.timings} keeps every graph that completed", file=sys.stderr)
        raise
    sys.stdout.write(RENDERERS[args.output](results))
    if args.timings:
        print(f"timings: {args.timings}", file=sys.stderr)
    return 0


def default_model(progress: bool) -> str:
    """The default model's path, made on first use (a few minutes) and cached."""
    return cached_model(DEFAULT_PRESET, DEFAULT_QTYPE, progress)


def cached_model(preset: str, qtype: str, progress: bool) -> str:
    """A made model (`hyprof model make`'s presets) kept in the cache: made once, then reused."""
    from profiler.machine import cache_dir

    path = cache_dir() / "models" / f"{preset}-{qtype}.gguf"
    if path.exists():
        return str(path)
    from hybrid.make_model import make_model
    from profiler.progress import progress_bar

    print(f"hyprof: making the model {preset} ({qtype.upper()}) once, cached as {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar(0, f"making {path.name}", progress, "MiB") as advance:
        make_model(path, preset, qtype, progress=lambda done, total: advance(
            completed=done >> 20, total=total >> 20))
    return str(path)


def _peak_bw(given: float | None, progress: bool):
    """The header's peak_bw for a thread count: --peak-bw, else `hyprof membw`'s (cached)."""
    from profiler.membw import cached_stream, given_peak_bw, peak_bw_header

    if given is not None:
        header = given_peak_bw(given)
        return lambda threads: header
    return lambda threads: peak_bw_header(cached_stream(threads, progress=progress)[0])


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas")


def _switches(text: str) -> list[int]:
    """A 0|1 flag's comma list (llama-bench's -mla, -fa, -fmoe, -rtr): anything else is a mistake,
    not a true value."""
    values = _ints(text)
    if any(v not in (0, 1) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 or 1 (or a comma list of them)")
    return values


def _pair(text: str) -> tuple[int, int]:
    values = _ints(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PP,TG")
    return values[0], values[1]


def _flat(lists: list[list[int]] | None, default: list) -> list:
    return [v for values in lists for v in values] if lists else default
