"""DeepSeek2 (DeepSeek-V2/V3/R1, Kimi K2, DeepSeek-V2-Lite): the graph of one evaluation.

The model's maths, one readable file in the manner of gpt-fast's model.py, written as
calls to the op vocabulary of `hybrid.builder.Builder`: which op reads which weight and
which values, with shapes in trailing comments (T tokens, H heads, E experts, U experts
used per token, L kv_lora_rank, R n_rot). How an op is computed (native kernels, the
CPU's thread pool, torch) is the builder's and the backends' business, not this file's.

The op sequence follows llama.cpp's deepseek2 graph (src/models/deepseek2.cpp,
build_moe_ffn in src/llama-graph.cpp): q or q-LoRA, the compressed KV projection with
its norm, RoPE on the rope part (consecutive pairs, YaRN as llama.cpp sets it up), then
either standard attention over decompressed per-head K/V (`mla=False`), or absorbed MLA
(`mla=True`) over a cache of the compressed kv_lora + rope vector per token; the router
(softmax or sigmoid, selection bias, group-limited top-k, weight norm and scale), the
routed and shared experts, residuals, output norm and head. tests/reference_deepseek2.py
checks it against an independent float64 NumPy pass.

An architecture module gives `rope_setup`, `cache_layout` and `build_graph`.
"""

from __future__ import annotations

import math

import torch

from hybrid.builder import Builder
from hybrid.config import ModelConfig
from hybrid.graph import Graph, Node
from hybrid.rope import Rope


def rope_setup(c: ModelConfig, metadata: dict) -> Rope:
    """RoPE angles and scales exactly as llama.cpp computes them for deepseek2.

    llama-context.cpp sets attn_factor = get_mscale(f, m)/get_mscale(f, log_mul)
    (m = log_mul unless it is 1), then cancels ggml's own YaRN factor
    (1 + 0.1 ln f); ggml_rope multiplies it back, so the rotated parts carry the
    ratio alone. deepseek2.cpp undoes the cancel and scales the softmax by
    mscale^2 with mscale = that * (1 + 0.1 log_mul ln f). The file stores
    log_mul as 0.1 * mscale_all_dim, which llama.cpp divides by 0.1.
    """
    attn_factor = float(metadata.get(f"{c.arch}.rope.scaling.attn_factor", 1.0))
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


