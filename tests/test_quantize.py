"""hybrid/quantize.py through gguf-py's dequantisation, and the mixes `model make` writes.

Each quantiser is held to the error its format allows, computed from the data (not
from the stored scales): half a step of each group, where the step is the group's
range over its levels plus what rounding the scales up to the super-block's grid
adds (one grid unit, a 63rd or 127th of the block's largest step). IQ4's levels are
not uniform: half the widest gap, 14 of 127 at the positive end.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, LlamaFileType
from gguf.quants import dequantize

from hybrid.make_model import make_model, preset_config, tensor_plan
from hybrid.quantize import quantize
from profiler.gguf_file import read_gguf

SLACK = 1.01      # the fp16 scales are nudged up by 2**-10 before rounding


def data(rng: np.random.Generator, n_rows: int = 48, n_cols: int = 1024) -> np.ndarray:
    """Rows of different magnitudes, one all zero, one all positive, one with a single outlier."""
    x = (rng.standard_normal((n_rows, n_cols)) * rng.uniform(1e-3, 5, (n_rows, 1))).astype(np.float32)
    x[0] = 0
    x[1] = np.abs(x[1])
    x[2, 7] = 40
    return x


def groups(x: np.ndarray, block: int, group: int) -> np.ndarray:
    return x.reshape(-1, block // group, group)


def affine_bound(x: np.ndarray, n_levels: int) -> np.ndarray:
    """Q4_K/Q5_K: per element, half of its group's step (range with the min rounded to the
    block's grid of mins, over the levels) plus the scale grid's unit."""
    g = groups(x.astype(np.float64), 256, 32)
    neg_min = np.maximum(-g.min(-1), 0)
    offset = neg_min + neg_min.max(-1, keepdims=True) / 63 * SLACK
    step = (g.max(-1) + offset) / (n_levels - 1)
    step = step + step.max(-1, keepdims=True) / 63 * SLACK
    return np.broadcast_to((step / 2 * SLACK)[..., None], g.shape).reshape(x.shape)


def symmetric_bound(x: np.ndarray, block: int, group: int, half_levels: float, grid: int, half_gap: float):
    """Q6_K, IQ4_NL, IQ4_XS: a group's step is its largest magnitude over `half_levels`, plus
    the scale grid's unit (`grid` 0: the scale is the fp16 itself); the error is `half_gap` steps."""
    g = groups(x.astype(np.float64), block, group)
    step = np.abs(g).max(-1) / half_levels
    if grid:
        step = step + step.max(-1, keepdims=True) / grid * SLACK
    return np.broadcast_to((step * half_gap * SLACK)[..., None], g.shape).reshape(x.shape)


BOUNDS = {
    T.Q4_K: lambda x: affine_bound(x, 16),
    T.Q5_K: lambda x: affine_bound(x, 32),
    T.Q6_K: lambda x: symmetric_bound(x, 256, 16, 31, 127, 0.5),
    T.IQ4_NL: lambda x: symmetric_bound(x, 32, 32, 127, 0, 14),
    T.IQ4_XS: lambda x: symmetric_bound(x, 256, 32, 127, 31, 14),
}
# root-mean-square error over the data's standard deviation, measured 0.080, 0.039, 0.020, 0.080, 0.082
# on normal rows: a mis-packed field gives errors of the order of the values
RMS = {T.Q4_K: 0.1, T.Q5_K: 0.05, T.Q6_K: 0.025, T.IQ4_NL: 0.1, T.IQ4_XS: 0.1}


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_round_trip_through_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    x = data(rng)
    stored = quantize(x, qtype)
    assert stored.dtype == np.uint8 and stored.shape == (48, 1024 // (32 if qtype == T.IQ4_NL else 256) * {
        T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210, T.IQ4_NL: 18, T.IQ4_XS: 136}[qtype])
    back = dequantize(stored, qtype)
    err = np.abs(back.astype(np.float64) - x)
    bound = BOUNDS[qtype](x)
    worst = np.unravel_index(np.argmax(err - bound), x.shape)
    assert np.all(err <= bound), f"at {worst}: error {err[worst]:.3g} > bound {bound[worst]:.3g}"
    assert np.all(back[0] == 0)
    normal = x[3:]
    rms = np.sqrt(np.mean((back[3:] - normal) ** 2, axis=1)) / normal.std(axis=1)
    assert rms.max() < RMS[qtype]


def test_gguf_py_types_pass_through():
    x = data(np.random.default_rng(1))
    for qtype in (T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_0):
        from gguf.quants import quantize as gguf_quantize
        np.testing.assert_array_equal(quantize(x, qtype), gguf_quantize(x, qtype))


