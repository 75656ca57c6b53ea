"""The -ncmoe and op-offload flags of the commands that take one value of each (`generate`,
`model info`); `run` takes comma lists of them to sweep, as llama-bench."""

from __future__ import annotations

import argparse


def add_offload_flags(p: argparse.ArgumentParser, ubatch_help: str) -> None:
    p.add_argument("-ncmoe", "--n-cpu-moe", type=int, default=0, metavar="N",
                   help="routed experts of the first N layers on the CPU, a rule tried before -ot's (default: 0)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, metavar="N", help=ubatch_help)
    p.add_argument("-nopo", "--no-op-offload", type=int, choices=(0, 1), default=0,
                   help="1: no op offload, a batch's matmuls on host weights stay on the CPU (default: 0)")
    p.add_argument("--op-offload-min-batch", type=int, metavar="N",
                   help="the smallest ubatch whose matmuls on host weights run on the accelerator, the experts "
                        "it uses uploaded first (default: GGML_OP_OFFLOAD_MIN_BATCH, else 32)")
    p.add_argument("--op-offload", choices=("llama.cpp", "ik"), default="llama.cpp",
                   help="the op-offload rule: llama.cpp's (batch >= minimum) or ik_llama.cpp's (also batch x "
                        "n_expert_used >= minimum x n_expert) (default: llama.cpp)")
