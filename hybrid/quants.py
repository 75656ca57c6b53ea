"""Dequantisation of GGML block formats with torch, vectorised over blocks.

A quantised GGUF tensor is rows of fixed-size blocks; each block packs
`block_size` weights into `type_size` bytes (scales first, then the packed
quants). The engine keeps weights in that stored form and calls `dequantize`
on the rows a matmul needs, so a Q4 file is never inflated to f32 in RAM.
Bit layouts follow ggml-quants.c; tests/test_quants.py checks every type block
by block against gguf-py's reference `gguf.quants.dequantize`.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256
# IQ4_NL's 16 non-uniform levels (ggml's kvalues_iq4nl)
KVALUES_IQ4NL = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                             dtype=torch.float32)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 2] -> float32 [n, 1] read as little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Packed 4-bit quants -> values: per `group` bytes, low nibbles first, then high."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte 6-bit scale/min packing of Q4_K and Q5_K -> two [n, 8] tensors."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return (_nibbles(b[:, 2:], 16).to(torch.int8) - 8).float() * d


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:], 16).float() + m


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 5-bit types' qh bytes [n, 4] -> bit j of the little-endian word as [n, 32] (0 or 16)."""
    bits = qh.reshape(-1, 4, 1) >> torch.arange(8, dtype=torch.uint8)
    return ((bits & 1) << 4).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return ((_nibbles(b[:, 6:], 16) | _fifth_bits(b[:, 2:6])).to(torch.int8) - 16).float() * d


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * (_nibbles(b[:, 8:], 16) | _fifth_bits(b[:, 4:8])).float() + m


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d * KVALUES_IQ4NL[_nibbles(b[:, 2:], 16).long()]


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    scales_h = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF                   # [n, 1]
    scales_l = torch.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], dim=-1).reshape(n, 8).int()  # sub-block s: s/2, s%2
    high = (scales_h >> (2 * torch.arange(8, dtype=torch.int32))) & 3
    ls = (scales_l | (high << 4)) - 32
    q = KVALUES_IQ4NL[_nibbles(b[:, 8:], 16).long()].reshape(n, 8, 32)
    return ((d * ls.float()).unsqueeze(-1) * q).reshape(n, QK_K)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 16:], 32).float().reshape(n, 8, 32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    q = (_nibbles(b[:, 48:], 32).reshape(n, 8, 32) | ((qh & 1) << 4)).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(n, -1, 32)                     # [n, 8, 32]
    qh = b[:, 128:192].reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, -1, 32)                                  # [n, 8, 32]
    q = ((ql | (qh << 4)).to(torch.int16) - 32).float().reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()         # [n, 16]
    d = _f16(b[:, 208:210])
    return ((d * scales).unsqueeze(-1) * q).reshape(n, QK_K)


def q4_groups(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit rows -> (q uint8 [rows, n_cols] in 0..15, scale, zero: float32 [rows, n_cols/32]).

    Every 4-bit type here is, per group of 32 weights, `(q - 8) * scale + zero`
    exactly (in float32); that is the form torch's int4 weight-only pack takes,
    which is what `-rtr 1` repacks into.
    """
    qtype = T(ggml_type)
    _, type_size = GGML_QUANT_SIZES[qtype]
    n_rows = raw.shape[0]
    b = raw.reshape(-1, type_size)
    if qtype == T.Q4_0:
        q, scale = _nibbles(b[:, 2:], 16), _f16(b[:, :2])
        zero = torch.zeros_like(scale)
    elif qtype == T.Q4_1:
        q, scale, m = _nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4])
        zero = m + 8 * scale
    elif qtype == T.Q4_K:
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        q, scale = _nibbles(b[:, 16:], 32), d * sc                        # scale, zero: [n, 8]
        zero = 8 * scale - dmin * mn
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type")
    return q.reshape(n_rows, -1), scale.reshape(n_rows, -1), zero.reshape(n_rows, -1)


_BLOCK_DEQUANT = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0, T.IQ4_NL: _iq4_nl,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.IQ4_XS: _iq4_xs,
}
FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}   # as torch holds them

SUPPORTED_TYPES = frozenset(_BLOCK_DEQUANT) | frozenset(FLOAT_DTYPES)


def row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes one row of `n_cols` weights takes when stored as `ggml_type`."""
    block_size, type_size = GGML_QUANT_SIZES[T(ggml_type)]
    return n_cols // block_size * type_size


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Stored bytes uint8 [..., row_bytes] -> float32 [..., n_cols].

    Float types may also come as their own dtype (an F16 tensor held as
    float16); they are only converted.
    """
    qtype = T(ggml_type)
    if qtype in FLOAT_DTYPES:
        if raw.dtype == torch.uint8:
            raw = raw.contiguous().view(FLOAT_DTYPES[qtype])
        return raw.float()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    lead = raw.shape[:-1]
    n_blocks_row = raw.shape[-1] // type_size
    blocks = raw.reshape(-1, type_size)
    out = _BLOCK_DEQUANT[qtype](blocks)
    return out.reshape(*lead, n_blocks_row * block_size)