# DeepSeek-V2-Lite, 27 layers, worked by hand from llama.cpp's src/llama-quant.cpp: the layers
# use_more_bits picks are i < 27/8 = 3, i >= 7*27/8 = 23, and (i - 3) % 3 == 2
MORE_BITS_27 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26}


def test_q4_k_m_plan_of_deepseek_v2_lite():
    plan = tensor_plan(preset_config("deepseek-v2-lite"), "q4_k_m")
    types = {name: t for name, (_, t) in plan.items()}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.0.ffn_down.weight"] == T.Q8_0            # Q6_K, but 10944 = 42.75 blocks of 256
    for i in range(1, 27):
        more = i in MORE_BITS_27
        assert types[f"blk.{i}.ffn_down_exps.weight"] == (T.Q8_0 if more else T.Q5_0), i   # 1408 wide
        assert types[f"blk.{i}.ffn_down_shexp.weight"] == (T.Q6_K if more else T.Q4_K), i  # 2816 wide
        assert types[f"blk.{i}.attn_kv_b.weight"] == (T.Q6_K if more else T.Q4_K), i
        assert types[f"blk.{i}.ffn_up_exps.weight"] == types[f"blk.{i}.attn_output.weight"] == T.Q4_K
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == types[f"blk.{i}.attn_norm.weight"] == T.F32
    assert sum(types[f"blk.{i}.attn_kv_b.weight"] == T.Q6_K for i in range(27)) == 13


def test_iq4_xs_and_q6_k_plans_of_deepseek_v2_lite():
    iq4 = {name: t for name, (_, t) in tensor_plan(preset_config("deepseek-v2-lite"), "iq4_xs").items()}
    assert iq4["output.weight"] == T.Q6_K
    for i in range(1, 27):        # the first eighth's ffn_down takes Q5_K, which 1408 turns into Q5_1
        assert iq4[f"blk.{i}.ffn_down_exps.weight"] == (T.Q5_1 if i < 3 else T.IQ4_NL), i
        assert iq4[f"blk.{i}.ffn_down_shexp.weight"] == (T.Q5_K if i < 3 else T.IQ4_XS), i
        assert iq4[f"blk.{i}.attn_kv_b.weight"] == T.IQ4_XS        # no GQA in deepseek2's kv_b form
    q6 = {name: t for name, (_, t) in tensor_plan(preset_config("deepseek-v2-lite"), "q6_k").items()}
    assert {t for n, t in q6.items() if "exps" in n} == {T.Q6_K, T.Q8_0}
    assert q6["blk.5.ffn_down_exps.weight"] == T.Q8_0 and q6["blk.5.ffn_up_exps.weight"] == T.Q6_K


def test_eight_expert_rules_and_gqa():
    """Models of exactly 8 experts (the tiny presets) get llama.cpp's Mixtral rules: attn_v and
    attn_k Q8_0, attn_output Q5_K in Q4_K_M; Qwen3-30B-A3B's GQA of 8 gives IQ4_XS's attn_v Q5_K."""
    wide = preset_config("qwen3-tiny", overrides=dict(n_embd=256, n_ff_exp=256))
    types = {name: t for name, (_, t) in tensor_plan(wide, "q4_k_m").items()}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == T.Q8_0
    assert types["blk.0.attn_q.weight"] == T.Q4_K
    assert types["blk.0.attn_output.weight"] == T.Q5_1          # Q5_K on 128-wide rows (Q4_K's fallback: Q5_0)
    qwen = {name: t for name, (_, t) in tensor_plan(preset_config("qwen3-30b-a3b"), "iq4_xs").items()}
    assert qwen["blk.10.attn_v.weight"] == T.Q5_K and qwen["blk.10.attn_k.weight"] == T.IQ4_XS
    assert qwen["blk.10.ffn_down_exps.weight"] == T.IQ4_XS and qwen["blk.5.ffn_down_exps.weight"] == T.Q5_K


@pytest.mark.parametrize("qtype,file_type", [("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M), ("iq4_xs", LlamaFileType.MOSTLY_IQ4_XS)])
def test_made_file_has_the_plan_and_the_file_type(tmp_path, qtype, file_type):
    path = tmp_path / f"{qtype}.gguf"
    config = make_model(path, "tiny", qtype, overrides=dict(n_embd=256, n_ff_exp=96))
    f = read_gguf(path)
    assert {t.name: t.ggml_type for t in f.tensors} == {n: t for n, (_, t) in tensor_plan(config, qtype).items()}
    assert f.fields["general.file_type"] == int(file_type)
