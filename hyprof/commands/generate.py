"""`hyprof generate`: greedy continuation of a prompt, to see the engine produce tokens."""

from __future__ import annotations

import argparse
import os
import sys

from hyprof.offload_flags import add_offload_flags
from profiler.errors import UserError

EPILOG = """\
The prompt is evaluated in one batch (prefill), then one token per step with the
KV cache (decode); tokens are chosen greedily (argmax). Speeds go to stderr.

Placement follows llama.cpp: -ngl N offloads the last N layers (and the output)
to the accelerator, each -ot REGEX=BACKEND rule overrides it for the tensors it
matches; --accel picks the accelerator (auto: CUDA0 when torch sees a GPU, else
none; emulated: ACC0, torch on the CPU, which runs the whole hybrid path without
a GPU). The CPU backend runs on -t threads; --poll N keeps them spinning for
up to N x 2 ms between splits before they sleep (fast wakeups, busy cores).

examples:
  hyprof generate -m tiny.gguf --prompt-ids 1,5,77 -n 16 --ids
  hyprof generate -m lite.gguf --prompt "the cat" -n 32 -mla 1 -fmoe 1 -t 2
  hyprof generate -m lite.gguf --prompt-ids 1,2 -n 32 --accel emulated -ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="greedy generation from a prompt",
                              description="Generate tokens greedily with the hyprof engine.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, metavar="FILE.gguf", help="GGUF model")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=_ids, metavar="ID,ID,...", help="prompt as token ids")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt as text (needs the file's vocabulary)")
    p.add_argument("-n", "--n-predict", type=int, default=16, metavar="N", help="tokens to generate (default: 16)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N",
                   help="context size, the KV cache's length (default: 4096, at most the model's)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="CPU threads, the main thread included (default: all cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="offload the last N layers and the output to the accelerator (99: all; default: 0)")
    add_offload_flags(p, "the prompt runs as graphs of at most N tokens (default: 512)")
    p.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="REGEX=BACKEND[;...]",
                   help="tensors whose name matches REGEX go to BACKEND (CPU, CUDA0, ACC0); repeatable, or "
                        "separated by ';' or ',' (both, as there is no sweep here; a piece without '=' belongs "
                        "to the next rule, so `blk\\.\\d{1,2}\\.=CPU` is one rule); the first matching rule wins")
    p.add_argument("--accel", choices=("auto", "cuda", "emulated", "none"), default="auto",
                   help="the accelerator: CUDA when present (auto), CUDA or an error, the emulated ACC0, "
                        "or none (default: auto)")
    p.add_argument("--poll", type=int, choices=range(101), default=0, metavar="0..100",
                   help="CPU workers' polling level between splits, as ggml's --poll (default: 0: sleep)")
    p.add_argument("-mla", type=int, choices=(0, 1), default=0,
                   help="1: absorbed MLA attention over the compressed KV cache (default: 0)")
    p.add_argument("-fa", type=int, choices=(0, 1), default=0,
                   help="1: flash attention, kq, softmax and kqv as one op (default: 0)")
    p.add_argument("-fmoe", type=int, choices=(0, 1), default=0,
                   help="1: fused gate+up expert matmul (default: 0)")
    p.add_argument("-rtr", type=int, choices=(0, 1), default=0,
                   help="1: repack 4-bit weights at load into torch's int4 pack, bf16 compute (default: 0)")
    p.add_argument("--ids", action="store_true", help="print the generated ids, comma-separated, as the last line")
    p.set_defaults(func=run)


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of token ids: {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from hybrid.engine import Engine
    from hybrid.generate import check_prompt, check_ram, generate
    from hybrid.gguf_model import load_model
    from hybrid.tokenizer import Tokenizer

    if args.n_predict < 1:
        raise UserError(f"-n {args.n_predict}: generate at least 1 token")
    if args.threads < 1:
        raise UserError(f"-t {args.threads}: at least 1 thread")
    gguf = load_model(args.model)
    tokenizer = Tokenizer.from_gguf(gguf)
    if args.prompt is not None:
        if tokenizer is None:
            raise UserError(f"{args.model}: --prompt needs a vocabulary, and this file has none (use --prompt-ids)")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = args.prompt_ids
    n_ctx = min(args.ctx_size, gguf.config.n_ctx_train)
    check_prompt(prompt, args.n_predict, gguf.config.n_vocab, n_ctx)
    check_ram(gguf, n_ctx, bool(args.mla))
    engine = Engine(args.model, threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                    overrides=args.override_tensor, accel=args.accel, mla=args.mla, fa=args.fa, fmoe=args.fmoe,
                    rtr=args.rtr, poll=args.poll, n_ctx=n_ctx, n_ubatch=args.ubatch_size, n_cpu_moe=args.n_cpu_moe,
                    no_op_offload=args.no_op_offload, op_offload_min_batch=args.op_offload_min_batch,
                    op_offload=args.op_offload)
    for warning in engine.placement.warnings:
        print(f"hyprof: warning: {warning}", file=sys.stderr)

    def show(token: int) -> None:
        if tokenizer is not None:
            sys.stdout.write(tokenizer.decode([token]))
            sys.stdout.flush()

    if tokenizer is not None and args.prompt is not None:
        sys.stdout.write(args.prompt)
    with engine:
        result = generate(engine.forward, prompt, args.n_predict, on_token=show)
    if tokenizer is not None:
        sys.stdout.write("\n")
    print(f"prompt: {len(prompt)} tokens in {result.prompt_s:.3f} s ({result.prompt_tps:.2f} t/s); "
          f"generated: {len(result.tokens)} tokens, decode {result.decode_tps:.2f} t/s "
          f"[{engine.accel_label}, {args.threads} threads]", file=sys.stderr)
    if args.ids:
        print(",".join(map(str, result.tokens)))
    return 0
