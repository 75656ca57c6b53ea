"""CPU expert matmul bandwidth: the native GGUF kernels vs torch, beside STREAM triad, in one run.

DeepSeek-V2-Lite expert shapes (n_embd 2048, n_ff_exp 1408, 64 experts, 6
used per token), random GGUF blocks for several layers (>= 1 GB, far beyond
the last-level cache). Each step runs one MoE layer's expert matmuls (fused
gate+up, then down, as with -fmoe) for fresh random expert ids, cycling
through the layers, so every step reads its experts from DRAM, as in a real
token. Figures: GB/s = bytes of the touched experts as stored / wall time of
the workers (the kernels alone: activations are quantised beforehand, and the
workers do not synchronise between gate/up and down; H6's pool adds that).
Threads are Python threads each calling a kernel on its half of every
expert's rows (torch paths: on half of the experts, torch at 1 thread each).

The previous path (torch): dequantise-then-matmul (hybrid.quants.dequantize
of the used experts, then F.linear), bf16 weights with torch matmul, and
torch's int4 weight-only kernel (_weight_int4pack_mm_for_cpu, group 32); their
GB/s count the bytes of their own weight format. The machine is shared, so
figures are noisy; read the ratios, taken in the same run.

    .venv/bin/python benchmarks/bench_expert_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from hybrid import cpu_kernels as ck
from hybrid.quants import dequantize
from profiler.membw import measure_stream

N_EMBD, N_FF, N_EXPERT, N_USED = 2048, 1408, 64, 6
TYPES = {"q4_0": ck.Q4_0, "q8_0": ck.Q8_0}
FP16_SCALE = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)


def random_blocks(rng, n_expert, n_out, n_in, ggml_type):
    """uint8 [n_expert, n_out, row_bytes]: random quants, a sane fp16 scale per block."""
    bb = ck.BLOCK_BYTES[ggml_type]
    raw = rng.integers(0, 256, size=(n_expert, n_out, n_in // 32, bb), dtype=np.uint8)
    raw[..., :2] = FP16_SCALE
    return raw.reshape(n_expert, n_out, -1)


def make_layers(rng, n_layers, ggml_type):
    return [dict(gate=random_blocks(rng, N_EXPERT, N_FF, N_EMBD, ggml_type),
                 up=random_blocks(rng, N_EXPERT, N_FF, N_EMBD, ggml_type),
                 down=random_blocks(rng, N_EXPERT, N_EMBD, N_FF, ggml_type)) for _ in range(n_layers)]


def routing(rng, n_steps, n_tokens):
    """Random distinct experts per token, int32 [n_steps, n_tokens, N_USED]."""
    return np.argsort(rng.random((n_steps, n_tokens, N_EXPERT)), axis=-1)[..., :N_USED].astype(np.int32)


def touched_bytes(expert_bytes, ids):
    """Bytes the step reads: each distinct expert of gate, up and down once."""
    return len(np.unique(ids)) * expert_bytes


def run_workers(n_threads, work):
    """Wall time of n Python threads running work(i)."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def halves(n, i, n_threads):
    return n * i // n_threads, n * (i + 1) // n_threads


def native_steps(layers, ggml_type, ids, n_threads):
    """Seconds for all steps: per step, fused gate+up then down, rows split across threads."""
    n_tokens = ids.shape[1]
    x = np.random.default_rng(0).standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    xq = ck.quantize_activations(x)
    hq = ck.quantize_activations(np.random.default_rng(1).standard_normal((n_tokens * N_USED, N_FF)).astype(np.float32))
    h = np.empty((n_tokens, N_USED, N_FF), np.float32)
    y = np.empty((n_tokens, N_USED, N_EMBD), np.float32)

    def work(i):
        f0, f1 = halves(N_FF, i, n_threads)
        e0, e1 = halves(N_EMBD, i, n_threads)
        for s, step_ids in enumerate(ids):
            layer = layers[s % len(layers)]
            ck.mul_mat_id(layer["gate"], ggml_type, xq, step_ids, h, f0, f1, w_up=layer["up"])
            ck.mul_mat_id(layer["down"], ggml_type, hq, step_ids, y, e0, e1)

    return run_workers(n_threads, work)


def torch_steps(layers, ids, n_threads, matmul):
    """Seconds for all steps of a torch path: matmul(layer, name, expert, x) per used expert,
    experts split across threads, torch at one thread each."""
    n_tokens = ids.shape[1]
    x = torch.randn(n_tokens, N_EMBD)

    def work(i):
        for s, step_ids in enumerate(ids):
            layer = layers[s % len(layers)]
            experts = np.unique(step_ids)
            for e in experts[i::n_threads]:
                rows = torch.from_numpy(np.flatnonzero((step_ids == e).any(-1)))
                xe = x[rows]
                h = F.silu(matmul(layer, "gate", e, xe)) * matmul(layer, "up", e, xe)
                matmul(layer, "down", e, h)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_workers(n_threads, work)
    finally:
        torch.set_num_threads(previous)


def dequant_matmul(ggml_type):
    def matmul(layer, name, e, x):
        return F.linear(x, dequantize(torch.from_numpy(layer[name][e]), ggml_type))
    return matmul


def bf16_layers(n_layers):
    shapes = dict(gate=(N_FF, N_EMBD), up=(N_FF, N_EMBD), down=(N_EMBD, N_FF))
    return [{k: torch.randn(N_EXPERT, *s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
            for _ in range(n_layers)]


def bf16_matmul(layer, name, e, x):
    return F.linear(x.to(torch.bfloat16), layer[name][e])


def int4_layers(n_layers):
    """torch's packed int4 (group 32, bf16 scale and zero per group) for every expert."""
    def pack(n_out, n_in):
        w = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n_out, n_in), dtype=torch.int32), 2)
        return w, torch.rand(n_in // 32, n_out, 2, dtype=torch.bfloat16)
    shapes = dict(gate=(N_FF, N_EMBD), up=(N_FF, N_EMBD), down=(N_EMBD, N_FF))
    return [{k: [pack(*s) for _ in range(N_EXPERT)] for k, s in shapes.items()} for _ in range(n_layers)]


def int4_matmul(layer, name, e, x):
    w, sz = layer[name][e]
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, 32, sz)


