"""CPU matmuls on quantised weights as stored in the GGUF file (native, `hybrid._kernels`).

The CPU expert matmuls of a hybrid MoE run are bound by memory bandwidth: a
generated token reads each selected expert once. These kernels read the GGUF
blocks directly (no dequantised copy), quantise the activation once to 8-bit
blocks, and use int8 dot products, as ggml does, so 4-bit weights stream at
memory speed. Each call does a row range [r0, r1) of the weight and releases
the GIL, and takes the engine's worker pool to split its rows between threads.

Calling pattern for one matmul y = x @ W.T:
    out = np.empty((n_tokens, n_out), np.float32)
    mul_mat(W, ggml_type, x, out, pool=pool)     # x float32 rows, quantised by the call;
                                                 # every thread of the pool shares the rows
An input read by several matmuls can be quantised once (`quantize_activations`)
and passed as q8 rows instead. Arrays are NumPy (a CPU torch tensor is viewed
with `.numpy()`, no copy); weights are the uint8 arrays `gguf.GGUFReader` gives
for quantised tensors. With `pool` (a `hybrid._kernels.Pool`, the CPU backend's
worker threads) the call's rows are cut into chunks that its threads claim, all
in C with the GIL released: no Python runs between the dispatch and the last
row. The engine's entry points, at the end of this module, are one call per op
(a cold op's Python costs more than a small matmul): `matmul` (MUL_MAT, torch in
and out) and `mul_mat_experts` (MUL_MAT_ID), which the graph nodes' `parallel`
forms call with the pool, and `run_tasks` for the ops without a native kernel.
Precision: the activation is rounded to 8 bits per block (scale amax/127; blocks
of 32 values, or 256 for the K-quants and IQ4_XS), so results differ from a float
matmul by at most sum_i |W_ji| * d_block(i) / 2; the weights themselves are used exactly.

Which types have kernels, their block sizes, and which SIMD paths can read their
repacked (R16) form come from the quant traits table (hybrid/quant_traits.h), as
`TRAITS`; the paths this CPU runs are a set, `paths()`.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from hybrid import _kernels

Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL = 2, 6, 7, 8, 20     # ggml type ids: 32-value blocks (q8_32 activations)
Q4_K, Q5_K, Q6_K, IQ4_XS = 12, 13, 14, 23           # 256-value blocks (q8_K activations)
R16 = _kernels.R16                                 # flag on a type: the blocks are `repack`ed
# ggml type id -> its facts (name, block_values, block_bytes, activation, and the paths with
# kernels, with R16 kernels, and where R16 is repacked at load); one entry per type the native
# code reads (GET_ROWS too), those with a matmul kernel have an activation
TRAITS = _kernels.TRAITS
# the ggml types the path in use has matmul kernels for
MATMUL_TYPES = frozenset(t for t, traits in TRAITS.items() if _kernels.DEFAULT_PATH in traits.kernels)


def available() -> str:
    """The SIMD path calls use by default: 'avx512vnni', 'avx2' or 'scalar', the first of
    these this CPU runs, or the one HYPROF_KERNELS=<path> names at import."""
    return _kernels.DEFAULT_PATH


def paths() -> tuple[str, ...]:
    """Every path this CPU can run (the set, scalar first); tests compare them."""
    return _kernels.PATHS


def _array(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.numpy()


def _weights(w) -> np.ndarray:
    w = _array(w)
    if w.dtype != np.uint8:
        raise ValueError(f"weights must be the uint8 GGUF blocks, got {w.dtype}")
    return w


def _outputs(out) -> np.ndarray:
    out = _array(out)
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array, got {out.dtype}")
    return out


def _path(path: str | None) -> int:
    if path is None:
        return -1
    if path not in _kernels.PATHS:
        raise ValueError(f"kernel path {path!r} is not available on this CPU (it runs {', '.join(paths())})")
    return _kernels.PATH_NAMES.index(path)


def _n_in(w: np.ndarray, ggml_type: int) -> int:
    traits = TRAITS.get(ggml_type & ~R16)
    if traits is None or traits.activation is None:
        with_kernels = ", ".join(f"{t.name}={i}" for i, t in TRAITS.items() if t.activation)
        raise ValueError(f"ggml type {ggml_type} has no CPU kernel ({with_kernels})")
    return w.shape[-1] // traits.block_bytes * traits.block_values


def repack(w: np.ndarray, ggml_type: int, path: str | None = None) -> np.ndarray | None:
    """Stored blocks [..., n_out, row_bytes] -> the same bytes interleaved 16 rows at a time
    (the R16 layout, hybrid/kernels/kernels.h), or None where n_out is not a multiple of 16,
    or where the path in use does not gain from it (`TRAITS[t].r16_first`: AVX2 and AVX-512 today).
    A call on the result passes `ggml_type | R16`, with row ranges in whole blocks of 16,
    on a path that reads R16 (`TRAITS[t].r16`). With `path`, the repack is that path's
    (any path with R16 kernels gives the same bytes), whether or not it gains from it:
    so tests reach the layout on every CPU through the scalar path.

    Why: with one token, the AVX-512 kernel on stored rows spends its time moving each row's
    blocks into SIMD lanes, not waiting for memory; interleaved rows need no such moves,
    and Q4_0 generation streams ~25 % faster (benchmarks/bench_expert_matmul.py). llama.cpp
    repacks Q4_0 for its CPU kernels at load for the same reason."""
    w = _weights(w)
    n_in = _n_in(w, ggml_type)
    wanted = TRAITS[ggml_type].r16 if path else TRAITS[ggml_type].r16_first
    if (path or available()) not in wanted or w.ndim < 2 or w.shape[-2] % 16:
        return None
    out = np.empty_like(w)
    _kernels.repack_r16(np.ascontiguousarray(w), ggml_type, n_in, out, _path(path))
    return out


def int8_peak_gmacs(path: str | None = None, n_threads: int = 1, seconds: float = 0.3) -> float | None:
    """The CPU's int8 multiply-add peak on a SIMD path, in GMAC/s over n_threads threads: its
    multiply instruction (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`) on independent registers,
    nothing loaded. What a prompt's matmul could reach, to state its kernels' share of it
    (benchmarks/bench_expert_matmul.py); None on the scalar path, which has no such instruction."""
    p = _path(path)
    rounds = 1 << 12
    while True:                                    # rounds that take about `seconds` on one thread
        t0 = time.perf_counter()
        if not _kernels.int8_macs(p, rounds):
            return None
        if time.perf_counter() - t0 > seconds / 4:
            break
        rounds *= 4
    macs = [0] * n_threads

    def run(i):
        macs[i] = _kernels.int8_macs(p, rounds * 4)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(macs) / (time.perf_counter() - t0) / 1e9


def q8_row_bytes(n_in: int, ggml_type: int = Q4_0) -> int:
    """Bytes of one quantised activation row of n_in values, in the format the type's dot
    product takes (`TRAITS[t].activation`: q8_32 rows, or q8_K rows for the 256-value types)."""
    return _kernels.q8_row_bytes(n_in, ggml_type)


def quantize_activations(x, out: np.ndarray | None = None, path: str | None = None,
                         ggml_type: int = Q4_0) -> np.ndarray:
    """float32 [n_rows, n_in] (n_in a multiple of the type's block) -> q8 rows for matmuls on
    weights of `ggml_type`, uint8 [n_rows, q8_row_bytes(n_in, ggml_type)].

    One quantised input serves every matmul that reads the same x (gate and up
    of all experts); `out` may be a preallocated buffer reused per token."""
    x = np.ascontiguousarray(_array(x), dtype=np.float32)
    n_in = x.shape[-1]
    if out is None:
        out = np.empty((x.size // max(n_in, 1), q8_row_bytes(n_in, ggml_type)), np.uint8)
    _kernels.quantize_q8(x, n_in, out, _path(path), ggml_type)
    return out


def mul_mat(w, ggml_type: int, x, out, r0: int = 0, r1: int | None = None,
            path: str | None = None, pool=None, times: np.ndarray | None = None) -> None:
    """out[t, r0:r1] = (W x_t)[r0:r1] for every row t of x (float32, or q8 rows).

    w: uint8 [n_out, row_bytes], the tensor's GGUF blocks; out: float32 [n_tokens, n_out];
    pool, times: as for `mul_mat_id`."""
    w = _weights(w)
    _kernels.mul_mat_id(w, b"", ggml_type, 1, _n_in(w, ggml_type), _array(x), None, 1, _outputs(out), r0,
                        w.shape[0] if r1 is None else r1, 0, 1, _path(path), pool, times)


def mul_mat_id(w, ggml_type: int, x, ids, out, r0: int = 0, r1: int | None = None,
               a0: int = 0, a1: int | None = None, w_up=None, path: str | None = None, pool=None,
               times: np.ndarray | None = None) -> int:
    """MUL_MAT_ID: out[t, k, r0:r1] = (W[ids[t, k]] x)[r0:r1] over a 3-D expert tensor;
    -> the number of experts computed (what the call read).

    w: uint8 [n_expert, n_out, row_bytes]; ids: int32 or int64 [n_tokens, n_used];
    x: float32 rows or q8 rows, either n_tokens (one input per token, shared by its
    experts: gate/up) or n_tokens*n_used (one per slot, in (t, k) order: down);
    out: float32 [n_tokens, n_used, n_out].
    Only rows [r0, r1) of each expert, and only the experts whose rank among the
    distinct used ids is in [a0, a1), are computed. With w_up (same shape as w,
    the up tensor; w is then gate) it is the fused gate+up of `-fmoe`:
    out = silu(W_gate x) * (W_up x). With `pool`, all its threads share the work
    in chunks of (expert, block of rows); `times` (int64 [pool.n_threads, 3]) then
    gets per thread (first claim, end, chunks run), CLOCK_MONOTONIC ns."""
    w = _weights(w)
    n_expert = w.shape[0]
    return _kernels.mul_mat_id(w, b"" if w_up is None else _weights(w_up), ggml_type, n_expert,
                               _n_in(w, ggml_type), _array(x), _array(ids), ids.shape[-1], _outputs(out), r0,
                               w.shape[1] if r1 is None else r1, a0, n_expert if a1 is None else a1, _path(path),
                               pool, times)


# --- the engine's forms: one call per op, torch in and out ---------------------------------

def _rows(x) -> np.ndarray:
    """A CPU torch tensor's float32 rows as a C-contiguous NumPy view (a copy only if needed)."""
    a = x.detach().numpy() if x.requires_grad else x.numpy()
    return a if _is_rows(a) else np.ascontiguousarray(a, np.float32)


def _is_rows(a: np.ndarray) -> bool:
    return a.dtype == np.float32 and a.flags.c_contiguous


def _note(out, y, reads: tuple, args: tuple) -> None:
    """Note the kernel call in `out` (`hybrid.ops.Out.call`) where it can run again as it is, so
    that a program can capture it (`hybrid.program.Captures`): it wrote the memory `out` keeps
    and read its inputs' own memory (`reads`: pairs of a tensor and the array the call read,
    not a contiguous copy of it)."""
    if out is not None:
        own = y is out.tensor and all(a.ctypes.data == t.data_ptr() for t, a in reads)
        out.call = (_kernels.mul_mat_id, args, tuple(t for t, _ in reads)) if own else None


def _output(out, shape):
    """(NumPy view, tensor) of the output: in `out` (a callable shape -> float32 torch
    tensor, such as `hybrid.ops.Out`), or fresh memory."""
    import torch
    if out is None:
        a = np.empty(shape, np.float32)
        return a, torch.from_numpy(a)
    y = out(shape)
    return y.numpy(), y


def matmul(w_data, ggml_type: int, x, pool=None, times: np.ndarray | None = None, out=None):
    """x [T, K] float32 torch tensor @ W^T -> [T, N] (MUL_MAT), for weight data uint8
    [N, row_bytes] (a whole tensor, one expert, or a slice of rows); shared by the
    pool's threads when one is given; into `out(shape)`'s tensor (`hybrid.ops.Out`) if given."""
    return bind_matmul(w_data, ggml_type)(x, pool, times, out)


def bind_matmul(w_data, ggml_type: int):
    """`matmul` with the weight's checks done once -> run(x, pool, times, out): the form a
    graph node keeps; with `out`, the call is noted there (`_note`)."""
    w = _weights(w_data)
    n_out, n_in = w.shape[0], _n_in(w, ggml_type)

    def run(x, pool=None, times: np.ndarray | None = None, out=None):
        xn = _rows(x)
        yn, y = _output(out, (x.shape[0], n_out))
        args = (w, b"", ggml_type, 1, n_in, xn, None, 1, yn, 0, n_out, 0, 1, -1, pool, times)
        _kernels.mul_mat_id(*args)          # (the checks of `mul_mat` are the kernel's own, less the dtypes)
        _note(out, y, ((x, xn),), args)
        return y
    return run


def mul_mat_experts(w_data, ggml_type: int, x, ids, w_up_data=None, rows: tuple[int, int] | None = None,
                    pool=None, times: np.ndarray | None = None, out=None):
    """MUL_MAT_ID -> (dst float32 torch [T, U, N], experts computed).

    x: float32 torch [T, K] (gate/up: one input per token) or [T, U, K] (down: one per
    slot); ids: [T, U] expert ids; only rows [r0, r1) of each expert with `rows`;
    with w_up_data it is silu(gate x) * (up x) (-fmoe); into `out(shape)`'s tensor if given."""
    return bind_mul_mat_id(w_data, ggml_type, w_up_data, rows)(x, ids, pool, times, out)


def bind_mul_mat_id(w_data, ggml_type: int, w_up_data=None, rows: tuple[int, int] | None = None):
    """`mul_mat_experts` with the weights' checks done once -> run(x, ids, pool, times, out):
    the form a graph node keeps (see `bind_matmul`)."""
    w = _weights(w_data)
    w_up = b"" if w_up_data is None else _weights(w_up_data)
    n_expert, n_out, n_in = w.shape[0], w.shape[1], _n_in(w, ggml_type)
    r0, r1 = rows or (0, n_out)

    def run(x, ids, pool=None, times: np.ndarray | None = None, out=None):
        xn, idn = _rows(x), _array(ids)
        yn, y = _output(out, (*ids.shape, n_out))
        args = (w, w_up, ggml_type, n_expert, n_in, xn, idn, idn.shape[-1], yn, r0, r1, 0, n_expert, -1, pool, times)
        n = _kernels.mul_mat_id(*args)
        _note(out, y, ((x, xn),) + (((ids, idn),) if hasattr(ids, "data_ptr") else ()), args)   # (NumPy ids: their own)
        return y, n
    return run


def row_splits(n_rows: int, n_tasks: int) -> list[int]:
    """Boundaries cutting rows into n_tasks near-equal ranges."""
    return [n_rows * i // n_tasks for i in range(n_tasks + 1)]


def range_tasks(bounds: list[int], run) -> list:
    """One Python task `run(r0, r1)` per non-empty range between consecutive bounds."""
    return [lambda r0=r0, r1=r1: run(r0, r1) for r0, r1 in zip(bounds, bounds[1:]) if r1 > r0]


def n_tasks(pool) -> int:
    """How many Python tasks to cut an op into for `run_tasks` on this pool (or none)."""
    return 1 if pool is None else pool.n_threads


def run_tasks(tasks: list, pool=None, times: np.ndarray | None = None) -> None:
    """Run an op's Python tasks (no-argument callables filling disjoint parts of its
    output; the ops without a native kernel): shared by the pool's threads, or on
    the calling thread alone without one."""
    if pool is None:
        for task in tasks:
            task()
    else:
        pool.run_tasks(tasks, times)
