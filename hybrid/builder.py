"""The op vocabulary an architecture's graph builder speaks: `Builder`, one method per op.

An architecture file (hybrid/models/deepseek2.py, ...) says which ops a layer runs on
which weights and values, with the model's maths in trailing shape comments; this module
says how each op is computed and what it costs. So a second architecture is one more
file of calls to these methods, and what the CPU path's speed asks of an op (native kernels
bound once per node and buffer, output memory a node keeps, its native call noted so that
a backend can capture it, `_capture`) lives here, not in the model's maths.

The graph a builder makes is reusable: the number of cached tokens (`n_past`) is read
from the graph when an op runs, not fixed when the graph is built, so one graph serves
every token of a generation (hybrid/engine.py reuses it, as llama.cpp reuses its graphs,
instead of rebuilding ~130 nodes per token). Activations are float32 torch tensors.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType

from hybrid import cpu_kernels, ops
from hybrid.graph import Cost, Forms, Graph, Node
from hybrid.weights import GateUpExperts, mul_mat, native, on_device


def _tensor_label(buffer: str) -> str:
    """blk.3.ffn_up_exps.weight -> blk.3.ffn_up_exps (the op name the profiler shows)."""
    return buffer.removesuffix(".weight")


class Builder:
    """Appends nodes in topological order; each method adds one op (see the module docstring).

    `model` is the loaded model (hybrid/model.py): its `config`, its `weights` (the
    buffers ops read, for their shapes and their kernels) and its rope table (`cos_sin`).
    """

    def __init__(self, model, n_tokens: int, n_past: int):
        self.m, self.c = model, model.config
        self.n_tokens = n_tokens
        self.graph = Graph([], {}, None, n_tokens=n_tokens, n_past=n_past)
        self.nodes, self.inputs = self.graph.nodes, self.graph.inputs

    def input(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.long) -> Node:
        """A graph input (token ids, positions: int64 [T]) in memory the graph owns: the same at
        every evaluation, so a captured program reads it in place."""
        node = Node("INPUT", name, (), None, n_tokens=self.n_tokens)
        self.nodes.append(node)
        self.inputs[name] = node
        self.graph.input_values[name] = torch.zeros(shape or (self.n_tokens,), dtype=dtype)
        return node

    def op(self, op: str, name: str, fn: Callable, *srcs: Node, layer: int = -1, buffer: str | None = None,
           n_bytes: int = 0, flops: int = 0, parallel: Callable | None = None, cost: Cost | None = None) -> Node:
        """A node whose forms are fn(buf, *src_values) and, if given, parallel(buf, *src_values,
        pool, times); its cost is `cost`, or else n_bytes read and flops done at every run."""
        return self.bound_op(op, name, forms(fn, parallel), *srcs, layer=layer, buffer=buffer,
                             cost=cost or Cost(n_bytes, flops))

    def bound_op(self, op: str, name: str, make: Callable, *srcs: Node, layer: int = -1,
                 buffer: str | None = None, cost: Cost = Cost()) -> Node:
        """A node whose forms make(buf) binds to the buffer a backend gives it (`Node.make`)."""
        node = Node(op, name, tuple(srcs), make, buffer, layer, cost, self.n_tokens)
        self.nodes.append(node)
        return node

    def native(self, op: str, name: str, fn: Callable, *srcs: Node, dtype: torch.dtype = ops.F32,
               shared: bool = False, n_past: Callable[[], int] | None = None, layer: int = -1,
               buffer: str | None = None, n_bytes: int = 0, flops: int = 0, cost: Cost | None = None) -> Node:
        """An op that writes into memory the node keeps: fn(buf, *src_values, out), `out` an
        `ops.Out` of `dtype` where its native call is noted, so it can be captured (`_capture`;
        `n_past`: the call's first argument is the depth, read at each run). `shared`:
        fn(buf, *src_values, pool, times, out) is also the op's pool form, its rows shared by
        the CPU threads (for a prompt's batch, see hybrid/backends/cpu.py)."""
        out = ops.Out(dtype)
        capture = _capture(out, n_past)

        def make(buf) -> Forms:
            if shared:
                return Forms(lambda *srcs: fn(buf, *srcs, None, None, out), lambda *args: fn(buf, *args, out), capture)
            return Forms(lambda *srcs: fn(buf, *srcs, out), None, capture)
        return self.bound_op(op, name, make, *srcs, layer=layer, buffer=buffer, cost=cost or Cost(n_bytes, flops))

    def weight(self, name: str):
        return self.m.weights[name]

    def kv_op(self, op: str, name: str, fn: Callable, *srcs: Node, layer: int, buffer: str | None = None,
              bytes_per_kv: int = 0, flops_per_kv: int = 0) -> Node:
        """An attention op over the n_kv = n_past + T cached positions whose output's shape grows
        with n_kv (-fa 0's kq and softmax), so it always runs live; its bytes and flops grow too."""
        return self.op(op, name, fn, *srcs, layer=layer, buffer=buffer,
                       cost=Cost(bytes_per_kv=bytes_per_kv, flops_per_kv=flops_per_kv))

    def kv_store(self, cache: str, layer: int, n_bytes: int, *srcs: Node) -> Node:
        """The CPY of this evaluation's rows (srcs: x, or x and its tail, see `ops.append_kv`)
        into a KV cache; its value is the cache, whose first n_past + T rows its readers take,
        so it is the same memory at every depth and its call runs again with the depth of the moment."""
        graph = self.graph

        def store(cache, *rows_and_out):
            *rows, out = rows_and_out
            return ops.append_kv(cache, graph.n_past, *rows, out=out)
        return self.native("CPY", cache, store, *srcs, n_past=lambda: graph.n_past, layer=layer, buffer=cache,
                           n_bytes=n_bytes)

    def mul_mat(self, wname: str, x: Node, layer: int, result: str | None = None) -> Node:
        """x [T, K] @ W^T -> [T, N]; workers split it by rows of W. The native form writes
        into memory the node keeps (`ops.Out`); the graph's result (`result`) into "fresh"
        memory, which outlives the evaluation, or "reused" memory kept whatever its size."""
        w = self.weight(wname)
        n, k = w.shape[-2], w.shape[-1]
        out = None if result == "fresh" else ops.Out(keep_bytes=None if result == "reused" else ops.KEEP_BYTES)
        capture = None if out is None else _capture(out)

        def make(buf) -> Forms:
            parallel = _mul_mat_form(buf, out)
            return Forms(lambda x: parallel(x, None, None), parallel, capture)
        return self.bound_op("MUL_MAT", _tensor_label(wname), make, x, layer=layer, buffer=wname,
                             cost=Cost(w.n_bytes, 2 * self.n_tokens * n * k))

    def rms_norm(self, wname: str, x: Node, layer: int, name: str, cols: slice = slice(None), heads: int = 1) -> Node:
        """RMS_NORM then MUL by the weight, over the last dimension of x (its columns `cols`): of
        [T, n], or per head of [T, heads, D] with one weight [D] for every head (Qwen3's q/k norm)."""
        eps = self.c.rms_eps

        # out: the node's output memory, reused by each evaluation of the graph (hybrid.ops.Out);
        # norm weights are F32 in llama.cpp's files: their data is the values
        def fn(w, x, out):
            return ops.rms_norm(x, w.data if w.data.dtype is torch.float32 else w.dequantize(), eps, cols, out)
        return self.native("RMS_NORM", name, fn, x, layer=layer, buffer=wname, n_bytes=self.weight(wname).n_bytes,
                           flops=4 * self.n_tokens * heads * self.weight(wname).shape[0])

    def add(self, name: str, a: Node, b: Node, layer: int) -> Node:
        return self.native("ADD", name, lambda _, a, b, pool, times, out: ops.add(a, b, out, pool, times), a, b,
                           shared=True, layer=layer, flops=self.n_tokens * self.c.n_embd)

    def swiglu(self, name: str, gate: Node, up: Node, layer: int, width: int) -> Node:
        return self.native("GLU", name, lambda _, g, u, pool, times, out: ops.swiglu(g, u, out, pool, times), gate,
                           up, shared=True, layer=layer, flops=5 * self.n_tokens * width)

    def view(self, name: str, x: Node, make: Callable, layer: int = -1, op: str = "VIEW") -> Node:
        """A view of x: make(x), a slice or reshape, no copy; captured as the view itself."""
        def make_view(_) -> Forms:
            return Forms(make, None, _same)
        return self.bound_op(op, name, make_view, x, layer=layer)

    def get_rows(self, name: str, wname: str, ids: Node) -> Node:
        """GET_ROWS: the rows ids [T] of a stored weight, dequantised -> [T, n_cols] (token_embd)."""
        w = self.weight(wname)

        def fn(w, ids, out):
            return ops.get_rows(w.data, w.ggml_type, w.shape[-1], ids, out)
        return self.native("GET_ROWS", name, fn, ids, buffer=wname, n_bytes=self.n_tokens * w.n_bytes // w.shape[0])

    def rope(self, name: str, x: Node, pos: Node, layer: int, start: int = 0, keep_from: int = 0,
             flops: int = 0, neox: bool = False) -> Node:
        """ROPE: x [T, ..., n] with its columns from `start` on rotated in pairs by the angles of
        each token's position pos [T] (`ops.rope`): consecutive pairs (ggml's NORM mode), or with
        `neox` the pairs (i, i + half) (NEOX mode); the output keeps x's columns from `keep_from` on."""
        cos_sin = self.m.cos_sin

        def fn(_, x, pos, out):
            return ops.rope(x, cos_sin(pos.device), pos, start, keep_from, out, neox)
        return self.native("ROPE", name, fn, x, pos, layer=layer, flops=flops)

    def kq(self, name: str, q: Node, k: Node, layer: int, cache: str, bytes_per_kv: int, flops_per_kv: int,
           q_pe: Node | None = None) -> Node:
        """MUL_MAT kq (-fa 0): the scores of T queries over the first n_kv rows of the cache
        value k -> [H, T, n_kv] (`ops.kq`; with q_pe, q is the first part of each query)."""
        graph = self.graph

        def fn(_, q, k, *q_pe, out=ops.Out()):
            return ops.kq(q, k[:graph.n_kv], *q_pe, out=out)
        return self.kv_op("MUL_MAT", name, fn, q, k, *([q_pe] if q_pe else []), layer=layer, buffer=cache,
                          bytes_per_kv=bytes_per_kv, flops_per_kv=flops_per_kv)

    def causal_softmax(self, name: str, kq: Node, layer: int, scale: float, flops_per_kv: int) -> Node:
        """SOFT_MAX of kq [H, T, n_kv] times `scale`, each token over the positions up to its own."""
        graph = self.graph

        def fn(_, kq, out=ops.Out()):
            return ops.softmax(kq, scale, graph.n_past, out)
        return self.kv_op("SOFT_MAX", name, fn, kq, layer=layer, flops_per_kv=flops_per_kv)

    def kqv(self, name: str, probs: Node, v: Node, layer: int, cache: str, bytes_per_kv: int,
            flops_per_kv: int) -> Node:
        """MUL_MAT kqv (-fa 0): probs [H, T, n_kv] times the first n_kv rows of the cache value
        v -> [T, H, Dv] (`ops.kqv`)."""
        graph = self.graph

        def fn(_, probs, v, out=ops.Out()):
            return ops.kqv(probs, v[:graph.n_kv], out)
        return self.kv_op("MUL_MAT", name, fn, probs, v, layer=layer, buffer=cache, bytes_per_kv=bytes_per_kv,
                          flops_per_kv=flops_per_kv)

    def flash_attn(self, name: str, q: Node, k: Node, v: Node, layer: int, cache: str, scale: float,
                   bytes_per_kv: int, flops_per_kv: int, q_pe: Node | None = None) -> Node:
        """FLASH_ATTN_EXT (-fa 1): kq, the causal softmax and kqv as one op over the caches' values
        k and v -> [T, H, Dv] (`ops.flash_attn`), its heads shared by the CPU threads; captured
        with the depth read at each run."""
        graph = self.graph

        def attend(_, q, k, v, *rest):                  # rest: [q_pe], pool, times, out
            *q_pe, pool, times, out = rest
            return ops.flash_attn(q, k, v, graph.n_past, scale, q_pe[0] if q_pe else None, out, pool, times)
        return self.native("FLASH_ATTN_EXT", name, attend, q, k, v, *([q_pe] if q_pe else []), shared=True,
                           n_past=lambda: graph.n_past, layer=layer, buffer=cache,
                           cost=Cost(bytes_per_kv=bytes_per_kv, flops_per_kv=flops_per_kv))

    def attention(self, layer: int, q: Node, k: Node, v: Node, scale: float, n_head: int, n_head_kv: int,
                  head_k: int, head_v: int, k_tail: Node | None = None) -> Node:
        """Standard attention of q [T, H, head_k] over the layer's caches (`cache_k_l{il}` and
        `cache_v_l{il}`), after this evaluation's k [T, H_kv, head_k] and v [T, H_kv, head_v] are
        stored in them -> [T, H, head_v]: one FLASH_ATTN_EXT (-fa 1), or kq, the causal softmax
        (times `scale`) and kqv (-fa 0). With GQA (H_kv < H) query head h reads cached head
        h // (H / H_kv), as llama.cpp's attention does; each cached position is read once. `k_tail`
        [T, R]: each k row is k's then this tail, the same for every head (DeepSeek2's k_nope and
        k_pe, stored without concatenating them, `ops.append_kv`)."""
        T, il = self.n_tokens, layer
        ck, cv = f"cache_k_l{il}", f"cache_v_l{il}"
        k_all = self.kv_store(ck, il, 4 * T * n_head_kv * head_k, k, *([k_tail] if k_tail else []))
        # k_all [n_ctx, H_kv, head_k]
        v_all = self.kv_store(cv, il, 4 * T * n_head_kv * head_v, v)                # [n_ctx, H_kv, head_v]
        if self.m.fa:
            return self.flash_attn(f"__fattn__-{il}", q, k_all, v_all, il, ck, scale,
                                   bytes_per_kv=4 * n_head_kv * (head_k + head_v),
                                   flops_per_kv=n_head * T * (2 * head_k + 5 + 2 * head_v))
        kq = self.kq(f"kq-{il}", q, k_all, il, ck, bytes_per_kv=4 * n_head_kv * head_k,
                     flops_per_kv=2 * n_head * T * head_k)                             # [H, T, n_kv]
        kq = self.causal_softmax(f"kq_soft_max-{il}", kq, il, scale, flops_per_kv=5 * n_head * T)
        return self.kqv(f"kqv-{il}", kq, v_all, il, cv, bytes_per_kv=4 * n_head_kv * head_v,
                        flops_per_kv=2 * n_head * T * head_v)

    def routed_experts(self, layer: int, h: Node, ids: Node, weights: Node) -> Node:
        """The routed experts' SwiGLU MLPs of normed input h [T, n_embd] for the chosen ids [T, U],
        each output times its routing weight [T, U] and summed -> [T, n_embd] (llama.cpp's
        build_moe_ffn after the router): the gate and up matmuls as one fused op with -fmoe."""
        c, il, p = self.c, layer, f"blk.{layer}."
        if self.m.fmoe:
            act = self.mul_mat_id(p + "ffn_gate_up_exps.weight", h, ids, il, fused=True)  # [T, U, n_ff_exp]
        else:
            gate = self.mul_mat_id(p + "ffn_gate_exps.weight", h, ids, il)
            up = self.mul_mat_id(p + "ffn_up_exps.weight", h, ids, il)
            act = self.swiglu(f"ffn_moe_swiglu-{il}", gate, up, il, c.n_expert_used * c.n_ff_exp)
        down = self.mul_mat_id(p + "ffn_down_exps.weight", act, ids, il)                 # [T, U, n_embd]
        flops = self.n_tokens * c.n_expert_used * c.n_embd
        weighted = self.scale_rows(f"ffn_moe_weighted-{il}", down, weights, il, flops)  # [T, U, n_embd]
        return self.sum_experts(f"ffn_moe_out-{il}", weighted, il, flops)              # [T, n_embd]

    def layers(self, attention: Callable, ffn: Callable) -> Node:
        """The graph's inputs `inp_tokens` and `inp_pos` (int64 [T]), their embeddings, and every
        layer's two pre-norm residual blocks: x + attention(b, il, attn_norm(x), pos), then x +
        ffn(b, il, ffn_norm(x)) -> the last layer's x [T, n_embd] (the skeleton llama.cpp's
        deepseek2 and qwen3moe graphs share; the model's maths are the two functions)."""
        tokens, pos = self.input("inp_tokens"), self.input("inp_pos")
        x = self.get_rows("token_embd", "token_embd.weight", tokens)                   # [T, n_embd]
        for il in range(self.c.n_layer):
            h = self.rms_norm(f"blk.{il}.attn_norm.weight", x, il, f"attn_norm-{il}")
            x = self.add(f"ffn_inp-{il}", attention(self, il, h, pos), x, il)
            h = self.rms_norm(f"blk.{il}.ffn_norm.weight", x, il, f"ffn_norm-{il}")
            x = self.add(f"l_out-{il}", ffn(self, il, h), x, il)
        return x

    def logits(self, x: Node, head: str, all_logits: bool, keep_output: bool) -> Graph:
        """The graph's output: `output_norm` then the head weight on the last layer's x [T, n_embd]
        -> logits [T, n_vocab] with `all_logits`, else of the last token only [1, n_vocab]; in
        memory the graph reuses with `keep_output` (see `hybrid.models.deepseek2.build_graph`)."""
        if not all_logits:
            x = self.view("inp_out_ids", x, lambda x: x[-1:], op="GET_ROWS")             # [1, n_embd]
        x = self.rms_norm("output_norm.weight", x, -1, "result_norm")
        self.graph.output = self.mul_mat(head, x, -1, result="reused" if keep_output else "fresh")
        return self.graph

    def sigmoid(self, name: str, x: Node, layer: int) -> Node:
        return self.native("SIGMOID", name, lambda _, x, out: ops.sigmoid(x, out), x, layer=layer)

    def softmax(self, name: str, x: Node, layer: int) -> Node:
        """SOFT_MAX over the last dimension (the router's probabilities)."""
        return self.native("SOFT_MAX", name, lambda _, x, out: ops.softmax(x, out=out), x, layer=layer)

    def add_weight(self, name: str, x: Node, wname: str, layer: int) -> Node:
        """ADD of a stored vector to every row of x (the router's selection bias)."""
        return self.native("ADD", name, lambda w, x, out: ops.add(x, w.dequantize(), out), x, layer=layer,
                           buffer=wname, n_bytes=self.weight(wname).n_bytes)

    def top_k(self, name: str, sel: Node, layer: int, k: int, n_groups: int = 0, n_groups_used: int = 0) -> Node:
        """TOP_K: the k best columns of each row of sel [T, E] -> int64 [T, k], group-limited where
        n_groups > 1 (`ops.top_k`); the graph's `routes` (the experts a layer chose, recorded
        after each evaluation) are these nodes."""
        def fn(_, sel, out):
            return ops.top_k(sel, k, n_groups, n_groups_used, out)
        node = self.native("TOP_K", name, fn, sel, dtype=torch.int64, layer=layer)
        self.graph.routes.append(node)
        return node

    def expert_weights(self, name: str, probs: Node, ids: Node, layer: int, norm: bool, scale: float) -> Node:
        """GET_ROWS of the routing weights probs [T, E] at the chosen ids [T, U], normalised to sum
        1 if `norm`, times `scale` unless it is 0 -> [T, U]."""
        def fn(_, probs, ids, out):
            return ops.expert_weights(probs, ids, norm, scale, out)
        return self.native("GET_ROWS", name, fn, probs, ids, layer=layer)

    def scale_rows(self, name: str, x: Node, w: Node, layer: int, flops: int) -> Node:
        """MUL of each row of x [..., n] by its weight w [...] (each expert's output by its routing weight)."""
        return self.native("MUL", name, lambda _, x, w, pool, times, out: ops.scale_rows(x, w, out, pool, times), x,
                           w, shared=True, layer=layer, flops=flops)

    def sum_experts(self, name: str, x: Node, layer: int, flops: int) -> Node:
        """ADD of x [T, U, n] over its U experts -> [T, n]."""
        return self.native("ADD", name, lambda _, x, out: ops.sum_experts(x, out), x, layer=layer, flops=flops)

    def per_head(self, wname: str, x: Node, layer: int, name: str, n_head: int, rows: slice = slice(None),
                 transposed: bool = False) -> Node:
        """A batched per-head matmul with a 3-D attention weight (ggml MUL_MAT on 3-D tensors).

        W is [H, N, K] (or its 2-D form [H * N, K]) and out[t, h] = W[h] @ x[t, h] (x [T, K]
        is shared by all heads); `rows` takes rows of each head's N (DeepSeek2's single
        attn_kv_b holds each head's k rows, then its v rows); `transposed` uses W[h]^T.
        An x shared by all heads times W's rows (not transposed) is a plain matmul on the
        stored rows, so it takes the native kernels like `mul_mat` (input rounded to 8
        bits); the rest multiplies by an exact f32 copy of W (`_head_weights`).
        """
        w = self.weight(wname)
        per_head = w.shape[-2] if len(w.shape) == 3 else w.shape[0] // n_head
        r0, r1, _ = rows.indices(per_head)

        def prepare(w) -> torch.Tensor:
            full = w.dequantize().reshape(n_head, per_head, -1)[:, r0:r1]
            return (full.transpose(1, 2) if transposed else full).contiguous()      # [H, N, K]

        def heads(wh, x, h0: int, h1: int) -> torch.Tensor:                             # [T, h1-h0, N]
            wh = wh[h0:h1]
            if x.dim() == 2:                                    # one x for all heads: a single GEMM
                return (x @ wh.reshape(-1, wh.shape[-1]).T).reshape(x.shape[0], *wh.shape[:2])
            return torch.einsum("hnk,thk->thn", wh, x[:, h0:h1])

        def make(buf) -> Forms:
            bound, out = _native_heads_form(buf, n_head, (r0, r1)) if native(buf) and not transposed else (None, None)

            def parallel(x, pool, times):     # workers split the heads (native: each head's rows)
                if bound is not None and x.dim() == 2:
                    return bound(x, pool, times)
                wh = _head_weights(buf, (r0, r1, transposed), prepare)
                dst = x.new_empty(x.shape[0], *wh.shape[:2])

                def task(h0: int, h1: int) -> None:
                    dst[:, h0:h1] = heads(wh, x, h0, h1)
                bounds = cpu_kernels.row_splits(n_head, cpu_kernels.n_tasks(pool))
                cpu_kernels.run_tasks(cpu_kernels.range_tasks(bounds, task), pool, times)
                return dst
            return Forms(lambda x: parallel(x, None, None), parallel, None if out is None else _capture(out))
        share = (r1 - r0) / per_head
        # bytes: the share of the weight the op reads, as stored (what a GPU engine reads; the
        # f32 form that hyprof's torch path keeps, see _head_weights, is its own affair)
        return self.bound_op("MUL_MAT", name, make, x, layer=layer, buffer=wname,
                             cost=Cost(int(w.n_bytes * share), 2 * self.n_tokens * int(math.prod(w.shape) * share)))

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

        def make(buf) -> Forms:
            if on_device(buf):
                return Forms(lambda x, ids: _experts_on_device(buf, x, ids, fused))
            bound, out = _expert_kernel(buf, fused), ops.Out()

            def parallel(x, ids, pool, times):
                if bound is not None:
                    return bound(x, ids, pool, times, out)
                experts = torch.unique(ids).tolist()
                dst = x.new_zeros(ids.shape[0], ids.shape[1], n)
                k = cpu_kernels.n_tasks(pool)
                groups = [experts[i::k] for i in range(k)]
                cpu_kernels.run_tasks([lambda g=g: [expert_fn(buf, x, ids, e, dst) for e in g] for g in groups if g],
                                      pool, times)
                return dst, len(experts)
            return Forms(lambda x, ids: parallel(x, ids, None, None), parallel,
                         None if bound is None else _capture(out, counts=True))
        return self.bound_op("MOE_FUSED_UP_GATE" if fused else "MUL_MAT_ID", _tensor_label(wname), make, x, ids,
                             layer=layer, buffer=wname, cost=cost)


def _capture(out: ops.Out, n_past: Callable[[], int] | None = None, counts: bool = False) -> Callable:
    """`Forms.capture` for an op whose native call `out` notes (`hybrid.ops.Out.call`): the call
    bound to the memory of the run that noted it. With `n_past`, the call's first argument is
    the depth, read at each run (the cache's CPY, FLASH_ATTN_EXT); with `counts`, the call
    returns the experts it computed (MUL_MAT_ID) and the op (value, experts)."""
    def capture(value):
        call = out.call                 # (fn, args, the tensors args point into: kept alive here)
        if call is None:
            return None
        fn, args, _ = call
        if counts:
            return lambda *_, call=call: (value, fn(*args))
        if n_past is None:
            def run(*_, call=call):
                fn(*args)
                return value
            return run
        rest = args[1:]

        def run_at_depth(*_, call=call):
            fn(n_past(), *rest)
            return value
        return run_at_depth
    return capture


def _same(value) -> Callable:
    """`Forms.capture` of a view: the view itself (its source's memory is fixed)."""
    return lambda *_: value


def forms(fn: Callable, parallel: Callable | None = None) -> Callable[[object], Forms]:
    """make(buf) for an op written as fn(buf, *src_values) (and parallel(buf, *src_values,
    pool, times)): both with the buffer bound."""
    if parallel is None:
        return lambda buf: Forms(functools.partial(fn, buf))
    return lambda buf: Forms(functools.partial(fn, buf), functools.partial(parallel, buf))


# Per-head attention weights where the native kernels cannot serve (k_b read transposed,
# -mla 1's per-head inputs, CUDA, HYPROF_KERNELS=torch): dequantised once per buffer (a
# backend's own copy is its own key) in the [H, N, K] layout the op multiplies by, up to
# 8 MiB f32 per layer at DeepSeek-V2-Lite shapes; dequantising per token cost more than the
# rest of attention. Entries go with their buffer.
_HEAD_WEIGHTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _native_heads_form(w, n_head: int, rows: tuple[int, int]) -> tuple[Callable, ops.Out]:
    """A per-head matmul whose input x [T, K] is shared by all heads, on the native kernel:
    MUL_MAT_ID with head h as expert h, rows `rows` of each head's rows -> [T, H, N]
    (on the repacked blocks where heads and rows are whole blocks of 16 rows).
    -> (run(x, pool, times), the `ops.Out` its call is noted in)."""
    per_head = w.shape[-2] if len(w.shape) == 3 else w.shape[0] // n_head
    r0, r1 = rows
    blocks, kind = w.kernel_blocks
    if per_head % 16 or r0 % 16 or r1 % 16:            # repacked blocks are read 16 rows at a time
        blocks, kind = w.data, w.ggml_type
    kernel = cpu_kernels.bind_mul_mat_id(blocks.reshape(n_head, per_head, -1), kind, rows=(r0, r1))
    out = ops.Out()

    def run(x, pool, times):
        dst, _ = kernel(x, _head_ids(x.shape[0], n_head), pool, times, out)      # into out [T, H, per_head]
        return dst[:, :, r0:r1]
    return run, out


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
    """MUL_MAT's pool form parallel(x, pool, times) on weight w (into `out`'s memory, if one),
    bound to w's native kernel once where it has one. A float32 weight (in llama.cpp's files
    the MoE router's, 0.5 MiB) shares its rows natively too: alone, one thread read it in
    ~50 us after a token's expert weights had gone through the caches."""
    if w.ggml_type == GGMLQuantizationType.F32:
        return functools.partial(_mul_mat_f32, w, out=out)
    if not native(w):
        return functools.partial(_mul_mat_parallel, w, out=out)
    run = cpu_kernels.bind_matmul(*w.kernel_blocks)
    return lambda x, pool, times: run(x, pool, times, out)


def _mul_mat_f32(w, x: torch.Tensor, pool, times, out: ops.Out) -> torch.Tensor:
    """MUL_MAT's form for a float32 weight (the MoE router's): its rows shared by the pool."""
    return ops.matmul_f32(x, w.data, out, pool, times)


def _mul_mat_parallel(w, x: torch.Tensor, pool, times, out: ops.Out | None = None) -> torch.Tensor:
    """MUL_MAT's pool form on a weight without a native kernel: row ranges in torch, as tasks."""
    dst = x.new_empty(x.shape[0], w.shape[-2])

    def task(r0: int, r1: int) -> None:
        dst[:, r0:r1] = mul_mat(w.rows(r0, r1), x)
    cpu_kernels.run_tasks(cpu_kernels.range_tasks(w.row_splits(cpu_kernels.n_tasks(pool)), task), pool, times)
    return dst


def _experts_on_device(w, x: torch.Tensor, ids: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MUL_MAT_ID on a GPU's dense expert weights (`weights.for_gpu`), the experts selected on
    the device: nothing is read back to the host inside the split (a `.tolist()` or `.nonzero()`
    would wait for the GPU in every MoE layer). -> ([T, U, N], the distinct experts used, a
    device scalar that the backend reads with the op's times, after its sync).

    With few slots (T * U <= E: generation) each slot's expert matrix is gathered and applied
    (one batched GEMV, reading the used experts); with more (a prompt), every expert runs over
    all slots and each slot keeps its own expert's rows (E GEMMs, E / U times the flops of the
    selected ones, but no data-dependent shapes)."""
    n_tok, n_used = ids.shape
    n_expert = (w.gate if fused else w).shape[0]
    xs = x if x.dim() == 3 else x[:, None, :].expand(n_tok, n_used, x.shape[-1])        # [T, U, K]

    def apply(data: torch.Tensor) -> torch.Tensor:                                      # [E, N, K] -> [T, U, N]
        if n_tok * n_used <= n_expert:
            rows = torch.bmm(data[ids.reshape(-1)], xs.reshape(n_tok * n_used, -1, 1))
            return rows.reshape(n_tok, n_used, -1)
        y = xs.new_zeros(n_tok, n_used, data.shape[1])
        for e in range(n_expert):
            y += (ids == e)[..., None] * (xs @ data[e].T)
        return y
    dst = F.silu(apply(w.gate.data)) * apply(w.up.data) if fused else apply(w.data)
    used = torch.zeros(n_expert, dtype=torch.bool, device=ids.device).index_fill_(0, ids.reshape(-1), True)
    return dst, used.sum()


def _expert_rows(x: torch.Tensor, ids: torch.Tensor, e: int):
    t, u = (ids == e).nonzero(as_tuple=True)
    return t, u, (x[t] if x.dim() == 2 else x[t, u])


def _expert(w, x: torch.Tensor, ids: torch.Tensor, e: int, dst: torch.Tensor) -> None:
    t, u, xs = _expert_rows(x, ids, e)
    dst[t, u] = mul_mat(w.expert(e), xs)


def _fused_expert(w: GateUpExperts, x: torch.Tensor, ids: torch.Tensor, e: int, dst: torch.Tensor) -> None:
    t, u, xs = _expert_rows(x, ids, e)
    dst[t, u] = F.silu(mul_mat(w.gate.expert(e), xs)) * mul_mat(w.up.expert(e), xs)
