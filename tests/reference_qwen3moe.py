"""An independent float64 NumPy forward pass of Qwen3-MoE, the engine's yardstick for qwen3moe.

Like tests/reference_deepseek2.py, whose GGUF reading, dequantisation, matmul (with its
optional 8-bit activation rounding), RMS norm and token loop it reuses, it shares no code
with `hybrid/`. What is Qwen3's is written out plainly from llama.cpp's qwen3moe graph
(src/models/qwen3moe.cpp, build_moe_ffn in src/llama-graph.cpp) and ggml's NEOX rope,
read as a specification: per-head q/k RMS norms over head_dim before NEOX RoPE (pairs
(i, i + D/2) of the whole head), grouped-query attention with head h reading kv head
h // (H / H_kv), softmax routing with the top-k weights renormalised to sum 1, no dense
layers or shared experts, and the head tied to token_embd when `output` is absent.
"""

from __future__ import annotations

import math

import numpy as np

from reference_deepseek2 import Deepseek2Reference


class Qwen3MoeReference(Deepseek2Reference):
    """Float64 weights and a per-layer K/V cache of the kv heads; `forward(tokens)` -> logits."""

    def __init__(self, path, round_activations: bool = False):
        super().__init__(path, round_activations)
        self.cache_k = [np.zeros((self.n_head_kv, 0, self.d_k)) for _ in range(self.n_layer)]
        self.cache_v = [np.zeros((self.n_head_kv, 0, self.d_v)) for _ in range(self.n_layer)]

    def _key(self, name, default=None):
        return self.meta.get(f"qwen3moe.{name}", default)

    def _read_hparams(self):
        k = self._key
        self.n_layer = int(k("block_count"))
        self.n_embd = int(k("embedding_length"))
        self.n_head = int(k("attention.head_count"))
        self.n_head_kv = int(k("attention.head_count_kv", self.n_head))
        self.eps = float(k("attention.layer_norm_rms_epsilon"))
        self.d_k = int(k("attention.key_length", self.n_embd // self.n_head))
        self.d_v = int(k("attention.value_length", self.d_k))
        self.n_rot = int(k("rope.dimension_count", self.d_k))
        self.n_dense, self.n_expert, self.n_used = 0, int(k("expert_count")), int(k("expert_used_count"))
        base = float(k("rope.freq_base", 10000.0))
        self.freq = base ** (-2.0 * np.arange(self.n_rot // 2) / self.n_rot)
        self.kq_scale = 1.0 / math.sqrt(self.d_k)

    def rope(self, x, pos):
        """x [..., D] at position pos, NEOX mode: pair i is (x[i], x[i + D/2])."""
        ang = pos * self.freq
        c, s = np.cos(ang), np.sin(ang)
        half = self.n_rot // 2
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def attention(self, x, il, pos):
        p = f"blk.{il}."
        q = self.mm(p + "attn_q.weight", x).reshape(self.n_head, self.d_k)
        k = self.mm(p + "attn_k.weight", x).reshape(self.n_head_kv, self.d_k)
        v = self.mm(p + "attn_v.weight", x).reshape(self.n_head_kv, self.d_v)
        q = self.rope(self.norm(q, p + "attn_q_norm.weight"), pos)      # each head normed over its D
        k = self.rope(self.norm(k, p + "attn_k_norm.weight"), pos)
        self.cache_k[il] = np.concatenate([self.cache_k[il], k[:, None, :]], axis=1)
        self.cache_v[il] = np.concatenate([self.cache_v[il], v[:, None, :]], axis=1)
        group = self.n_head // self.n_head_kv
        out = np.empty((self.n_head, self.d_v))
        for h in range(self.n_head):
            s = self.cache_k[il][h // group] @ q[h] * self.kq_scale      # keys 0..pos: causal by construction
            s = np.exp(s - s.max())
            out[h] = (s / s.sum()) @ self.cache_v[il][h // group]
        return self.mm(p + "attn_output.weight", out.reshape(-1))

    def moe(self, x, il):
        p = f"blk.{il}."
        logits = self.mm(p + "ffn_gate_inp.weight", x)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ids = np.argsort(-probs, kind="stable")[:self.n_used]
        weights = probs[ids] / probs[ids].sum()
        out = np.zeros(self.n_embd)
        for e, wt in zip(ids, weights):
            g = self.mm(p + "ffn_gate_exps.weight", x, e)
            u = self.mm(p + "ffn_up_exps.weight", x, e)
            out += wt * self.mm(p + "ffn_down_exps.weight", g / (1 + np.exp(-g)) * u, e)
        return out