def gemm_gmacs(n_threads, dtype, n=2048):
    """The machine's dense matmul throughput through torch (oneDNN/MKL), for scale of pp."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        a = torch.randn(n, n).to(getattr(torch, {"f32": "float32"}.get(dtype, "bfloat16")))
        torch.mm(a, a)
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, a)
        return 3 * n**3 / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(previous)


def n_steps_for(n_tokens, quick):
    """Enough layer-steps for ~0.3 s per measurement."""
    return {1: 60 if quick else 120, 64: 4 if quick else 8}.get(n_tokens, 1 if quick else 2)


def test_name(n_tokens):
    return "tg" if n_tokens == 1 else f"pp{n_tokens}"


def side_by_side(run, n_threads, nbytes, n_macs, rounds):
    """Median over rounds of (seconds, GB/s, fraction of a STREAM triad taken just before).
    Pairing each run with its own triad keeps the ratio honest on a shared machine."""
    seconds, ratios = [], []
    for _ in range(rounds):
        triad = measure_stream(n_threads, array_bytes=256 << 20, runs=2).triad_GBps
        seconds.append(run())
        ratios.append(nbytes / seconds[-1] / 1e9 / triad)
    t = float(np.median(seconds))
    return t, nbytes / t / 1e9, float(np.median(ratios)), n_macs / t / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.2, help="GB of expert weights per type (>= 1 to defeat the cache)")
    ap.add_argument("--tokens", default="1,64,512", help="batch sizes: 1 = tg, others pp")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per row (median reported)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch paths (the previous path)")
    ap.add_argument("--quick", action="store_true", help="fewer steps per measurement")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print(f"kernel path: {ck.available()} (of {', '.join(ck.paths())})")
    rows = [(f"STREAM triad (256 MiB arrays)", "torch", n, "-", "-",
             f"{measure_stream(n, array_bytes=256 << 20, runs=5).triad_GBps:.1f}", "100%", "-") for n in thread_counts]
    rows += [(f"{dt} dense", f"torch GEMM 2048^3", n, "-", "-", "-", "-", f"{gemm_gmacs(n, dt):.0f}")
             for dt in ("f32", "bf16") for n in thread_counts]

    def measure(kind, path, n, ids, expert_bytes, run, rounds=args.rounds):
        nbytes = sum(touched_bytes(expert_bytes, i) for i in ids)
        n_macs = ids.size * 3 * N_FF * N_EMBD
        t, gbps, frac, gmacs = side_by_side(run, n, nbytes, n_macs, rounds)
        rows.append((kind, path, n, test_name(ids.shape[1]), f"{t / len(ids) * 1e3:.2f}", f"{gbps:.1f}",
                     f"{frac:.0%}", f"{gmacs:.0f}"))
        print("  " + " | ".join(map(str, rows[-1])), flush=True)

    for tname in args.types.split(","):
        ggml_type = TYPES[tname]
        expert_bytes = 3 * N_FF * N_EMBD // 32 * ck.BLOCK_BYTES[ggml_type]      # gate, up, down
        n_layers = max(2, int(np.ceil(args.gb * 1e9 / (N_EXPERT * expert_bytes))))
        layers = make_layers(rng, n_layers, ggml_type)
        print(f"{tname}: {n_layers} layers, {n_layers * N_EXPERT * expert_bytes / 1e9:.2f} GB of experts")
        for n_tokens in tokens:
            ids = routing(rng, n_steps_for(n_tokens, args.quick), n_tokens)
            for n in thread_counts:
                native_steps(layers, ggml_type, ids[:1], n)                  # warm-up
                measure(tname, f"native {ck.available()}", n, ids, expert_bytes,
                        lambda: native_steps(layers, ggml_type, ids, n))
                if not args.no_torch and n_tokens <= 64:
                    few = ids[: max(1, len(ids) // 8)]
                    measure(tname, "torch dequant + f32", n, few, expert_bytes,
                            lambda: torch_steps(layers, few, n, dequant_matmul(ggml_type)), rounds=1)
        del layers

    if not args.no_torch:
        bf16_expert = 3 * N_FF * N_EMBD * 2
        int4_expert = 3 * (N_FF * N_EMBD // 2 + N_EMBD // 32 * N_FF * 4)    # packed nibbles + bf16 scale/zero
        for name, make, matmul, eb, gb in [("bf16", bf16_layers, bf16_matmul, bf16_expert, args.gb),
                                           ("int4", int4_layers, int4_matmul, int4_expert, args.gb / 2)]:
            n_layers = max(1, int(np.ceil(gb * 1e9 / (N_EXPERT * eb))))
            layers = make(n_layers)
            print(f"torch {name}: {n_layers} layers, {n_layers * N_EXPERT * eb / 1e9:.2f} GB of experts")
            for n_tokens in [t for t in tokens if t <= 64]:
                ids = routing(rng, max(2, n_steps_for(n_tokens, args.quick) // 2), n_tokens)
                for n in thread_counts:
                    torch_steps(layers, ids[:1], n, matmul)
                    measure(name, f"torch {name} weights", n, ids, eb, lambda: torch_steps(layers, ids, n, matmul))
            del layers

    print("\n| weights | path | threads | test | ms per layer | GB/s (as stored) | of triad (paired) | GMAC/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
