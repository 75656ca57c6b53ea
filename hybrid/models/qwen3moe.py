"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): the graph of one evaluation.

The model's maths as calls to the op vocabulary of `hybrid.builder.Builder`, as
hybrid/models/deepseek2.py (T tokens, H query heads, H_kv cached heads, D head_dim, E
experts, U experts used per token). The op sequence follows llama.cpp's qwen3moe graph
(src/models/qwen3moe.cpp, build_moe_ffn in src/llama-graph.cpp): q, k and v projections,
each q and k head RMS-normed over D and then rotated whole by NEOX RoPE (pairs (i, i + D/2)),
grouped-query attention over a cache of H_kv heads, then in every layer the experts alone
(no dense layers, no shared experts): a softmax router whose top-k weights are renormalised
to sum 1. tests/reference_qwen3moe.py checks it against an independent float64 NumPy pass.
"""

from __future__ import annotations

import math

import torch

from hybrid.builder import Builder
from hybrid.config import ModelConfig
from hybrid.graph import Graph, Node
from hybrid.rope import Rope
from profiler.errors import UserError


def rope_setup(c: ModelConfig, metadata: dict) -> Rope:
    """Plain RoPE over the whole head (n_rot = D), softmax scale 1/sqrt(D), as llama.cpp runs a
    file without rope scaling keys; the long-context (YaRN) variants are not supported yet."""
    if c.rope_scaling_type != "none":
        raise UserError(f"qwen3moe with rope scaling {c.rope_scaling_type!r} is not supported")
    pairs = torch.arange(c.n_rot // 2, dtype=torch.float64)
    return Rope((c.rope_freq_base ** (-2.0 * pairs / c.n_rot)).float(), 1.0, 1.0 / math.sqrt(c.n_embd_head_k))


def cache_layout(c: ModelConfig, mla: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each layer's K and V cache [H_kv, D] per position (GQA: the kv heads only), derived from
    its attn_k, so the cache sits where that layer's attention runs. `mla` does not apply."""
    layout = {}
    for il in range(c.n_layer):
        parent = f"blk.{il}.attn_k.weight"
        layout[f"cache_k_l{il}"] = (c.n_head_kv, c.n_embd_head_k), parent
        layout[f"cache_v_l{il}"] = (c.n_head_kv, c.n_embd_head_v), parent
    return layout


def attention(b: Builder, il: int, h: Node, pos: Node) -> Node:
    """Self-attention of layer il on normed input h [T, n_embd] -> [T, n_embd]."""
    c, p, T = b.c, f"blk.{il}.", b.n_tokens
    H, H_kv, D = c.n_head, c.n_head_kv, c.n_embd_head_k
    q = b.mul_mat(p + "attn_q.weight", h, il)                                          # [T, H * D]
    k = b.mul_mat(p + "attn_k.weight", h, il)                                          # [T, H_kv * D]
    v = b.mul_mat(p + "attn_v.weight", h, il)                                          # [T, H_kv * D]
    q = b.view(f"Qcur-{il}", q, lambda q: q.reshape(T, H, D), il)                      # [T, H, D]
    k = b.view(f"Kcur-{il}", k, lambda k: k.reshape(T, H_kv, D), il)                   # [T, H_kv, D]
    v = b.view(f"Vcur-{il}", v, lambda v: v.reshape(T, H_kv, D), il)                   # [T, H_kv, D]
    q = b.rms_norm(p + "attn_q_norm.weight", q, il, f"Qcur_normed-{il}", heads=H)      # [T, H, D]
    q = b.rope(f"Qcur_rope-{il}", q, pos, il, neox=True, flops=6 * T * H * D)
    k = b.rms_norm(p + "attn_k_norm.weight", k, il, f"Kcur_normed-{il}", heads=H_kv)   # [T, H_kv, D]
    k = b.rope(f"Kcur_rope-{il}", k, pos, il, neox=True, flops=6 * T * H_kv * D)
    out = b.attention(il, q, k, v, b.m.rope.kq_scale, H, H_kv, D, c.n_embd_head_v)     # [T, H, D]
    out = b.view(f"kqv_out-{il}", out, lambda o: o.reshape(T, H * c.n_embd_head_v), il)
    return b.mul_mat(p + "attn_output.weight", out, il)                                # [T, n_embd]


def moe(b: Builder, il: int, h: Node) -> Node:
    """The routed experts of layer il on normed input h [T, n_embd]: softmax router, top-k,
    the chosen probabilities renormalised to sum 1."""
    c = b.c
    logits = b.mul_mat(f"blk.{il}.ffn_gate_inp.weight", h, il)                         # [T, E]
    probs = b.softmax(f"ffn_moe_probs-{il}", logits, il)                               # [T, E]
    ids = b.top_k(f"ffn_moe_topk-{il}", probs, il, c.n_expert_used)                    # [T, U]
    weights = b.expert_weights(f"ffn_moe_weights-{il}", probs, ids, il, norm=True, scale=1.0)  # [T, U]
    return b.routed_experts(il, h, ids, weights)                                       # [T, n_embd]


def build_graph(model, n_tokens: int, n_past: int, all_logits: bool = False, keep_output: bool = False) -> Graph:
    """The graph of one evaluation, with deepseek2.build_graph's inputs, output and reuse. The
    head is `output`, or the tied `token_embd` in files without one (as llama.cpp loads them)."""
    b = Builder(model, n_tokens, n_past)
    x = b.layers(attention, moe)                                                        # [T, n_embd]
    head = "output.weight" if "output.weight" in model.weights else "token_embd.weight"
    return b.logits(x, head, all_logits, keep_output)
