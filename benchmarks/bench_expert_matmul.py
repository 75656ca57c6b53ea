"""CPU expert matmul bandwidth: the native GGUF kernels vs torch, beside STREAM triad, in one run.

DeepSeek-V2-Lite expert shapes (n_embd 2048, n_ff_exp 1408, 64 experts, 6
used per token; `--arch qwen3moe`: Qwen3-30B-A3B's, 2048, 768, 128 experts, 8
used), random GGUF blocks for several layers (>= 1 GB, far beyond
the last-level cache); for the 256-value types (Q4_K, Q5_K, Q6_K, IQ4_XS) the
1408-wide down rows are in the type llama.cpp's quantizer falls back to (Q5_0,
Q5_1, Q8_0, IQ4_NL), as in those files. Each step runs one MoE layer's expert matmuls (fused
gate+up, then down, as with -fmoe) for fresh random expert ids, cycling
through the layers, so every step reads its experts from DRAM, as in a real
token. Figures: GB/s = bytes of the touched experts as stored / wall time
(the kernels alone: activations are quantised beforehand). The native kernels
run as the engine runs them: on the CPU backend's worker pool (hybrid/_pool.c,
spinning, the caller as thread 0), each call's guided chunks of (expert, row block)
units claimed by whichever thread is free, on the blocks as stored ("stored") and
repacked at load into the SIMD kernels' interleaved 16-row blocks
("repacked", what the engine reads on such CPUs); torch paths split the experts
between Python threads, torch at 1 thread each.

The previous path (torch): dequantise-then-matmul (hybrid.quants.dequantize
of the used experts, then F.linear), bf16 weights with torch matmul, and
torch's int4 weight-only kernel (_weight_int4pack_mm_for_cpu, group 32); their
GB/s count the bytes of their own weight format. Each figure is the best of
several rounds, each round a STREAM triad then the measurement, as STREAM
itself reports the best of its trials: on a shared machine that is the least
disturbed run, and the ratio to the triad of the same rounds is the figure to
read. Medians are printed beside. A prompt's GMAC/s is also given as a share of the
CPU's int8 multiply-add peak on the same path and threads (hybrid.cpu_kernels.int8_peak_gmacs:
`vpdpbusd` on AVX-512 VNNI, `vpmaddubsw` on AVX2, on registers alone).

    .venv/bin/python benchmarks/bench_expert_matmul.py [--quick]
    .venv/bin/python benchmarks/bench_expert_matmul.py --types q4_0,q5_0,iq4_nl --paths avx2,avx512vnni \
        --tokens 1 --threads 2 --no-torch
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybrid import cpu_kernels as ck
from hybrid._kernels import Pool
from hybrid.quants import dequantize
from profiler.membw import measure_stream



@dataclass(frozen=True)
class Experts:
    """One MoE layer's experts: what the benchmark's weights and routing take from a model."""
    n_embd: int
    n_ff: int
    n_expert: int
    n_used: int

    @property
    def shapes(self):
        """Per tensor (n_out, n_in)."""
        return dict(gate=(self.n_ff, self.n_embd), up=(self.n_ff, self.n_embd), down=(self.n_embd, self.n_ff))


ARCHS = {"deepseek2": Experts(2048, 1408, 64, 6),     # DeepSeek-V2-Lite
         "qwen3moe": Experts(2048, 768, 128, 8)}      # Qwen3-30B-A3B
TYPES = {"q4_0": ck.Q4_0, "q5_0": ck.Q5_0, "q5_1": ck.Q5_1, "q8_0": ck.Q8_0, "iq4_nl": ck.IQ4_NL,
         "q4_k": ck.Q4_K, "q5_k": ck.Q5_K, "q6_k": ck.Q6_K, "iq4_xs": ck.IQ4_XS}
# the type llama.cpp's quantizer stores a tensor in when its rows are not whole 256-value blocks:
# DeepSeek-V2-Lite's 1408-wide down rows in its Q4_K, Q5_K, Q6_K and IQ4_XS files
FALLBACK = {ck.Q4_K: ck.Q5_0, ck.Q5_K: ck.Q5_1, ck.Q6_K: ck.Q8_0, ck.IQ4_XS: ck.IQ4_NL}
FP16_SCALE = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
FP16_AT = {ck.Q5_1: (0, 2), ck.Q4_K: (0, 2), ck.Q5_K: (0, 2), ck.Q6_K: (208,)}   # d (and m, dmin); others: d at 0


def tensor_type(ggml_type, n_in):
    return ggml_type if n_in % ck.TRAITS[ggml_type].block_values == 0 else FALLBACK[ggml_type]


def random_blocks(rng, n_expert, n_out, n_in, ggml_type):
    """uint8 [n_expert, n_out, row_bytes]: random quants, sane fp16 scales (and mins) per block."""
    bb, bv = ck.TRAITS[ggml_type].block_bytes, ck.TRAITS[ggml_type].block_values
    raw = rng.integers(0, 256, size=(n_expert, n_out, n_in // bv, bb), dtype=np.uint8)
    for at in FP16_AT.get(ggml_type, (0,)):
        raw[..., at:at + 2] = FP16_SCALE
    return raw.reshape(n_expert, n_out, -1)


def make_layers(ex, rng, n_layers, ggml_type):
    """Per layer {tensor: (blocks, its type)}: the type, or its fallback where rows are not whole blocks."""
    return [{name: (random_blocks(rng, ex.n_expert, n_out, n_in, tensor_type(ggml_type, n_in)),
                    tensor_type(ggml_type, n_in)) for name, (n_out, n_in) in ex.shapes.items()}
            for _ in range(n_layers)]


def bytes_per_expert(ex, ggml_type):
    """Bytes of one expert's gate, up and down as stored."""
    return sum(n_out * n_in // ck.TRAITS[t].block_values * ck.TRAITS[t].block_bytes
               for n_out, n_in in ex.shapes.values() for t in [tensor_type(ggml_type, n_in)])


