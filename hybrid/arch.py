"""What a GGUF file of each architecture holds: metadata keys <-> ModelConfig fields, and tensors.

The loader (`hybrid/gguf_model.py`) reads through these tables and the maker
(`hybrid/make_model.py`) writes through them, so each key and each tensor shape is
spelled once. Each MoE architecture (deepseek2, qwen3moe) is one `Arch` in `ARCHS`: a key
table, its attention-layout hooks and its tensor list.

Shapes are in NumPy/torch order (the reverse of ggml's `ne`): a 2-D weight is
(n_out, n_in), `ffn_gate_exps` is (n_expert, n_ff_exp, n_embd). Facts follow
llama.cpp's loaders (src/models/deepseek2.cpp, qwen3moe.cpp, src/llama-model.cpp).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGUFValueType

from hybrid.config import ModelConfig

U32, F32, STR, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL


@dataclass(frozen=True)
class Key:
    """One metadata key `{arch}.{key}` that maps onto one ModelConfig field."""
    field: str
    key: str
    vtype: GGUFValueType
    required: bool = False
    # The maker leaves the key out when this says so (keys real files do not carry).
    omit: Callable[[ModelConfig], bool] | None = None


def _is_default(name: str) -> Callable[[ModelConfig], bool]:
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig)}[name]
    return lambda c: getattr(c, name) == default


def _no_rope_scaling(c: ModelConfig) -> bool:
    return c.rope_scaling_type == "none"


COMMON_KEYS = (
    Key("n_ctx_train", "context_length", U32, required=True),
    Key("n_embd", "embedding_length", U32, required=True),
    Key("n_layer", "block_count", U32, required=True),
    Key("n_ff", "feed_forward_length", U32),
    Key("n_head", "attention.head_count", U32, required=True),
    Key("rms_eps", "attention.layer_norm_rms_epsilon", F32, required=True),
    Key("rope_freq_base", "rope.freq_base", F32),
    Key("n_rot", "rope.dimension_count", U32),
    Key("rope_scaling_type", "rope.scaling.type", STR, omit=_no_rope_scaling),
    Key("rope_scaling_factor", "rope.scaling.factor", F32, omit=_no_rope_scaling),
    Key("rope_orig_ctx", "rope.scaling.original_context_length", U32, omit=_no_rope_scaling),
    Key("rope_yarn_log_mul", "rope.scaling.yarn_log_multiplier", F32, omit=_no_rope_scaling),
    Key("rope_yarn_beta_fast", "rope.scaling.yarn_beta_fast", F32, omit=_is_default("rope_yarn_beta_fast")),
    Key("rope_yarn_beta_slow", "rope.scaling.yarn_beta_slow", F32, omit=_is_default("rope_yarn_beta_slow")),
    Key("n_expert", "expert_count", U32),
    Key("n_expert_used", "expert_used_count", U32),
    Key("n_ff_exp", "expert_feed_forward_length", U32),
    Key("n_expert_groups", "expert_group_count", U32, omit=_is_default("n_expert_groups")),
    Key("n_group_used", "expert_group_used_count", U32, omit=_is_default("n_group_used")),
)

DEEPSEEK2_LITE_LAYERS = (26, 27)  # llama.cpp ignores attention.q_lora_rank for these layer counts

DEEPSEEK2_KEYS = COMMON_KEYS + (
    Key("n_layer_dense_lead", "leading_dense_block_count", U32),
    Key("q_lora_rank", "attention.q_lora_rank", U32,
        omit=lambda c: c.q_lora_rank == 0 and c.n_layer in DEEPSEEK2_LITE_LAYERS),
    Key("kv_lora_rank", "attention.kv_lora_rank", U32, required=True),
    Key("n_expert_shared", "expert_shared_count", U32, required=True),
    Key("expert_weights_scale", "expert_weights_scale", F32),
    Key("expert_weights_norm", "expert_weights_norm", BOOL),
    Key("expert_gating_func", "expert_gating_func", U32),
)


def _deepseek2_read_layout(meta: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """Per-head sizes and the MLA layout, which the two real layouts store differently.

    Old files: one attn_kv_b, head_count_kv = n_head, key/value_length per head.
    Current files: attn_k_b + attn_v_b, head_count_kv = 1, key_length = kv_lora + rope,
    and the per-head sizes in key_length_mla / value_length_mla (llama.cpp's `is_mla`).
    """
    per_head = fields["n_embd"] // fields["n_head"]
    out: dict[str, Any] = {"n_head_kv": _scalar(meta.get("attention.head_count_kv", fields["n_head"]))}
    if "attention.key_length_mla" in meta and "attention.value_length_mla" in meta:
        out.update(kv_layout="k_b_v_b", n_embd_head_k=meta["attention.key_length_mla"],
                   n_embd_head_v=meta["attention.value_length_mla"])
    else:
        out.update(kv_layout="kv_b", n_embd_head_k=meta.get("attention.key_length", per_head),
                   n_embd_head_v=meta.get("attention.value_length", per_head))
    if fields.get("expert_gating_func", 0) == 0:     # absent or NONE: V2-era files mean softmax
        out["expert_gating_func"] = 1
    return out


def _deepseek2_write_layout(c: ModelConfig) -> list[tuple[str, Any, GGUFValueType]]:
    if c.kv_layout == "k_b_v_b":
        return [("attention.head_count_kv", 1, U32),
                ("attention.key_length", c.kv_lora_rank + c.n_rot, U32),
                ("attention.value_length", c.kv_lora_rank, U32),
                ("attention.key_length_mla", c.n_embd_head_k, U32),
                ("attention.value_length_mla", c.n_embd_head_v, U32)]
    return [("attention.head_count_kv", c.n_head, U32),
            ("attention.key_length", c.n_embd_head_k, U32),
            ("attention.value_length", c.n_embd_head_v, U32)]


def _deepseek2_tensors(c: ModelConfig, optional: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a deepseek2 file, in file order. `optional` adds `exp_probs_b.bias`,
    the selection bias of sigmoid-gated (V3-style) routers that llama.cpp does not require."""
    head_k, head_v, nope = c.n_embd_head_k, c.n_embd_head_v, c.n_embd_head_qk_nope
    shexp = c.n_ff_exp * c.n_expert_shared
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, c.n_embd)}
    for il in range(c.n_layer):
        b = f"blk.{il}."
        t[b + "attn_norm.weight"] = (c.n_embd,)
        if c.q_lora_rank > 0:
            t[b + "attn_q_a_norm.weight"] = (c.q_lora_rank,)
        t[b + "attn_kv_a_norm.weight"] = (c.kv_lora_rank,)
        if c.q_lora_rank > 0:
            t[b + "attn_q_a.weight"] = (c.q_lora_rank, c.n_embd)
            t[b + "attn_q_b.weight"] = (c.n_head * head_k, c.q_lora_rank)
        else:
            t[b + "attn_q.weight"] = (c.n_head * head_k, c.n_embd)
        t[b + "attn_kv_a_mqa.weight"] = (c.kv_lora_rank + c.n_rot, c.n_embd)
        if c.kv_layout == "k_b_v_b":
            t[b + "attn_k_b.weight"] = (c.n_head, c.kv_lora_rank, nope)
            t[b + "attn_v_b.weight"] = (c.n_head, head_v, c.kv_lora_rank)
        else:
            t[b + "attn_kv_b.weight"] = (c.n_head * (nope + head_v), c.kv_lora_rank)
        t[b + "attn_output.weight"] = (c.n_embd, c.n_head * head_v)
        t[b + "ffn_norm.weight"] = (c.n_embd,)
        if not c.is_moe_layer(il):
            t[b + "ffn_gate.weight"] = (c.n_ff, c.n_embd)
            t[b + "ffn_down.weight"] = (c.n_embd, c.n_ff)
            t[b + "ffn_up.weight"] = (c.n_ff, c.n_embd)
            continue
        t[b + "ffn_gate_inp.weight"] = (c.n_expert, c.n_embd)
        if optional:
            t[b + "exp_probs_b.bias"] = (c.n_expert,)
        t[b + "ffn_gate_exps.weight"] = (c.n_expert, c.n_ff_exp, c.n_embd)
        t[b + "ffn_down_exps.weight"] = (c.n_expert, c.n_embd, c.n_ff_exp)
        t[b + "ffn_up_exps.weight"] = (c.n_expert, c.n_ff_exp, c.n_embd)
        if c.n_expert_shared > 0:
            t[b + "ffn_gate_shexp.weight"] = (shexp, c.n_embd)
            t[b + "ffn_down_shexp.weight"] = (c.n_embd, shexp)
            t[b + "ffn_up_shexp.weight"] = (shexp, c.n_embd)
    t["output_norm.weight"] = (c.n_embd,)
    t["output.weight"] = (c.n_vocab, c.n_embd)
    return t


