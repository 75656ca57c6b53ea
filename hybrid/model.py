"""The DeepSeek2 forward pass, built as a graph of named ggml-style ops.

One readable file in the manner of gpt-fast's model.py, except that the model
is not run directly: `build_graph` returns a `hybrid.graph.Graph` whose nodes
(GET_ROWS, RMS_NORM, MUL_MAT, ROPE, SOFT_MAX, MUL_MAT_ID, ...) each name the
buffer they read (a GGUF weight or a KV-cache buffer), so the scheduler can
place, split and time them. Activations are float32 torch tensors with shapes
in trailing comments: T tokens, H heads, E experts, U experts used per token.

The op sequence follows llama.cpp's deepseek2 graph (src/models/deepseek2.cpp,
build_moe_ffn in src/llama-graph.cpp): q or q-LoRA, the compressed KV
projection with its norm, RoPE on the rope part (consecutive pairs, YaRN as
llama.cpp sets it up), then either standard attention over decompressed
per-head K/V (`mla=False`), or absorbed MLA (`mla=True`) over a cache of the
compressed kv_lora + rope vector per token; the router (softmax or sigmoid,
selection bias, group-limited top-k, weight norm and scale), the routed and
shared experts, residuals, output norm and head. tests/reference_deepseek2.py
checks it against an independent float64 NumPy pass.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType

from hybrid.config import ModelConfig
from hybrid.graph import Cost, Graph, Node
from hybrid.sched import compute
from hybrid import cpu_kernels, ops
from hybrid.weights import GateUpExperts, ModelWeights, mul_mat, native


# --- RoPE ----------------------------------------------------------------------

@dataclass(frozen=True)
class Rope:
    freq: torch.Tensor      # [n_rot/2] angle per position of each rotated pair
    mag: float              # magnitude llama.cpp's rope multiplies cos/sin by (YaRN mscale)
    kq_scale: float         # softmax scale: mscale^2 / sqrt(head_k)


def rope_setup(c: ModelConfig, attn_factor: float = 1.0) -> Rope:
    """RoPE angles and scales exactly as llama.cpp computes them for deepseek2.

    llama-context.cpp sets attn_factor = get_mscale(f, m)/get_mscale(f, log_mul)
    (m = log_mul unless it is 1), then cancels ggml's own YaRN factor
    (1 + 0.1 ln f); ggml_rope multiplies it back, so the rotated parts carry the
    ratio alone. deepseek2.cpp undoes the cancel and scales the softmax by
    mscale^2 with mscale = that * (1 + 0.1 log_mul ln f). The file stores
    log_mul as 0.1 * mscale_all_dim, which llama.cpp divides by 0.1.
    """
    pairs = torch.arange(c.n_rot // 2, dtype=torch.float64)
    freq = c.rope_freq_base ** (-2.0 * pairs / c.n_rot)
    scaled = c.rope_scaling_type in ("yarn", "linear")
    factor = c.rope_scaling_factor if scaled else 1.0
    log_mul = c.rope_yarn_log_mul / 0.1

    def get_mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

    if c.rope_scaling_type == "yarn":
        n_ctx_orig = c.rope_orig_ctx or c.n_ctx_train

        def corr_dim(beta: float) -> float:
            return c.n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(c.rope_freq_base))

        lo = max(0.0, math.floor(corr_dim(c.rope_yarn_beta_fast)))
        hi = min(c.n_rot - 1.0, math.ceil(corr_dim(c.rope_yarn_beta_slow)))
        ramp_mix = 1.0 - ((pairs - lo) / max(0.001, hi - lo)).clamp(0.0, 1.0)
        freq = freq / factor * (1 - ramp_mix) + freq * ramp_mix
        if log_mul != 0.0:
            ratio = get_mscale(factor, log_mul if log_mul != 1.0 else 1.0) / get_mscale(factor, log_mul)
        else:
            ratio = get_mscale(factor, 1.0)
        mag = ratio * attn_factor
        mag_org = mag
    else:
        freq = freq / factor
        mag = attn_factor
        mag_org = attn_factor * (1 + 0.1 * math.log(factor))
    mscale = mag_org * (1 + 0.1 * log_mul * math.log(factor))
    return Rope(freq.float(), mag, mscale * mscale / math.sqrt(c.n_embd_head_k))


def rope_cos_sin(pos: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, n_rot/2] (times the YaRN magnitude) of each pair's angle at positions pos [T]."""
    ang = pos.to(torch.float64)[:, None] * rope.freq.to(pos.device, torch.float64)[None, :]
    return (torch.cos(ang) * rope.mag).float(), (torch.sin(ang) * rope.mag).float()


# --- KV cache ------------------------------------------------------------------

