"""CPU expert matmul bandwidth: the native GGUF kernels vs torch, beside STREAM triad, in one run.

DeepSeek-V2-Lite expert shapes (n_embd 2048, n_ff_exp 1408, 64 experts, 6
used per token), random GGUF blocks for several layers (>= 1 GB, far beyond
the last-level cache). Each step runs one MoE layer's expert matmuls (fused
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
read. Medians are printed beside.

    .venv/bin/python benchmarks/bench_expert_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from hybrid import cpu_kernels as ck
from hybrid._kernels import Pool
from hybrid.quants import dequantize
from profiler.membw import measure_stream

N_EMBD, N_FF, N_EXPERT, N_USED = 2048, 1408, 64, 6
TYPES = {"q4_0": ck.Q4_0, "q8_0": ck.Q8_0}
FP16_SCALE = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)


def random_blocks(rng, n_expert, n_out, n_in, ggml_type):
    """uint8 [n_expert, n_out, row_bytes]: random quants, a sane fp16 scale per block."""
    bb = ck.TRAITS[ggml_type].block_bytes
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


def native_steps(layers, ggml_type, ids, pool):
    """Seconds for all steps (wall, and on-CPU per thread): per step, fused gate+up then
    down, every call shared by the pool's threads as in the engine."""
    n_tokens = ids.shape[1]
    x = np.random.default_rng(0).standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    xq = ck.quantize_activations(x)
    hq = ck.quantize_activations(np.random.default_rng(1).standard_normal((n_tokens * N_USED, N_FF)).astype(np.float32))
    h = np.empty((n_tokens, N_USED, N_FF), np.float32)
    y = np.empty((n_tokens, N_USED, N_EMBD), np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    for s, step_ids in enumerate(ids):
        layer = layers[s % len(layers)]
        ck.mul_mat_id(layer["gate"], ggml_type, xq, step_ids, h, w_up=layer["up"], pool=pool)
        ck.mul_mat_id(layer["down"], ggml_type, hq, step_ids, y, pool=pool)
    return time.perf_counter() - t0, (time.process_time() - c0) / pool.n_threads


@contextmanager
def torch_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Triad:
    """STREAM triad a = b + 3 c on persistent arrays, taken beside every measurement round
    (profiler.membw gives the headline figure; this one avoids re-allocating per round)."""

    def __init__(self, array_bytes=256 << 20):
        self.a, self.b, self.c = (torch.full((array_bytes // 4,), v) for v in (1.0, 2.0, 0.0))
        self.n_bytes = 3 * array_bytes

    def gbps(self, n_threads):
        """-> (GB/s over wall time, GB/s over on-CPU time per thread)."""
        with torch_threads(n_threads):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.add(self.b, self.c, alpha=3.0, out=self.a)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / n_threads
        return self.n_bytes / wall / 1e9, self.n_bytes / cpu / 1e9


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

    with torch_threads(1):
        return run_workers(n_threads, work)


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


def side_by_side(run, ids, expert_bytes, n_threads, triad):
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
        gmacs.append(ids_r.size * 3 * N_FF * N_EMBD / wall / 1e9)
    best = int(np.argmax(gbps))
    return (ms[best], gbps[best], float(np.median(gbps)), gbps[best] / max(triads),
            float(np.median(cpu_gbps)) / float(np.median(cpu_triads)), gmacs[best])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.2, help="GB of expert weights per type (>= 1 to defeat the cache)")
    ap.add_argument("--tokens", default="1,64,512", help="batch sizes: 1 = tg, others pp")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch paths (the previous path)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print(f"kernel path: {ck.available()} (of {', '.join(ck.paths())})")
    stream = {n: measure_stream(n, array_bytes=256 << 20, runs=5).triad_samples_GBps for n in thread_counts}
    rows = [("STREAM triad (profiler.membw), 3 x 256 MiB", "torch", n, "-", "-", f"{max(stream[n]):.1f}",
             f"{np.median(stream[n]):.1f}", "100%", "100%", "-") for n in thread_counts]
    rows += [(f"{dt} dense", "torch GEMM 2048^3", n, "-", "-", "-", "-", "-", "-", f"{gemm_gmacs(n, dt):.0f}")
             for dt in ("f32", "bf16") for n in thread_counts]
    triad = Triad()

    def measure(kind, path, n, ids, expert_bytes, run):
        ms, gbps, median, frac, cpu_frac, gmacs = side_by_side(run, ids, expert_bytes, n, triad)
        rows.append((kind, path, n, test_name(ids.shape[2]), f"{ms:.2f}", f"{gbps:.1f}", f"{median:.1f}",
                     f"{frac:.0%}", f"{cpu_frac:.0%}", f"{gmacs:.0f}"))
        print("  " + " | ".join(map(str, rows[-1])), flush=True)

    for tname in args.types.split(","):
        ggml_type = TYPES[tname]
        expert_bytes = 3 * N_FF * N_EMBD // 32 * ck.TRAITS[ggml_type].block_bytes      # gate, up, down
        n_layers = max(2, int(np.ceil(args.gb * 1e9 / (N_EXPERT * expert_bytes))))
        layers = make_layers(rng, n_layers, ggml_type)
        forms = [("stored", layers, ggml_type)]
        if ck.repack(layers[0]["gate"], ggml_type) is not None:
            forms.append(("repacked", [{k: ck.repack(w, ggml_type) for k, w in layer.items()} for layer in layers],
                          ggml_type | ck.R16))
        print(f"{tname}: {n_layers} layers, {n_layers * N_EXPERT * expert_bytes / 1e9:.2f} GB of experts")
        for n_tokens in tokens:
            steps, rounds = plan(n_tokens, args.quick)
            ids = routing(rng, rounds * steps, n_tokens).reshape(rounds, steps, n_tokens, N_USED)
            for n in thread_counts:
                pool = Pool(n, True)
                for form, form_layers, kind in forms:
                    native_steps(form_layers, kind, ids[0, :1], pool)                  # warm-up
                    measure(tname, f"native {ck.available()}, {form}", n, ids, expert_bytes,
                            lambda i: native_steps(form_layers, kind, i, pool))
                pool.close()
                if not args.no_torch and n_tokens <= 64:
                    measure(tname, "torch dequant + f32", n, ids[:2, :1], expert_bytes,
                            lambda i: torch_steps(layers, i, n, dequant_matmul(ggml_type)))
        del layers, forms

    if not args.no_torch:
        bf16_expert = 3 * N_FF * N_EMBD * 2
        int4_expert = 3 * (N_FF * N_EMBD // 2 + N_EMBD // 32 * N_FF * 4)    # packed nibbles + bf16 scale/zero
        for name, make, matmul, eb, gb in [("bf16", bf16_layers, bf16_matmul, bf16_expert, args.gb),
                                           ("int4", int4_layers, int4_matmul, int4_expert, args.gb / 2)]:
            n_layers = max(1, int(np.ceil(gb * 1e9 / (N_EXPERT * eb))))
            layers = make(n_layers)
            print(f"torch {name}: {n_layers} layers, {n_layers * N_EXPERT * eb / 1e9:.2f} GB of experts")
            for n_tokens in [t for t in tokens if t <= 64]:
                steps, rounds = plan(n_tokens, True)
                ids = routing(rng, rounds * steps, n_tokens).reshape(rounds, steps, n_tokens, N_USED)
                for n in thread_counts:
                    torch_steps(layers, ids[0, :1], n, matmul)
                    measure(name, f"torch {name} weights", n, ids, eb, lambda i: torch_steps(layers, i, n, matmul))
            del layers

    print("\n| weights | path | threads | test | ms per layer | GB/s (as stored), best round | median round | "
          "best / best triad of the same rounds | same, on-CPU time (medians) | GMAC/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