QWEN3MOE_KEYS = COMMON_KEYS + (
    Key("n_head_kv", "attention.head_count_kv", U32),
    Key("n_embd_head_k", "attention.key_length", U32),
    Key("n_embd_head_v", "attention.value_length", U32),
)


def _qwen3moe_read_layout(meta: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's defaults for the keys a file may leave out: as many kv heads as heads, a
    head of n_embd / n_head (Qwen3-30B-A3B's key_length, 128, is not: its files carry it), the
    rope over the whole head."""
    head_k = fields.get("n_embd_head_k", fields["n_embd"] // fields["n_head"])
    return {"n_head_kv": fields.get("n_head_kv", fields["n_head"]), "n_embd_head_k": head_k,
            "n_embd_head_v": fields.get("n_embd_head_v", head_k), "n_rot": fields.get("n_rot", head_k)}


def _qwen3moe_tensors(c: ModelConfig, optional: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a qwen3moe file, in file order. `optional` adds `output.weight`, which
    files with a head tied to the embedding (llama.cpp then reads token_embd) do not carry."""
    q, kv = c.n_head * c.n_embd_head_k, c.n_head_kv * c.n_embd_head_k
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.n_vocab, c.n_embd)}
    for il in range(c.n_layer):
        b = f"blk.{il}."
        t[b + "attn_norm.weight"] = (c.n_embd,)
        t[b + "attn_q.weight"] = (q, c.n_embd)
        t[b + "attn_k.weight"] = (kv, c.n_embd)
        t[b + "attn_v.weight"] = (c.n_head_kv * c.n_embd_head_v, c.n_embd)
        t[b + "attn_output.weight"] = (c.n_embd, c.n_head * c.n_embd_head_v)
        t[b + "attn_k_norm.weight"] = (c.n_embd_head_k,)
        t[b + "attn_q_norm.weight"] = (c.n_embd_head_k,)
        t[b + "ffn_norm.weight"] = (c.n_embd,)
        t[b + "ffn_gate_inp.weight"] = (c.n_expert, c.n_embd)
        t[b + "ffn_gate_exps.weight"] = (c.n_expert, c.n_ff_exp, c.n_embd)
        t[b + "ffn_down_exps.weight"] = (c.n_expert, c.n_embd, c.n_ff_exp)
        t[b + "ffn_up_exps.weight"] = (c.n_expert, c.n_ff_exp, c.n_embd)
    t["output_norm.weight"] = (c.n_embd,)
    if optional:
        t["output.weight"] = (c.n_vocab, c.n_embd)
    return t


