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
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGUFValueType

from hybrid.config import ModelConfig

U32, F32, STR, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL
MAX_LAYERS = 512                        # llama.cpp's LLAMA_MAX_LAYERS


class MetadataError(ValueError):
    """A file's metadata the engine cannot run: a key missing, of the wrong type, or contradicting
    another key or a tensor's shape; the message, put after the file's name, names the keys and values."""


class Dim(int):
    """A tensor dimension that says which metadata it comes from, so that the loader's message on a
    misshapen tensor names the keys and their values ("deepseek2.attention.head_count 4 ×
    deepseek2.attention.key_length 48"). Arithmetic between Dims keeps the sources; anywhere else
    it is the int it equals."""

    source: str

    def __new__(cls, value: int, source: str) -> "Dim":
        d = super().__new__(cls, value)
        d.source = source
        return d

    def __mul__(self, other):
        if not isinstance(other, Dim):
            return int(self) * other
        factors = [f"({d.source})" if " + " in d.source or " - " in d.source else d.source for d in (self, other)]
        return Dim(int(self) * int(other), " × ".join(factors))

    def __add__(self, other):
        return Dim(int(self) + int(other), f"{self.source} + {other.source}") if isinstance(other, Dim) \
            else int(self) + other

    def __sub__(self, other):
        return Dim(int(self) - int(other), f"{self.source} - {other.source}") if isinstance(other, Dim) \
            else int(self) - other


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
    def uint(key: str, default: int) -> int:
        return _from_file(f"deepseek2.{key}", U32, meta[key]) if key in meta else default

    per_head = fields["n_embd"] // fields["n_head"] if fields["n_head"] else 0   # (0 heads: config_problems)
    out: dict[str, Any] = {"n_head_kv": uint("attention.head_count_kv", fields["n_head"])}
    if "attention.key_length_mla" in meta and "attention.value_length_mla" in meta:
        out.update(kv_layout="k_b_v_b", n_embd_head_k=uint("attention.key_length_mla", 0),
                   n_embd_head_v=uint("attention.value_length_mla", 0))
        kv_lora, rope = fields.get("kv_lora_rank", 0), fields.get("n_rot", 0)
        for key, want, why in (("attention.key_length", kv_lora + rope, "kv_lora_rank + rope.dimension_count"),
                               ("attention.value_length", kv_lora, "kv_lora_rank")):
            if uint(key, want) != want:
                raise MetadataError(f"deepseek2.{key} is {uint(key, want)}, but in the attn_k_b/attn_v_b layout "
                                    f"it must be {why} = {want}")
    else:
        out.update(kv_layout="kv_b", n_embd_head_k=uint("attention.key_length", per_head),
                   n_embd_head_v=uint("attention.value_length", per_head))
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


def _deepseek2_layout_keys(c: ModelConfig) -> dict[str, str]:
    """The keys the layout's fields are read from (`_deepseek2_read_layout`), for messages."""
    mla = "_mla" if c.kv_layout == "k_b_v_b" else ""
    return {"n_head_kv": "attention.head_count_kv", "n_embd_head_k": f"attention.key_length{mla}",
            "n_embd_head_v": f"attention.value_length{mla}"}


def _deepseek2_attention_problems(c: ModelConfig, k: dict[str, str]) -> list[str]:
    problems = []
    if c.kv_lora_rank < 1:
        problems.append(f"{k['kv_lora_rank']}: must be at least 1")
    if c.n_embd_head_k <= c.n_rot:
        problems.append(f"{k['n_embd_head_k']} must exceed the rope dimension {k['n_rot']}")
    want_kv = 1 if c.kv_layout == "k_b_v_b" else c.n_head
    if c.n_head_kv != want_kv:
        problems.append(f"{k['n_head_kv']}: the {c.kv_layout} attention layout needs {want_kv} ({k['n_head']})")
    return problems


