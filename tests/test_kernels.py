"""The native kernels against a float64 NumPy reference: the types of 32-value blocks (Q4_0,
Q5_0, Q5_1, Q8_0, IQ4_NL, activations in q8_32 rows) and of 256-value blocks (Q4_K, Q5_K, Q6_K,
IQ4_XS, activations in q8_K rows).

The weights are random raw GGUF blocks (every nibble / int8 value / high bit / 6-bit scale,
including Q8_0's -128, negative and subnormal fp16 scales and mins), dequantised by gguf-py, the
independent reference. The kernels quantise the activation to 8 bits per
block (32 values, or 256 for the K-quants and IQ4_XS), so two references are used:
- the exact one: the activation as the kernel rounded it (decoded from the q8
  rows), where only float32 summation error remains (bounded by 1e-5 of
  sum |w x|, since at most ~100 float32 partial sums of 2^-24 error each);
- the honest one: the true float activation, where the error is bounded by
  rounding: |x - x_q| <= d/2 per value, d = amax(activation block)/127, so
  |y - W x| <= sum_i |W_ji| d_i / 2 (plus the float32 term).
Every SIMD path is compared with the scalar one, which is always correct.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from hybrid import cpu_kernels as ck

TYPES = {ck.Q4_0: T.Q4_0, ck.Q5_0: T.Q5_0, ck.Q5_1: T.Q5_1, ck.Q8_0: T.Q8_0, ck.IQ4_NL: T.IQ4_NL,
         ck.Q4_K: T.Q4_K, ck.Q5_K: T.Q5_K, ck.Q6_K: T.Q6_K, ck.IQ4_XS: T.IQ4_XS}
R16_TYPES = [t for t in TYPES if ck.TRAITS[t].r16]
K_R16_TYPES = [t for t in R16_TYPES if ck.TRAITS[t].activation == "q8_K"]
SCALES = np.array([0.01, -0.02, 0.5, 3e-6, -1e-7, 1.0], np.float16)  # incl. subnormal fp16
FP16_AT = {ck.Q5_1: (0, 2), ck.Q4_K: (0, 2), ck.Q5_K: (0, 2), ck.Q6_K: (208,)}   # d (and m, dmin); others: d at 0
# bytes [start, end) of each type's quants and the byte that makes its most negative weight (Q5_1's,
# Q4_K's and Q5_K's: the largest, their weights being d q + m, d sc q - dmin m)
EXTREME = {ck.Q4_0: (2, 18, 0x00), ck.Q5_0: (2, 22, 0x00), ck.Q5_1: (4, 24, 0xff), ck.Q8_0: (2, 34, 0x80),
           ck.IQ4_NL: (2, 18, 0x00), ck.Q4_K: (16, 144, 0xff), ck.Q5_K: (16, 176, 0xff), ck.Q6_K: (0, 192, 0x00),
           ck.IQ4_XS: (8, 136, 0x00)}


def width(ggml_type, n_in):
    """A row width of the same block count as n_in has in blocks of 32, in the type's blocks."""
    return n_in // 32 * ck.TRAITS[ggml_type].block_values