class KVCache:
    """Per-layer cache buffers, named `cache_k_l{il}` / `cache_v_l{il}` like llama.cpp's.

    Standard attention caches decompressed per-head K [n_ctx, H, head_k] and V
    [n_ctx, H, head_v]; MLA caches only the compressed kv_lora + rope vector per
    token [n_ctx, kv_lora + n_rot] in `cache_k_l{il}` (V is its first kv_lora
    columns), which is MLA's point: 576 floats a token instead of H * 320.
    """

    def __init__(self, c: ModelConfig, n_ctx: int, mla: bool):
        self.n_ctx, self.mla, self.n_past = n_ctx, mla, 0
        self.buffers: dict[str, torch.Tensor] = {}
        for il in range(c.n_layer):
            if mla:
                self.buffers[f"cache_k_l{il}"] = torch.zeros(n_ctx, c.kv_lora_rank + c.n_rot)
            else:
                self.buffers[f"cache_k_l{il}"] = torch.zeros(n_ctx, c.n_head, c.n_embd_head_k)
                self.buffers[f"cache_v_l{il}"] = torch.zeros(n_ctx, c.n_head, c.n_embd_head_v)

    @staticmethod
    def bytes_needed(c: ModelConfig, n_ctx: int, mla: bool) -> int:
        per_token = c.kv_lora_rank + c.n_rot if mla else c.n_head * (c.n_embd_head_k + c.n_embd_head_v)
        return 4 * n_ctx * per_token * c.n_layer

    @property
    def n_bytes(self) -> int:
        return sum(b.numel() * 4 for b in self.buffers.values())


# --- the graph builder ---------------------------------------------------------

def _tensor_label(buffer: str) -> str:
    """blk.3.ffn_up_exps.weight -> blk.3.ffn_up_exps (the op name the profiler shows)."""
    return buffer.removesuffix(".weight")