def cache_layout(c: ModelConfig, mla: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each layer's KV cache buffers, named `cache_k_l{il}` / `cache_v_l{il}` like llama.cpp's:
    name -> (the shape of one cached position, the tensor it derives from: the layer's
    compressed KV projection, so the cache sits where that layer's attention runs).

    Standard attention caches decompressed per-head K [H, head_k] and V [H, head_v] per
    position; MLA caches only the compressed kv_lora + rope vector [L + R] in `cache_k_l{il}`
    (V is its first L columns), which is MLA's point: 576 floats a token instead of H * 320.
    """
    layout = {}
    for il in range(c.n_layer):
        parent = f"blk.{il}.attn_kv_a_mqa.weight"
        if mla:
            layout[f"cache_k_l{il}"] = (c.kv_lora_rank + c.n_rot,), parent
        else:
            layout[f"cache_k_l{il}"] = (c.n_head, c.n_embd_head_k), parent
            layout[f"cache_v_l{il}"] = (c.n_head, c.n_embd_head_v), parent
    return layout


def attention(b: Builder, il: int, h: Node, pos: Node) -> Node:
    """Self-attention of layer il on normed input h [T, n_embd] -> [T, n_embd]."""
    c, m, p = b.c, b.m, f"blk.{il}."
    H, L, R, nope, head_k, head_v = (c.n_head, c.kv_lora_rank, c.n_rot, c.n_embd_head_qk_nope, c.n_embd_head_k,
                                     c.n_embd_head_v)
    T, scale = b.n_tokens, m.rope.kq_scale
    if c.q_lora_rank:
        q = b.mul_mat(p + "attn_q_a.weight", h, il)                                    # [T, q_lora]
        q = b.rms_norm(p + "attn_q_a_norm.weight", q, il, f"q_a_norm-{il}")
        q = b.mul_mat(p + "attn_q_b.weight", q, il)                                    # [T, H*head_k]
    else:
        q = b.mul_mat(p + "attn_q.weight", h, il)
    q = b.view(f"q-{il}", q, lambda q: q.reshape(T, H, head_k), il)                   # [T, H, head_k]
    q = b.rope(f"q_pe-{il}", q, pos, il, start=nope, flops=6 * T * H * R)              # [T, H, head_k]
    kv = b.mul_mat(p + "attn_kv_a_mqa.weight", h, il)                                  # [T, L + R]
    kv_c = b.rms_norm(p + "attn_kv_a_norm.weight", kv, il, f"kv_cmpr-{il}", cols=slice(0, L))   # [T, L]
    k_pe = b.rope(f"k_pe-{il}", kv, pos, il, start=L, keep_from=L, flops=6 * T * R)   # [T, R]
    # the k and v up-projections: one attn_kv_b [H * (nope + head_v), L], or attn_k_b / attn_v_b
    split_kv = c.kv_layout == "kv_b"
    k_b, k_rows = (p + "attn_kv_b.weight", slice(0, nope)) if split_kv else (p + "attn_k_b.weight", slice(None))
    v_b, v_rows = (p + "attn_kv_b.weight", slice(nope, nope + head_v)) if split_kv else (p + "attn_v_b.weight",
                                                                                      slice(None))

    if m.mla:
        ck = f"cache_k_l{il}"
        q_nope = b.view(f"q_nope-{il}", q, lambda q: q[..., :nope], il)                 # [T, H, nope]
        q_pe = b.view(f"q_rope-{il}", q, lambda q: q[..., nope:], il)                   # [T, H, R]
        # q_nope absorbed into the latent space: k_b [H, L, nope] (or kv_b's k rows, transposed)
        q_abs = b.per_head(k_b, q_nope, il, f"q_nope_absorbed-{il}", H, k_rows, transposed=split_kv)  # [T, H, L]
        kv_all = b.kv_store(ck, il, 4 * T * (L + R), kv_c, k_pe)                        # [n_ctx, L + R]
        v_all = b.view(f"v_cmpr-{il}", kv_all, lambda kv: kv[:, :L], il)                # [n_ctx, L]
        if m.fa:
            kqv = b.flash_attn(f"__fattn__-{il}", q_abs, kv_all, v_all, il, ck, scale, bytes_per_kv=4 * (L + R),
                               flops_per_kv=H * T * (2 * (L + R) + 5 + 2 * L), q_pe=q_pe)          # [T, H, L]
        else:
            kq = b.kq(f"kq-{il}", q_abs, kv_all, il, ck, bytes_per_kv=4 * (L + R),
                      flops_per_kv=2 * H * T * (L + R), q_pe=q_pe)                     # [H, T, n_kv]
            kq = b.causal_softmax(f"kq_soft_max-{il}", kq, il, scale, flops_per_kv=5 * H * T)
            kqv = b.kqv(f"kqv-{il}", kq, v_all, il, ck, bytes_per_kv=4 * L, flops_per_kv=2 * H * T * L)  # [T, H, L]
        out = b.per_head(v_b, kqv, il, f"wv_b-{il}", H, v_rows)                         # [T, H, head_v]
    else:
        k_nope = b.per_head(k_b, kv_c, il, f"k_nope-{il}", H, k_rows, transposed=not split_kv)  # [T, H, nope]
        v = b.per_head(v_b, kv_c, il, f"v-{il}", H, v_rows)                             # [T, H, head_v]
        out = b.attention(il, q, k_nope, v, scale, H, H, head_k, head_v, k_tail=k_pe)   # [T, H, head_v]
    out = b.view(f"kqv_out-{il}", out, lambda o: o.reshape(T, H * head_v), il)          # [T, H * head_v]
    return b.mul_mat(p + "attn_output.weight", out, il)


def feed_forward(b: Builder, il: int, h: Node, suffix: str = "") -> Node:
    """The SwiGLU MLP: the dense layers' ffn (suffix "") and the shared experts ("_shexp")."""
    p = f"blk.{il}."
    gate = b.mul_mat(f"{p}ffn_gate{suffix}.weight", h, il)
    up = b.mul_mat(f"{p}ffn_up{suffix}.weight", h, il)
    act = b.swiglu(f"ffn_swiglu{suffix}-{il}", gate, up, il, b.weight(f"{p}ffn_up{suffix}.weight").shape[0])
    return b.mul_mat(f"{p}ffn_down{suffix}.weight", act, il)


def moe(b: Builder, il: int, h: Node) -> Node:
    """Routed experts plus shared experts of layer il on normed input h [T, n_embd]."""
    c, p = b.c, f"blk.{il}."
    logits = b.mul_mat(p + "ffn_gate_inp.weight", h, il)                                # [T, E]
    if c.expert_gating_func == 2:
        probs = b.sigmoid(f"ffn_moe_probs-{il}", logits, il)                            # [T, E]
    else:
        probs = b.softmax(f"ffn_moe_probs-{il}", logits, il)
    sel = probs
    if p + "exp_probs_b.bias" in b.m.weights:                                           # selection bias (V3)
        sel = b.add_weight(f"ffn_moe_probs_biased-{il}", probs, p + "exp_probs_b.bias", il)
    # top-k experts, group-limited where the model has expert groups (DeepSeek-V3)
    ids = b.top_k(f"ffn_moe_topk-{il}", sel, il, c.n_expert_used, c.n_expert_groups, c.n_group_used)  # [T, U]
    weights = b.expert_weights(f"ffn_moe_weights-{il}", probs, ids, il, c.expert_weights_norm,
                               c.expert_weights_scale)                                  # [T, U]
    moe_out = b.routed_experts(il, h, ids, weights)                                     # [T, n_embd]
    return b.add(f"ffn_out-{il}", moe_out, feed_forward(b, il, h, "_shexp"), il)


def build_graph(model, n_tokens: int, n_past: int, all_logits: bool = False, keep_output: bool = False) -> Graph:
    """The graph of one evaluation: n_tokens new tokens after n_past cached ones.

    Inputs `inp_tokens` and `inp_pos` (int64 [T]); the output is the logits
    [T, n_vocab] with `all_logits`, else of the last token only [1, n_vocab], in fresh memory
    unless `keep_output`: then in memory the graph reuses at its next evaluation (the engine's
    greedy token reads it at once; ~0.4 MB allocated and faulted in per token otherwise).
    The graph can be evaluated again at another depth: set `graph.n_past` first.
    """
    c = model.config
    b = Builder(model, n_tokens, n_past)

    def ffn(b: Builder, il: int, h: Node) -> Node:
        return moe(b, il, h) if c.is_moe_layer(il) else feed_forward(b, il, h)
    x = b.layers(attention, ffn)                                                        # [T, n_embd]
    return b.logits(x, "output.weight", all_logits, keep_output)
