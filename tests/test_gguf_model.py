"""Made GGUF files load back as written, and every bad file is one clear UserError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

from hybrid.gguf_model import load_model
from hybrid.make_model import PRESETS, preset_config, tensor_plan, vocabulary, weight
from profiler.errors import UserError

VARIANTS = {
    "standard attention": dict(q_lora_rank=0),
    "k_b/v_b layout": dict(kv_layout="k_b_v_b"),
    "sigmoid gating": dict(expert_gating_func=2, expert_weights_norm=True, expert_weights_scale=2.5),
    "group-limited routing": dict(n_expert_groups=4, n_group_used=2),
    "yarn": dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_orig_ctx=512, rope_yarn_log_mul=0.1,
                 rope_yarn_beta_fast=16.0),
}


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "f16", "bf16", "f32"])
def test_round_trip_values(make_gguf, qtype):
    """Same hyperparameters, names, shapes, types, and values equal to quantize(weight) decoded."""
    path = make_gguf("tiny", qtype)
    model = load_model(path)
    config = preset_config("tiny")
    assert model.config == config
    plan = tensor_plan(config, qtype)
    assert list(model.tensors) == list(plan)
    for name, t in model.tensors.items():
        shape, ggml_type = plan[name]
        assert (t.shape, t.ggml_type) == (shape, ggml_type), name
        written = quants.quantize(weight(name, shape, config, seed=0), ggml_type)
        expected = quants.dequantize(written, ggml_type).reshape(shape)
        np.testing.assert_array_equal(t.dequantize(), expected, err_msg=name)
    assert model.ftype == qtype.upper()
    assert model.tensor_data_bytes <= model.size_bytes
    assert model.n_params == sum(int(np.prod(s)) for s, _ in plan.values())


def test_quantized_values_stay_close_to_the_floats(make_gguf):
    model = load_model(make_gguf("tiny", "q4_0"))
    t = model.tensors["blk.1.ffn_up_exps.weight"]
    exact = weight(t.name, t.shape, model.config, seed=0)
    err = np.abs(t.dequantize() - exact).max()
    assert 0 < err < 0.2 * np.abs(exact).max()


def test_tensor_data_is_memory_mapped_not_copied(tiny_gguf):
    model = load_model(tiny_gguf)
    for t in model.tensors.values():
        base = t.data
        while not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        assert isinstance(base, np.memmap), t.name
        assert not t.data.flags.owndata


def test_data_layout_per_type(make_gguf):
    q4 = load_model(make_gguf("tiny", "q4_0")).tensors["blk.1.ffn_down_exps.weight"]
    assert q4.shape == (8, 64, 32)                       # (n_expert, n_embd, n_ff_exp)
    assert q4.data.dtype == np.uint8 and q4.data.shape == (8, 64, 18)   # one Q4_0 block per row
    assert q4.n_bytes == 8 * 64 * 18
    bf = load_model(make_gguf("tiny", "bf16")).tensors["blk.1.ffn_gate_exps.weight"]
    assert bf.data.dtype == np.uint16 and bf.data.shape == bf.shape == (8, 32, 64)
    f16 = load_model(make_gguf("tiny", "f16")).tensors["output.weight"]
    assert f16.data.dtype == np.float16 and f16.data.shape == (512, 64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_round_trip(make_gguf, variant):
    overrides = VARIANTS[variant]
    model = load_model(make_gguf("tiny", "q8_0", **overrides))
    assert model.config == preset_config("tiny", overrides=overrides)
    names = set(model.tensors)
    if variant == "standard attention":
        assert "blk.0.attn_q.weight" in names and "blk.0.attn_q_a.weight" not in names
    if variant == "k_b/v_b layout":
        assert model.config.n_head_kv == 1
        assert model.tensors["blk.0.attn_k_b.weight"].shape == (4, 32, 32)    # (n_head, kv_lora, nope)
        assert model.tensors["blk.0.attn_v_b.weight"].shape == (4, 32, 32)    # (n_head, v, kv_lora)
        assert model.metadata["deepseek2.attention.key_length"] == 32 + 16
        assert "blk.0.attn_kv_b.weight" not in names
    if variant == "sigmoid gating":
        assert model.tensors["blk.1.exp_probs_b.bias"].ggml_type == T.F32
    else:
        assert "blk.1.exp_probs_b.bias" not in names


def test_layer_count_and_lite_keys(make_gguf):
    model = load_model(make_gguf("tiny", "q4_0", n_layers=5))
    assert model.config.n_layer == 5 and "blk.4.ffn_up_exps.weight" in model.tensors
    assert model.metadata["deepseek2.attention.q_lora_rank"] == 32


def test_presets_match_deepseek_v2_lite():
    lite = preset_config("deepseek-v2-lite")
    assert (lite.n_layer, lite.n_embd, lite.n_head, lite.kv_lora_rank, lite.q_lora_rank) == (27, 2048, 16, 512, 0)
    assert (lite.n_rot, lite.n_embd_head_k - lite.n_rot, lite.n_embd_head_v) == (64, 128, 128)
    assert (lite.n_expert, lite.n_ff_exp, lite.n_expert_used, lite.n_expert_shared) == (64, 1408, 6, 2)
    assert (lite.n_layer_dense_lead, lite.n_ff, lite.n_vocab) == (1, 10944, 102400)
    mini = preset_config("deepseek-v2-lite-mini")
    assert dataclasses.replace(mini, n_layer=27) == lite
    tiny = preset_config("tiny")
    assert tiny.q_lora_rank > 0 and tiny.n_layer == 3 and tiny.n_expert == 8 and tiny.n_expert_used == 2
    assert {"tiny", "deepseek-v2-lite-mini", "deepseek-v2-lite"} <= set(PRESETS)
    n_params = sum(int(np.prod(s)) for s, _ in tensor_plan(lite, "q4_0").values())
    assert 15.5e9 < n_params < 16.0e9                    # DeepSeek-V2-Lite: 15.7 B


def test_presets_match_qwen3_30b_a3b(make_gguf):
    full = preset_config("qwen3-30b-a3b")
    assert (full.arch, full.n_layer, full.n_embd, full.n_head, full.n_head_kv, full.n_embd_head_k) == \
        ("qwen3moe", 48, 2048, 32, 4, 128)
    assert (full.n_expert, full.n_ff_exp, full.n_expert_used, full.rope_freq_base, full.n_vocab) == \
        (128, 768, 8, 1e6, 151936)
    assert dataclasses.replace(preset_config("qwen3-30b-a3b-mini"), n_layer=48) == full
    n_params = sum(int(np.prod(s)) for s, _ in tensor_plan(full, "q4_0").values())
    assert 30.0e9 < n_params < 31.0e9                    # Qwen3-30B-A3B: 30.5 B
    made = load_model(make_gguf("qwen3-tiny", "q8_0")).config
    assert made == preset_config("qwen3-tiny")            # every key written and read back


def test_vocabulary_is_byte_level_bpe():
    tokens, types, merges = vocabulary(1000)
    assert len(tokens) == len(types) == 1000 == len(set(tokens))
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"
    for m in merges:                                      # every merge joins two existing tokens
        left, right = m.split(" ")
        assert left in tokens and right in tokens and left + right in tokens


@pytest.mark.parametrize("overrides, message", [
    (dict(kv_layout="mla"), "kv_layout"),
    (dict(expert_gating_func=3), "expert_gating_func"),
    (dict(n_expert_groups=3, n_group_used=1), "expert groups"),
    (dict(n_expert_used=9), "expert_used_count 9"),
    (dict(rope_scaling_type="ntk"), "rope.scaling.type ntk"),
    (dict(no_such_field=1), "no_such_field"),
])
def test_invalid_overrides(overrides, message):
    with pytest.raises(UserError, match=message):
        preset_config("tiny", overrides=overrides)


@pytest.mark.parametrize("n_layers", [0, 1, 513, 26, 27])
def test_layers_out_of_range(n_layers):
    """tiny uses q-LoRA, which llama.cpp ignores for 26 or 27 layers."""
    with pytest.raises(UserError, match="layers"):
        preset_config("tiny", n_layers)


def test_unknown_preset():
    with pytest.raises(UserError, match="available: tiny"):
        preset_config("gpt-5")


# ---- bad files -----------------------------------------------------------------------------

def copy_gguf(src: Path, dst: Path, arch: str | None = None, drop_tensors=(), drop_keys=(), set_keys=None) -> Path:
    """Rewrite a GGUF with edits, through gguf-py only (independent of make_model)."""
    reader = GGUFReader(src)
    meta_arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch or meta_arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, (value, vtype) in (set_keys or {}).items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name not in drop_tensors:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_copy_gguf_itself_round_trips(tiny_gguf, tmp_path):
    copy = load_model(copy_gguf(tiny_gguf, tmp_path / "copy.gguf"))
    assert copy.config == load_model(tiny_gguf).config
    assert list(copy.tensors) == list(load_model(tiny_gguf).tensors)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am text\n")
    with pytest.raises(UserError, match=r"notes.gguf: not a GGUF file"):
        load_model(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(empty)
    with pytest.raises(UserError, match="no such file"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(UserError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError, match=r"cut.gguf: truncated"):
        load_model(p)


def test_unsupported_architecture(tiny_gguf, tmp_path):
    p = copy_gguf(tiny_gguf, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(UserError, match=r"unsupported architecture 'llama' \(supported: deepseek2, qwen3moe\)"):
        load_model(p)


def test_unsupported_tensor_type(tiny_gguf, tmp_path):
    """I32 has F32's 4 bytes a value, so retyping the router keeps the file consistent."""
    p = tmp_path / "i32.gguf"
    p.write_bytes(tiny_gguf.read_bytes())
    reader = GGUFReader(p, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_gate_inp.weight")
    assert t.tensor_type == T.F32
    t.field.parts[4][0] = T.I32
    reader.data.flush()
    del reader
    with pytest.raises(UserError, match=r"tensor blk.2.ffn_gate_inp.weight has type I32, which hyprof cannot"):
        load_model(p)


def test_missing_tensor(tiny_gguf, tmp_path):
    p = copy_gguf(tiny_gguf, tmp_path / "holey.gguf", drop_tensors={"blk.1.ffn_down_exps.weight"})
    with pytest.raises(UserError, match=r"missing tensor blk.1.ffn_down_exps.weight"):
        load_model(p)


def test_missing_metadata_key(tiny_gguf, tmp_path):
    p = copy_gguf(tiny_gguf, tmp_path / "nokey.gguf", drop_keys={"deepseek2.attention.kv_lora_rank"})
    with pytest.raises(UserError, match=r"missing metadata key deepseek2.attention.kv_lora_rank"):
        load_model(p)


def test_misshapen_tensor(tiny_gguf, tmp_path):
    p = copy_gguf(tiny_gguf, tmp_path / "shape.gguf",
                  set_keys={"deepseek2.expert_feed_forward_length": (64, GGUFValueType.UINT32)})
    with pytest.raises(UserError, match=r"tensor blk.1.ffn_gate_exps.weight has shape \(8, 32, 64\), expected"):
        load_model(p)


def test_vocab_size_must_match_embedding(tiny_gguf, tmp_path):
    tokens = load_model(tiny_gguf).vocab
    p = copy_gguf(tiny_gguf, tmp_path / "vocab.gguf", drop_keys={"tokenizer.ggml.tokens"},
                  set_keys={"tokenizer.ggml.tokens": (tokens[:300], GGUFValueType.ARRAY)})
    with pytest.raises(UserError, match="300 tokens but token_embd.weight has 512 rows"):
        load_model(p)
