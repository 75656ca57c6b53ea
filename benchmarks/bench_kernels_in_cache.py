"""The native kernels' compute speed, weights in cache: GB/s of weights per type, path and token count.

Where bench_expert_matmul.py asks whether a kernel keeps up with DRAM, this asks how
fast it is when memory is not the limit: one 512 x 2048 matrix (0.6-1.1 MB, inside
L2 on current x86 cores), multiplied again and again on one thread, its bytes as
stored over the thread's CPU time (the best of 30 rounds of 20 calls: on a shared
machine, CPU time and the best round keep the least disturbed figure). A kernel
that runs below the machine's DRAM bandwidth here cannot reach it from memory.
Forms: the blocks as stored, and repacked into R16 on the paths that repack at load.

Comparing two builds (a change against main): run this script from each checkout,
alternately, on the same machine, e.g.

    for i in 1 2 3; do for tree in ../main .; do PYTHONPATH=$tree .venv/bin/python \\
        $tree/benchmarks/bench_kernels_in_cache.py --types q4_0; done; done

    .venv/bin/python benchmarks/bench_kernels_in_cache.py [--types q4_0,q4_k] [--paths avx2,avx512vnni]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hybrid import cpu_kernels as ck

N_OUT, N_IN = 512, 2048
TYPES = {traits.name.lower(): t for t, traits in ck.TRAITS.items() if traits.activation}    # those with kernels
FP16_AT = {ck.Q5_1: (0, 2), ck.Q4_K: (0, 2), ck.Q5_K: (0, 2), ck.Q6_K: (208,)}   # d (and m, dmin); others: d at 0


def random_blocks(rng, ggml_type):
    """uint8 [1, N_OUT, row_bytes]: random quants, fp16 scales (and mins) of 0.01."""
    traits = ck.TRAITS[ggml_type]
    raw = rng.integers(0, 256, size=(1, N_OUT, N_IN // traits.block_values, traits.block_bytes), dtype=np.uint8)
    for at in FP16_AT.get(ggml_type, (0,)):
        raw[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(1, N_OUT, -1)


def gbps(w, kind, x, path):
    """Best GB/s over rounds: bytes of w per call / CPU nanoseconds per call."""
    ids = np.zeros((x.shape[0], 1), np.int32)
    out = np.empty((x.shape[0], 1, N_OUT), np.float32)
    best = float("inf")
    for _ in range(30):
        t0 = time.thread_time_ns()
        for _ in range(20):
            ck.mul_mat_id(w, kind, x, ids, out, path=path)
        best = min(best, (time.thread_time_ns() - t0) / 20)
    return w.nbytes / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES), help=f"of {','.join(TYPES)}")
    ap.add_argument("--paths", default=",".join(ck.paths()), help=f"of those this CPU runs ({','.join(ck.paths())})")
    ap.add_argument("--tokens", default="1,4,8")
    args = ap.parse_args()
    for name in args.types.split(","):
        if name not in TYPES:
            ap.error(f"--types: {name} is not one with kernels ({', '.join(TYPES)})")
    for path in args.paths.split(","):
        if path not in ck.paths():
            ap.error(f"--paths: {path} is not one this CPU runs ({', '.join(ck.paths())})")
    tokens = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    print(f"{N_OUT} x {N_IN}, one thread, weights in cache; GB/s of weights as stored per CPU second")
    print("| type | path | form | " + " | ".join(f"{n} token{'s' * (n > 1)}" for n in tokens) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in tokens) + " |")
    for name in args.types.split(","):
        ggml_type = TYPES[name]
        w = random_blocks(rng, ggml_type)
        for path in args.paths.split(","):
            forms = [("stored", w, ggml_type)]
            if path in ck.TRAITS[ggml_type].r16_first:
                forms.append(("repacked", ck.repack(w, ggml_type, path=path), ggml_type | ck.R16))
            for form, blocks, kind in forms:
                figures = []
                for n in tokens:
                    x = ck.quantize_activations(rng.standard_normal((n, N_IN)).astype(np.float32), path=path,
                                                ggml_type=ggml_type)
                    figures.append(f"{gbps(blocks, kind, x, path):.1f}")
                print(f"| {ck.TRAITS[ggml_type].name} | {path} | {form} | " + " | ".join(figures) + " |", flush=True)


if __name__ == "__main__":
    main()
