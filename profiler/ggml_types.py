"""Every ggml tensor type a GGUF file may store, and how many bytes a row of it takes.

Why a table of our own and not gguf-py's GGML_QUANT_SIZES: gguf-py is mainline llama.cpp's
and knows none of ik_llama.cpp's types (IQ4_KS, IQ2_KT, ... and the row-interleaved `_R4` /
`_R8` forms `llama-quantize --repack` stores), and several of those keep a few bytes of
scales per row beside the blocks (`row_meta`), so a row is `row_meta + n / block * type_size`
bytes (ik_llama.cpp's `ggml_row_size`). The sizes are ggml's: ik_llama.cpp's type_traits
(ggml/src/ggml.c) and block structs (ggml/src/ggml-common.h), and mainline's for the types
only it has; tests/test_gguf_file.py checks them against gguf-py where both define an id.

A repacked type holds the same blocks as its base type, interleaved across 4 or 8 rows, so
its bytes per weight are the base type's: `-rtr 1` changes the layout in memory, never the
bytes a matmul reads. Q8_1 is left out: no file stores it (it is the activations' type) and
the two engines' blocks differ in size (36 bytes in ik_llama.cpp, 40 in mainline's gguf-py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class TypeTraits:
    block: int          # values per block
    type_size: int      # bytes per block
    row_meta: int = 0   # bytes per row beside the blocks (ik_llama.cpp's per-row scales)


# name: (ggml type id, values per block, bytes per block, bytes of row meta)
_TABLE = {
    "F32": (0, 1, 4, 0), "F16": (1, 1, 2, 0), "Q4_0": (2, 32, 18, 0), "Q4_1": (3, 32, 20, 0),
    "Q5_0": (6, 32, 22, 0), "Q5_1": (7, 32, 24, 0), "Q8_0": (8, 32, 34, 0),
    "Q2_K": (10, 256, 84, 0), "Q3_K": (11, 256, 110, 0), "Q4_K": (12, 256, 144, 0), "Q5_K": (13, 256, 176, 0),
    "Q6_K": (14, 256, 210, 0), "Q8_K": (15, 256, 292, 0),
    "IQ2_XXS": (16, 256, 66, 0), "IQ2_XS": (17, 256, 74, 0), "IQ3_XXS": (18, 256, 98, 0), "IQ1_S": (19, 256, 50, 0),
    "IQ4_NL": (20, 32, 18, 0), "IQ3_S": (21, 256, 110, 0), "IQ2_S": (22, 256, 82, 0), "IQ4_XS": (23, 256, 136, 0),
    "I8": (24, 1, 1, 0), "I16": (25, 1, 2, 0), "I32": (26, 1, 4, 0), "I64": (27, 1, 8, 0), "F64": (28, 1, 8, 0),
    "IQ1_M": (29, 256, 56, 0), "BF16": (30, 1, 2, 0),
    "Q4_0_4_4": (31, 32, 18, 0), "Q4_0_4_8": (32, 32, 18, 0), "Q4_0_8_8": (33, 32, 18, 0),
    # mainline only
    "TQ1_0": (34, 256, 54, 0), "TQ2_0": (35, 256, 66, 0), "NVFP4": (40, 64, 36, 0),
    # ik_llama.cpp only (I2_S: Microsoft BitNet's), then both (Q1_0: ik_llama.cpp's Q1_0_G128)
    "I2_S": (36, 1, 1, 0), "MXFP4": (39, 32, 17, 0), "Q1_0": (41, 128, 18, 0),
    "Q8_0_X4": (97, 32, 34, 0), "Q8_1_X4": (98, 32, 36, 0), "Q8_2_X4": (99, 32, 36, 0),
    "Q6_0": (133, 32, 26, 0), "IQ1_BN": (134, 64, 13, 2), "IQ2_BN": (135, 64, 16, 4), "Q8_K64": (136, 64, 68, 0),
    "IQ2_K": (137, 256, 76, 0), "IQ3_K": (138, 256, 110, 0), "IQ4_K": (139, 256, 144, 0), "IQ5_K": (140, 256, 176, 0),
    "IQ6_K": (141, 256, 212, 0), "IQ4_KS": (144, 256, 136, 4), "IQ2_KS": (145, 256, 70, 2),
    "IQ4_KSS": (146, 256, 128, 4), "Q8_K16": (147, 64, 64, 20), "Q8_K32": (148, 256, 292, 0),
    "Q8_KR8": (149, 256, 292, 0), "Q8_K128": (150, 128, 140, 0), "Q8_KV": (151, 32, 32, 8),
    "IQ5_KS": (152, 256, 168, 4), "IQ2_KT": (153, 256, 68, 4), "IQ3_KT": (154, 256, 100, 4),
    "IQ4_KT": (155, 256, 128, 4), "IQ3_KS": (156, 256, 102, 2), "IQ2_KL": (157, 256, 86, 2),
    "IQ1_KT": (158, 256, 56, 4),
    # ik_llama.cpp's repacked (row-interleaved) forms: the base type's blocks
    "Q4_0_R8": (202, 32, 18, 0), "Q5_0_R4": (206, 32, 22, 0), "Q8_0_R8": (208, 32, 34, 0),
    "Q2_K_R4": (210, 256, 84, 0), "Q3_K_R4": (211, 256, 110, 0), "Q4_K_R4": (212, 256, 144, 0),
    "Q5_K_R4": (213, 256, 176, 0), "Q6_K_R4": (214, 256, 210, 0), "IQ2_XXS_R4": (216, 256, 66, 0),
    "IQ2_XS_R4": (217, 256, 74, 0), "IQ3_XXS_R4": (218, 256, 98, 0), "IQ1_S_R4": (219, 32, 6, 2),
    "IQ4_NL_R4": (220, 32, 18, 0), "IQ3_S_R4": (221, 256, 110, 0), "IQ2_S_R4": (222, 256, 82, 0),
    "IQ4_XS_R8": (223, 256, 136, 0), "IQ1_M_R4": (229, 32, 7, 2), "BF16_R16": (230, 1, 2, 0),
    "Q6_0_R4": (233, 32, 26, 0), "IQ2_BN_R4": (335, 64, 16, 4), "IQ2_K_R4": (337, 256, 76, 0),
    "IQ3_K_R4": (338, 256, 110, 0), "IQ4_K_R4": (339, 256, 144, 0), "IQ5_K_R4": (340, 256, 176, 0),
    "IQ4_KS_R4": (344, 256, 136, 4), "IQ5_KS_R4": (352, 256, 168, 4), "MXFP4_R8": (353, 32, 17, 0),
    "Q8_K_R16": (397, 256, 258, 0), "Q8_KV_R8": (398, 32, 32, 4), "Q8_K_R8": (399, 256, 258, 0),
}

# The ids as an enum: its members compare and hash equal to gguf-py's GGMLQuantizationType of the
# same id (both are IntEnums), so code written against gguf-py takes them as they are.
GGMLType = enum.IntEnum("GGMLType", {name: row[0] for name, row in _TABLE.items()})
TRAITS: dict[GGMLType, TypeTraits] = {GGMLType[name]: TypeTraits(*row[1:]) for name, row in _TABLE.items()}


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of `n` values (n a whole number of blocks), as ggml_row_size."""
    t = TRAITS[ggml_type]
    return t.row_meta + n // t.block * t.type_size
