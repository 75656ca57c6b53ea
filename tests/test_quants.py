"""hybrid.quants against gguf-py's reference dequantisation, block by block.

Blocks are random bytes with their fp16 scale fields replaced by random finite
fp16 values, so every bit of the packed quants and 6-bit scales is exercised.
"""

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from hybrid.quants import SUPPORTED_TYPES, dequantize, row_bytes

# byte offsets of the fp16 scale fields inside one block
FP16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0], T.Q4_K: [0, 2],
               T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_XS: [0]}


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", sorted(FP16_FIELDS, key=int), ids=lambda t: t.name)
def test_block_dequant_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 64, rng)
    want = gq.dequantize(raw, qtype)                       # [64, block_size]
    got = dequantize(torch.from_numpy(raw), qtype).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf(qtype):
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    raw = gq.quantize(x, qtype) if qtype == T.BF16 else x.astype(np.float16 if qtype == T.F16 else np.float32)
    raw_u8 = np.ascontiguousarray(raw).view(np.uint8)
    want = gq.dequantize(raw_u8, qtype)
    got = dequantize(torch.from_numpy(raw_u8), qtype).numpy()
    np.testing.assert_array_equal(got, want)


def test_rows_keep_leading_shape():
    """A 3-D expert tensor [n_expert, rows, row_bytes] dequantises row-wise."""
    rng = np.random.default_rng(1)
    raw = random_blocks(T.Q4_K, 2 * 3 * 2, rng).reshape(2, 3, 2 * 144)
    got = dequantize(torch.from_numpy(raw), T.Q4_K)
    assert got.shape == (2, 3, 512)
    want = gq.dequantize(raw, T.Q4_K)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert row_bytes(T.Q4_K, 512) == 288


def test_supported_types_are_the_documented_ones():
    from hybrid import gguf_model
    assert SUPPORTED_TYPES == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q4_K,
                               T.Q5_K, T.Q6_K, T.IQ4_XS}
    assert gguf_model.SUPPORTED_TYPES == SUPPORTED_TYPES      # the loader accepts what the engine computes
