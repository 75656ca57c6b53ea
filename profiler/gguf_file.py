"""The GGUF container read directly: header, key/values, tensor infos, and each tensor's
bytes as a view of one read-only memory map.

It lives in `profiler` because both layers above read model files: the engine loads one
(hybrid/gguf_model.py), and the analyzer takes the weight bytes of another engine's ops
from one (analysis/model_bytes.py) without importing the engine or torch. Tensor types are
profiler/ggml_types.py's, so files quantised by ik_llama.cpp (IQ4_KS, `_R8`, ...) read too.

Why not gguf-py's `GGUFReader` (which tests/reference_deepseek2.py keeps using, to stay
independent of this): it builds a NumPy view for every item of every array, so opening a
file with a 100K-token vocabulary (tokens, token types, merges: ~300K items) takes ~5 s,
more than the whole benchmark it precedes. Here one pass over the bytes cuts the strings
and a numeric array is one `frombuffer`.

The layout (ggml's gguf.h, versions 2 and 3, little-endian): magic "GGUF", u32 version,
u64 tensor count, u64 key/value count; each key/value is a string key, a u32 value type
and the value (an array: u32 item type, u64 count, items; a string: u64 length, UTF-8
bytes); each tensor info is a string name, u32 n_dims, u64 dims (ggml order, fastest
first), u32 ggml type, u64 offset into the data, which starts at the next multiple of
`general.alignment` (default 32) after the infos.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

from profiler.ggml_types import TRAITS, GGMLType, row_bytes

V = GGUFValueType
T = GGMLType

SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # ggml's GGML_MAX_DIMS
# The fewest bytes a tensor info (name length, n_dims, one dim, type, offset) and a key/value (key
# length, value type, a 1-byte value) take: a count the bytes left cannot hold is corrupt.
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
MIN_KV_BYTES = 8 + 4 + 1
# Tensor types whose items NumPy holds as such; the others (quantised, BF16) are bytes.
ITEM_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
               T.I32: np.int32, T.I64: np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands; the message, put after the
    file's name, says what and where."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: GGMLType            # compares equal to gguf-py's GGMLQuantizationType of its id
    dims: tuple[int, ...]          # ggml order: dims[0] is the row length
    n_bytes: int
    data_offset: int               # from the start of the file
    data: np.ndarray               # items of ITEM_DTYPES in NumPy order, else uint8 [..., row bytes]


@dataclass(frozen=True)
class GGUFFile:
    version: int
    fields: dict[str, Any]         # key -> int | float | bool | str | list (arrays)
    types: dict[str, tuple]        # key -> (value type,) or (ARRAY, item type)
    tensors: list[GGUFTensor]      # in file order
    data_offset: int


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the file's header and map its tensor data; GGUFFormatError on bad bytes, OSError
    (FileNotFoundError, IsADirectoryError, ...) where the file cannot be read.

    Every size the file states is checked against the bytes it has before it is used (a count
    against the bytes left, a tensor's dims and offset against the file's end), so a corrupt or
    hostile header is a message naming the key or tensor and the byte, never a wrong view.
    """
    data = np.memmap(path, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)  # (mmap refuses 0 bytes)
    buf = memoryview(data)
    if bytes(buf[:4]) != struct.pack("<I", GGUF_MAGIC):
        raise GGUFFormatError("not a GGUF file (no 'GGUF' magic at the start)")
    r = _Cursor(buf, at=4)
    version = r.scalar("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version}, which hyprof cannot read (it reads 2 and 3, little-endian)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > r.left:
        raise GGUFFormatError(f"truncated GGUF file: the header at byte 8 counts {n_tensors} tensors and {n_kv} "
                              f"key/values, more than the {r.left} bytes after it can hold")
    fields, types = {}, {}
    for _ in range(n_kv):
        r.what = f"a key at byte {r.at}"
        key = r.string()
        if key in fields:
            raise GGUFFormatError(f"corrupt GGUF file: key {printable_name(key)} (byte {r.at}) appears twice")
        r.what = f"key {printable_name(key)}"
        vtype = r.value_type()
        if vtype == V.ARRAY:
            item = r.value_type()
            if item == V.ARRAY:
                raise GGUFFormatError(f"corrupt GGUF file: {r.what} (byte {r.at}) is an array of arrays, "
                                      "which GGUF does not allow")
            fields[key], types[key] = r.array(item, r.scalar("<Q")), (vtype, item)
        else:
            fields[key], types[key] = r.value(vtype), (vtype,)
    infos = []
    for i in range(n_tensors):
        r.what = f"tensor info {i} at byte {r.at}"
        name = r.string()
        r.what = f"tensor {printable_name(name)}"
        n_dims = r.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"corrupt GGUF file: {r.what} (byte {r.at - 4}) has {n_dims} dimensions "
                                  f"(1 to {MAX_DIMS})")
        dims_at = r.at
        dims = tuple(int(d) for d in r.numbers("<u8", n_dims))
        infos.append((name, dims_at, dims, r.scalar("<I"), r.scalar("<Q")))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"corrupt GGUF file: general.alignment {alignment!r} is not a power of two")
    start = -(-r.at // alignment) * alignment
    tensors = [_tensor(data, start, alignment, *info) for info in infos]
    if len({t.name for t in tensors}) != len(tensors):
        raise GGUFFormatError("corrupt GGUF file: two tensors share a name")
    return GGUFFile(version=version, fields=fields, types=types, tensors=tensors, data_offset=start)


def _tensor(data: np.ndarray, start: int, alignment: int, name: str, dims_at: int, dims: tuple[int, ...],
            raw_type: int, offset: int) -> GGUFTensor:
    """One tensor's view, once its dims, type and offset are known to fit the file (`dims_at`: the
    byte its dims start at, for messages). Sizes are Python integers: a product cannot wrap."""
    shown = printable_name(name)
    try:
        ggml_type = T(raw_type)
    except ValueError:
        raise GGUFFormatError(f"corrupt GGUF file: tensor {shown} has unknown ggml type {raw_type}") from None
    if min(dims) < 1:
        raise GGUFFormatError(f"corrupt GGUF file: tensor {shown} (byte {dims_at}) has dims {dims}; each must be >= 1")
    block = TRAITS[ggml_type].block
    if dims[0] % block:
        raise GGUFFormatError(f"corrupt GGUF file: tensor {shown}'s rows of {dims[0]} are not whole "
                              f"{ggml_type.name} blocks")
    if offset % alignment:
        raise GGUFFormatError(f"corrupt GGUF file: tensor {shown}'s offset {offset} is not a multiple of the "
                              f"alignment {alignment}")
    row = row_bytes(ggml_type, dims[0])
    n_bytes = math.prod(dims[1:]) * row
    at = start + offset
    if at + n_bytes > data.size:
        raise GGUFFormatError(f"truncated GGUF file: tensor {shown} (dims {dims}, {ggml_type.name}) ends at byte "
                              f"{at + n_bytes} of {data.size}")
    shape = tuple(reversed(dims))
    raw = data[at:at + n_bytes]
    if ggml_type in ITEM_DTYPES:
        view = raw.view(ITEM_DTYPES[ggml_type]).reshape(shape)
    else:
        view = raw.reshape(*shape[:-1], row)
    return GGUFTensor(name=name, ggml_type=ggml_type, dims=dims, n_bytes=n_bytes, data_offset=at, data=view)


def printable_name(text: str) -> str:
    """A name from the file as a message shows it: on one line, and short."""
    return text if text.isprintable() and len(text) <= 80 else ascii(text[:80])


class _Cursor:
    """Reads values from the front of the file's bytes, moving on past each; `what` names the
    key or tensor being read, for messages."""

    def __init__(self, buf: memoryview, at: int = 0):
        self.buf, self.at, self.what = buf, at, "the header"

    @property
    def left(self) -> int:
        return len(self.buf) - self.at

    def _take(self, n: int) -> int:
        at = self.at
        if n < 0 or at + n > len(self.buf):
            raise GGUFFormatError(f"truncated GGUF file: {self.what}: {n} bytes at byte {at} run past its end "
                                  f"({len(self.buf)} bytes)")
        self.at = at + n
        return at

    def scalar(self, fmt: str):
        at = self._take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def value_type(self) -> GGUFValueType:
        raw = self.scalar("<I")
        try:
            return V(raw)
        except ValueError:
            raise GGUFFormatError(f"corrupt GGUF file: {self.what}: unknown value type {raw} "
                                  f"at byte {self.at - 4}") from None

    def string(self) -> str:
        n = self.scalar("<Q")
        at = self._take(n)
        return str(self.buf[at:at + n], "utf-8", "replace")

    def numbers(self, dtype: str, n: int) -> np.ndarray:
        dt = np.dtype(dtype)
        at = self._take(n * dt.itemsize)
        return np.frombuffer(self.buf, dt, n, at)

    def value(self, vtype: GGUFValueType):
        return self.string() if vtype == V.STRING else self.scalar(SCALARS[vtype])

    def array(self, item: GGUFValueType, n: int) -> list:
        if item in SCALARS:
            return self.numbers(SCALARS[item], n).tolist()
        if n * 8 > self.left:       # each string takes at least its 8-byte length
            raise GGUFFormatError(f"truncated GGUF file: {self.what}: {n} strings at byte {self.at} run past its "
                                  f"end ({len(self.buf)} bytes)")
        return self._strings(n)

    def _strings(self, n: int) -> list[str]:
        """n strings: one loop of slices (the bulk of a vocabulary's reading)."""
        buf, at, end, out = self.buf, self.at, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if at + 8 > end:
                raise GGUFFormatError(f"truncated GGUF file: {self.what}: a string at byte {at} runs past its end "
                                      f"({end} bytes)")
            length = unpack(buf, at)[0]
            at += 8
            if at + length > end:
                raise GGUFFormatError(f"truncated GGUF file: {self.what}: a string at byte {at - 8} runs past its "
                                      f"end ({end} bytes)")
            out.append(str(buf[at:at + length], "utf-8", "replace"))
            at += length
        self.at = at
        return out
