"""Model hyperparameters, read from GGUF metadata into one frozen dataclass.

Field names follow llama.cpp's `llama_hparams`. Each MoE architecture (deepseek2,
qwen3moe) is one entry in the key mapping of `hybrid/arch.py`, not a new
dataclass: fields an architecture lacks keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # general.architecture, e.g. "deepseek2"
    n_layer: int                   # block_count
    n_embd: int                    # embedding_length
    n_head: int                    # attention.head_count
    n_head_kv: int                 # attention.head_count_kv (1 in the k_b/v_b layout; GQA's kv heads in qwen3moe)
    n_vocab: int
    n_ctx_train: int               # context_length
    rms_eps: float                 # attention.layer_norm_rms_epsilon
    n_ff: int                      # feed_forward_length (leading dense layers)

    # Multi-head latent attention (DeepSeek2)
    q_lora_rank: int = 0           # 0: plain attn_q, else attn_q_a/attn_q_a_norm/attn_q_b
    kv_lora_rank: int = 0
    n_rot: int = 0                 # rope.dimension_count (qk_rope_head_dim)
    n_embd_head_k: int = 0         # per-head key size, nope + rope (192 on V2-Lite; 128 on Qwen3-30B-A3B)
    n_embd_head_v: int = 0         # per-head value size (128 on V2-Lite)
    kv_layout: str = "kv_b"        # "kv_b" (one attn_kv_b) or "k_b_v_b" (attn_k_b + attn_v_b)

    # RoPE / YaRN
    rope_freq_base: float = 10000.0
    rope_scaling_type: str = "none"          # "none" | "linear" | "yarn"
    rope_scaling_factor: float = 1.0
    rope_orig_ctx: int = 0                   # rope.scaling.original_context_length
    rope_yarn_log_mul: float = 0.0           # rope.scaling.yarn_log_multiplier, as stored (DeepSeek
                                             # converters store 0.1*mscale_all_dim; llama.cpp's deepseek2
                                             # loader divides it by 0.1 before use)
    rope_yarn_beta_fast: float = 32.0        # rope.scaling.yarn_beta_fast (llama.cpp's default when absent)
    rope_yarn_beta_slow: float = 1.0         # rope.scaling.yarn_beta_slow

    # Feed-forward / MoE
    n_layer_dense_lead: int = 0    # leading_dense_block_count
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0              # expert_feed_forward_length
    n_expert_groups: int = 0       # expert_group_count (0/1: no group-limited routing)
    n_group_used: int = 0          # expert_group_used_count
    expert_weights_scale: float = 1.0
    expert_weights_norm: bool = False
    expert_gating_func: int = 1    # 1 softmax, 2 sigmoid

    @property
    def n_embd_head_qk_nope(self) -> int:
        return self.n_embd_head_k - self.n_rot

    def is_moe_layer(self, il: int) -> bool:
        return self.n_expert > 0 and il >= self.n_layer_dense_lead
