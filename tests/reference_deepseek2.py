"""An independent float64 NumPy forward pass of DeepSeek2, the engine's yardstick.

It shares no code with `hybrid/`: it reads the GGUF with gguf-py's GGUFReader,
dequantises every tensor with `gguf.quants.dequantize`, and writes attention,
RoPE/YaRN and routing out in the plainest form (loops over heads and tokens,
the decompressed "standard" attention only). It follows llama.cpp's deepseek2
graph (src/models/deepseek2.cpp, build_moe_ffn in src/llama-graph.cpp, the YaRN
set-up in src/llama-context.cpp and ggml's rope_yarn), read as a specification.
Slow by design; use it on the tiny presets only.

`round_activations=True` models the engine's native CPU kernels (as llama.cpp's
CPU backend): the input of every matmul on a weight of a quantised type with native
kernels (ROUNDED_TYPES) is first rounded to 8 bits per block of 32 values (256 for the
K-quants and IQ4_XS), rint(x / d) * d with d = amax / 127.
That includes the per-head up-projections of the compressed KV (attn_kv_b, and
attn_v_b), which multiply the stored rows; attn_k_b is used transposed (its
columns), which the engine computes on exact dequantised values, so the input
of k_b stays exact, as does the embedding lookup. The absorbed (MLA) form
rounds differently, so compare it with this reference at the looser MLA
tolerance only.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf import quants as gq


# the types whose native kernels take 8-bit activations -> values per activation block (hybrid/quant_traits.h)
ROUNDED_TYPES = {GGMLQuantizationType.Q4_0: 32, GGMLQuantizationType.Q5_0: 32, GGMLQuantizationType.Q5_1: 32,
                 GGMLQuantizationType.Q8_0: 32, GGMLQuantizationType.IQ4_NL: 32, GGMLQuantizationType.Q4_K: 256,
                 GGMLQuantizationType.Q5_K: 256, GGMLQuantizationType.Q6_K: 256, GGMLQuantizationType.IQ4_XS: 256}

class Deepseek2Reference:
    """Holds float64 weights and a per-layer K/V cache; `forward(tokens)` -> logits."""

    def __init__(self, path, round_activations: bool = False):
        reader = GGUFReader(str(path))
        self.round_activations = round_activations
        self.types = {t.name: t.tensor_type for t in reader.tensors}
        self.meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = np.asarray(gq.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)
        self._read_hparams()
        self.cache_k = [np.zeros((self.n_head, 0, self.d_k)) for _ in range(self.n_layer)]
        self.cache_v = [np.zeros((self.n_head, 0, self.d_v)) for _ in range(self.n_layer)]
        self.n_past = 0

    def _key(self, name, default=None):
        return self.meta.get(f"deepseek2.{name}", default)

    def _read_hparams(self):
        k = self._key
        self.n_layer = int(k("block_count"))
        self.n_embd = int(k("embedding_length"))
        self.n_head = int(k("attention.head_count"))
        self.eps = float(k("attention.layer_norm_rms_epsilon"))
        self.kv_lora = int(k("attention.kv_lora_rank"))
        self.n_rot = int(k("rope.dimension_count"))
        self.d_k = int(k("attention.key_length_mla", k("attention.key_length")))
        self.d_v = int(k("attention.value_length_mla", k("attention.value_length")))
        self.d_nope = self.d_k - self.n_rot
        self.n_dense = int(k("leading_dense_block_count", 0))
        self.n_expert = int(k("expert_count", 0))
        self.n_used = int(k("expert_used_count", 0))
        self.w_scale = float(k("expert_weights_scale", 0.0))
        self.w_norm = bool(k("expert_weights_norm", False))
        self.gating = int(k("expert_gating_func", 1)) or 1
        self.n_groups = int(k("expert_group_count", 0))
        self.n_groups_used = int(k("expert_group_used_count", 0))
        self._rope_setup()

    def _rope_setup(self):
        """Angles per rotated pair and the two magnitudes llama.cpp applies.

        YaRN mixes interpolated (pos*freq/f) and extrapolated (pos*freq) angles
        with a linear ramp over the pair index between the correction dims; the
        rotated q/k parts are scaled by `rope_mag` and the softmax by `kq_scale`.
        """
        k = self._key
        base = float(k("rope.freq_base", 10000.0))
        kind = k("rope.scaling.type", "none")
        f = float(k("rope.scaling.factor", 1.0)) if kind in ("yarn", "linear") else 1.0
        log_mul = float(k("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1   # stored as 0.1*mscale_all_dim
        attn_factor = float(k("rope.scaling.attn_factor", 1.0))
        n_ctx_orig = int(k("rope.scaling.original_context_length", 0)) or int(k("context_length"))
        beta_fast = float(k("rope.scaling.yarn_beta_fast", 32.0))
        beta_slow = float(k("rope.scaling.yarn_beta_slow", 1.0))
        pairs = np.arange(self.n_rot // 2)
        freq = base ** (-2.0 * pairs / self.n_rot)

        def mscale(scale, m):
            return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

        if kind == "yarn":
            def corr_dim(beta):
                return self.n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))
            lo = max(0.0, math.floor(corr_dim(beta_fast)))
            hi = min(self.n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
            extrap_weight = 1.0 - np.clip((pairs - lo) / max(0.001, hi - lo), 0.0, 1.0)
            self.freq = freq / f * (1 - extrap_weight) + freq * extrap_weight
            if log_mul != 0.0:
                m = log_mul if log_mul != 1.0 else 1.0
                self.rope_mag = mscale(f, m) / mscale(f, log_mul) * attn_factor
            else:
                self.rope_mag = mscale(f, 1.0) * attn_factor
            mag_org = self.rope_mag
        else:
            self.freq = freq / f
            self.rope_mag = attn_factor
            mag_org = attn_factor * (1 + 0.1 * math.log(f))
        kq_mscale = mag_org * (1 + 0.1 * log_mul * math.log(f))
        self.kq_scale = kq_mscale * kq_mscale / math.sqrt(self.d_k)

    # --- pieces -------------------------------------------------------------

    def mm(self, name, x, expert=None, w=None):
        """W @ x for the weight `name` (one expert of it with `expert`; `w`: a given view of it)."""
        if w is None:
            w = self.w[name] if expert is None else self.w[name][expert]
        if self.round_activations and self.types[name] in ROUNDED_TYPES:
            blocks = x.reshape(-1, ROUNDED_TYPES[self.types[name]])
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            x = (np.rint(blocks / np.where(d == 0, 1, d)) * d).reshape(x.shape)
        return w @ x

    def norm(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.w[name]

    def rope(self, x, pos):
        """x [..., n_rot] at position pos: rotate consecutive pairs (x0,x1), (x2,x3), ..."""
        ang = pos * self.freq
        c, s = np.cos(ang) * self.rope_mag, np.sin(ang) * self.rope_mag
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def mlp(self, x, prefix, suffix=""):
        g = self.mm(f"{prefix}ffn_gate{suffix}.weight", x)
        u = self.mm(f"{prefix}ffn_up{suffix}.weight", x)
        return self.mm(f"{prefix}ffn_down{suffix}.weight", g / (1 + np.exp(-g)) * u)

    def kv_up(self, il, c):
        """Per-head k_nope [h, nope] and v [h, d_v] from the compressed KV c [kv_lora]."""
        p = f"blk.{il}."
        if p + "attn_kv_b.weight" in self.w:
            name = p + "attn_kv_b.weight"
            kvb = self.w[name].reshape(self.n_head, self.d_nope + self.d_v, self.kv_lora)
            return self.mm(name, c, w=kvb[:, :self.d_nope, :]), self.mm(name, c, w=kvb[:, self.d_nope:, :])
        k_b = self.w[p + "attn_k_b.weight"]          # [h, kv_lora, nope], used transposed: exact input
        return np.transpose(k_b, (0, 2, 1)) @ c, self.mm(p + "attn_v_b.weight", c)

    def attention(self, x, il, pos):
        p = f"blk.{il}."
        if p + "attn_q.weight" in self.w:
            q = self.mm(p + "attn_q.weight", x)
        else:
            q = self.mm(p + "attn_q_b.weight", self.norm(self.mm(p + "attn_q_a.weight", x), p + "attn_q_a_norm.weight"))
        q = q.reshape(self.n_head, self.d_k)
        q = np.concatenate([q[:, :self.d_nope], self.rope(q[:, self.d_nope:], pos)], axis=1)
        kv = self.mm(p + "attn_kv_a_mqa.weight", x)
        c = self.norm(kv[:self.kv_lora], p + "attn_kv_a_norm.weight")
        k_pe = self.rope(kv[self.kv_lora:], pos)
        k_nope, v = self.kv_up(il, c)                                                          # [h, d_v]
        k = np.concatenate([k_nope, np.broadcast_to(k_pe, (self.n_head, self.n_rot))], axis=1)  # [h, d_k]
        self.cache_k[il] = np.concatenate([self.cache_k[il], k[:, None, :]], axis=1)
        self.cache_v[il] = np.concatenate([self.cache_v[il], v[:, None, :]], axis=1)
        out = np.empty((self.n_head, self.d_v))
        for h in range(self.n_head):
            s = self.cache_k[il][h] @ q[h] * self.kq_scale          # keys 0..pos: causal by construction
            s = np.exp(s - s.max())
            out[h] = (s / s.sum()) @ self.cache_v[il][h]
        return self.mm(p + "attn_output.weight", out.reshape(-1))

    def route(self, x, il):
        """Expert ids and their weights for one token, as build_moe_ffn selects them."""
        p = f"blk.{il}."
        logits = self.mm(p + "ffn_gate_inp.weight", x)
        if self.gating == 2:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
        select = probs + self.w[p + "exp_probs_b.bias"] if p + "exp_probs_b.bias" in self.w else probs.copy()
        if self.n_groups > 1:
            groups = select.reshape(self.n_groups, -1)
            group_score = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
            keep = np.argsort(-group_score, kind="stable")[:self.n_groups_used]
            masked = np.full_like(groups, -np.inf)
            masked[keep] = groups[keep]
            select = masked.reshape(-1)
        ids = np.argsort(-select, kind="stable")[:self.n_used]
        weights = probs[ids]
        if self.w_norm:
            weights = weights / weights.sum()
        if self.w_scale != 0.0:
            weights = weights * self.w_scale
        return ids, weights

    def moe(self, x, il):
        p = f"blk.{il}."
        ids, weights = self.route(x, il)
        out = np.zeros(self.n_embd)
        for e, wt in zip(ids, weights):
            g = self.mm(p + "ffn_gate_exps.weight", x, e)
            u = self.mm(p + "ffn_up_exps.weight", x, e)
            out += wt * self.mm(p + "ffn_down_exps.weight", g / (1 + np.exp(-g)) * u, e)
        return out + self.mlp(x, p, "_shexp")

    # --- the pass -----------------------------------------------------------

    def forward(self, tokens) -> np.ndarray:
        """Logits [len(tokens), n_vocab] for tokens following what is in the cache."""
        logits = []
        for tok in tokens:
            pos = self.n_past
            x = self.w["token_embd.weight"][tok].copy()
            for il in range(self.n_layer):
                p = f"blk.{il}."
                x = x + self.attention(self.norm(x, p + "attn_norm.weight"), il, pos)
                h = self.norm(x, p + "ffn_norm.weight")
                x = x + (self.mlp(h, p) if il < self.n_dense or self.n_expert == 0 else self.moe(h, il))
            head = "output.weight" if "output.weight" in self.w else "token_embd.weight"
            logits.append(self.mm(head, self.norm(x, "output_norm.weight")))
            self.n_past += 1
        return np.stack(logits)
