"""Rewrite a made F32 GGUF with its weight matrices in another quant type, through gguf-py only.

`hyprof model make` writes F32/F16/BF16/Q8_0/Q4_0; the engine also reads Q4_1,
Q5_0, Q5_1, IQ4_NL and the K-quants. Q4_1, Q5_0, Q5_1 and IQ4_NL are quantized
from the weights (gguf-py, hybrid/quantize.py); for Q4_K, Q5_K, Q6_K and IQ4_XS the
blocks are random (uniform quants, 6-bit scales, mins that centre each group) with fp16 scales set so the weights keep
the original tensor's standard deviation. The reference dequantises whatever is
stored, so random blocks test the engine's decoding as well as real ones.
Norms, biases and the router stay F32 (as llama.cpp quantizes); rows that do
not fill whole blocks stay as they were.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from hybrid.quantize import pack_k_scales, quantize


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def random_k_blocks(qtype: T, n_blocks: int, std: float, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == T.IQ4_XS:                    # w = d * (ls - 32) * kv[q], ls uniform in 0..63, q in 0..15
        levels = np.array(gq.IQ4_NL.kvalues, dtype=np.float64)
        raw[:, 0:2] = _fp16_bytes(np.full(n_blocks, std / np.sqrt(np.mean((np.arange(64) - 32) ** 2) * np.mean(levels ** 2))))
        return raw
    if qtype == T.Q6_K:                      # w = d * scale * (q - 32), q uniform in 0..63 (sd 18.5)
        scales = rng.integers(8, 32, size=(n_blocks, 16)) * rng.choice([-1, 1], size=(n_blocks, 16))
        raw[:, 192:208] = scales.astype(np.int8).view(np.uint8)
        raw[:, 208:210] = _fp16_bytes(np.full(n_blocks, std / (np.sqrt(np.mean(scales ** 2)) * 18.5)))
        return raw
    levels, sc_max = (16, 7) if qtype == T.Q4_K else (32, 4)
    sc = rng.integers(1, sc_max + 1, size=(n_blocks, 8)).astype(np.uint8)
    m = np.round(sc * (levels - 1) / 2).astype(np.uint8)   # w = d * (sc * q - m): centred
    d = std / (np.sqrt(np.mean(sc.astype(float) ** 2)) * levels / np.sqrt(12))
    raw[:, 0:2] = _fp16_bytes(np.full(n_blocks, d))
    raw[:, 2:4] = raw[:, 0:2]                                 # dmin = d
    raw[:, 4:16] = pack_k_scales(sc, m)
    return raw


def retype_gguf(src, dst, qtype: T, seed: int = 0):
    rng = np.random.default_rng(seed)
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    block_size = GGML_QUANT_SIZES[qtype][0]
    for t in reader.tensors:
        values = np.array(t.data)
        keep = (t.tensor_type != T.F32 or values.ndim == 1 or t.name.endswith("ffn_gate_inp.weight")
                or values.shape[-1] % block_size)
        if keep:
            writer.add_tensor(t.name, values, raw_dtype=t.tensor_type)
            continue
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
            n_blocks = values.size // block_size
            blocks = random_k_blocks(qtype, n_blocks, float(values.std()), rng)
            data = blocks.reshape(*values.shape[:-1], -1)
        else:
            data = quantize(values, qtype)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