def _deepseek2_tensors(c: ModelConfig, optional: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a deepseek2 file, in file order. `optional` adds `exp_probs_b.bias`,
    the selection bias of sigmoid-gated (V3-style) routers that llama.cpp does not require.
    Every dimension is a `Dim` naming the keys it comes from."""
    d = dims(c)
    head_k, head_v, nope = d.n_embd_head_k, d.n_embd_head_v, d.n_embd_head_k - d.n_rot
    shexp = d.n_ff_exp * d.n_expert_shared
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (d.n_vocab, d.n_embd)}
    for il in range(c.n_layer):
        b = f"blk.{il}."
        t[b + "attn_norm.weight"] = (d.n_embd,)
        if c.q_lora_rank > 0:
            t[b + "attn_q_a_norm.weight"] = (d.q_lora_rank,)
        t[b + "attn_kv_a_norm.weight"] = (d.kv_lora_rank,)
        if c.q_lora_rank > 0:
            t[b + "attn_q_a.weight"] = (d.q_lora_rank, d.n_embd)
            t[b + "attn_q_b.weight"] = (d.n_head * head_k, d.q_lora_rank)
        else:
            t[b + "attn_q.weight"] = (d.n_head * head_k, d.n_embd)
        t[b + "attn_kv_a_mqa.weight"] = (d.kv_lora_rank + d.n_rot, d.n_embd)
        if c.kv_layout == "k_b_v_b":
            t[b + "attn_k_b.weight"] = (d.n_head, d.kv_lora_rank, nope)
            t[b + "attn_v_b.weight"] = (d.n_head, head_v, d.kv_lora_rank)
        else:
            t[b + "attn_kv_b.weight"] = (d.n_head * (nope + head_v), d.kv_lora_rank)
        t[b + "attn_output.weight"] = (d.n_embd, d.n_head * head_v)
        t[b + "ffn_norm.weight"] = (d.n_embd,)
        if not c.is_moe_layer(il):
            t[b + "ffn_gate.weight"] = (d.n_ff, d.n_embd)
            t[b + "ffn_down.weight"] = (d.n_embd, d.n_ff)
            t[b + "ffn_up.weight"] = (d.n_ff, d.n_embd)
            continue
        t[b + "ffn_gate_inp.weight"] = (d.n_expert, d.n_embd)
        if optional:
            t[b + "exp_probs_b.bias"] = (d.n_expert,)
        t[b + "ffn_gate_exps.weight"] = (d.n_expert, d.n_ff_exp, d.n_embd)
        t[b + "ffn_down_exps.weight"] = (d.n_expert, d.n_embd, d.n_ff_exp)
        t[b + "ffn_up_exps.weight"] = (d.n_expert, d.n_ff_exp, d.n_embd)
        if c.n_expert_shared > 0:
            t[b + "ffn_gate_shexp.weight"] = (shexp, d.n_embd)
            t[b + "ffn_down_shexp.weight"] = (d.n_embd, shexp)
            t[b + "ffn_up_shexp.weight"] = (shexp, d.n_embd)
    t["output_norm.weight"] = (d.n_embd,)
    t["output.weight"] = (d.n_vocab, d.n_embd)
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
    per_head = fields["n_embd"] // fields["n_head"] if fields["n_head"] else 0   # (0 heads: config_problems)
    head_k = fields.get("n_embd_head_k", per_head)
    return {"n_head_kv": fields.get("n_head_kv", fields["n_head"]), "n_embd_head_k": head_k,
            "n_embd_head_v": fields.get("n_embd_head_v", head_k), "n_rot": fields.get("n_rot", head_k)}


def _qwen3moe_attention_problems(c: ModelConfig, k: dict[str, str]) -> list[str]:
    if c.n_rot == c.n_embd_head_k == c.n_embd_head_v and c.n_head_kv >= 1 and c.n_head % c.n_head_kv == 0:
        return []
    return [f"{k['n_head']} / {k['n_head_kv']} with {k['n_embd_head_k']}, {k['n_embd_head_v']} and {k['n_rot']} "
            "(llama.cpp's qwen3moe: kv heads divide heads, rope = k = v head size)"]


def _qwen3moe_tensors(c: ModelConfig, optional: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a qwen3moe file, in file order. `optional` adds `output.weight`, which
    files with a head tied to the embedding (llama.cpp then reads token_embd) do not carry.
    Every dimension is a `Dim` naming the keys it comes from."""
    d = dims(c)
    q, kv = d.n_head * d.n_embd_head_k, d.n_head_kv * d.n_embd_head_k
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (d.n_vocab, d.n_embd)}
    for il in range(c.n_layer):
        b = f"blk.{il}."
        t[b + "attn_norm.weight"] = (d.n_embd,)
        t[b + "attn_q.weight"] = (q, d.n_embd)
        t[b + "attn_k.weight"] = (kv, d.n_embd)
        t[b + "attn_v.weight"] = (d.n_head_kv * d.n_embd_head_v, d.n_embd)
        t[b + "attn_output.weight"] = (d.n_embd, d.n_head * d.n_embd_head_v)
        t[b + "attn_k_norm.weight"] = (d.n_embd_head_k,)
        t[b + "attn_q_norm.weight"] = (d.n_embd_head_k,)
        t[b + "ffn_norm.weight"] = (d.n_embd,)
        t[b + "ffn_gate_inp.weight"] = (d.n_expert, d.n_embd)
        t[b + "ffn_gate_exps.weight"] = (d.n_expert, d.n_ff_exp, d.n_embd)
        t[b + "ffn_down_exps.weight"] = (d.n_expert, d.n_embd, d.n_ff_exp)
        t[b + "ffn_up_exps.weight"] = (d.n_expert, d.n_ff_exp, d.n_embd)
    t["output_norm.weight"] = (d.n_embd,)
    if optional:
        t["output.weight"] = (d.n_vocab, d.n_embd)
    return t