def raw_weights(rng, shape, ggml_type):
    """Random GGUF blocks: uniform bytes, fp16 scales (and mins) drawn from SCALES."""
    *lead, n_in = shape
    bb, bv = ck.TRAITS[ggml_type].block_bytes, ck.TRAITS[ggml_type].block_values
    raw = rng.integers(0, 256, size=(*lead, n_in // bv, bb), dtype=np.uint8)
    for at in FP16_AT.get(ggml_type, (0,)):
        raw[..., at:at + 2] = rng.choice(SCALES, size=(*lead, n_in // bv, 1)).view(np.uint8)
    return raw.reshape(*lead, n_in // bv * bb)


def quantize(x, ggml_type, path=None):
    return ck.quantize_activations(x, path=path, ggml_type=ggml_type)


def decode(xq, n_in, ggml_type):
    """Activation rows of the type's format -> the float64 values the kernels multiply by."""
    if ck.TRAITS[ggml_type].activation == "q8_32":
        return decode_q8(xq, n_in)
    b = xq.reshape(xq.shape[0], -1, 320)
    d = b[:, :, 288:292].copy().view(np.float32).astype(np.float64)
    return (b[:, :, :256].view(np.int8) * d).reshape(len(b), -1)


def act_block(ggml_type):
    """Values per activation block: 32, or 256 (q8_K)."""
    return 32 if ck.TRAITS[ggml_type].activation == "q8_32" else 256


def dequant(raw, ggml_type):
    return dequantize(raw, TYPES[ggml_type]).astype(np.float64)


def activations(rng, n, n_in):
    x = rng.standard_normal((n, n_in)).astype(np.float32) * rng.choice([1e-3, 1.0, 30.0], size=(n, 1))
    x[:, 32:64] = 0.0 if n_in >= 64 else x[:, 32:64]          # an all-zero block: scale 0 ...
    x[:, 256:512] = 0.0 if n_in >= 768 else x[:, 256:512]     # ... in q8_K rows too
    return x.astype(np.float32)


def decode_q8(xq, n_in):
    """q8 rows -> the float64 activation the kernels multiply by (layout in hybrid/kernels/kernels.h)."""
    g = xq.reshape(xq.shape[0], -1, 256)
    lo = g[:, :, :64].view(np.int8).reshape(len(g), -1, 4, 16)
    hi = g[:, :, 64:128].view(np.int8).reshape(len(g), -1, 4, 16)
    d = g[:, :, 128:192].copy().view(np.float32).reshape(len(g), -1, 4, 4)[..., :1]
    q = np.concatenate([lo, hi], axis=-1).astype(np.float64)        # [n, groups, 4, 32]
    return (q * d).reshape(len(g), -1)[:, :n_in]


def exact_tolerance(w, x):
    return 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.mark.parametrize("ggml_type", list(TYPES))
@pytest.mark.parametrize("n_out,n_in,n_tok", [(1, 32, 1), (37, 96, 5), (8, 160, 4), (19, 2048 + 96, 9), (3, 1408, 2)])
def test_mul_mat_matches_float64_reference(ggml_type, n_out, n_in, n_tok):
    rng = np.random.default_rng(n_out * n_in + n_tok)
    n_in, blk = width(ggml_type, n_in), act_block(ggml_type)
    raw, x = raw_weights(rng, (n_out, n_in), ggml_type), activations(rng, n_tok, n_in)
    w = dequant(raw, ggml_type)
    xq = quantize(x, ggml_type)
    for path in ck.paths():
        out = np.full((n_tok, n_out), np.nan, np.float32)
        ck.mul_mat(raw, ggml_type, xq, out, path=path)
        xr = decode(xq, n_in, ggml_type)
        assert np.all(np.abs(out - xr @ w.T) <= exact_tolerance(w, xr)), path
        d = np.repeat(np.abs(x.reshape(n_tok, -1, blk)).max(-1) / 127, blk, axis=-1)
        bound = (d / 2) @ np.abs(w).T * (1 + 1e-5) + exact_tolerance(w, x)
        assert np.all(np.abs(out - x.astype(np.float64) @ w.T) <= bound), path


@pytest.mark.parametrize("path", ck.paths())
def test_quantize_activations_rounds_each_block_to_nearest(path):
    rng = np.random.default_rng(1)
    x = activations(rng, 3, 224)                                      # 7 blocks: a padded group
    x[0, :32] = np.r_[127.0, np.arange(31) - 15.5]                   # d = 1: exact .5 ties, rounded half to even
    xq = ck.quantize_activations(x, path=path)
    assert xq.shape == (3, 2 * 256)
    blocks = x.reshape(3, -1, 32)
    d = (np.abs(blocks).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    np.testing.assert_array_equal(decode_q8(xq, 224), (q * d.astype(np.float64)).reshape(3, -1))
    sums = xq.reshape(3, -1, 256)[:, :, 192:].copy().view(np.int32).reshape(3, -1, 4, 4)
    np.testing.assert_array_equal(sums[..., 0].reshape(3, -1)[:, :7], -8 * q.sum(-1))
    np.testing.assert_array_equal(sums[..., 1].reshape(3, -1)[:, :7], -128 * q.sum(-1))
    dsums = sums[..., 2].copy().view(np.float32).reshape(3, -1)[:, :7]
    np.testing.assert_array_equal(dsums, (d[..., 0] * q.sum(-1).astype(np.float32)).astype(np.float32))
    assert not sums[..., 3].any() and not sums[:, 1, 3:].any()
    assert not xq.reshape(3, -1, 256)[:, 1, 3 * 16:64].any()          # the pad block is zero


@pytest.mark.parametrize("path", ck.paths())
def test_q8_K_rows_round_each_256_block_to_nearest_with_sums_of_16(path):
    rng = np.random.default_rng(13)
    x = activations(rng, 3, 768)
    x[0, :256] = np.r_[127.0, np.arange(255) % 64 - 31.5]            # d = 1: exact .5 ties, rounded half to even
    xq = quantize(x, ck.Q4_K, path=path)
    assert xq.shape == (3, 3 * 320) and ck.q8_row_bytes(768, ck.Q4_K) == 3 * 320
    blocks = x.reshape(3, -1, 256)
    d = (np.abs(blocks).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    np.testing.assert_array_equal(decode(xq, 768, ck.Q4_K), (q * d.astype(np.float64)).reshape(3, -1))
    b = xq.reshape(3, -1, 320)
    np.testing.assert_array_equal(b[:, :, 256:288].copy().view(np.int16), q.reshape(3, 3, 16, 16).sum(-1))
    assert not b[:, :, 292:].any() and not b[:, 1, :256].any()         # the all-zero block: d 0, values 0


@pytest.mark.parametrize("ggml_type", list(TYPES))
def test_simd_paths_agree_with_scalar(ggml_type):
    rng = np.random.default_rng(2)
    n_in = width(ggml_type, 2048 + 160)
    raw, x = raw_weights(rng, (64, n_in), ggml_type), activations(rng, 7, n_in)
    xq = quantize(x, ggml_type)
    ref = np.zeros((7, 64), np.float32)
    ck.mul_mat(raw, ggml_type, xq, ref, path="scalar")
    tol = exact_tolerance(dequant(raw, ggml_type), decode(xq, n_in, ggml_type))
    for path in ck.paths()[1:]:
        out = np.zeros_like(ref)
        ck.mul_mat(raw, ggml_type, xq, out, path=path)
        assert np.all(np.abs(out - ref) <= 2 * tol), path


@pytest.mark.parametrize("ggml_type", list(TYPES))
@pytest.mark.parametrize("n_tok", [3, 4, 8, 9, 17])
def test_prompt_kernel_tiles_and_row_blocks_match_scalar(ggml_type, n_tok):
    """From 4 tokens on (R16_MIN_TOKENS), AVX2 and AVX-512 take the interleaved 16-row kernel: token
    counts off its 8-token tile, row counts off 16 (a short last block), block counts off
    the 4-block activation group, and the extreme products must all agree."""
    rng = np.random.default_rng(10 + n_tok)
    for n_out, n_in in [(1, 32), (15, 96), (16, 160), (33, 416), (50, 1408)]:
        n_in = width(ggml_type, n_in)
        raw, x = raw_weights(rng, (n_out, n_in), ggml_type), activations(rng, n_tok, n_in)
        blocks = raw[:2].reshape(min(n_out, 2), -1, ck.TRAITS[ggml_type].block_bytes)
        start, end, byte = EXTREME[ggml_type]
        blocks[:, :, start:end] = byte                                       # all extreme weights ...
        for at in FP16_AT.get(ggml_type, (0,)):
            blocks[:, :, at:at + 2] = SCALES[-1:].view(np.uint8)
        x[0] = np.abs(x[0]) + 1.0                                            # ... times positive activations
        xq = quantize(x, ggml_type)
        xr, w = decode(xq, n_in, ggml_type), dequant(raw, ggml_type)
        ref = np.zeros((n_tok, n_out), np.float32)
        ck.mul_mat(raw, ggml_type, xq, ref, path="scalar")
        assert np.all(np.abs(ref - xr @ w.T) <= exact_tolerance(w, xr))
        for path in ck.paths()[1:]:
            out = np.full_like(ref, np.nan)
            ck.mul_mat(raw, ggml_type, xq, out, path=path)
            assert np.all(np.abs(out - ref) <= 2 * exact_tolerance(w, xr)), (path, n_out, n_in)


@pytest.mark.parametrize("ggml_type", list(TYPES))
def test_fused_gate_up_on_the_prompt_kernel(ggml_type):
    """Fused gate+up with every token on the same experts (the prompt kernel's case), odd rows."""
    rng = np.random.default_rng(11)
    n_in = width(ggml_type, 224)
    gate, up = (raw_weights(rng, (3, 37, n_in), ggml_type) for _ in range(2))
    ids = np.tile(np.array([[2, 0]], np.int32), (11, 1))
    xq = quantize(activations(rng, 11, n_in), ggml_type)
    xr = decode(xq, n_in, ggml_type)
    for path in ck.paths():
        h = np.zeros((11, 2, 37), np.float32)
        ck.mul_mat_id(gate, ggml_type, xq, ids, h, w_up=up, path=path)
        for k, e in enumerate(ids[0]):
            g64, u64 = (xr @ dequant(w[e], ggml_type).T for w in (gate, up))
            want = g64 * 0.5 * (1 + np.tanh(g64 / 2)) * u64
            np.testing.assert_allclose(h[:, k], want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=path)


def test_row_ranges_write_only_their_rows_and_compose():
    rng = np.random.default_rng(3)
    raw, x = raw_weights(rng, (41, 288), ck.Q4_0), activations(rng, 6, 288)
    xq = ck.quantize_activations(x)
    full = np.zeros((6, 41), np.float32)
    ck.mul_mat(raw, ck.Q4_0, xq, full)
    part = np.full_like(full, np.nan)
    ck.mul_mat(raw, ck.Q4_0, xq, part, 7, 20)
    assert np.isnan(part[:, :7]).all() and np.isnan(part[:, 20:]).all()
    np.testing.assert_array_equal(part[:, 7:20], full[:, 7:20])
    threads = [threading.Thread(target=ck.mul_mat, args=(raw, ck.Q4_0, xq, part, r0, r1)) for r0, r1 in [(0, 7), (20, 41)]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    np.testing.assert_array_equal(part, full)


def moe_case(rng, ggml_type, n_expert=9, n_out=21, n_in=160, n_tok=7, n_used=3):
    raw = raw_weights(rng, (n_expert, n_out, n_in), ggml_type)
    ids = np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    return raw, ids, activations(rng, n_tok, n_in)


@pytest.mark.parametrize("ggml_type", list(TYPES))
def test_mul_mat_id_matches_per_slot_reference(ggml_type):
    rng = np.random.default_rng(4)
    raw, ids, x = moe_case(rng, ggml_type, n_in=width(ggml_type, 160))
    w = dequant(raw, ggml_type)                                        # [n_expert, n_out, n_in]
    n_tok, n_used = ids.shape
    per_slot = activations(rng, n_tok * n_used, x.shape[1])            # the down form: one input per slot
    for xs, rows in [(x, lambda t, k: t), (per_slot, lambda t, k: t * n_used + k)]:
        xq = quantize(xs, ggml_type)
        xr = decode(xq, xs.shape[1], ggml_type)
        for path in ck.paths():
            out = np.full((n_tok, n_used, w.shape[1]), np.nan, np.float32)
            ck.mul_mat_id(raw, ggml_type, xq, ids, out, path=path)
            for t in range(n_tok):
                for k in range(n_used):
                    we, xv = w[ids[t, k]], xr[rows(t, k)][None]
                    ref = (xv @ we.T)[0]
                    assert np.all(np.abs(out[t, k] - ref) <= exact_tolerance(we, xv)[0]), (path, t, k)


def test_mul_mat_id_splits_by_rows_and_experts_compose():
    rng = np.random.default_rng(5)
    raw, ids, x = moe_case(rng, ck.Q4_0)
    xq = ck.quantize_activations(x)
    full = np.zeros((*ids.shape, raw.shape[1]), np.float32)
    ck.mul_mat_id(raw, ck.Q4_0, xq, ids, full)
    n_active = len(np.unique(ids))
    split = np.full_like(full, np.nan)
    for a0, a1 in [(0, 2), (2, n_active)]:                             # by experts ...
        for r0, r1 in [(0, 10), (10, raw.shape[1])]:                   # ... and by rows
            ck.mul_mat_id(raw, ck.Q4_0, xq, ids, split, r0, r1, a0, a1)
    np.testing.assert_array_equal(split, full)
    only = np.full_like(full, np.nan)
    ck.mul_mat_id(raw, ck.Q4_0, xq, ids, only, a0=0, a1=1)             # the lowest used expert alone
    np.testing.assert_array_equal(np.isnan(only).all(-1), ids != ids.min())


def test_fused_gate_up_is_silu_gate_times_up():
    rng = np.random.default_rng(6)
    gate, ids, x = moe_case(rng, ck.Q8_0)
    up = raw_weights(rng, gate.shape[:2] + (160,), ck.Q8_0)
    xq = ck.quantize_activations(x)
    g, u, h = (np.zeros((*ids.shape, gate.shape[1]), np.float32) for _ in range(3))
    ck.mul_mat_id(gate, ck.Q8_0, xq, ids, g)
    ck.mul_mat_id(up, ck.Q8_0, xq, ids, u)
    ck.mul_mat_id(gate, ck.Q8_0, xq, ids, h, w_up=up)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(h, g64 * 0.5 * (1 + np.tanh(g64 / 2)) * u, rtol=1e-5, atol=1e-6 * np.abs(h).max())


def test_bad_arguments_raise_value_errors():
    rng = np.random.default_rng(7)
    raw, ids, x = moe_case(rng, ck.Q4_0)
    xq = ck.quantize_activations(x)
    out = np.zeros((*ids.shape, raw.shape[1]), np.float32)
    with pytest.raises(ValueError, match="row range"):
        ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out, 0, raw.shape[1] + 1)
    with pytest.raises(ValueError, match="outside"):
        ck.mul_mat_id(raw, ck.Q4_0, xq, np.full_like(ids, 9), out)
    with pytest.raises(ValueError, match="out: expected"):
        ck.mul_mat_id(raw, ck.Q4_0, xq, ids, out[:, :1].copy())
    with pytest.raises(ValueError, match="no CPU kernel"):
        ck.mul_mat(raw[0], 3, xq, out)                               # Q4_1: no kernel
    with pytest.raises(ValueError, match="float32"):
        ck.mul_mat(raw[0], ck.Q4_0, xq, out.astype(np.float64))
    with pytest.raises(ValueError, match="whole rows"):
        ck.mul_mat(np.ascontiguousarray(raw[0][:, :-1]), ck.Q4_0, xq, out)
    with pytest.raises(ValueError, match="not available"):
        ck.mul_mat(raw[0], ck.Q4_0, xq, np.zeros((7, 21), np.float32), path="neon")
    with pytest.raises(ValueError, match="multiple of 32"):
        ck.quantize_activations(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="float32 rows or uint8 q8 rows"):
        ck.mul_mat_id(raw, ck.Q4_0, x.astype(np.float64), ids, out)
    with pytest.raises(ValueError, match="whole number of float32 rows"):
        ck.mul_mat_id(raw, ck.Q4_0, x[:, :-1].copy(), ids, out)
    with pytest.raises(ValueError, match="neither"):
        ck.mul_mat_id(raw, ck.Q4_0, x[:-1].copy(), ids, out)
    with pytest.raises(ValueError, match="int32 or int64"):
        ck.mul_mat_id(raw, ck.Q4_0, x, ids.astype(np.float32), out)
    with pytest.raises(ValueError, match="n_expert = n_used = 1"):
        ck._kernels.mul_mat_id(raw, b"", ck.Q4_0, raw.shape[0], 160, x, None, 1, out, 0, 1, 0, 1, -1)


def r16_paths(ggml_type):
    """The paths this CPU runs that read the repacked (R16) layout: scalar everywhere, AVX2 and AVX-512 where present."""
    return [path for path in ck.paths() if path in ck.TRAITS[ggml_type].r16]


def r16_layout(raw, ggml_type):
    """Stored blocks [n_out, row_bytes] -> R16 bytes, written from the layout's description
    (hybrid/kernels/kernels.h) in NumPy: per block of 16 rows and stored block, the 16 values of
    each 16-bit field (row i in lane 4 (i % 4) + i // 4; Q4_K, Q5_K, IQ4_XS: their first two,
    IQ4_XS's scales_h the second; Q6_K: its d, stored last), the 5-bit types' masks (mask k, bit 4p + i: the fifth bit
    of value 4k + i of lane p), then quad k (the block's other bytes, 4 at a time) of every lane (Q8_0 values + 128)."""
    fields = (0, 2) if ggml_type in (ck.Q4_K, ck.Q5_K, ck.IQ4_XS) else FP16_AT.get(ggml_type, (0,))
    bb = ck.TRAITS[ggml_type].block_bytes
    blocks = raw.reshape(-1, 16, raw.shape[-1] // bb, bb).transpose(0, 2, 1, 3)     # [row block, block, row, bytes]
    lanes = blocks[:, :, [4 * (p % 4) + p // 4 for p in range(16)]]                   # lane p: row 4 (p % 4) + p // 4
    parts = [lanes[..., at:at + 2].reshape(*lanes.shape[:2], 32) for at in fields]
    quants = np.delete(lanes, [at + i for at in fields for i in (0, 1)], axis=-1)     # the rest, in stored order
    if ggml_type in (ck.Q5_0, ck.Q5_1):
        bits = np.unpackbits(quants[..., :4], axis=-1, bitorder="little")           # [.., lane, value]
        masks = bits.reshape(*bits.shape[:3], 8, 4).transpose(0, 1, 3, 2, 4)        # [.., k, lane, i]
        parts.append(np.packbits(masks.reshape(*masks.shape[:3], 64), axis=-1, bitorder="little").reshape(
            *lanes.shape[:2], 64))
        quants = quants[..., 4:]
    quads = quants.reshape(*lanes.shape[:3], -1, 4) ^ np.uint8(0x80 if ggml_type == ck.Q8_0 else 0)
    parts.append(quads.transpose(0, 1, 3, 2, 4).reshape(*lanes.shape[:2], -1))
    return np.concatenate(parts, axis=-1).reshape(raw.shape)


@pytest.mark.parametrize("ggml_type", R16_TYPES)
def test_every_r16_path_repacks_to_the_described_layout(ggml_type):
    rng = np.random.default_rng(22)
    w = raw_weights(rng, (48, width(ggml_type, 416)), ggml_type)
    for path in r16_paths(ggml_type):
        np.testing.assert_array_equal(ck.repack(w, ggml_type, path=path), r16_layout(w, ggml_type), err_msg=path)


@pytest.mark.parametrize("ggml_type", R16_TYPES)
def test_scalar_r16_kernel_gives_the_scalar_row_kernels_products(ggml_type):
    """Bit for bit, for any token count: what the R16 tests check on the scalar path holds of its row kernel."""
    rng = np.random.default_rng(23)
    n_in = width(ggml_type, 416)
    w = raw_weights(rng, (2, 32, n_in), ggml_type)
    packed = ck.repack(w, ggml_type, path="scalar")
    for n_tok in (1, 3, 9, 17):
        x, ids = activations(rng, n_tok, n_in), rng.integers(0, 2, size=(n_tok, 1)).astype(np.int32)
        want, got = (np.full((n_tok, 1, 32), np.nan, np.float32) for _ in range(2))
        ck.mul_mat_id(w, ggml_type, x, ids, want, path="scalar")
        ck.mul_mat_id(packed, ggml_type | ck.R16, x, ids, got, path="scalar")
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ggml_type", R16_TYPES)
@pytest.mark.parametrize("n_tok", [1, 2, 5, 9])
def test_repacked_weights_give_the_stored_weights_products(ggml_type, n_tok):
    """R16 blocks read in place give the float64 reference's products, for generation and
    prompts, whole experts and 16-row ranges, plain and fused, on every path that reads them."""
    rng = np.random.default_rng(20 + n_tok)
    n_in = width(ggml_type, 416) if ggml_type not in K_R16_TYPES else 768
    gate, up = (raw_weights(rng, (4, 48, n_in), ggml_type) for _ in range(2))
    ids = np.stack([rng.choice(4, 2, replace=False) for _ in range(n_tok)]).astype(np.int32)
    x = activations(rng, n_tok, n_in)
    xr = decode(quantize(x, ggml_type), n_in, ggml_type)
    for path in r16_paths(ggml_type):
        packed_gate, packed_up = ck.repack(gate, ggml_type, path=path), ck.repack(up, ggml_type, path=path)
        assert packed_gate.shape == gate.shape and not np.array_equal(packed_gate, gate)
        for w_up, packed_w_up in ((None, None), (up, packed_up)):
            for r0, r1 in ((0, 48), (16, 32)):
                got = np.full((n_tok, 2, 48), np.nan, np.float32)
                ck.mul_mat_id(packed_gate, ggml_type | ck.R16, x, ids, got, r0, r1, w_up=packed_w_up, path=path)
                for t, k in np.ndindex(n_tok, 2):
                    g = xr[t] @ dequant(gate[ids[t, k]], ggml_type)[r0:r1].T
                    u = xr[t] @ dequant(up[ids[t, k]], ggml_type)[r0:r1].T
                    want = g if w_up is None else g * 0.5 * (1 + np.tanh(g / 2)) * u         # silu(g) * u
                    np.testing.assert_allclose(got[t, k, r0:r1], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                               err_msg=path)
                assert np.isnan(got[..., :r0]).all() and np.isnan(got[..., r1:]).all()


@pytest.mark.parametrize("ggml_type", R16_TYPES)
def test_one_token_reads_two_row_blocks_in_turn_with_the_same_products(ggml_type):
    """One token takes the range's two halves in one pass (r16_dot2: two streams from DRAM); each
    row's sum is the same instructions in the same order as when it is one of several tokens' rows,
    so bit for bit, for even and odd numbers of row blocks and ranges that do not start at 0."""
    rng = np.random.default_rng(24)
    w = raw_weights(rng, (2, 112, 512), ggml_type)
    for path in r16_paths(ggml_type):
        packed = ck.repack(w, ggml_type, path=path)
        x = activations(rng, 2, 512)
        for r0, r1 in ((0, 112), (0, 64), (16, 112), (32, 48)):
            one, two = np.full((1, 1, 112), np.nan, np.float32), np.full((2, 1, 112), np.nan, np.float32)
            ck.mul_mat_id(packed, ggml_type | ck.R16, x[:1], np.array([[1]], np.int32), one, r0, r1, path=path)
            ck.mul_mat_id(packed, ggml_type | ck.R16, x, np.array([[1], [1]], np.int32), two, r0, r1, path=path)
            np.testing.assert_array_equal(one[0, 0, r0:r1], two[0, 0, r0:r1], err_msg=f"{path} rows {r0}:{r1}")
            assert np.isnan(one[..., :r0]).all() and np.isnan(one[..., r1:]).all()


def test_repacked_weights_refuse_what_they_cannot_do():
    rng = np.random.default_rng(21)
    w = raw_weights(rng, (32, 64), ck.Q4_0)
    packed, x, out = ck.repack(w, ck.Q4_0, path="scalar"), activations(rng, 1, 64), np.zeros((1, 32), np.float32)
    assert ck.repack(w[:24], ck.Q4_0, path="scalar") is None             # not whole blocks of 16 rows
    assert (ck.repack(w, ck.Q4_0) is None) == (ck.available() not in ck.TRAITS[ck.Q4_0].r16_first)   # not at load
    with pytest.raises(ValueError, match="whole blocks of 16"):
        ck.mul_mat(packed, ck.Q4_0 | ck.R16, x, out, 0, 8, path="scalar")
    with pytest.raises(ValueError, match="whole blocks of 16 rows"):
        ck._kernels.repack_r16(w[:24], ck.Q4_0, 64, np.empty_like(w[:24]), ck._kernels.PATH_NAMES.index("scalar"))


# The largest products of the 256-value types: Q4_K's and Q5_K's scale, min and quant bytes all
# 0xff (6-bit scales and mins 63, quants 15 or 31); IQ4_XS's scales 0 (ls - 32 = -32) and nibbles 15
# (level 113, the largest stored + 128); Q6_K's quants 63 and scales -128: the int32 sums over a
# block stay exact only if the kernels' order of scaling and summing does.
K_EXTREME = {ck.Q4_K: ((4, 144, 0xff),), ck.Q5_K: ((4, 176, 0xff),), ck.IQ4_XS: ((2, 8, 0x00), (8, 136, 0xff)),
             ck.Q6_K: ((0, 192, 0xff), (192, 208, 0x80))}


@pytest.mark.parametrize("ggml_type", K_R16_TYPES)
def test_r16_kernels_of_256_value_types_match_scalar_and_reference(ggml_type):
    """On every path with R16 kernels, for every token count of a tile (1..8) and widths of 1, 2, 3
    and 8 blocks (2048: DeepSeek-Lite's n_embd): the products agree with the scalar row kernel
    (float32 summation order aside) and with gguf-py's float64 dequantisation within the
    activation's rounding, extreme blocks in the first rows. A width not a whole number of
    256-value blocks (DeepSeek-Lite's 1408, which llama.cpp stores as Q5_0, Q5_1, Q8_0 or IQ4_NL) is refused."""
    rng = np.random.default_rng(25)
    for n_in in (256, 512, 768, 2048):
        raw = raw_weights(rng, (32, n_in), ggml_type)
        blocks = raw[:3].reshape(3, -1, ck.TRAITS[ggml_type].block_bytes)
        for start, end, byte in K_EXTREME[ggml_type]:
            blocks[:, :, start:end] = byte
        for at in FP16_AT.get(ggml_type, (0,)):
            blocks[:, :, at:at + 2] = SCALES[-1:].view(np.uint8)
        w = dequant(raw, ggml_type)
        packed = {path: ck.repack(raw, ggml_type, path=path) for path in r16_paths(ggml_type)}
        for n_tok in range(1, 9):
            x = activations(rng, n_tok, n_in)
            x[0] = np.abs(x[0]) + 1.0
            xq = quantize(x, ggml_type)
            xr = decode(xq, n_in, ggml_type)
            ref = np.full((n_tok, 32), np.nan, np.float32)
            ck.mul_mat(raw, ggml_type, xq, ref, path="scalar")
            d = np.repeat(np.abs(x.reshape(n_tok, -1, 256)).max(-1) / 127, 256, axis=-1)
            bound = (d / 2) @ np.abs(w).T * (1 + 1e-5) + exact_tolerance(w, x)
            for path, r16 in packed.items():
                out = np.full_like(ref, np.nan)
                ck.mul_mat(r16, ggml_type | ck.R16, xq, out, path=path)
                assert np.all(np.abs(out - ref) <= 2 * exact_tolerance(w, xr)), (path, n_in, n_tok)
                assert np.all(np.abs(out - x.astype(np.float64) @ w.T) <= bound), (path, n_in, n_tok)
    with pytest.raises(ValueError, match="multiple of 256"):
        ck._kernels.repack_r16(np.zeros((16, 792), np.uint8), ggml_type, 1408, np.zeros((16, 792), np.uint8), -1)


def test_traits_agree_with_gguf():
    """The table's blocks are gguf-py's, every path it lists is built, and a type with kernels has scalar ones."""
    from gguf.constants import GGML_QUANT_SIZES
    for ggml_type, traits in ck.TRAITS.items():
        assert traits.name == T(ggml_type).name
        assert (traits.block_values, traits.block_bytes) == GGML_QUANT_SIZES[T(ggml_type)]
        assert set(traits.r16_first) <= set(traits.r16) <= set(traits.kernels) <= set(ck._kernels.PATH_NAMES)
        assert not traits.activation or "scalar" in traits.kernels
        assert not traits.r16 or "scalar" in traits.r16
    assert ck.MATMUL_TYPES == set(TYPES)


def test_float_inputs_and_wide_ids_are_the_same_call():
    """float32 rows are quantised by the call exactly as by quantize_activations, and int64
    ids mean what int32 ids do; the call returns how many experts it read."""
    rng = np.random.default_rng(12)
    raw, ids, x = moe_case(rng, ck.Q8_0)
    want = np.zeros((*ids.shape, raw.shape[1]), np.float32)
    assert ck.mul_mat_id(raw, ck.Q8_0, ck.quantize_activations(x), ids, want) == len(np.unique(ids))
    got = np.full_like(want, np.nan)
    assert ck.mul_mat_id(raw, ck.Q8_0, x, ids.astype(np.int64), got, a0=1, a1=3) == 2
    ranks = np.searchsorted(np.unique(ids), ids)
    mask = (ranks >= 1) & (ranks < 3)
    np.testing.assert_array_equal(got[mask], want[mask])
    assert np.isnan(got[~mask]).all()


def test_env_var_picks_any_path_of_the_set():
    code = "from hybrid import cpu_kernels as ck; print(ck.available())"
    for path in ck.paths():
        env = dict(os.environ, HYPROF_KERNELS=path)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert run.stdout.strip() == path
    env["HYPROF_KERNELS"] = "sve"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "HYPROF_KERNELS=sve" in run.stderr


def test_engine_forms_match_the_direct_calls():
    import torch

    rng = np.random.default_rng(8)
    gate, ids, x = moe_case(rng, ck.Q4_0, n_out=22)
    up = raw_weights(rng, gate.shape[:2] + (160,), ck.Q4_0)
    w = dequant(gate[3], ck.Q4_0)
    y = ck.matmul(torch.from_numpy(gate[3]), ck.Q4_0, torch.from_numpy(x))
    xr = decode_q8(ck.quantize_activations(x), 160)
    assert np.all(np.abs(y.numpy() - xr @ w.T) <= exact_tolerance(w, xr))
    for x_in in (x, ck.quantize_activations(x)):                        # float32 rows or q8 rows
        out = np.full((x.shape[0], 22), np.nan, np.float32)
        ck.mul_mat(gate[3], ck.Q4_0, x_in, out)
        np.testing.assert_array_equal(out, y.numpy())
    for w_up in (None, up):
        want = np.zeros((*ids.shape, 22), np.float32)
        ck.mul_mat_id(gate, ck.Q4_0, ck.quantize_activations(x), ids, want, w_up=w_up)
        dst, n = ck.mul_mat_experts(gate, ck.Q4_0, torch.from_numpy(x), torch.from_numpy(ids).long(),
                                    None if w_up is None else torch.from_numpy(w_up))
        np.testing.assert_array_equal(dst.numpy(), want)
        assert n == len(np.unique(ids))                                 # what the call read
    per_slot = activations(rng, ids.size, 160)                          # the down form: x [T, U, K]
    want = np.zeros((*ids.shape, 22), np.float32)
    ck.mul_mat_id(gate, ck.Q4_0, ck.quantize_activations(per_slot), ids, want)
    dst, _ = ck.mul_mat_experts(gate, ck.Q4_0, torch.from_numpy(per_slot.reshape(*ids.shape, 160)), ids)
    np.testing.assert_array_equal(dst.numpy(), want)


def test_a_bound_form_reads_each_call_what_its_inputs_hold_now():
    """A bound form called again after its inputs' contents changed in place sees the new
    contents, also where its view was a copy (x not contiguous); it notes its call in `out`
    only where the call read x's own memory (a captured program runs that call again); without
    `out` each call returns fresh memory (the graph's result outlives its evaluation)."""
    import torch
    from hybrid import ops

    rng = np.random.default_rng(10)
    gate, ids, x = moe_case(rng, ck.Q4_0, n_out=32)
    w = dequant(gate[3], ck.Q4_0)
    xt = torch.from_numpy(x.copy())
    x_strided = torch.from_numpy(np.asfortranarray(x))             # the same values, not contiguous
    ids_t = torch.from_numpy(ids.copy()).long()
    for x_in in (xt, x_strided):
        matmul, experts = ck.bind_matmul(gate[3], ck.Q4_0), ck.bind_mul_mat_id(gate, ck.Q4_0)
        out, out_id = ops.Out(), ops.Out()
        for _ in range(3):
            xr = decode_q8(ck.quantize_activations(x_in.numpy()), 160)
            y = matmul(x_in, None, None, out)
            assert y is out.tensor and np.all(np.abs(y.numpy() - xr @ w.T) <= exact_tolerance(w, xr))
            assert (out.call is not None) == (x_in is xt)        # a call on a copy of x is not noted
            want = np.zeros((*ids.shape, 32), np.float32)
            ck.mul_mat_id(gate, ck.Q4_0, ck.quantize_activations(x_in.numpy()), ids_t.numpy(), want)
            dst, _ = experts(x_in, ids_t, None, None, out_id)
            np.testing.assert_array_equal(dst.numpy(), want)
            x_in.mul_(-0.5).add_(0.25)                               # new contents, same objects
            ids_t.copy_(ids_t.flip(0))
    fresh = [matmul(xt) for _ in range(2)]
    assert fresh[0] is not fresh[1] and fresh[0].data_ptr() != fresh[1].data_ptr()
    np.testing.assert_array_equal(fresh[0].numpy(), fresh[1].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("ggml_type", list(TYPES))
def test_deepseek_lite_expert_shapes(ggml_type):
    """gate/up [E, 1408, 2048] with x per token, down [E, 2048, 1408] with x per slot."""
    rng = np.random.default_rng(9)
    ids = np.stack([rng.choice(8, 6, replace=False) for _ in range(5)]).astype(np.int32)
    for n_out, n_in, n_x in [(1408, 2048, 5), (2048, 1408, 30)]:
        if n_in % ck.TRAITS[ggml_type].block_values:
            continue                                  # (1408-wide rows: not whole 256-value blocks)
        raw = raw_weights(rng, (8, n_out, n_in), ggml_type)
        w = dequant(raw.reshape(-1, raw.shape[-1]), ggml_type).reshape(8, n_out, n_in)
        xq = quantize(activations(rng, n_x, n_in), ggml_type)
        xr = decode(xq, n_in, ggml_type)
        out = np.zeros((5, 6, n_out), np.float32)
        ck.mul_mat_id(raw, ggml_type, xq, ids, out)
        for t, k in np.ndindex(5, 6):
            xv = xr[t if n_x == 5 else 6 * t + k][None]
            ref = (xv @ w[ids[t, k]].T)[0]
            assert np.all(np.abs(out[t, k] - ref) <= exact_tolerance(w[ids[t, k]], xv)[0])


def test_int8_peak_counts_the_multiply_adds_of_each_path():
    """The benchmark's int8 peak: each SIMD path counts what its loop issued (vpdpbusd: 64 per
    instruction, vpmaddubsw: 32, 12 per round), scalar has none; the rate is a positive figure."""
    per_round = {"scalar": 0, "avx2": 12 * 32, "avx512vnni": 12 * 64}
    for path in ck.paths():
        assert ck._kernels.int8_macs(ck._kernels.PATH_NAMES.index(path), 1000) == 1000 * per_round[path]
        peak = ck.int8_peak_gmacs(path, 1, seconds=0.02)
        assert (peak is None) if path == "scalar" else peak > 1.0
