"""Write DeepSeek- and Qwen3-MoE-shaped GGUF files with seeded random weights (`hyprof model make`).

Profiling needs models of real shapes, not real knowledge: the bytes an expert
matmul streams depend on the shapes and the quantization, not on trained values.
So a preset is a ModelConfig (gpt-fast style: a dict of fields), and every weight is
seeded noise whose scale keeps activations finite and logits spread through every
layer. Files carry every key llama.cpp's deepseek2 or qwen3moe loader reads and a small byte-level
BPE vocabulary, so llama.cpp loads them too (the oracle tests).

Tensors are streamed: the header and all tensor infos are written first, then each
tensor is generated, quantized and written in row chunks, so the 27-layer preset
(~9 GiB at Q4_0) needs about one quantized tensor of memory. The file appears under
its name only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.constants import TokenType

from hybrid import arch as arches
from hybrid.config import ModelConfig
from hybrid.quantize import quantize
from profiler.errors import UserError
from profiler.files import atomic_output, check_output_path

T = GGMLQuantizationType

_DEEPSEEK_V2_LITE = dict(
    arch="deepseek2", n_layer=27, n_embd=2048, n_head=16, n_head_kv=16, n_vocab=102400,
    n_ctx_train=163840, rms_eps=1e-6, n_ff=10944,
    q_lora_rank=0, kv_lora_rank=512, n_rot=64, n_embd_head_k=192, n_embd_head_v=128,
    rope_freq_base=10000.0, rope_scaling_type="yarn", rope_scaling_factor=40.0, rope_orig_ctx=4096,
    rope_yarn_log_mul=0.0707,
    n_layer_dense_lead=1, n_expert=64, n_expert_used=6, n_expert_shared=2, n_ff_exp=1408,
    expert_weights_scale=1.0, expert_weights_norm=False, expert_gating_func=1,
)

_QWEN3_30B_A3B = dict(
    arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, n_vocab=151936,
    n_ctx_train=40960, rms_eps=1e-6, n_ff=6144, n_rot=128, n_embd_head_k=128, n_embd_head_v=128,
    rope_freq_base=1e6, n_expert=128, n_expert_used=8, n_ff_exp=768,
)

PRESETS: dict[str, dict[str, Any]] = {
    # A few MB, for tests: 1 dense + 2 MoE layers, q-LoRA attention (the V2/V3 form).
    "tiny": dict(
        arch="deepseek2", n_layer=3, n_embd=64, n_head=4, n_head_kv=4, n_vocab=512,
        n_ctx_train=2048, rms_eps=1e-6, n_ff=128,
        q_lora_rank=32, kv_lora_rank=32, n_rot=16, n_embd_head_k=48, n_embd_head_v=32,
        n_layer_dense_lead=1, n_expert=8, n_expert_used=2, n_expert_shared=1, n_ff_exp=32,
        expert_weights_scale=1.0, expert_weights_norm=False, expert_gating_func=1,
    ),
    # Exact DeepSeek-V2-Lite shapes, 4 layers (1 dense + 3 MoE): ~1.4 GiB at Q4_0.
    "deepseek-v2-lite-mini": {**_DEEPSEEK_V2_LITE, "n_layer": 4},
    # All 27 layers: ~9 GiB at Q4_0, 15.7 B parameters.
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    # A few MB, for tests: 2 MoE layers, GQA (4 heads over 2 kv heads), heads wider than n_embd / n_head.
    "qwen3-tiny": dict(
        arch="qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_vocab=512,
        n_ctx_train=2048, rms_eps=1e-6, n_ff=128, n_rot=32, n_embd_head_k=32, n_embd_head_v=32,
        rope_freq_base=1e6, n_expert=8, n_expert_used=2, n_ff_exp=32,
    ),
    # Exact Qwen3-30B-A3B shapes, 4 layers: ~2 GiB at Q4_0.
    "qwen3-30b-a3b-mini": {**_QWEN3_30B_A3B, "n_layer": 4},
    # All 48 layers: ~17 GiB at Q4_0, 30.5 B parameters.
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
}

# --type -> (general.file_type, the type most weights get). The last four are llama.cpp's mixes:
# `mix_type` upgrades some tensors, as llama-quantize does for these file types.
QTYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, T.Q4_0), "q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "f16": (LlamaFileType.MOSTLY_F16, T.F16), "bf16": (LlamaFileType.MOSTLY_BF16, T.BF16),
    "f32": (LlamaFileType.ALL_F32, T.F32),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K), "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, T.Q6_K), "iq4_xs": (LlamaFileType.MOSTLY_IQ4_XS, T.IQ4_XS),
}
MIXES = ("q4_k_m", "q5_k_m", "q6_k", "iq4_xs")
# llama.cpp's tensor_type_fallback: the type a tensor takes when its rows are not whole blocks of
# its chosen type (DeepSeek-V2-Lite's 1408-wide expert rows); F16 where even that does not fit.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}
_ATTN_V = ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")   # llama.cpp's attn_v-like tensors
_CHUNK_ELEMENTS = 1 << 22               # rows generated and quantized at a time (16 MiB of float32)
_RESIDUAL_OUTPUTS = ("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")


def preset_config(preset: str, n_layers: int | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig a preset, a layer count and field overrides describe, validated.

    `overrides` replaces ModelConfig fields so tests can make variants, e.g.
    {"q_lora_rank": 0}, {"kv_layout": "k_b_v_b"}, {"expert_gating_func": 2},
    {"n_expert_groups": 4, "n_group_used": 2}, {"rope_scaling_type": "yarn", ...}.
    """
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown preset (available: {', '.join(PRESETS)})")
    fields = dict(PRESETS[preset])
    unknown = sorted(set(overrides or {}) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise UserError(f"unknown ModelConfig field(s) in overrides: {', '.join(unknown)}")
    fields.update(overrides or {})
    if n_layers is not None:
        lo = fields.get("n_layer_dense_lead", 0) + 1
        if not lo <= n_layers <= arches.MAX_LAYERS:
            raise UserError(f"--layers {n_layers}: out of range for preset {preset} (between {lo}, so that "
                            f"at least one layer is MoE, and {arches.MAX_LAYERS}, llama.cpp's limit)")
        if fields.get("q_lora_rank", 0) > 0 and n_layers in arches.DEEPSEEK2_LITE_LAYERS:
            raise UserError(f"--layers {n_layers}: llama.cpp reads every deepseek2 file with 26 or 27 layers "
                            f"as V2-Lite, without q-LoRA, and preset {preset} uses q-LoRA; choose another count")
        fields["n_layer"] = n_layers
    if fields["arch"] == "deepseek2":   # the current mainline layout keeps one latent KV head (DESIGN.md, "Models")
        fields["n_head_kv"] = 1 if fields.get("kv_layout") == "k_b_v_b" else fields["n_head"]
    config = ModelConfig(**fields)
    _validate(config, preset)
    return config


def _validate(c: ModelConfig, preset: str) -> None:
    """Refuse configs that llama.cpp would reject or misread, before writing anything."""
    problems = []
    if c.q_lora_rank > 0 and c.n_layer in arches.DEEPSEEK2_LITE_LAYERS:
        problems.append(f"{c.n_layer} layers with q-LoRA attention (llama.cpp reads every deepseek2 file "
                        f"with {' or '.join(map(str, arches.DEEPSEEK2_LITE_LAYERS))} layers as V2-Lite, "
                        "without q-LoRA); choose another layer count")
    problems += arches.config_problems(c)
    if c.n_vocab < _N_BASE_TOKENS:
        problems.append(f"n_vocab {c.n_vocab} (at least {_N_BASE_TOKENS}: 256 byte tokens and BOS/EOS)")
    if problems:
        raise UserError(f"preset {preset}: invalid model: " + "; ".join(problems))


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, config: ModelConfig) -> GGMLQuantizationType:
    """As llama.cpp quantizes a file of --type `qtype`: norms, biases and the router stay F32;
    a mix upgrades some tensors (`mix_type`); rows that do not fill whole blocks fall back
    (FALLBACK, else F16); everything else (token_embd too) takes the file's type."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return T.F32
    ggml_type = QTYPES[qtype][1]
    if qtype in MIXES:
        ggml_type = mix_type(name, ggml_type, qtype, config)
    for candidate in (ggml_type, FALLBACK.get(ggml_type, T.F16)):
        if shape[-1] % GGML_QUANT_SIZES[candidate][0] == 0:
            return candidate
    return T.F16


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers a _M mix gives more bits: the first and last eighth, and
    every third layer between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def mix_type(name: str, ggml_type: GGMLQuantizationType, qtype: str, c: ModelConfig) -> GGMLQuantizationType:
    """The type llama.cpp's llama_tensor_get_type gives a quantizable tensor in a Q4_K_M, Q5_K_M,
    Q6_K or IQ4_XS file (src/llama-quant.cpp, without an importance matrix), before the fallback.

    Its counter of attn_v-like tensors equals the layer index here (one per layer, in layer order).
    Its rules for models of exactly 8 experts (Mixtral's) apply to the tiny presets too.
    """
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    more_bits = qtype in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, c.n_layer)
    if name == "output.weight":
        return T.Q6_K
    if name.endswith(_ATTN_V):
        if c.n_expert == 8:
            return T.Q8_0
        if qtype == "iq4_xs" and c.n_head // c.n_head_kv >= 4:
            return T.Q5_K
        return T.Q6_K if more_bits else ggml_type
    if name.endswith("attn_k.weight") and c.n_expert == 8:
        return T.Q8_0
    if "ffn_down" in name:
        if more_bits:
            return T.Q6_K
        if qtype == "iq4_xs" and layer < c.n_layer // 8:
            return T.Q5_K
    if name.endswith("attn_output.weight") and c.n_expert == 8 and qtype in ("q4_k_m", "iq4_xs"):
        return T.Q5_K
    return ggml_type


def tensor_plan(config: ModelConfig, qtype: str) -> dict[str, tuple[tuple[int, ...], GGMLQuantizationType]]:
    """Every tensor the file gets, in file order: name -> (shape, type)."""
    arch = arches.ARCHS[config.arch]
    shapes = arch.tensors(config, arch.makes_optional(config))
    return {name: (shape, tensor_type(name, shape, qtype, config)) for name, shape in shapes.items()}


def _n_bytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block * type_size


def _init(name: str, shape: tuple[int, ...], config: ModelConfig) -> tuple[float, float]:
    """(center, std) of a tensor's values.

    Norm weights sit near 1 (not exactly, so that forgetting to apply one shows);
    projections get std 1/sqrt(n_in) so each keeps unit variance; residual outputs
    half that, so the residual stream grows slowly over 27 layers; the embedding has
    unit variance and the output head gives logits a spread of about 4, so that greedy
    decoding has clear winners.
    """
    if name.endswith("norm.weight"):
        return 1.0, 0.05
    if name.endswith("exp_probs_b.bias"):
        return 0.0, 0.02
    if name == "token_embd.weight":
        return 0.0, 1.0
    std = 1.0 / math.sqrt(shape[-1])
    if name == "output.weight":
        return 0.0, 4.0 * std
    return 0.0, std * 0.5 if name.endswith(_RESIDUAL_OUTPUTS) else std


def weight_chunks(name: str, shape: tuple[int, ...], config: ModelConfig, seed: int) -> Iterator[np.ndarray]:
    """The float32 values of one tensor as consecutive row chunks (rows = all but the last axis).

    Uniform noise of the `_init` mean and std, seeded by (seed, name): the same values
    whatever order tensors are written in. Uniform, because it is 4x cheaper to draw
    than normal noise and the 27-layer preset draws 15.7 B values.
    """
    center, std = _init(name, shape, config)
    half_width = std * math.sqrt(3.0)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n_cols = shape[-1]
    n_rows = math.prod(shape[:-1])
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    for i in range(0, n_rows, step):
        x = rng.random((min(step, n_rows - i), n_cols), dtype=np.float32)
        x -= 0.5
        x *= 2.0 * half_width
        x += center
        yield x


def weight(name: str, shape: tuple[int, ...], config: ModelConfig, seed: int) -> np.ndarray:
    """All float32 values of one tensor, before quantization (tests compare against these)."""
    return np.concatenate(list(weight_chunks(name, shape, config, seed))).reshape(shape)


def _encode(name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType, config: ModelConfig,
            seed: int) -> np.ndarray:
    """One tensor as stored, (rows, bytes or values per row): generated and quantized chunk by
    chunk into one buffer, so memory holds the stored tensor plus one float32 chunk."""
    out, i = None, 0
    for x in weight_chunks(name, shape, config, seed):
        q = quantize(x, ggml_type)
        if out is None:
            out = np.empty((math.prod(shape[:-1]), q.shape[-1]), q.dtype)
        out[i:i + len(q)] = q
        i += len(q)
    return out


# ---- vocabulary -------------------------------------------------------------------------------

_BOS, _EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"   # DeepSeek's spelling
_N_BASE_TOKENS = 256 + 2


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: byte b is spelled as this printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of exactly `n_vocab` tokens: (tokens, token types, merges).

    Ids 0-255 are the bytes (any text can be tokenized), 256/257 are BOS/EOS, and the
    rest come from merges of lower-case letters, breadth first ("Ġt", "th", "the", ...),
    so that English-looking text tokenizes into multi-byte tokens.
    """
    tokens = _byte_chars() + [_BOS, _EOS]
    types = [TokenType.NORMAL] * 256 + [TokenType.CONTROL] * 2
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges: list[str] = []
    level = ["Ġ", *letters]
    while len(tokens) < n_vocab:
        next_level = []
        for left in level:
            for right in letters:
                if len(tokens) == n_vocab:
                    break
                merges.append(f"{left} {right}")
                tokens.append(left + right)
                next_level.append(left + right)
        level = next_level
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    return tokens, [int(t) for t in types], merges


# ---- writing ----------------------------------------------------------------------------------

def make_model(path: str | Path, preset: str, qtype: str = "q4_0", n_layers: int | None = None, seed: int = 0,
               overrides: dict[str, Any] | None = None, force: bool = False,
               progress: Callable[[int, int], None] | None = None) -> ModelConfig:
    """Write a preset's model to `path`; return its config.

    `progress(done_bytes, total_bytes)` is called after each tensor.
    """
    if qtype not in QTYPES:
        raise UserError(f"--type {qtype}: unknown type (available: {', '.join(QTYPES)})")
    config = preset_config(preset, n_layers, overrides)
    out = check_output_path(path, force)
    plan = tensor_plan(config, qtype)
    total = sum(_n_bytes(shape, t) for shape, t in plan.values())

    with atomic_output(out, "wb", force=force) as tmp:
        writer = GGUFWriter(tmp.name, arch=config.arch)
        _write_metadata(writer, config, preset, QTYPES[qtype][0], seed)
        for name, (shape, ggml_type) in plan.items():
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _n_bytes(shape, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        try:
            for name, (shape, ggml_type) in plan.items():
                writer.write_tensor_data(_encode(name, shape, ggml_type, config, seed))
                done += _n_bytes(shape, ggml_type)
                if progress:
                    progress(done, total)
        finally:
            writer.close()
    return config


def _write_metadata(w: GGUFWriter, c: ModelConfig, preset: str, file_type: LlamaFileType, seed: int) -> None:
    w.add_type("model")
    w.add_name(f"hyprof {preset} (random weights, seed {seed})")
    w.add_file_type(int(file_type))
    w.add_quantization_version(2)
    for key, value, vtype in arches.metadata(c):
        w.add_key_value(key, value, vtype)
    tokens, types, merges = vocabulary(c.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(_BOS))
    w.add_eos_token_id(tokens.index(_EOS))
    w.add_pad_token_id(tokens.index(_EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
