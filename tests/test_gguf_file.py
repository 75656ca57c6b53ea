"""hybrid/gguf_file.py against gguf-py's GGUFReader, the independent reference: files that
gguf-py writes read back as gguf-py reads them (every key, value and value type; every
tensor's name, type, shape and bytes), and bad bytes stop with a message, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter, quants

from hybrid.gguf_file import GGUFFormatError, read_gguf


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
