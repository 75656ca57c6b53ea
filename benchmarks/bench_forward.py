"""Forward-pass speed of the engine on the CPU alone: pp and tg tokens/s, bytes per token, RSS.

deepseek-v2-lite-mini (DeepSeek-V2-Lite shapes, 4 layers) at Q4_0, made once into
hyprof's cache directory; sequential `hybrid.program.compute` (no scheduler, no
accelerator), torch at -t threads. Figures:
  pp t/s    prompt of -p tokens evaluated as one batch
  tg t/s    -n single-token decode steps after it, with the KV cache
  bytes/tok weight bytes the ops of one decode step read, as stored (the experts
            actually selected, the rest of the model whole)
  RSS       resident memory after the run (VmRSS) and its peak (VmHWM); the file's
            pages count once touched, as with llama.cpp's mmap
Each figure is one warm run: a throw-away decode step comes first. The machine is
shared with other work, so figures are noisy.

    .venv/bin/python benchmarks/bench_forward.py [-t 2] [-p 64] [-n 16] [-mla 1] [-fmoe 1] [-rtr 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hybrid.gguf_model import load_model
from hybrid.program import compute
from hybrid.model import Model
from hyprof.commands.run import cached_model

PRESET, QTYPE = "deepseek-v2-lite-mini", "q4_0"


def proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def decode_bytes(model: Model, token: int) -> int:
    """Weight bytes read by one decode step: run its graph, then sum the ops' bytes (one token
    uses n_expert_used distinct experts per MoE layer)."""
    graph = model.graph(1)
    compute(graph, model.inputs(graph, [token]), model.buffer)
    model.cache.n_past += 1
    n_kv, n_used = graph.n_kv, model.config.n_expert_used
    return sum(n.cost.at(n_kv, n_used)[0] for n in graph.nodes
               if n.buffer is not None and not n.buffer.startswith("cache_"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, help=f"GGUF model (default: {PRESET} {QTYPE}, made once)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=64)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-mla", type=int, default=0)
    ap.add_argument("-fmoe", type=int, default=0)
    ap.add_argument("-rtr", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    path = args.model or Path(cached_model(PRESET, QTYPE, progress=True))
    gguf = load_model(path)
    t0 = time.perf_counter()
    model = Model(gguf, n_ctx=args.n_prompt + args.n_gen + 8, mla=bool(args.mla), fmoe=bool(args.fmoe),
                  rtr=bool(args.rtr))
    load_s = time.perf_counter() - t0
    c = gguf.config
    prompt = torch.randint(0, c.n_vocab, (args.n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    model.forward(prompt[:1])                                       # warm-up, thrown away
    model.reset()
    t0 = time.perf_counter()
    logits = model.forward(prompt)
    pp_s = time.perf_counter() - t0
    token = int(logits[-1].argmax())
    bytes_per_token = decode_bytes(model, token)
    t0 = time.perf_counter()
    for _ in range(args.n_gen):
        token = int(model.forward([token])[-1].argmax())
    tg_s = time.perf_counter() - t0

    print(f"model      {path.name}: {c.n_layer} layers, {c.n_expert} experts ({c.n_expert_used} used), "
          f"{gguf.tensor_data_bytes / 2**30:.2f} GiB of tensors ({gguf.ftype})")
    print(f"options    -t {args.threads} -mla {args.mla} -fmoe {args.fmoe} -rtr {args.rtr}; load {load_s:.1f} s"
          f" (repacked {model.weights.resident_bytes() / 2**20:.0f} MiB)")
    print(f"pp{args.n_prompt:<6} {args.n_prompt / pp_s:8.2f} t/s   ({pp_s:.2f} s)")
    print(f"tg{args.n_gen:<6} {args.n_gen / tg_s:8.2f} t/s   ({tg_s / args.n_gen * 1e3:.0f} ms/token)")
    print(f"bytes/tok  {bytes_per_token / 2**20:.1f} MiB of weights per generated token "
          f"-> {bytes_per_token * args.n_gen / tg_s / 1e9:.2f} GB/s effective")
    print(f"RSS        {proc_status_bytes('VmRSS') / 2**30:.2f} GiB now, peak {proc_status_bytes('VmHWM') / 2**30:.2f} GiB"
          f" (pid {os.getpid()})")


if __name__ == "__main__":
    main()