@dataclass(frozen=True)
class Arch:
    name: str
    keys: tuple[Key, ...]
    read_layout: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    write_layout: Callable[[ModelConfig], list[tuple[str, Any, GGUFValueType]]]
    layout_keys: Callable[[ModelConfig], dict[str, str]]
    # what in the attention's sizes contradicts itself, given each field's "key value" (config_problems)
    attention_problems: Callable[[ModelConfig, dict[str, str]], list[str]]
    tensors: Callable[[ModelConfig, bool], dict[str, tuple[int, ...]]]
    # whether `hyprof model make` writes the optional tensors for this config
    makes_optional: Callable[[ModelConfig], bool]


ARCHS: dict[str, Arch] = {
    "deepseek2": Arch("deepseek2", DEEPSEEK2_KEYS, _deepseek2_read_layout, _deepseek2_write_layout,
                      _deepseek2_layout_keys, _deepseek2_attention_problems, _deepseek2_tensors,
                      makes_optional=lambda c: c.expert_gating_func == 2),
    "qwen3moe": Arch("qwen3moe", QWEN3MOE_KEYS, _qwen3moe_read_layout, lambda c: [], lambda c: {},
                     _qwen3moe_attention_problems, _qwen3moe_tensors, makes_optional=lambda c: True),
}


def key_names(c: ModelConfig) -> dict[str, str]:
    """ModelConfig field -> the full metadata key it is read from (n_vocab: the embedding's rows)."""
    arch = ARCHS[c.arch]
    names = {k.field: k.key for k in arch.keys} | arch.layout_keys(c)
    return {f: f"{arch.name}.{key}" for f, key in names.items()} | {"n_vocab": "token_embd.weight's rows"}


def dims(c: ModelConfig) -> Any:
    """Each integer field of the config as a `Dim` naming its key and value, by field name."""
    names = key_names(c)
    return SimpleNamespace(**{f: Dim(getattr(c, f), f"{key} {getattr(c, f)}") for f, key in names.items()
                              if type(getattr(c, f)) is int})


