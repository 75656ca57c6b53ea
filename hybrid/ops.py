"""The forward pass's small ops (norms, RoPE, softmax, residual adds, SwiGLU, the router, and
the attention core: the KV cache's CPY, kq and kqv, or FLASH_ATTN_EXT), native on CPU float32
tensors and torch everywhere else.

A generated token runs ~70 such ops besides its matmuls, each on a few KiB. In
torch each one costs 10-100 us inside the engine although its arithmetic takes
under a microsecond: it runs right after a matmul has streamed hundreds of MB
through the caches, and torch's per-op dispatch, and even allocating the
output, is cold code and data to bring back. So the native path
(`hybrid._ops`, plain C loops) takes the tensors' addresses rather than
`.numpy()` views, and writes into an `Out`: output memory an op node keeps
from one evaluation of its (reused) graph to the next. Arithmetic is float32 as
in torch (norm sums in float64, as ggml's; exp to ~2 ulp).

Each function takes the native path when every tensor it reads is a
C-contiguous float32 CPU tensor (ids: int64) of the shapes the op expects (the
attention ops also read views whose rows are contiguous, by their strides); this
module is what checks that, as `hybrid._ops` trusts the addresses it is given.
Anything else runs the same op in torch: CUDA tensors, other dtypes,
non-contiguous views. The emulated accelerator keeps its tensors on the CPU, so
it takes the native path too. `HYPROF_OPS=torch` in the environment at import
selects torch everywhere (to compare the two in one run).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from hybrid import _ops
from hybrid._kernels import TRAITS
from hybrid.quants import FLOAT_DTYPES, dequantize

NATIVE = os.environ.get("HYPROF_OPS") != "torch"
F32, I64 = torch.float32, torch.int64
# ggml types GET_ROWS dequantises natively (those of the quant traits table) -> the dtype
# `hybrid.weights.Weight.data` holds them in: float types as themselves, quantised ones as uint8 blocks
NATIVE_GET_ROWS = {t: FLOAT_DTYPES.get(t, torch.uint8) for t in TRAITS}
KEEP_BYTES = 64 << 10           # an `Out` keeps outputs up to this size; larger ones are allocated per call
# kq and kqv of larger batches run in torch: from ~32 tokens on, its blocked BLAS GEMM outruns the
# plain C loops by more than its dispatch costs (the C loops win 2-3x at 1-8 tokens)
MAX_NATIVE_ATTN_TOKENS = 32


class Out:
    """One op node's output memory, reused each time the node runs.

    Allocating a fresh output costs a cold op more than its arithmetic (6-9 us
    after a matmul); the graph is reused from token to token and each node runs
    once per evaluation, consumed within it, so its output memory can be too.
    Outputs up to `keep_bytes` (KEEP_BYTES: tens of MB at most for a whole graph)
    are kept, in a flat buffer grown by doubling so that a softmax over one more
    cached position each token does not reallocate each token; larger ones are
    fresh. `keep_bytes=None` keeps any size (the engine's logits).
    """

    __slots__ = ("dtype", "keep_bytes", "flat", "tensor", "call")

    def __init__(self, dtype: torch.dtype = F32, keep_bytes: int | None = KEEP_BYTES):
        self.dtype, self.keep_bytes, self.flat, self.tensor = dtype, keep_bytes, None, None
        self.call = None        # the native call that last wrote `tensor` (see `_native_call`)

    def __call__(self, shape) -> torch.Tensor:
        t = self.tensor
        if t is not None and t.shape == shape:
            return t
        n = math.prod(shape)
        if self.keep_bytes is not None and n * self.dtype.itemsize > self.keep_bytes:
            return torch.empty(shape, dtype=self.dtype)
        if self.flat is None or self.flat.numel() < n:
            self.flat = torch.empty(max(n, 2 * (0 if self.flat is None else self.flat.numel())), dtype=self.dtype)
        self.tensor = t = self.flat[:n].view(shape)
        return t


def _new(out: Out | None, shape, dtype: torch.dtype = F32) -> torch.Tensor:
    return out(shape) if out is not None else torch.empty(shape, dtype=dtype)


def _native_call(out: Out | None, y: torch.Tensor, reads: tuple, fn, *args) -> torch.Tensor:
    """Run the native op fn(*args), which writes y, and note the call in `out` when y is the
    memory `out` keeps, with the tensors `reads` whose addresses args hold (kept alive with
    it): a program whose memory is fixed can run the same call again (`hybrid.program.Captures`),
    without this module's checks, which cost a cold op more than its arithmetic."""
    fn(*args)
    if out is not None:
        out.call = (fn, args, reads) if y is out.tensor else None
    return y


def _on_pool(pool, times, fn):
    """fn() as the one task of a `hybrid._kernels.Pool` job (None: here), so that an op given a
    pool fills `times` as the pool's jobs do even where its torch path ran: the CPU backend
    makes the op's events from them."""
    if pool is None:
        return fn()
    result = []
    pool.run_tasks([lambda: result.append(fn())], times)
    return result[0]


def _native(*tensors: torch.Tensor) -> bool:
    return NATIVE and all(t.dtype is F32 and t.is_cpu and t.is_contiguous() for t in tensors)


def _rows(t: torch.Tensor, dim: int) -> bool:
    """A float32 CPU tensor of `dim` dimensions whose rows (last dimension) are contiguous: the
    attention ops read such views in place, by their strides."""
    return NATIVE and t.dtype is F32 and t.is_cpu and t.dim() == dim and t.stride(-1) == 1


def _rows_at(t: torch.Tensor | None) -> tuple[int, int, int]:
    """Rows [i, h] of t [I, H, n] (or of t [I, n], the same for every head h), as the C side
    reads them (rows_t): the address, the stride of i, the stride of h. None: no rows."""
    if t is None:
        return 0, 0, 0
    strides = t.stride()
    return t.data_ptr(), strides[0], strides[1] if t.dim() == 3 else 0


def _ids(t: torch.Tensor) -> bool:
    return t.dtype is I64 and t.is_cpu and t.is_contiguous()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, cols: slice = slice(None),
             out: Out | None = None) -> torch.Tensor:
    """x[..., cols] / sqrt(mean(x[..., cols]^2) + eps) * w, row by row (RMS_NORM then MUL)."""
    row_len = x.shape[-1]
    c0, c1, step = cols.indices(row_len)
    if _native(x, w) and step == 1 and c1 > c0 and w.shape == (c1 - c0,):
        y = _new(out, (*x.shape[:-1], c1 - c0))
        return _native_call(out, y, (x, w), _ops.rms_norm, x.data_ptr(), x.numel() // row_len, row_len, c0,
                            c1 - c0, w.data_ptr(), eps, y.data_ptr())
    x = x[..., cols]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor, start: int,
         keep_from: int = 0, out: Out | None = None, neox: bool = False) -> torch.Tensor:
    """x[..., keep_from:] with its columns from `start` on rotated in pairs by the angles of each
    token's position: x [T, ..., n], pos int64 [T], and cos, sin [n_pos, (n - start)/2] a table
    over positions (`hybrid.model.Model.cos_sin`). Pair i is columns (2i, 2i + 1) of the rotated
    part (ggml's NORM mode: DeepSeek2), or with `neox` (i, i + half) (NEOX mode: Qwen3).

    The q heads keep their unrotated part (keep_from 0); k_pe is the rotated tail alone
    (keep_from = start); either way the output is the only copy made."""
    cos, sin = cos_sin
    n, n_tok = x.shape[-1], x.shape[0]
    if (_native(x, cos, sin) and keep_from <= start and cos.shape == sin.shape and cos.dim() == 2
            and cos.shape[1] * 2 == n - start and _ids(pos) and pos.shape == (n_tok,)):
        y = _new(out, (*x.shape[:-1], n - keep_from))
        rows = x.numel() // n
        return _native_call(out, y, (x, cos, sin, pos), _ops.rope, x.data_ptr(), rows, n, keep_from,
                            n - keep_from, start, n - start, rows // n_tok, cos.data_ptr(), sin.data_ptr(),
                            pos.data_ptr(), cos.shape[0], int(neox), y.data_ptr())
    shape = (n_tok,) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos[pos].reshape(shape), sin[pos].reshape(shape)
    if neox:
        x0, x1 = x[..., start:].chunk(2, dim=-1)
        rotated = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    else:
        x0, x1 = x[..., start::2], x[..., start + 1::2]
        rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., keep_from:start], rotated], dim=-1) if keep_from < start else rotated