def repacked(layers, path):
    """The layers with each tensor whose type `path` repacks at load (r16_first) repacked, or None if none is."""
    if not any(path in ck.TRAITS[t].r16_first for t in (t for _, t in layers[0].values())):
        return None
    return [{name: (ck.repack(w, t, path=path), t | ck.R16) if path in ck.TRAITS[t].r16_first else (w, t)
             for name, (w, t) in layer.items()} for layer in layers]


def routing(ex, rng, n_steps, n_tokens):
    """Random distinct experts per token, int32 [n_steps, n_tokens, n_used]."""
    return np.argsort(rng.random((n_steps, n_tokens, ex.n_expert)), axis=-1)[..., :ex.n_used].astype(np.int32)


def touched_bytes(expert_bytes, ids):
    """Bytes the step reads: each distinct expert of gate, up and down once."""
    return len(np.unique(ids)) * expert_bytes


def run_workers(n_threads, work):
    """n Python threads running work(i) -> (wall seconds, on-CPU seconds of the busiest
    thread). On an oversubscribed machine the second is what the work took while it ran."""
    cpu = [0.0] * n_threads

    def timed(i):
        c0 = time.thread_time()
        work(i)
        cpu[i] = time.thread_time() - c0

    threads = [threading.Thread(target=timed, args=(i,)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, max(cpu)


def native_steps(ex, layers, ids, pool, path):
    """Seconds for all steps (wall, and on-CPU per thread): per step, fused gate+up then
    down, every call shared by the pool's threads as in the engine, on SIMD path `path`."""
    n_tokens = ids.shape[1]
    gate_type, down_type = layers[0]["gate"][1] & ~ck.R16, layers[0]["down"][1] & ~ck.R16
    x = np.random.default_rng(0).standard_normal((n_tokens, ex.n_embd)).astype(np.float32)
    xq = ck.quantize_activations(x, path=path, ggml_type=gate_type)
    h_in = np.random.default_rng(1).standard_normal((n_tokens * ex.n_used, ex.n_ff)).astype(np.float32)
    hq = ck.quantize_activations(h_in, path=path, ggml_type=down_type)
    h = np.empty((n_tokens, ex.n_used, ex.n_ff), np.float32)
    y = np.empty((n_tokens, ex.n_used, ex.n_embd), np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    for s, step_ids in enumerate(ids):
        (gate, gate_kind), (up, _), (down, down_kind) = (layers[s % len(layers)][k] for k in ("gate", "up", "down"))
        ck.mul_mat_id(gate, gate_kind, xq, step_ids, h, w_up=up, path=path, pool=pool)
        ck.mul_mat_id(down, down_kind, hq, step_ids, y, path=path, pool=pool)
    return time.perf_counter() - t0, (time.process_time() - c0) / pool.n_threads


@contextmanager
def torch_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Each triad array: 1 GiB, so that the three exceed any last-level cache (this VM's host reports 504 MiB).
TRIAD_ARRAY_BYTES = 1 << 30


class Triad:
    """STREAM triad a = b + 3 c on persistent arrays, taken beside every measurement round
    (profiler.membw gives the headline figure; this one avoids re-allocating per round)."""

    def __init__(self, array_bytes=TRIAD_ARRAY_BYTES):
        self.a, self.b, self.c = (torch.full((array_bytes // 4,), v) for v in (1.0, 2.0, 0.0))
        self.n_bytes = 3 * array_bytes

    def gbps(self, n_threads):
        """-> (GB/s over wall time, GB/s over on-CPU time per thread)."""
        with torch_threads(n_threads):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.add(self.b, self.c, alpha=3.0, out=self.a)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / n_threads
        return self.n_bytes / wall / 1e9, self.n_bytes / cpu / 1e9


def torch_steps(ex, layers, ids, n_threads, matmul):
    """Seconds for all steps of a torch path: matmul(layer, name, expert, x) per used expert,
    experts split across threads, torch at one thread each."""
    n_tokens = ids.shape[1]
    x = torch.randn(n_tokens, ex.n_embd)

    def work(i):
        for s, step_ids in enumerate(ids):
            layer = layers[s % len(layers)]
            experts = np.unique(step_ids)
            for e in experts[i::n_threads]:
                rows = torch.from_numpy(np.flatnonzero((step_ids == e).any(-1)))
                xe = x[rows]
                h = F.silu(matmul(layer, "gate", e, xe)) * matmul(layer, "up", e, xe)
                matmul(layer, "down", e, h)

    with torch_threads(1):
        return run_workers(n_threads, work)


def dequant_matmul(layer, name, e, x):
    blocks, ggml_type = layer[name]
    return F.linear(x, dequantize(torch.from_numpy(blocks[e]), ggml_type))


def bf16_layers(ex, n_layers):
    return [{k: torch.randn(ex.n_expert, *s, dtype=torch.bfloat16) * 0.02 for k, s in ex.shapes.items()}
            for _ in range(n_layers)]


def bf16_matmul(layer, name, e, x):
    return F.linear(x.to(torch.bfloat16), layer[name][e])


def int4_layers(ex, n_layers):
    """torch's packed int4 (group 32, bf16 scale and zero per group) for every expert."""
    def pack(n_out, n_in):
        w = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n_out, n_in), dtype=torch.int32), 2)
        return w, torch.rand(n_in // 32, n_out, 2, dtype=torch.bfloat16)
    return [{k: [pack(*s) for _ in range(ex.n_expert)] for k, s in ex.shapes.items()} for _ in range(n_layers)]


def int4_matmul(layer, name, e, x):
    w, sz = layer[name][e]
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, 32, sz)


def gemm_gmacs(n_threads, dtype, n=2048):
    """The machine's dense matmul throughput through torch (oneDNN/MKL), for scale of pp."""
    with torch_threads(n_threads):
        a = torch.randn(n, n).to(torch.float32 if dtype == "f32" else torch.bfloat16)
        torch.mm(a, a)
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, a)
        return 3 * n**3 / (time.perf_counter() - t0) / 1e9


def plan(n_tokens, quick):
    """(layer-steps per round, rounds). A tg round is ~0.1 s: long enough that starting the
    threads is noise, short enough for many rounds."""
    steps, rounds = {1: (40, 10), 64: (2, 5)}.get(n_tokens, (1, 3))
    return steps, max(2, rounds // 2) if quick else rounds


def test_name(n_tokens):
    return "tg" if n_tokens == 1 else f"pp{n_tokens}"


def side_by_side(ex, run, ids, expert_bytes, n_threads, triad):
    """Run `run(ids[r])` for each round r, each beside a STREAM triad (best of 2) taken just
    before. Figures of the best round (STREAM's convention: on a shared machine, the least
    disturbed), its ratio to the best triad of the same rounds, the median round, and the
    same ratio over on-CPU time (bytes / CPU seconds of the busiest thread), which is what
    survives when the machine runs more threads than it has cores.
    -> (ms per layer-step, GB/s, median GB/s, fraction of triad, on-CPU fraction, GMAC/s)."""
    gbps, cpu_gbps, ms, gmacs, triads, cpu_triads = [], [], [], [], [], []
    for ids_r in ids:
        tri = [triad.gbps(n_threads) for _ in range(2)]
        triads.append(max(t[0] for t in tri))
        cpu_triads.append(max(t[1] for t in tri))
        time.sleep(0.2)         # torch's OpenMP threads spin on after the triad; let them sleep
        wall, cpu = run(ids_r)
        nbytes = sum(touched_bytes(expert_bytes, i) for i in ids_r)
        gbps.append(nbytes / wall / 1e9)
        cpu_gbps.append(nbytes / cpu / 1e9)
        ms.append(wall / len(ids_r) * 1e3)
        gmacs.append(ids_r.size * 3 * ex.n_ff * ex.n_embd / wall / 1e9)
    best = int(np.argmax(gbps))
    return (ms[best], gbps[best], float(np.median(gbps)), gbps[best] / max(triads),
            float(np.median(cpu_gbps)) / float(np.median(cpu_triads)), gmacs[best])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="deepseek2",
                    help="whose expert shapes (default: deepseek2, DeepSeek-V2-Lite's; qwen3moe: Qwen3-30B-A3B's)")
    ap.add_argument("--gb", type=float, default=1.2, help="GB of expert weights per type (>= 1 to defeat the cache)")
    ap.add_argument("--tokens", default="1,64,512", help="batch sizes: 1 = tg, others pp")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default="q4_0,q8_0", help=f"of {','.join(TYPES)}")
    ap.add_argument("--paths", default=ck.available(),
                    help=f"SIMD paths of the native kernels, of those this CPU runs ({','.join(ck.paths())}); "
                         "weights are repacked for those that repack at load")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch paths (the previous path)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    args = ap.parse_args()
    ex = ARCHS[args.arch]
    tokens = [int(t) for t in args.tokens.split(",")]
    paths = args.paths.split(",")
    for path in paths:
        if path not in ck.paths():
            ap.error(f"--paths: {path} is not one this CPU runs ({', '.join(ck.paths())})")
    thread_counts = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print(f"kernel path: {ck.available()} (of {', '.join(ck.paths())})")
    print(f"experts: {args.arch}'s, n_embd {ex.n_embd}, n_ff {ex.n_ff}, {ex.n_used} used of {ex.n_expert}")
    stream = {n: measure_stream(n, array_bytes=TRIAD_ARRAY_BYTES, runs=5).triad_samples_GBps for n in thread_counts}
    rows = [(f"STREAM triad (profiler.membw), 3 x {TRIAD_ARRAY_BYTES >> 20} MiB", "torch", n, "-", "-", f"{max(stream[n]):.1f}",
             f"{np.median(stream[n]):.1f}", "100%", "100%", "-", "-") for n in thread_counts]
    rows += [(f"{dt} dense", "torch GEMM 2048^3", n, "-", "-", "-", "-", "-", "-", f"{gemm_gmacs(n, dt):.0f}", "-")
             for dt in ("f32", "bf16") for n in thread_counts]
    int8_peak = {(path, n): ck.int8_peak_gmacs(path, n) for path in paths for n in thread_counts}
    rows += [("int8 multiply-add peak (cpu_kernels.int8_peak_gmacs)", path, n, "-", "-", "-", "-", "-", "-",
              f"{peak:.0f}", "100%") for (path, n), peak in int8_peak.items() if peak]
    triad = Triad()

    def measure(kind, path, n, ids, expert_bytes, run, peak=None):
        ms, gbps, median, frac, cpu_frac, gmacs = side_by_side(ex, run, ids, expert_bytes, n, triad)
        rows.append((kind, path, n, test_name(ids.shape[2]), f"{ms:.2f}", f"{gbps:.1f}", f"{median:.1f}",
                     f"{frac:.0%}", f"{cpu_frac:.0%}", f"{gmacs:.0f}", f"{gmacs / peak:.0%}" if peak else "-"))
        print("  " + " | ".join(map(str, rows[-1])), flush=True)

    for tname in args.types.split(","):
        ggml_type = TYPES[tname]
        eb = bytes_per_expert(ex, ggml_type)
        n_layers = max(2, int(np.ceil(args.gb * 1e9 / (ex.n_expert * eb))))
        layers = make_layers(ex, rng, n_layers, ggml_type)
        forms = [(path, "stored", layers) for path in paths]
        forms += [(path, "repacked", r) for path in paths for r in [repacked(layers, path)] if r is not None]
        down = ck.TRAITS[layers[0]["down"][1]].name
        print(f"{tname}: {n_layers} layers, {n_layers * ex.n_expert * eb / 1e9:.2f} GB of experts (down in {down})")
        for n_tokens in tokens:
            steps, rounds = plan(n_tokens, args.quick)
            ids = routing(ex, rng, rounds * steps, n_tokens).reshape(rounds, steps, n_tokens, ex.n_used)
            for n in thread_counts:
                pool = Pool(n, True)
                for path, form, form_layers in forms:
                    native_steps(ex, form_layers, ids[0, :1], pool, path)                  # warm-up
                    measure(tname, f"native {path}, {form}", n, ids, eb,
                            lambda i: native_steps(ex, form_layers, i, pool, path), int8_peak[path, n])
                pool.close()
                if not args.no_torch and n_tokens <= 64:
                    measure(tname, "torch dequant + f32", n, ids[:2, :1], eb,
                            lambda i: torch_steps(ex, layers, i, n, dequant_matmul))
        del layers, forms

    if not args.no_torch:
        bf16_expert = 3 * ex.n_ff * ex.n_embd * 2
        int4_expert = 3 * (ex.n_ff * ex.n_embd // 2 + ex.n_embd // 32 * ex.n_ff * 4)    # packed nibbles + bf16 scale/zero
        for name, make, matmul, eb, gb in [("bf16", bf16_layers, bf16_matmul, bf16_expert, args.gb),
                                           ("int4", int4_layers, int4_matmul, int4_expert, args.gb / 2)]:
            n_layers = max(1, int(np.ceil(gb * 1e9 / (ex.n_expert * eb))))
            layers = make(ex, n_layers)
            print(f"torch {name}: {n_layers} layers, {n_layers * ex.n_expert * eb / 1e9:.2f} GB of experts")
            for n_tokens in [t for t in tokens if t <= 64]:
                steps, rounds = plan(n_tokens, True)
                ids = routing(ex, rng, rounds * steps, n_tokens).reshape(rounds, steps, n_tokens, ex.n_used)
                for n in thread_counts:
                    torch_steps(ex, layers, ids[0, :1], n, matmul)
                    measure(name, f"torch {name} weights", n, ids, eb, lambda i: torch_steps(ex, layers, i, n, matmul))
            del layers

    print("\n| weights | path | threads | test | ms per layer | GB/s (as stored), best round | median round | "
          "best / best triad of the same rounds | same, on-CPU time (medians) | GMAC/s | of the int8 peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