def config_problems(c: ModelConfig) -> list[str]:
    """What in a config contradicts itself or the engine's limits, one line each naming the keys and
    values: checked before any shape is computed or any op runs, so that nothing inconsistent
    (no experts to choose from, a zero head count, a rope wider than its head) reaches a kernel."""
    k = {f: f"{key} {getattr(c, f)}" for f, key in key_names(c).items()}
    problems = []
    if not 1 <= c.n_layer <= MAX_LAYERS:
        problems.append(f"{k['n_layer']}: out of range (1 to {MAX_LAYERS}, llama.cpp's limit)")
    for f in ("n_embd", "n_head", "n_ctx_train", "n_vocab", "n_embd_head_v"):
        if getattr(c, f) < 1:
            problems.append(f"{k[f]}: must be at least 1")
    if c.n_layer_dense_lead > c.n_layer:
        problems.append(f"{k['n_layer_dense_lead']} is more than {k['n_layer']}")
    if (c.n_expert == 0 or c.n_layer_dense_lead > 0) and c.n_ff < 1:
        problems.append(f"{k['n_ff']}: dense layers need at least 1")
    if c.n_expert > 0 and c.n_layer_dense_lead < c.n_layer:
        if not 0 < c.n_expert_used <= c.n_expert:
            problems.append(f"{k['n_expert_used']} with {k['n_expert']} (a token uses 1 to all of the experts)")
        if c.n_ff_exp < 1:
            problems.append(f"{k['n_ff_exp']}: MoE layers need at least 1")
    if c.n_expert_groups > 1 and not (c.n_expert % c.n_expert_groups == 0 and c.n_expert_groups < c.n_expert
                                      and 0 < c.n_group_used < c.n_expert_groups):
        problems.append(f"expert groups {k['n_expert_groups']} / {k['n_group_used']} with {k['n_expert']} "
                        "(groups must divide the experts, 0 < used < groups)")
    if c.n_rot < 2 or c.n_rot % 2:
        problems.append(f"{k['n_rot']}: RoPE rotates pairs, so at least 2 and even")
    problems += ARCHS[c.arch].attention_problems(c, k)
    for f in ("rms_eps", "rope_freq_base", "rope_scaling_factor"):
        if not getattr(c, f) > 0:
            problems.append(f"{k[f]}: must be positive")
    if c.kv_layout not in ("kv_b", "k_b_v_b"):
        problems.append(f"kv_layout {c.kv_layout!r} (kv_b or k_b_v_b)")
    if c.rope_scaling_type not in ("none", "linear", "yarn"):
        problems.append(f"{k['rope_scaling_type']!s}: none, linear or yarn")
    if c.expert_gating_func not in (1, 2):
        problems.append(f"{k['expert_gating_func']} (1 softmax, 2 sigmoid)")
    return problems


_TYPE_WORDS = {U32: "an unsigned integer", F32: "a finite number", STR: "a string", BOOL: "a boolean"}


def _from_file(key: str, vtype: GGUFValueType, value: Any) -> Any:
    """A metadata value as the config holds it, checked to be of the key's type (a flipped value
    type must not hand a float or a string to a shape). Some keys may be per-layer arrays
    (llama.cpp's get_key_or_arr); the config keeps the largest item."""
    v = max(value) if isinstance(value, list) and value else value
    if vtype == F32 and type(v) in (int, float):
        # The shortest decimal that is this float32 (1e-06, not 9.99999997e-07): the value meant.
        v = float(str(np.float32(v)))
    ok = {U32: type(v) is int and v >= 0, F32: type(v) is float and math.isfinite(v),
          STR: type(v) is str, BOOL: type(v) is bool}[vtype]
    if not ok:
        shown = f"an array of {len(value)} items" if isinstance(value, list) else repr(value)
        raise MetadataError(f"{key} is {shown}, expected {_TYPE_WORDS[vtype]}")
    return v


def config_fields(arch: Arch, meta: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a file's metadata (keys without the `{arch}.` prefix); MetadataError
    for a required key that is missing or a value of the wrong type."""
    fields: dict[str, Any] = {"arch": arch.name}
    for k in arch.keys:
        if k.key in meta:
            fields[k.field] = _from_file(f"{arch.name}.{k.key}", k.vtype, meta[k.key])
        elif k.required:
            raise MetadataError(f"missing metadata key {arch.name}.{k.key}")
    fields.update(arch.read_layout(meta, fields))
    return fields


def metadata(c: ModelConfig) -> list[tuple[str, Any, GGUFValueType]]:
    """The `{arch}.*` keys a file of this config carries: (full key, value, GGUF type)."""
    arch = ARCHS[c.arch]
    out = [(k.key, getattr(c, k.field), k.vtype) for k in arch.keys if not (k.omit and k.omit(c))]
    out += arch.write_layout(c)
    out.append(("vocab_size", c.n_vocab, U32))
    return [(f"{arch.name}.{key}", v, t) for key, v, t in out]
