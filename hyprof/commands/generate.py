"""`hyprof generate`: greedy continuation of a prompt, to see the engine produce tokens."""

from __future__ import annotations

import argparse
import sys

from profiler.errors import UserError

EPILOG = """\
The prompt is evaluated in one batch (prefill), then one token per step with the
KV cache (decode); tokens are chosen greedily (argmax). Speeds go to stderr.

examples:
  hyprof generate -m tiny.gguf --prompt-ids 1,5,77 -n 16 --ids
  hyprof generate -m lite.gguf --prompt "the cat" -n 32 -mla 1 -fmoe 1 -t 2
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
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's)")
    p.add_argument("-mla", type=int, choices=(0, 1), default=0,
                   help="1: absorbed MLA attention over the compressed KV cache (default: 0)")
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
    import torch

    from hybrid.generate import check_prompt, check_ram, generate
    from hybrid.gguf_model import load_model
    from hybrid.model import Model
    from hybrid.tokenizer import Tokenizer

    if args.n_predict < 1:
        raise UserError(f"-n {args.n_predict}: generate at least 1 token")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"-t {args.threads}: at least 1 thread")
        torch.set_num_threads(args.threads)
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
    model = Model(gguf, n_ctx=n_ctx, mla=bool(args.mla), fmoe=bool(args.fmoe), rtr=bool(args.rtr))

    def show(token: int) -> None:
        if tokenizer is not None:
            sys.stdout.write(tokenizer.decode([token]))
            sys.stdout.flush()

    if tokenizer is not None and args.prompt is not None:
        sys.stdout.write(args.prompt)
    result = generate(model.forward, prompt, args.n_predict, on_token=show)
    if tokenizer is not None:
        sys.stdout.write("\n")
    print(f"prompt: {len(prompt)} tokens in {result.prompt_s:.3f} s ({result.prompt_tps:.2f} t/s); "
          f"generated: {len(result.tokens)} tokens, decode {result.decode_tps:.2f} t/s", file=sys.stderr)
    if args.ids:
        print(",".join(map(str, result.tokens)))
    return 0
