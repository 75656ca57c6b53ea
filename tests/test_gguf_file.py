"""profiler/gguf_file.py against gguf-py's GGUFReader, the independent reference: files that
gguf-py writes read back as gguf-py reads them (every key, value and value type; every
tensor's name, type, shape and bytes), and bad bytes stop with a message, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter, quants

from profiler.gguf_file import GGUFFormatError, read_gguf


def assert_reads_as_gguf_py(path) -> None:
    ref, mine = GGUFReader(path), read_gguf(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(mine.fields) == keys
    for k in keys:
        f = ref.fields[k]
        assert mine.fields[k] == f.contents(), k
        assert mine.types[k] == tuple(f.types[:2]) if f.types[0] == V.ARRAY else (f.types[0],), k
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(mine.tensors, ref.tensors):
        assert a.ggml_type == b.tensor_type and a.dims == tuple(b.shape.tolist()), a.name
        assert a.n_bytes == b.n_bytes and a.data_offset == b.data_offset, a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


@pytest.fixture
def every_type(tmp_path):
    """A file with a value of every type, arrays of numbers, strings and booleans, and
    tensors of the types the engine reads."""
    p = tmp_path / "types.gguf"
    w = GGUFWriter(p, "deepseek2")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, wörld")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ünï", "d e"])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("q4_0", quants.quantize(x, T.Q4_0), raw_dtype=T.Q4_0)
    w.add_tensor("q8_0", quants.quantize(np.stack([x, x]), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("bf16", quants.quantize(x, T.BF16), raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_every_value_type_reads_as_gguf_py_reads_it(every_type):
    assert_reads_as_gguf_py(every_type)
    f = read_gguf(every_type)
    assert f.fields["t.str"] == "héllo, wörld" and f.fields["t.u64"] == 2**63 + 5
    assert f.tensors[3].data.shape == (2, 4, 64 // 32 * 34)


def test_a_made_model_reads_as_gguf_py_reads_it(tiny_gguf):
    assert_reads_as_gguf_py(tiny_gguf)


def test_every_cut_of_the_header_is_a_truncated_file(every_type, tmp_path):
    data = every_type.read_bytes()
    header_end = read_gguf(every_type).data_offset
    p = tmp_path / "cut.gguf"
    for n in list(range(4, header_end, 7)) + [len(data) - 1]:
        p.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError, match="truncated GGUF file"):
            read_gguf(p)


def test_bad_bytes_are_named(every_type, tmp_path):
    data = bytearray(every_type.read_bytes())
    p = tmp_path / "bad.gguf"
    version = bytes(data)
    p.write_bytes(version[:4] + (1).to_bytes(4, "little") + version[8:])
    with pytest.raises(GGUFFormatError, match="GGUF version 1"):
        read_gguf(p)
    first_type = 24 + 8 + len(b"general.architecture")      # the first key's value type
    data[first_type:first_type + 4] = (99).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="unknown value type 99"):
        read_gguf(p)


# ---------------------------------------------------------------- every type's bytes (profiler/ggml_types.py)

def test_type_table_agrees_with_gguf_py():
    """Every id gguf-py (mainline's) knows has its name and block sizes; Q8_1, whose blocks the two
    engines size differently and no file stores, is the one left out."""
    from gguf import GGML_QUANT_SIZES

    from profiler.ggml_types import TRAITS, GGMLType
    for t in T:
        if t == T.Q8_1:
            assert int(t) not in {int(g) for g in GGMLType}
            continue
        mine = GGMLType(int(t))
        assert mine.name == t.name and mine == t
        assert (TRAITS[mine].block, TRAITS[mine].type_size, TRAITS[mine].row_meta) == (*GGML_QUANT_SIZES[t], 0), t


def test_bits_per_weight_and_rows_by_hand():
    from profiler.ggml_types import GGMLType as G, row_bytes

    def bits(t, n=256 * 28):
        return row_bytes(t, n) * 8 / n

    # block bytes from ggml-common.h's structs: IQ4_NL = fp16 d + 16 bytes of nibbles per 32
    hand = {G.Q4_0: 4.5, G.IQ4_NL: 4.5, G.Q5_0: 5.5, G.Q8_0: 8.5, G.Q4_K: 4.5, G.Q5_K: 5.5, G.Q6_K: 6.5625,
            G.Q2_K: 2.625, G.Q3_K: 3.4375, G.IQ4_XS: 4.25, G.F16: 16, G.BF16: 16, G.F32: 32,
            G.Q6_0: 6.5, G.IQ4_K: 4.5, G.IQ5_K: 5.5, G.IQ6_K: 6.625, G.IQ2_K: 2.375, G.IQ3_K: 3.4375}
    for t, b in hand.items():
        assert bits(t) == b, t.name
    # ik_llama.cpp's repacked forms store their base type's blocks, interleaved: the same bytes
    for repacked, base in ((G.Q4_0_R8, G.Q4_0), (G.Q8_0_R8, G.Q8_0), (G.IQ4_NL_R4, G.IQ4_NL), (G.Q4_K_R4, G.Q4_K),
                           (G.Q6_K_R4, G.Q6_K), (G.IQ4_XS_R8, G.IQ4_XS), (G.IQ4_K_R4, G.IQ4_K), (G.Q5_0_R4, G.Q5_0),
                           (G.BF16_R16, G.BF16), (G.IQ4_KS_R4, G.IQ4_KS)):
        assert row_bytes(repacked, 7168) == row_bytes(base, 7168), repacked.name
    # types with a per-row scale beside the blocks (ggml_row_size = row_meta + blocks)
    assert row_bytes(G.IQ4_KS, 7168) == 4 + 28 * 136            # one f32 row scale
    assert row_bytes(G.IQ2_KT, 4096) == 4 + 16 * 68
    assert row_bytes(G.IQ2_KS, 2048) == 2 + 8 * 70              # one f16 row scale
    assert row_bytes(G.IQ1_S_R4, 128) == 2 + 4 * 6             # 24-byte block over 4 rows of 32: 6 a row


def _hand_made_gguf(tensors: list[tuple[str, tuple, int, int]]) -> bytes:
    """A GGUF v3 file with no key/values and the given (name, ggml dims, type id, data bytes) tensors."""
    import struct
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0)
    offset, infos = 0, b""
    for name, dims, type_id, n_bytes in tensors:
        infos += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)
        offset += -(-n_bytes // 32) * 32
    start = -(-(len(head) + len(infos)) // 32) * 32
    return (head + infos).ljust(start, b"\0") + bytes(offset)


def test_ik_llama_types_read_with_their_row_bytes(tmp_path):
    from profiler.ggml_types import GGMLType as G
    p = tmp_path / "ik.gguf"
    # IQ4_KS_R4 [256 x 4]: 4 rows of (4 + 136); Q4_0_R8 [64 x 8]: 8 rows of 2 x 18; IQ2_KT [256 x 3 x 2]
    p.write_bytes(_hand_made_gguf([("a", (256, 4), 344, 4 * 140), ("b", (64, 8), 202, 8 * 36),
                                   ("c", (256, 3, 2), 153, 6 * 72)]))
    a, b, c = read_gguf(p).tensors
    assert (a.ggml_type, a.n_bytes, a.data.shape) == (G.IQ4_KS_R4, 560, (4, 140))
    assert (b.ggml_type, b.n_bytes, b.data.shape) == (G.Q4_0_R8, 288, (8, 36))
    assert (c.ggml_type, c.n_bytes, c.data.shape) == (G.IQ2_KT, 432, (2, 3, 72))
    assert c.data_offset - b.data_offset == 288 and b.data_offset - a.data_offset == 576   # 560 padded to 32
    p.write_bytes(_hand_made_gguf([("x", (256, 4), 203, 0)]))        # no ggml type 203
    with pytest.raises(GGUFFormatError, match="tensor x has unknown ggml type 203"):
        read_gguf(p)
