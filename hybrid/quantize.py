"""NumPy quantisers for the types gguf-py cannot write: Q4_K, Q5_K, Q6_K, IQ4_XS and IQ4_NL.

`hyprof model make --type q4_k_m|q5_k_m|q6_k|iq4_xs` writes llama.cpp's mixes, and
gguf-py (`gguf.quants`) quantises only Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the float
types. These quantisers are simple but valid: one pass per block, no search for the
scales that minimise the error (llama.cpp's `make_qkx2_quants` / `make_qx_quants`
do that; for seeded noise it changes nothing a profile measures). Every scale is
rounded *up* (fp16 super-block scales nudged up by one part in 1024, 6-bit sub-block
scales by ceil), so the values of a block always fit its range: no clipping, and
every weight is within half a step of its stored value (IQ4's non-uniform levels:
half the widest gap between levels, 14 of 127).

Everything is vectorised over blocks: `deepseek-v2-lite-mini` has 2 B weights.
Layouts are ggml's (ggml-common.h), as gguf-py's `dequantize_blocks` reads them.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

T = GGMLQuantizationType
QK_K = 256
IQ4_LEVELS = np.array(quants.IQ4_NL.kvalues, dtype=np.float32)
_IQ4_MIDPOINTS = (IQ4_LEVELS[1:] + IQ4_LEVELS[:-1]) / 2


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 [..., n] -> the stored bytes [..., n / block * type_size], for any type gguf-py
    or this module quantises."""
    if qtype not in _QUANTIZERS:
        return quants.quantize(values, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, block)
    return _QUANTIZERS[qtype](blocks).reshape(*values.shape[:-1], values.shape[-1] // block * type_size)


def _fp16_up(x: np.ndarray) -> np.ndarray:
    """x rounded to fp16 no smaller than x (x >= 0): fp16 rounding moves a value by at most
    one part in 2048, so a nudge of one part in 1024 first keeps it at or above x."""
    return (x * np.float32(1 + 2 ** -10)).astype(np.float16)


def _bytes(x16: np.ndarray) -> np.ndarray:
    return x16.reshape(-1, 1).view(np.uint8)


def _safe_div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x / d, and 0 where d is 0 (an all-zero group)."""
    return np.where(d != 0, x / np.where(d != 0, d, 1), 0)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo | (hi << 4)).astype(np.uint8)


def pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> Q4_K/Q5_K's 12 bytes (ggml's get_scale_min_k4)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _affine_k(blocks: np.ndarray, n_levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K's w = d * sc * q - dmin * m over 8 sub-blocks of 32: the min first (m rounded
    up, so -dmin * m is at or below the sub-block's smallest value), then the scale that covers
    the rest. -> (d, dmin as fp16, sc, m as uint8, q as uint8 [n, 8, 32])."""
    x = blocks.reshape(-1, 8, 32)
    neg_min = np.maximum(-x.min(axis=-1), 0)
    dmin = _fp16_up(neg_min.max(axis=-1) / 63)
    m = np.minimum(np.ceil(_safe_div(neg_min, dmin.astype(np.float32)[:, None])), 63)
    offset = dmin.astype(np.float32)[:, None] * m
    scale = (x.max(axis=-1) + offset) / (n_levels - 1)
    d = _fp16_up(scale.max(axis=-1) / 63)
    sc = np.minimum(np.ceil(_safe_div(scale, d.astype(np.float32)[:, None])), 63)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = np.clip(np.rint(_safe_div(x + offset[..., None], step)), 0, n_levels - 1)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks, 16)
    q = q.reshape(-1, 4, 2, 32)                       # 64-value chunks: sub-block 2j low nibbles, 2j+1 high
    qs = _nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_bytes(d), _bytes(dmin), pack_k_scales(sc, m), qs], axis=-1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks, 32)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)  # bit i: sub-block i
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = _nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_bytes(d), _bytes(dmin), pack_k_scales(sc, m), qh, qs], axis=-1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """w = d * sc * (q - 32) over 16 sub-blocks of 16, sc a signed byte; q - 32 kept in -31..31."""
    x = blocks.reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=-1) / 31
    d = _fp16_up(scale.max(axis=-1) / 127)
    sc = np.minimum(np.ceil(_safe_div(scale, d.astype(np.float32)[:, None])), 127)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.rint(_safe_div(x, step)), -31, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # each half of 128 values: ql's low nibbles hold values 0-63, high nibbles 64-127; qh's bit
    # pairs 0-1, 2-3, 4-5, 6-7 hold the top 2 bits of the four quarters of 32
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = _nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128)
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _bytes(d)], axis=-1)


def _iq4_signed_scale(x: np.ndarray) -> np.ndarray:
    """The scale that puts a group's value of largest magnitude on the level -127 (so its sign
    picks which end of the asymmetric grid the group's extreme lands on, as ggml starts its search)."""
    x_max = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return x_max / -127


def _iq4_indices(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The nearest of the 16 non-uniform levels to each x / scale."""
    return np.searchsorted(_IQ4_MIDPOINTS, _safe_div(x, scale)).astype(np.uint8)


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = _iq4_signed_scale(blocks).astype(np.float16)
    q = _iq4_indices(blocks, d.astype(np.float32)[:, None])
    return np.concatenate([_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=-1)


def _iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """w = d * (ls - 32) * level over 8 sub-blocks of 32: each sub-block's signed scale, rounded
    up in magnitude to a multiple of d (|ls - 32| <= 31), so no value passes the level -127."""
    x = blocks.reshape(-1, 8, 32)
    s = _iq4_signed_scale(x)
    d = _fp16_up(np.abs(s).max(axis=-1) / 31)
    ls = np.sign(s) * np.minimum(np.ceil(_safe_div(np.abs(s), d.astype(np.float32)[:, None])), 31)
    q = _iq4_indices(x, (d.astype(np.float32)[:, None] * ls)[..., None])
    ls = (ls + 32).astype(np.uint8)
    scales_h = ((ls >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=-1, dtype=np.uint16)
    scales_l = _nibbles(ls[:, 0::2] & 0x0F, ls[:, 1::2] & 0x0F)
    qs = _nibbles(q[..., :16], q[..., 16:]).reshape(-1, 128)
    return np.concatenate([_bytes(d), _bytes(scales_h), scales_l, qs], axis=-1)


_QUANTIZERS = {T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs}