def softmax(x: torch.Tensor, scale: float = 1.0, n_past: int | None = None, out: Out | None = None) -> torch.Tensor:
    """softmax(x * scale) over the last dimension: the router's probabilities (no scale), or with
    `n_past` the attention's causal SOFT_MAX of kq [..., T, n_kv], where token t (at position
    n_past + t) attends to the positions up to its own and the later ones are left out (0).

    Natively the rule is applied in the loop; torch masks with a mask it builds (`_causal_mask`)."""
    n = x.shape[-1]
    if _native(x):
        y = _new(out, x.shape)
        return _native_call(out, y, (x,), _ops.softmax, x.data_ptr(), x.numel() // n, n, scale,
                            0 if n_past is None else x.shape[-2], 0 if n_past is None else n_past, y.data_ptr())
    x = x * scale if scale != 1.0 else x
    if n_past is not None:
        x = x.masked_fill(_causal_mask(x.shape[-2], n_past, n, x.device), float("-inf"))
    return torch.softmax(x, dim=-1)


@functools.lru_cache(maxsize=8)
def _causal_mask(n_tokens: int, n_past: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """[T, n_kv] True where token t may not attend (a position after n_past + t): made once per
    evaluation and device, as every layer's softmax uses the same one."""
    return torch.ones(n_tokens, n_kv, dtype=torch.bool, device=device).triu_(n_past + 1)


def append_kv(cache: torch.Tensor, n_past: int, x: torch.Tensor, tail: torch.Tensor | None = None,
              out: Out | None = None) -> torch.Tensor:
    """The CPY of this evaluation's T rows into a KV cache [n_ctx, ...] after its n_past cached ones
    -> the cache (whole: its readers take the first n_past + T rows). x [T, ...] has the cache's
    row shape, or with `tail` [T, R] (k_pe, one per token for every head) all but its last R
    columns: x's rows are stored continued by their token's tail (MLA: kv_cmpr then k_pe; standard
    attention: each head's k_nope then k_pe), without concatenating them first. With `out`, the
    cache is the output it keeps (so the call can be replayed at the next depth)."""
    n_tok, n_x = x.shape[0], x.shape[-1]
    n_tail = 0 if tail is None else tail.shape[-1]
    n_kv = n_past + n_tok
    if n_kv > cache.shape[0]:
        raise ValueError(f"positions up to {n_kv} do not fit a cache of {cache.shape[0]}")
    heads = cache.dim() == 3
    if (_native(cache) and _rows(x, cache.dim()) and x.shape[1:-1] == cache.shape[1:-1]
            and n_x + n_tail == cache.shape[-1] and (tail is None or _rows(tail, 2) and tail.shape[0] == n_tok)):
        if out is not None:
            out.tensor = cache
        return _native_call(out, cache, (cache, x, tail), _ops.append_kv, n_past, cache.data_ptr(), cache.shape[0],
                            n_tok, cache.shape[1] if heads else 1, *_rows_at(x), n_x, *_rows_at(tail), n_tail)
    if tail is None:
        cache[n_past:n_kv] = x
    else:
        tail = tail[:, None, :].expand(-1, x.shape[1], -1) if heads else tail
        cache[n_past:n_kv] = torch.cat([x, tail], dim=-1)
    return cache


def _n_rep(n_head: int, cached: torch.Tensor) -> int:
    """Query heads per head of a cache value [n_kv, H_kv, D] (grouped-query attention: query head h
    reads cached head h // n_rep); 1 for MLA's [n_kv, D], which every head shares; 0 where H_kv
    does not divide n_head (no native path)."""
    if cached.dim() == 2:
        return 1
    return n_head // cached.shape[1] if n_head % cached.shape[1] == 0 else 0


def _heads(n_head: int, cached: torch.Tensor) -> torch.Tensor:
    """A cache value's heads repeated for the query heads that share them (GQA), for torch."""
    return cached if cached.dim() == 2 else cached.repeat_interleave(n_head // cached.shape[1], dim=1)


def kq(q: torch.Tensor, k: torch.Tensor, q_pe: torch.Tensor | None = None, out: Out | None = None) -> torch.Tensor:
    """The attention scores (MUL_MAT kq) kq[h, t, s] = q[t, h] . k[s, h // n_rep] -> [H, T, n_kv], for
    q [T, H, D] and k [n_kv, H_kv, D] (standard attention, H_kv = H / n_rep: fewer with GQA), or k
    [n_kv, D] that every head shares (MLA's compressed cache) and q in two parts, q [T, H, D - R]
    and q_pe [T, H, R] (MLA: q_nope absorbed, then the rotated part), multiplied as their
    concatenation without making it."""
    n_tok, n_head, n_q = q.shape
    n_pe = 0 if q_pe is None else q_pe.shape[-1]
    n_kv = k.shape[0]
    n_rep = _n_rep(n_head, k)
    if (n_tok <= MAX_NATIVE_ATTN_TOKENS and _rows(q, 3) and _rows(k, k.dim()) and k.shape[-1] == n_q + n_pe
            and n_rep and (q_pe is None or _rows(q_pe, 3) and q_pe.shape[:2] == q.shape[:2])):
        y = _new(out, (n_head, n_tok, n_kv))
        return _native_call(out, y, (q, q_pe, k), _ops.kq, *_rows_at(q), n_q, *_rows_at(q_pe), n_pe, n_tok,
                            n_head, *_rows_at(k), n_rep, n_kv, y.data_ptr())
    q = q if q_pe is None else torch.cat([q, q_pe], dim=-1)
    return torch.einsum("thd,shd->hts" if k.dim() == 3 else "thd,sd->hts", q, _heads(n_head, k))


def kqv(kq: torch.Tensor, v: torch.Tensor, out: Out | None = None) -> torch.Tensor:
    """The attention output (MUL_MAT kqv) kqv[t, h] = the sum over s of kq[h, t, s] v[s, h // n_rep]
    -> [T, H, Dv], for the softmax kq [H, T, n_kv] and v [n_kv, H_kv, Dv] (standard attention, as
    `kq`'s k), or v [n_kv, Dv] that every head shares (MLA: the compressed cache's first Dv columns)."""
    n_head, n_tok, n_kv = kq.shape
    n_rep = _n_rep(n_head, v)
    if (n_tok <= MAX_NATIVE_ATTN_TOKENS and _native(kq) and _rows(v, v.dim()) and v.shape[0] == n_kv and n_rep):
        y = _new(out, (n_tok, n_head, v.shape[-1]))
        return _native_call(out, y, (kq, v), _ops.kqv, kq.data_ptr(), n_tok, n_head, n_kv, *_rows_at(v), n_rep,
                            v.shape[-1], y.data_ptr())
    return torch.einsum("hts,shd->thd" if v.dim() == 3 else "hts,sd->thd", kq, _heads(n_head, v))


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int, scale: float,
               q_pe: torch.Tensor | None = None, out: Out | None = None, pool=None, times=None) -> torch.Tensor:
    """FLASH_ATTN_EXT: the causal attention of T queries at positions n_past.. over the n_past + T
    first rows of the caches k and v -> [T, H, Dv]; kq, the causal softmax (times `scale`) and kqv
    in one op, as `kq`, `softmax` and `kqv` lay out their operands (k, v: [n_ctx, H_kv, D], H_kv
    dividing H (GQA), or MLA's [n_ctx, D] shared by every head, v then a view of k's first Dv columns).

    Natively each head is one chunk of work: the scores stay in a thread's scratch instead of a
    [H, T, n_kv] tensor, and with a `pool` (`hybrid._kernels.Pool`, `times` as its jobs take)
    the threads share the heads. Otherwise (torch) it is the three ops."""
    n_tok, n_head, n_q = q.shape
    n_pe = 0 if q_pe is None else q_pe.shape[-1]
    n_kv = n_past + n_tok
    n_rep = _n_rep(n_head, k)
    if (n_tok <= MAX_NATIVE_ATTN_TOKENS and _rows(q, 3) and _rows(k, k.dim()) and _rows(v, k.dim())
            and k.shape[-1] == n_q + n_pe and k.shape[0] >= n_kv and v.shape[0] >= n_kv
            and n_rep and (k.dim() == 2 or k.shape[1] == v.shape[1])
            and (q_pe is None or _rows(q_pe, 3) and q_pe.shape[:2] == q.shape[:2])):
        y = _new(out, (n_tok, n_head, v.shape[-1]))
        return _native_call(out, y, (q, q_pe, k, v), _ops.flash_attn, n_past, *_rows_at(q), n_q, *_rows_at(q_pe),
                            n_pe, *_rows_at(k), *_rows_at(v), v.shape[-1], n_tok, n_head, n_rep, scale, y.data_ptr(),
                            pool, times)
    return _on_pool(pool, times, lambda: kqv(softmax(kq(q, k[:n_kv], q_pe), scale, n_past), v[:n_kv]))


def sigmoid(x: torch.Tensor, out: Out | None = None) -> torch.Tensor:
    if _native(x):
        y = _new(out, x.shape)
        return _native_call(out, y, (x,), _ops.sigmoid, x.data_ptr(), x.numel(), y.data_ptr())
    return torch.sigmoid(x)


def _shared(pool, times) -> tuple:
    """The trailing (pool, times) of a native elementwise call whose rows the pool's threads
    share; none (this thread alone, the GIL kept) without a pool."""
    return () if pool is None else (pool, times)


def add(a: torch.Tensor, b: torch.Tensor, out: Out | None = None, pool=None, times=None) -> torch.Tensor:
    """a + b, for b of a's shape or of its trailing dimensions (a bias). With a `pool`
    (`hybrid._kernels.Pool`, `times` as its jobs take), as `swiglu` and `scale_rows`, the
    threads share the rows: a prompt's [T, n_embd] is too large for one thread cold."""
    if _native(a, b) and b.shape == a.shape[a.dim() - b.dim():]:
        y = _new(out, a.shape)
        return _native_call(out, y, (a, b), _ops.add, a.data_ptr(), a.numel(), b.data_ptr(), b.numel(),
                            y.data_ptr(), *_shared(pool, times))
    return _on_pool(pool, times, lambda: a + b)


def swiglu(g: torch.Tensor, u: torch.Tensor, out: Out | None = None, pool=None, times=None) -> torch.Tensor:
    """silu(g) * u (GLU)."""
    if _native(g, u) and g.shape == u.shape:
        y = _new(out, g.shape)
        return _native_call(out, y, (g, u), _ops.swiglu, g.data_ptr(), u.data_ptr(), g.numel(), y.data_ptr(),
                            *_shared(pool, times))
    return _on_pool(pool, times, lambda: F.silu(g) * u)


def scale_rows(x: torch.Tensor, w: torch.Tensor, out: Out | None = None, pool=None, times=None) -> torch.Tensor:
    """x [..., n] times w [...], one weight per row: each expert's output times its routing weight."""
    if _native(x, w) and w.shape == x.shape[:-1]:
        y = _new(out, x.shape)
        return _native_call(out, y, (x, w), _ops.scale_rows, x.data_ptr(), w.numel(), x.shape[-1], w.data_ptr(),
                            y.data_ptr(), *_shared(pool, times))
    return _on_pool(pool, times, lambda: x * w[..., None])


def sum_experts(x: torch.Tensor, out: Out | None = None) -> torch.Tensor:
    """x [T, U, n] summed over its U experts -> [T, n]."""
    if _native(x) and x.dim() == 3 and x.shape[1]:
        y = _new(out, (x.shape[0], x.shape[2]))
        return _native_call(out, y, (x,), _ops.sum_rows, x.data_ptr(), x.shape[0], x.shape[1], x.shape[2],
                            y.data_ptr())
    return x.sum(1)


def top_k(sel: torch.Tensor, k: int, n_groups: int = 0, n_groups_used: int = 0,
          out: Out | None = None) -> torch.Tensor:
    """The k best columns of each row of sel [T, E], best first, ties to the lower index on the
    native path (torch's order of ties is unspecified) -> int64 [T, k].

    Group-limited routing (DeepSeek-V3) with n_groups > 1: the E columns form n_groups
    equal groups, each scored by the sum of its two best; only the n_groups_used best
    groups compete."""
    if _native(sel) and sel.dim() == 2:
        ids = _new(out, (sel.shape[0], k), I64)
        return _native_call(out, ids, (sel,), _ops.top_k, sel.data_ptr(), sel.shape[0], sel.shape[1], k, n_groups,
                            n_groups_used, ids.data_ptr())
    if n_groups > 1:
        groups = sel.reshape(sel.shape[0], n_groups, -1)                                # [T, G, E/G]
        score = groups.topk(2, dim=-1).values.sum(-1)                                   # [T, G]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(n_groups_used, dim=-1).indices, True)
        sel = groups.masked_fill(~keep[..., None], float("-inf")).reshape(sel.shape)
    return sel.topk(k, dim=-1).indices


def expert_weights(probs: torch.Tensor, ids: torch.Tensor, norm: bool, scale: float,
                   out: Out | None = None) -> torch.Tensor:
    """The routing weights probs [T, E] at the chosen ids [T, U], normalised to sum 1 per token
    if `norm`, times `scale` unless it is 0 (build_moe_ffn) -> [T, U]."""
    if (_native(probs) and _ids(ids) and ids.dim() == probs.dim() == 2
            and ids.shape[0] == probs.shape[0]):
        y = _new(out, ids.shape)
        return _native_call(out, y, (probs, ids), _ops.expert_weights, probs.data_ptr(), probs.shape[0],
                            probs.shape[1], ids.data_ptr(), ids.shape[1], norm, scale, y.data_ptr())
    w = probs.gather(1, ids)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale if scale != 0.0 else w


def get_rows(data: torch.Tensor, ggml_type: int, n_cols: int, ids: torch.Tensor,
             out: Out | None = None) -> torch.Tensor:
    """Rows ids [T] of a stored tensor (`hybrid.weights.Weight.data`: the GGUF blocks as uint8
    rows, or float values) dequantised -> float32 [T, n_cols]: the token embeddings' GET_ROWS.
    F32, F16, BF16 and the native kernels' types (hybrid/quant_traits.h) natively; other types
    through `hybrid.quants`."""
    if (NATIVE and NATIVE_GET_ROWS.get(ggml_type) is data.dtype and data.is_cpu and data.is_contiguous()
            and data.dim() == 2 and _ids(ids)):
        y = _new(out, (ids.numel(), n_cols))
        return _native_call(out, y, (data, ids), _ops.get_rows, data.data_ptr(), data.shape[0],
                            data.shape[1] * data.element_size(), ggml_type, n_cols, ids.data_ptr(), ids.numel(),
                            y.data_ptr())
    return dequantize(data[ids], ggml_type)


def matmul_f32(x: torch.Tensor, w: torch.Tensor, out: Out | None = None, pool=None, times=None) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T for a float32 weight (the MoE router, ffn_gate_inp) -> [T, N]; natively
    with a `pool` (`hybrid._kernels.Pool`, `times` as its jobs take) the threads share w's rows."""
    if _native(x, w) and x.dim() == w.dim() == 2 and x.shape[1] == w.shape[1]:
        y = _new(out, (x.shape[0], w.shape[0]))
        return _native_call(out, y, (x, w), _ops.matmul_f32, x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(),
                            w.shape[0], y.data_ptr(), pool, times)
    return _on_pool(pool, times, lambda: F.linear(x, w))


def argmax(x: torch.Tensor) -> int:
    """The index of the largest value in x's last row, the first on ties: the greedy token
    from logits [T, n_vocab] (or [n_vocab]). The row is found by address, not by indexing:
    a torch view costs tens of microseconds with torch cold, as it is after a token."""
    row = _last_row(x)
    return _ops.argmax(*row) if row is not None else int(torch.argmax(x.reshape(-1, x.shape[-1])[-1]))


def _last_row(x: torch.Tensor) -> tuple[int, int] | None:
    """(address, length) of x's last row for the native argmax; None: torch's."""
    if _native(x) and x.numel():
        n = x.shape[-1]
        return x.data_ptr() + 4 * (x.numel() - n), n
    return None


class Greedy:
    """`argmax` for logits that are the same tensor at every call (the engine's graph writes
    them into memory it reuses): the row is found once per tensor object, which then stays
    alive here; with torch cold after a token, the checks cost more than the argmax."""

    __slots__ = ("logits", "row")

    def __init__(self):
        self.logits, self.row = None, None

    def __call__(self, x: torch.Tensor) -> int:
        if x is not self.logits:
            self.logits, self.row = x, _last_row(x)
        return _ops.argmax(*self.row) if self.row is not None else argmax(x)