class _Builder:
    """Appends nodes in topological order; each helper below adds one op.

    The graph it builds is reusable: the number of cached tokens (`n_past`) is read
    from the graph when an op runs, not fixed when the graph is built, so one
    graph serves every token of a generation (hybrid/engine.py reuses it, as
    llama.cpp reuses its graphs, instead of rebuilding ~130 nodes per token).
    """

    def __init__(self, model: "Model", n_tokens: int, n_past: int):
        self.m, self.c = model, model.config
        self.n_tokens = n_tokens
        self.graph = Graph([], {}, None, n_tokens=n_tokens, n_past=n_past)
        self.nodes, self.inputs = self.graph.nodes, self.graph.inputs

    @property
    def n_past(self) -> int:
        """Tokens already in the cache for the evaluation now running."""
        return self.graph.n_past

    def input(self, name: str) -> Node:
        node = Node("INPUT", name, (), None, n_tokens=self.n_tokens)
        self.nodes.append(node)
        self.inputs[name] = node
        return node

    def op(self, op: str, name: str, fn: Callable, *srcs: Node, layer: int = -1, buffer: str | None = None,
           n_bytes: int = 0, flops: int = 0, parallel: Callable | None = None, cost: Cost | None = None) -> Node:
        """A node; its cost is `cost`, or else n_bytes read and flops done at every run."""
        node = Node(op, name, tuple(srcs), fn, buffer, layer, cost or Cost(n_bytes, flops), self.n_tokens, parallel)
        self.nodes.append(node)
        return node

    def native(self, op: str, name: str, fn: Callable, *srcs: Node, dtype: torch.dtype = ops.F32,
               shared: bool = False, **kw) -> Node:
        """An op that writes into memory the node keeps: fn(buf, *src_values, out), `out` an
        `ops.Out` of `dtype`, run through `replaying`. `shared`: fn(buf, *src_values, pool, times,
        out) is also the op's pool form, its rows shared by the CPU threads (for a prompt's batch,
        see hybrid/backends/cpu.py)."""
        run = replaying(fn, ops.Out(dtype))
        if shared:
            return self.op(op, name, _serial(run), *srcs, parallel=run, **kw)
        return self.op(op, name, run, *srcs, **kw)

    def weight(self, name: str):
        return self.m.weights[name]

    def kv_op(self, op: str, name: str, fn: Callable, *srcs: Node, layer: int, buffer: str | None = None,
              bytes_per_kv: int = 0, flops_per_kv: int = 0, parallel: bool = False) -> Node:
        """An attention op over the n_kv = n_past + T cached positions: its bytes and flops
        grow with n_kv. With `parallel`, fn is the op's pool form fn(buf, *src_values, pool, times)."""
        cost = Cost(bytes_per_kv=bytes_per_kv, flops_per_kv=flops_per_kv)
        if parallel:
            return self.op(op, name, _serial(fn), *srcs, layer=layer, buffer=buffer, parallel=fn, cost=cost)
        return self.op(op, name, fn, *srcs, layer=layer, buffer=buffer, cost=cost)

    def kv_store(self, cache: str, layer: int, n_bytes: int, *srcs: Node) -> Node:
        """The CPY of this evaluation's rows (srcs: x, or x and its tail, see `ops.append_kv`)
        into a KV cache; its value is the cache, whose first n_past + T rows its readers take,
        so it is the same object at every depth and the call replays with the depth of the moment."""
        def store(cache, *rows_and_out):
            *rows, out = rows_and_out
            return ops.append_kv(cache, self.n_past, *rows, out=out)
        return self.op("CPY", cache, replaying(store, ops.Out(), n_past=lambda: self.n_past), *srcs,
                       layer=layer, buffer=cache, n_bytes=n_bytes)

    def mul_mat(self, wname: str, x: Node, layer: int, result: str | None = None) -> Node:
        """x [T, K] @ W^T -> [T, N]; workers split it by rows of W. The native form writes
        into memory the node keeps (`ops.Out`); the graph's result (`result`) into "fresh"
        memory, which outlives the evaluation, or "reused" memory kept whatever its size."""
        w = self.weight(wname)
        n, k = w.shape[-2], w.shape[-1]
        out = None if result == "fresh" else ops.Out(keep_bytes=None if result == "reused" else ops.KEEP_BYTES)
        return self.op("MUL_MAT", _tensor_label(wname), mul_mat, x, layer=layer, buffer=wname,
                       n_bytes=w.n_bytes, flops=2 * self.n_tokens * n * k, parallel=_mul_mat_form(w, out))

    def rms_norm(self, wname: str, x: Node, layer: int, name: str, cols: slice = slice(None)) -> Node:
        eps = self.c.rms_eps

        # out: the node's output memory, reused by each evaluation of the graph (hybrid.ops.Out);
        # norm weights are F32 in llama.cpp's files: their data is the values
        def fn(w, x, out):
            return ops.rms_norm(x, w.data if w.data.dtype is torch.float32 else w.dequantize(), eps, cols, out)
        return self.native("RMS_NORM", name, fn, x, layer=layer, buffer=wname, n_bytes=self.weight(wname).n_bytes,
                           flops=4 * self.n_tokens * self.weight(wname).shape[0])

    def add(self, name: str, a: Node, b: Node, layer: int) -> Node:
        return self.native("ADD", name, lambda _, a, b, pool, times, out: ops.add(a, b, out, pool, times), a, b,
                           shared=True, layer=layer, flops=self.n_tokens * self.c.n_embd)

    def swiglu(self, name: str, gate: Node, up: Node, layer: int, width: int) -> Node:
        return self.native("GLU", name, lambda _, g, u, pool, times, out: ops.swiglu(g, u, out, pool, times), gate,
                           up, shared=True, layer=layer, flops=5 * self.n_tokens * width)

    def per_head(self, wname: str, x: Node, layer: int, name: str, part: str = "all",
                 transposed: bool = False) -> Node:
        """A batched per-head matmul with a 3-D attention weight (ggml MUL_MAT on 3-D tensors).

        W is [H, N, K] and out[t, h] = W[h] @ x[t, h] (x [T, K] is shared by all
        heads); `transposed` uses W[h]^T. `part` takes the k or v rows of the old
        single attn_kv_b [H * (nope + v), kv_lora] so both layouts feed one code path.
        An x shared by all heads times W's rows (not transposed) is a plain matmul on the
        stored rows, so it takes the native kernels like `mul_mat` (input rounded to 8
        bits); the rest multiplies by an exact f32 copy of W (`_head_weights`).
        """
        c, w = self.c, self.weight(wname)
        nope, hv = c.n_embd_head_qk_nope, c.n_embd_head_v
        rows = {"all": slice(None), "k": slice(0, nope), "v": slice(nope, nope + hv)}[part]

        def prepare(w) -> torch.Tensor:
            full = w.dequantize()
            if part != "all":
                full = full.reshape(c.n_head, nope + hv, c.kv_lora_rank)[:, rows]
            return (full.transpose(1, 2) if transposed else full).contiguous()      # [H, N, K]

        def heads(wh, x, h0: int, h1: int) -> torch.Tensor:                             # [T, h1-h0, N]
            wh = wh[h0:h1]
            if x.dim() == 2:                                    # one x for all heads: a single GEMM
                return (x @ wh.reshape(-1, wh.shape[-1]).T).reshape(x.shape[0], *wh.shape[:2])
            return torch.einsum("hnk,thk->thn", wh, x[:, h0:h1])

        bound = _native_heads_form(w, c.n_head, rows) if native(w) and not transposed else None

        def parallel(buf, x, pool, times):     # workers split the heads (native: each head's rows)
            if buf is w and bound is not None and x.dim() == 2:
                return bound(x, pool, times)
            if x.dim() == 2 and not transposed and native(buf):
                run = bound if buf is w else _native_heads_form(buf, c.n_head, rows)   # (a device's copy)
                return run(x, pool, times)
            wh = _head_weights(buf, (part, transposed), prepare)
            dst = x.new_empty(x.shape[0], *wh.shape[:2])

            def task(h0: int, h1: int) -> None:
                dst[:, h0:h1] = heads(wh, x, h0, h1)
            bounds = cpu_kernels.row_splits(c.n_head, cpu_kernels.n_tasks(pool))
            cpu_kernels.run_tasks(cpu_kernels.range_tasks(bounds, task), pool, times)
            return dst
        share = {"all": 1.0, "k": nope / (nope + hv), "v": hv / (nope + hv)}[part]
        # bytes: the share of the weight the op reads, as stored (what a GPU engine reads; the
        # f32 form that hyprof's torch path keeps, see _head_weights, is its own affair)
        return self.op("MUL_MAT", name, _serial(parallel), x, layer=layer, buffer=wname,
                       n_bytes=int(w.n_bytes * share), flops=2 * self.n_tokens * int(math.prod(w.shape) * share),
                       parallel=parallel)

    def mul_mat_id(self, wname: str, x: Node, ids: Node, layer: int, fused: bool = False) -> Node:
        """Expert matmuls: out[t, u] = W[ids[t, u]] @ x[t] (or x[t, u]) -> [T, U, N], and the
        number of distinct experts computed (what the op read: known only once it has run).
        With `fused`, W is the gate+up pair and the op also applies SiLU(gate) * up.
        """
        c, w = self.c, self.weight(wname)
        n, k = w.shape[-2], w.shape[-1]
        cost = Cost(flops=2 * self.n_tokens * c.n_expert_used * n * k * (2 if fused else 1),
                    bytes_per_expert=w.n_bytes // c.n_expert)
        expert_fn = _fused_expert if fused else _expert

        bound = _expert_kernel(w, fused)

        def parallel(buf, x, ids, pool, times, out=ops.Out()):
            run = bound if buf is w else _expert_kernel(buf, fused)    # (a device's copy: bound now)
            if run is not None:
                return run(x, ids, pool, times, out)
            experts = torch.unique(ids).tolist()
            dst = x.new_zeros(ids.shape[0], ids.shape[1], n)
            k = cpu_kernels.n_tasks(pool)
            groups = [experts[i::k] for i in range(k)]
            cpu_kernels.run_tasks([lambda g=g: [expert_fn(buf, x, ids, e, dst) for e in g] for g in groups if g],
                                  pool, times)
            return dst, len(experts)
        return self.op("MOE_FUSED_UP_GATE" if fused else "MUL_MAT_ID", _tensor_label(wname), _serial(parallel), x,
                       ids, layer=layer, buffer=wname, parallel=parallel, cost=cost)


def replaying(fn: Callable, out: ops.Out, n_past: Callable[[], int] | None = None) -> Callable:
    """A node's fn(buf, *src_values) from fn(buf, *src_values, out) that, while its buffer and
    inputs are the same objects as at its last run, runs again the native call that run made
    (`ops.Out.call`) instead of fn; with `n_past` (the depth now), a call that depends on the
    cache's depth, which such calls take as their first argument, runs at the depth of the moment.

    Why: in a reused graph each node sees the same input objects at every token (the
    memory its sources keep), and the call's addresses and sizes follow from them and
    from the node's own constants. Run as Python, a ~1 us op costs 5-30 us after a
    token's weights have gone through the caches (its torch checks and views are cold);
    the replay is one Python frame and the call. Of the ops whose call changes with the
    depth, the cache's CPY and FLASH_ATTN_EXT are built with `n_past`; the separate kq,
    softmax and kqv (-fa 0), whose output shapes change with it too, are not built with it."""
    last: list = []             # the buffer and inputs of the run whose call `out` holds

    def run(buf, *args):
        call = out.call
        if (call is not None and len(last) == len(args) + 1 and last[0] is buf
                and all(map(operator.is_, last[1:], args))):
            if n_past is None:
                call[0](*call[1])
            else:
                call[0](n_past(), *call[1][1:])
            return out.tensor
        out.call = None
        y = fn(buf, *args, out)
        last[:] = (buf, *args) if out.call is not None else ()
        return y
    return run


def _per_object(make: Callable) -> Callable:
    """get(x) -> make(x), made once per object x (the last one is held): a reused graph's
    node sees the same input objects at every token."""
    last = [None, None]

    def get(x):
        if last[0] is not x:
            last[:] = x, make(x)
        return last[1]
    return get


def _view(make: Callable) -> Callable:
    """A view node's fn: the view make(x) made once per input object. Its input is the output
    its source keeps from token to token (`ops.Out`), and a view that stays the same object
    lets the op reading it reuse what it prepared for it (`cpu_kernels.bind_matmul`)."""
    get = _per_object(make)
    return lambda _, x: get(x)


def _serial(parallel: Callable) -> Callable:
    """An op's `fn` from its `parallel` form: run on the calling thread alone (no pool)."""
    return lambda *args: parallel(*args, None, None)


# Per-head attention weights where the native kernels cannot serve (k_b read transposed,
# -mla 1's per-head inputs, CUDA, HYPROF_KERNELS=torch): dequantised once per buffer (a
# backend's own copy is its own key) in the [H, N, K] layout the op multiplies by, up to
# 8 MiB f32 per layer at DeepSeek-V2-Lite shapes; dequantising per token cost more than the
# rest of attention. Entries go with their buffer.
_HEAD_WEIGHTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _native_heads_form(w, n_head: int, rows: slice) -> Callable:
    """A per-head matmul whose input x [T, K] is shared by all heads, on the native kernel:
    MUL_MAT_ID with head h as expert h, rows `rows` of each head's rows -> [T, H, N]
    (on the repacked blocks where heads and rows are whole blocks of 16 rows).
    -> run(x, pool, times), bound once per node with its output memory, the ids of its x and
    the view of the rows it returns: binding and viewing per call cost ~25 us of cold Python."""
    per_head = w.shape[-2] if len(w.shape) == 3 else w.shape[0] // n_head
    r0, r1, _ = rows.indices(per_head)
    blocks, kind = w.kernel_blocks
    if per_head % 16 or r0 % 16 or r1 % 16:            # repacked blocks are read 16 rows at a time
        blocks, kind = w.data, w.ggml_type
    kernel = cpu_kernels.bind_mul_mat_id(blocks.reshape(n_head, per_head, -1), kind, rows=(r0, r1))
    out = ops.Out()
    ids_of = _per_object(lambda x: _head_ids(x.shape[0], n_head))
    rows_of = _per_object(lambda dst: dst[:, :, r0:r1])

    def run(x, pool, times):
        dst, _ = kernel(x, ids_of(x), pool, times, out)      # into out [T, H, per_head]
        return rows_of(dst)
    return run


@functools.lru_cache(maxsize=64)
def _head_ids(n_tokens: int, n_head: int) -> np.ndarray:
    """Every head for every token, as MUL_MAT_ID ids (read-only, shared by the calls)."""
    ids = np.tile(np.arange(n_head, dtype=np.int32), (n_tokens, 1))
    ids.flags.writeable = False
    return ids


def _head_weights(w, key, prepare: Callable) -> torch.Tensor:
    forms = _HEAD_WEIGHTS.setdefault(w, {})
    if key not in forms:
        forms[key] = prepare(w)
    return forms[key]


def _expert_kernel(w, fused: bool) -> Callable | None:
    """The native MUL_MAT_ID on expert weights w (the gate+up pair when fused), bound once
    (`cpu_kernels.bind_mul_mat_id`); None where they have no native kernel."""
    g = w.gate if fused else w
    if not native(g) or (fused and not native(w.up)):
        return None
    blocks, kind = g.kernel_blocks
    up = None
    if fused:
        up, up_kind = w.up.kernel_blocks
        if up_kind != kind:                     # one repacked, the other not: both as stored
            blocks, kind, up = g.data, g.ggml_type, w.up.data
    return cpu_kernels.bind_mul_mat_id(blocks, kind, up)


def _mul_mat_form(w, out: ops.Out | None) -> Callable:
    """MUL_MAT's pool form for the model's weight w (into `out`'s memory, if one): bound to
    w's native kernel once, when it has one; another object for the buffer (a device's
    copy) takes the general form. A float32 weight (in llama.cpp's files the MoE router's,
    0.5 MiB) shares its rows natively and, into `out`, replays its call (`replaying`):
    alone, one thread read it in ~50 us after a token's expert weights had gone through
    the caches."""
    if w.ggml_type == GGMLQuantizationType.F32:
        return functools.partial(_mul_mat_f32, out=None) if out is None else replaying(_mul_mat_f32, out)
    if not native(w):
        return functools.partial(_mul_mat_parallel, out=out)
    run = cpu_kernels.bind_matmul(*w.kernel_blocks)

    def parallel(buf, x, pool, times):
        if buf is not w:
            return _mul_mat_parallel(buf, x, pool, times, out)
        return run(x, pool, times, out)
    return parallel


def _mul_mat_f32(w, x: torch.Tensor, pool, times, out: ops.Out) -> torch.Tensor:
    """MUL_MAT's form for a float32 weight (the MoE router's): its rows shared by the pool."""
    return ops.matmul_f32(x, w.data, out, pool, times)


def _mul_mat_parallel(w, x: torch.Tensor, pool, times, out: ops.Out | None = None) -> torch.Tensor:
    if native(w):
        return cpu_kernels.matmul(*w.kernel_blocks, x, pool, times, out)
    dst = x.new_empty(x.shape[0], w.shape[-2])

    def task(r0: int, r1: int) -> None:
        dst[:, r0:r1] = mul_mat(w.rows(r0, r1), x)
    cpu_kernels.run_tasks(cpu_kernels.range_tasks(w.row_splits(cpu_kernels.n_tasks(pool)), task), pool, times)
    return dst


def _expert_rows(x: torch.Tensor, ids: torch.Tensor, e: int):
    t, u = (ids == e).nonzero(as_tuple=True)
    return t, u, (x[t] if x.dim() == 2 else x[t, u])


def _expert(w, x: torch.Tensor, ids: torch.Tensor, e: int, dst: torch.Tensor) -> None:
    t, u, xs = _expert_rows(x, ids, e)
    dst[t, u] = mul_mat(w.expert(e), xs)


def _fused_expert(w: GateUpExperts, x: torch.Tensor, ids: torch.Tensor, e: int, dst: torch.Tensor) -> None:
    t, u, xs = _expert_rows(x, ids, e)
    dst[t, u] = F.silu(mul_mat(w.gate.expert(e), xs)) * mul_mat(w.up.expert(e), xs)


# --- the layers ----------------------------------------------------------------

def attention(b: _Builder, il: int, h: Node, pos: Node) -> Node:
    """Self-attention of layer il on normed input h [T, n_embd] -> [T, n_embd]."""
    c, m, p = b.c, b.m, f"blk.{il}."
    H, L, R, nope = c.n_head, c.kv_lora_rank, c.n_rot, c.n_embd_head_qk_nope
    T = b.n_tokens
    if c.q_lora_rank:
        q = b.mul_mat(p + "attn_q_a.weight", h, il)                                    # [T, q_lora]
        q = b.rms_norm(p + "attn_q_a_norm.weight", q, il, f"q_a_norm-{il}")
        q = b.mul_mat(p + "attn_q_b.weight", q, il)                                    # [T, H*head_k]
    else:
        q = b.mul_mat(p + "attn_q.weight", h, il)

    def rope_q(_, q, pos, out):                                                         # [T, H, head_k]
        return ops.rope(q.reshape(T, H, c.n_embd_head_k), m.cos_sin(pos.device), pos, nope, out=out)
    q = b.native("ROPE", f"q_pe-{il}", rope_q, q, pos, layer=il, flops=6 * T * H * R)
    kv = b.mul_mat(p + "attn_kv_a_mqa.weight", h, il)                                  # [T, L + R]
    kv_c = b.rms_norm(p + "attn_kv_a_norm.weight", kv, il, f"kv_cmpr-{il}", cols=slice(0, L))   # [T, L]
    def rope_k(_, kv, pos, out):
        return ops.rope(kv, m.cos_sin(pos.device), pos, L, keep_from=L, out=out)      # [T, R]
    k_pe = b.native("ROPE", f"k_pe-{il}", rope_k, kv, pos, layer=il, flops=6 * T * R)
    split_kv = c.kv_layout == "kv_b"
    kv_b = p + ("attn_kv_b.weight" if split_kv else "attn_k_b.weight")
    v_b = p + ("attn_kv_b.weight" if split_kv else "attn_v_b.weight")
    ck, cv = f"cache_k_l{il}", f"cache_v_l{il}"

    def causal_softmax(_, kq, out=ops.Out()):                                           # kq [H, T, n_kv]
        return ops.softmax(kq, m.rope.kq_scale, b.n_past, out)

    def n_kv() -> int:
        return b.n_past + T

    def flash_attn(attend: Callable, *srcs: Node, bytes_per_kv: int, width_k: int, width_v: int) -> Node:
        """FLASH_ATTN_EXT (-fa 1), named as llama.cpp names it: attend(*src_values, pool, times,
        out) -> [T, H, width_v], over keys of width_k."""
        return b.kv_op("FLASH_ATTN_EXT", f"__fattn__-{il}",
                       replaying(lambda _, *a: attend(*a), ops.Out(), n_past=lambda: b.n_past), *srcs, layer=il,
                       buffer=ck, bytes_per_kv=bytes_per_kv, flops_per_kv=H * T * (2 * width_k + 5 + 2 * width_v),
                       parallel=True)

    if m.mla:
        q_abs = b.op("VIEW", f"q_nope-{il}", _view(lambda q: q[..., :nope]), q, layer=il)
        # q_nope absorbed into the latent space: k_b [H, L, nope] (or kv_b's k rows, transposed)
        q_abs = b.per_head(kv_b, q_abs, il, f"q_nope_absorbed-{il}", part="k" if split_kv else "all",
                           transposed=split_kv)                                        # [T, H, L]

        kv_all = b.kv_store(ck, il, 4 * T * (L + R), kv_c, k_pe)                        # [n_ctx, L + R]
        if m.fa:
            def attend(q_abs, q, kv_all, pool, times, out):                            # [T, H, L]
                return ops.flash_attn(q_abs, kv_all, kv_all[:, :L], b.n_past, m.rope.kq_scale, q[..., nope:],
                                      out, pool, times)
            kqv = flash_attn(attend, q_abs, q, kv_all, bytes_per_kv=4 * (L + R), width_k=L + R, width_v=L)
        else:
            def kq_fn(_, q_abs, q, kv_all, out=ops.Out()):                             # [H, T, n_kv]
                return ops.kq(q_abs, kv_all[:n_kv()], q[..., nope:], out)
            kq = b.kv_op("MUL_MAT", f"kq-{il}", kq_fn, q_abs, q, kv_all, layer=il, buffer=ck,
                         bytes_per_kv=4 * (L + R), flops_per_kv=2 * H * T * (L + R))
            kq = b.kv_op("SOFT_MAX", f"kq_soft_max-{il}", causal_softmax, kq, layer=il, flops_per_kv=5 * H * T)
            kqv = b.kv_op("MUL_MAT", f"kqv-{il}",
                          lambda _, pr, kv_all, out=ops.Out(): ops.kqv(pr, kv_all[:n_kv(), :L], out),
                          kq, kv_all, layer=il, buffer=ck, bytes_per_kv=4 * L, flops_per_kv=2 * H * T * L)  # [T, H, L]
        out = b.per_head(v_b, kqv, il, f"wv_b-{il}", part="v" if split_kv else "all")  # [T, H, head_v]
    else:
        if split_kv:
            k_nope = b.per_head(kv_b, kv_c, il, f"k_nope-{il}", part="k")             # [T, H, nope]
            v = b.per_head(v_b, kv_c, il, f"v-{il}", part="v")                         # [T, H, head_v]
        else:
            k_nope = b.per_head(kv_b, kv_c, il, f"k_nope-{il}", transposed=True)
            v = b.per_head(v_b, kv_c, il, f"v-{il}")

        k_all = b.kv_store(ck, il, 4 * T * H * c.n_embd_head_k, k_nope, k_pe)          # [n_ctx, H, head_k]
        v_all = b.kv_store(cv, il, 4 * T * H * c.n_embd_head_v, v)                     # [n_ctx, H, head_v]
        if m.fa:
            def attend(q, k_all, v_all, pool, times, out):                             # [T, H, head_v]
                return ops.flash_attn(q, k_all, v_all, b.n_past, m.rope.kq_scale, None, out, pool, times)
            out = flash_attn(attend, q, k_all, v_all, bytes_per_kv=4 * H * (c.n_embd_head_k + c.n_embd_head_v),
                             width_k=c.n_embd_head_k, width_v=c.n_embd_head_v)
        else:
            kq = b.kv_op("MUL_MAT", f"kq-{il}", lambda _, q, k, out=ops.Out(): ops.kq(q, k[:n_kv()], out=out), q,
                         k_all, layer=il, buffer=ck, bytes_per_kv=4 * H * c.n_embd_head_k,
                         flops_per_kv=2 * H * T * c.n_embd_head_k)
            kq = b.kv_op("SOFT_MAX", f"kq_soft_max-{il}", causal_softmax, kq, layer=il, flops_per_kv=5 * H * T)
            out = b.kv_op("MUL_MAT", f"kqv-{il}", lambda _, pr, v, out=ops.Out(): ops.kqv(pr, v[:n_kv()], out), kq,
                          v_all, layer=il, buffer=cv, bytes_per_kv=4 * H * c.n_embd_head_v,
                          flops_per_kv=2 * H * T * c.n_embd_head_v)                     # [T, H, head_v]
    out = b.op("VIEW", f"kqv_out-{il}", _view(lambda o: o.reshape(T, H * c.n_embd_head_v)), out, layer=il)
    return b.mul_mat(p + "attn_output.weight", out, il)


def feed_forward(b: _Builder, il: int, h: Node, suffix: str = "") -> Node:
    """The SwiGLU MLP: the dense layers' ffn (suffix "") and the shared experts ("_shexp")."""
    p = f"blk.{il}."
    gate = b.mul_mat(f"{p}ffn_gate{suffix}.weight", h, il)
    up = b.mul_mat(f"{p}ffn_up{suffix}.weight", h, il)
    act = b.swiglu(f"ffn_swiglu{suffix}-{il}", gate, up, il, b.weight(f"{p}ffn_up{suffix}.weight").shape[0])
    return b.mul_mat(f"{p}ffn_down{suffix}.weight", act, il)


def select_experts(sel: torch.Tensor, c: ModelConfig, out: ops.Out | None = None) -> torch.Tensor:
    """Top-k experts per token from selection scores [T, E] -> ids [T, U], with DeepSeek-V3's
    group-limited routing where the model has expert groups (see `hybrid.ops.top_k`)."""
    return ops.top_k(sel, c.n_expert_used, c.n_expert_groups, c.n_group_used, out)


def moe(b: _Builder, il: int, h: Node) -> Node:
    """Routed experts plus shared experts of layer il on normed input h [T, n_embd]."""
    c, p = b.c, f"blk.{il}."
    logits = b.mul_mat(p + "ffn_gate_inp.weight", h, il)                                # [T, E]
    if c.expert_gating_func == 2:
        probs = b.native("SIGMOID", f"ffn_moe_probs-{il}", lambda _, x, out: ops.sigmoid(x, out), logits,
                         layer=il)
    else:
        probs = b.native("SOFT_MAX", f"ffn_moe_probs-{il}", lambda _, x, out: ops.softmax(x, out=out), logits,
                         layer=il)
    sel = probs
    bias = p + "exp_probs_b.bias"
    if bias in b.m.weights:
        sel = b.native("ADD", f"ffn_moe_probs_biased-{il}", lambda w, x, out: ops.add(x, w.dequantize(), out),
                       probs, layer=il, buffer=bias, n_bytes=b.weight(bias).n_bytes)
    ids = b.native("TOP_K", f"ffn_moe_topk-{il}", lambda _, s, out: select_experts(s, c, out), sel,
                   dtype=torch.int64, layer=il)                                        # [T, U]

    def expert_weights(_, probs, ids, out):                                            # [T, U]
        return ops.expert_weights(probs, ids, c.expert_weights_norm, c.expert_weights_scale, out)
    weights = b.native("GET_ROWS", f"ffn_moe_weights-{il}", expert_weights, probs, ids, layer=il)
    if b.m.fmoe:
        act = b.mul_mat_id(p + "ffn_gate_up_exps.weight", h, ids, il, fused=True)      # [T, U, n_ff_exp]
    else:
        gate = b.mul_mat_id(p + "ffn_gate_exps.weight", h, ids, il)
        up = b.mul_mat_id(p + "ffn_up_exps.weight", h, ids, il)
        act = b.swiglu(f"ffn_moe_swiglu-{il}", gate, up, il, c.n_expert_used * c.n_ff_exp)
    down = b.mul_mat_id(p + "ffn_down_exps.weight", act, ids, il)                       # [T, U, n_embd]
    weighted = b.native("MUL", f"ffn_moe_weighted-{il}",
                        lambda _, d, w, pool, times, out: ops.scale_rows(d, w, out, pool, times), down, weights,
                        shared=True, layer=il, flops=b.n_tokens * c.n_expert_used * c.n_embd)
    moe_out = b.native("ADD", f"ffn_moe_out-{il}", lambda _, x, out: ops.sum_experts(x, out), weighted,
                       layer=il, flops=b.n_tokens * c.n_expert_used * c.n_embd)
    return b.add(f"ffn_out-{il}", moe_out, feed_forward(b, il, h, "_shexp"), il)


def build_graph(model: "Model", n_tokens: int, n_past: int, all_logits: bool = False,
                keep_output: bool = False) -> Graph:
    """The graph of one evaluation: n_tokens new tokens after n_past cached ones.

    Inputs `inp_tokens` and `inp_pos` (int64 [T]); the output is the logits
    [T, n_vocab] with `all_logits`, else of the last token only [1, n_vocab], in fresh memory
    unless `keep_output`: then in memory the graph reuses at its next evaluation (the engine's
    greedy token reads it at once; ~0.4 MB allocated and faulted in per token otherwise).
    The graph can be evaluated again at another depth: set `graph.n_past` first.
    """
    c = model.config
    b = _Builder(model, n_tokens, n_past)
    tokens, pos = b.input("inp_tokens"), b.input("inp_pos")
    emb = b.weight("token_embd.weight")
    def token_embd(w, t, out):
        return ops.get_rows(w.data, w.ggml_type, w.shape[-1], t, out)                  # [T, n_embd]
    x = b.native("GET_ROWS", "token_embd", token_embd, tokens, buffer="token_embd.weight",
             n_bytes=n_tokens * emb.n_bytes // c.n_vocab)
    for il in range(c.n_layer):
        h = b.rms_norm(f"blk.{il}.attn_norm.weight", x, il, f"attn_norm-{il}")
        x = b.add(f"ffn_inp-{il}", attention(b, il, h, pos), x, il)
        h = b.rms_norm(f"blk.{il}.ffn_norm.weight", x, il, f"ffn_norm-{il}")
        ffn = moe(b, il, h) if c.is_moe_layer(il) else feed_forward(b, il, h)
        x = b.add(f"l_out-{il}", ffn, x, il)
    if not all_logits:
        x = b.op("GET_ROWS", "inp_out_ids", _view(lambda x: x[-1:]), x)
    x = b.rms_norm("output_norm.weight", x, -1, "result_norm")
    b.graph.output = b.mul_mat("output.weight", x, -1, result="reused" if keep_output else "fresh")
    return b.graph


# --- the model -----------------------------------------------------------------

DEFAULT_N_CTX = 4096     # as llama.cpp's default context; the cache is allocated for all of it

class Model:
    """A loaded DeepSeek2 GGUF with its weights, KV cache and options, ready to build graphs.

    `mla`: absorbed attention over the compressed cache (-mla 1); `fa`: the attention's kq,
    softmax and kqv as one FLASH_ATTN_EXT op (-fa 1); `fmoe`: fused
    gate+up expert op (-fmoe 1); `rtr`: 4-bit weights repacked at load into torch's
    int4 pack (-rtr 1); `on_cpu(name)`: whether a weight is read on the CPU, where
    Q4_0/Q8_0 blocks are repacked for the native kernels (`hybrid.cpu_kernels.repack`).
    """

    def __init__(self, gguf, n_ctx: int | None = None, mla: bool = False, fmoe: bool = False,
                 rtr: bool = False, progress: Callable[[str], None] | None = None,
                 on_cpu: Callable[[str], bool] = lambda name: True, fa: bool = False):
        self.gguf, self.config = gguf, gguf.config
        self.mla, self.fmoe, self.rtr, self.fa = mla, fmoe, rtr, fa
        self.n_ctx = min(n_ctx or DEFAULT_N_CTX, self.config.n_ctx_train)
        arch = self.config.arch
        self.rope = rope_setup(self.config, float(gguf.metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0)))
        self._cos_sin = {torch.device("cpu"): rope_cos_sin(torch.arange(self.n_ctx), self.rope)}
        self.weights = ModelWeights(gguf, rtr=rtr, fmoe=fmoe, progress=progress, on_cpu=on_cpu)
        self.cache = KVCache(self.config, self.n_ctx, mla)
        self._inputs: dict[int, tuple] = {}     # per batch size: the input tensors, refilled

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n_ctx, n_rot/2] of every position (`rope_cos_sin`) on `device`: a table
        made once per model, of which each ROPE op reads its tokens' rows. Computed per
        evaluation instead, in torch, it cost more than all the model's ROPE arithmetic."""
        if device not in self._cos_sin:
            self._cos_sin[device] = tuple(t.to(device) for t in self._cos_sin[torch.device("cpu")])
        return self._cos_sin[device]

    def buffer(self, name: str):
        """The buffer a node reads: a KV-cache tensor or a weight."""
        return self.cache.buffers[name] if name.startswith("cache_") else self.weights[name]

    def buffer_names(self) -> list[str]:
        return list(self.weights.buffers) + list(self.cache.buffers)

    def graph(self, n_tokens: int, all_logits: bool = False, keep_output: bool = False) -> Graph:
        """The graph evaluating the next n_tokens after what the cache holds."""
        return build_graph(self, n_tokens, self.cache.n_past, all_logits, keep_output)

    def inputs(self, tokens: list[int]) -> dict[str, torch.Tensor]:
        """The graph's inputs: tokens and their positions, int64 [T]. The tensors of a batch
        size are made once and refilled through NumPy: making them in torch cost ~0.1 ms a
        generated token, with the interpreter and torch cold after the token's weights."""
        n = len(tokens)
        reused = self._inputs.get(n)
        if reused is None:
            if len(self._inputs) >= 8:
                self._inputs.clear()
            made = {"inp_tokens": torch.zeros(n, dtype=torch.long), "inp_pos": torch.zeros(n, dtype=torch.long)}
            reused = self._inputs[n] = made, made["inp_tokens"].numpy(), made["inp_pos"].numpy()
        made, token_ids, pos = reused
        if n == 1:          # a generated token: item assignment, ~10 us less than a slice's cold
            token_ids[0], pos[0] = tokens[0], self.cache.n_past
        else:
            token_ids[:] = tokens
            pos[:] = range(self.cache.n_past, self.cache.n_past + n)
        return made

    def forward(self, tokens: list[int], all_logits: bool = False,
                run: Callable[[Graph, dict, Callable], torch.Tensor] = compute) -> torch.Tensor:
        """Evaluate tokens after the cached ones, advance the cache, return logits.

        `run` executes the graph: the sequential `hybrid.graph.compute` by
        default, or the scheduler's.
        """
        if self.cache.n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"{self.cache.n_past + len(tokens)} tokens exceed the context of {self.n_ctx}")
        graph = self.graph(len(tokens), all_logits)
        logits = run(graph, self.inputs(tokens), self.buffer)
        self.cache.n_past += len(tokens)
        return logits

    def reset(self) -> None:
        self.cache.n_past = 0