@dataclass(frozen=True)
class Arch:
    name: str
    keys: tuple[Key, ...]
    read_layout: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    write_layout: Callable[[ModelConfig], list[tuple[str, Any, GGUFValueType]]]
    tensors: Callable[[ModelConfig, bool], dict[str, tuple[int, ...]]]
    # whether `hyprof model make` writes the optional tensors for this config
    makes_optional: Callable[[ModelConfig], bool]


ARCHS: dict[str, Arch] = {
    "deepseek2": Arch("deepseek2", DEEPSEEK2_KEYS, _deepseek2_read_layout, _deepseek2_write_layout,
                      _deepseek2_tensors, makes_optional=lambda c: c.expert_gating_func == 2),
    "qwen3moe": Arch("qwen3moe", QWEN3MOE_KEYS, _qwen3moe_read_layout, lambda c: [], _qwen3moe_tensors,
                     makes_optional=lambda c: True),
}


def _scalar(v: Any) -> Any:
    """Some keys may be per-layer arrays (llama.cpp's get_key_or_arr); the config keeps the largest."""
    return max(v) if isinstance(v, list) else v


_FROM_FILE: dict[GGUFValueType, Callable[[Any], Any]] = {
    BOOL: bool,
    # The shortest decimal that is this float32 (1e-06, not 9.99999997e-07): the value meant.
    F32: lambda v: float(str(np.float32(v))),
}


def config_fields(arch: Arch, meta: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a file's metadata (keys without the `{arch}.` prefix).

    Raises KeyError(full key name) for a required key that is missing.
    """
    fields: dict[str, Any] = {"arch": arch.name}
    for k in arch.keys:
        if k.key in meta:
            v = _scalar(meta[k.key])
            fields[k.field] = _FROM_FILE.get(k.vtype, lambda x: x)(v)
        elif k.required:
            raise KeyError(f"{arch.name}.{k.key}")
    fields.update(arch.read_layout(meta, fields))
    return fields


def metadata(c: ModelConfig) -> list[tuple[str, Any, GGUFValueType]]:
    """The `{arch}.*` keys a file of this config carries: (full key, value, GGUF type)."""
    arch = ARCHS[c.arch]
    out = [(k.key, getattr(c, k.field), k.vtype) for k in arch.keys if not (k.omit and k.omit(c))]
    out += arch.write_layout(c)
    out.append(("vocab_size", c.n_vocab, U32))
    return [(f"{arch.name}.{key}", v, t) for key, v, t in out]
