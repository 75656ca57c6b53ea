"""How the engine holds a weight, and the one matmul entry point, `mul_mat`.

A weight stays in the form the GGUF file stores it: a torch view of the file's
memory map (quantised blocks as uint8 rows, floats as themselves). A matmul
dequantises a bounded chunk of rows at a time, so a Q4 model's resident memory
is the file's pages it touches plus a few MiB of scratch, never an f32 copy
(except of the small per-head attention weights, see `hybrid.builder._head_weights`).
The CPU's weights that stay in the map are read through once at load (`fault_in`),
so that no token waits on a page fault.

`-rtr 1` ("run-time repack", as in ik_llama.cpp) converts 4-bit weights at load
into torch's int4 weight-only pack (`_weight_int4pack_mm_for_cpu`, groups of 32),
where the matmul runs in bfloat16 from packed nibbles instead of unpacking in
Python; the pack is about the size of the file's blocks, held in RAM.

Native kernels (`hybrid.cpu_kernels`: int8 dot products on raw blocks, Q4_0,
Q5_0, Q5_1, Q8_0 and IQ4_NL of 32 weights, Q4_K, Q5_K, Q6_K and IQ4_XS of 256)
take over every matmul on a stored weight of those types held in CPU memory:
`mul_mat` here, and the pool-shared forms in `hybrid.builder`, all ask
`native(w)`. They round each activation to 8 bits per block of 32 (256 for the
K-quants and IQ4_XS, as llama.cpp does on the CPU), so results move by ~1e-2
against a float matmul. Where the path in use has an interleaved kernel for the
type (`TRAITS[t].r16_first`: AVX2 and AVX-512, for every type with kernels), the
matmul weights placed on the CPU are also repacked at load into its 16-row blocks
(`Weight.packed`, the same size; llama.cpp repacks Q4_0 at load for its CPU
kernels too), which the native matmuls read instead: process memory,
while the file's pages stay in the page cache. `HYPROF_KERNELS=torch` in the environment at import (`NATIVE`)
selects the exact dequantise-then-matmul path instead; any other value (a SIMD
path name, see `hybrid.cpu_kernels.available`) or none keeps the kernels.
Weights on a CUDA device take the torch path, dequantised once at load (`for_gpu`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T

from hybrid import cpu_kernels, ops, quants

NATIVE = os.environ.get("HYPROF_KERNELS") != "torch"     # the native kernels, unless told the exact path
CHUNK_ELEMENTS = 1 << 21          # dequantise at most this many weights (8 MiB f32) at once
INT4_GROUP = 32
INT4_ROWS_PER_PACK = 256          # the pack cannot be sliced by rows, so pack row blocks separately

# ggml type -> kernel(weight, x [T, K] f32) -> [T, N] f32 (on the repacked blocks where the weight has them).
MATMUL_KERNELS: dict[int, Callable[["Weight", torch.Tensor], torch.Tensor]] = {
    t: lambda w, x: cpu_kernels.matmul(*w.kernel_blocks, x) for t in cpu_kernels.MATMUL_TYPES}


def _torch_view(data: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of a (read-only) memory-mapped array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # torch warns that the memmap is read-only
        return torch.from_numpy(data)


@dataclass(frozen=True, eq=False)
class Weight:
    """One tensor as stored. `shape` is the logical NumPy-order shape (n_out, n_in), or
    (n_expert, n_out, n_in) for expert tensors; `data` is uint8 [..., row_bytes] for
    quantised types, or float32 / float16 / bfloat16 values of `shape`."""
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: torch.Tensor
    # the same blocks repacked for the AVX2 / AVX-512 kernels (`cpu_kernels.repack`), same shape and
    # size, where the weight is on the CPU and can be; the native matmuls read these instead
    packed: np.ndarray | None = None

    @classmethod
    def from_tensor(cls, info) -> "Weight":
        """From a `hybrid.gguf_model.TensorInfo` (its memory-mapped `data`)."""
        data = _torch_view(info.data)
        if info.ggml_type == T.BF16:
            data = data.view(torch.bfloat16)
        return cls(info.name, int(info.ggml_type), tuple(info.shape), data)

    @property
    def n_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def type_name(self) -> str:
        return T(self.ggml_type).name

    @property
    def kernel_blocks(self) -> tuple:
        """(blocks, type) for the native kernels: the repacked blocks and type | R16 where
        the weight has them, else the stored ones."""
        if self.packed is not None:
            return self.packed, self.ggml_type | cpu_kernels.R16
        return self.data, self.ggml_type

    def expert(self, e: int) -> "Weight":
        return Weight(self.name, self.ggml_type, self.shape[1:], self.data[e],
                      None if self.packed is None else self.packed[e])

    def rows(self, r0: int, r1: int) -> "Weight":
        """Rows [r0, r1); repacked blocks come along when the range is whole blocks of 16."""
        aligned = self.packed is not None and r0 % 16 == 0 and r1 % 16 == 0
        return Weight(self.name, self.ggml_type, (r1 - r0,) + self.shape[1:], self.data[r0:r1],
                      self.packed[r0:r1] if aligned else None)

    def row_splits(self, n: int) -> list[int]:
        """Boundaries cutting the output rows into `n` near-equal slices."""
        return np.linspace(0, self.shape[-2], n + 1).astype(int).tolist()

    def dequantize(self) -> torch.Tensor:
        return quants.dequantize(self.data, self.ggml_type)
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ W^T -> [T, N], dequantising at most CHUNK_ELEMENTS weights at a time."""
        if self.data.dtype == torch.float32:
            return ops.matmul_f32(x, self.data)
        n_rows, n_cols = self.shape[-2], self.shape[-1]
        step = max(1, CHUNK_ELEMENTS // n_cols)
        if step >= n_rows:
            return x @ self.dequantize().T
        out = x.new_empty(x.shape[0], n_rows)
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            out[:, r0:r1] = x @ quants.dequantize(self.data[r0:r1], self.ggml_type).T
        return out


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """A 4-bit weight repacked (-rtr 1) into torch's CPU int4 pack, per block of rows.

    Each block holds the packed nibbles and bf16 (scale, zero) per group of 32, with
    `w = (q - 8) * scale + zero`; for experts, one list of blocks per expert.
    """
    name: str
    ggml_type: int                 # the stored type it came from
    shape: tuple[int, ...]
    blocks: tuple                  # ((r0, r1, packed, scales_zeros), ...) or, 3-D: one such tuple per expert
    n_bytes: int

    @classmethod
    def from_weight(cls, w: Weight) -> "Int4Weight":
        if len(w.shape) == 3:
            per_expert = tuple(_pack_rows(w.expert(e)) for e in range(w.shape[0]))
            nb = sum(_pack_bytes(b) for blocks in per_expert for b in blocks)
            return cls(w.name, w.ggml_type, w.shape, per_expert, nb)
        blocks = _pack_rows(w)
        return cls(w.name, w.ggml_type, w.shape, blocks, sum(_pack_bytes(b) for b in blocks))

    @property
    def type_name(self) -> str:
        return f"{T(self.ggml_type).name}->int4pack"

    def expert(self, e: int) -> "Int4Weight":
        return Int4Weight(self.name, self.ggml_type, self.shape[1:], self.blocks[e],
                          sum(_pack_bytes(b) for b in self.blocks[e]))

    def rows(self, r0: int, r1: int) -> "Int4Weight":
        blocks = tuple(b for b in self.blocks if b[0] >= r0 and b[1] <= r1)
        assert blocks and blocks[0][0] == r0 and blocks[-1][1] == r1, "rows() must follow row_splits()"
        shifted = tuple((b0 - r0, b1 - r0, p, sz) for b0, b1, p, sz in blocks)
        return Int4Weight(self.name, self.ggml_type, (r1 - r0,) + self.shape[1:], shifted,
                          sum(_pack_bytes(b) for b in shifted))

    def row_splits(self, n: int) -> list[int]:
        """Boundaries on whole packed blocks, near-equal in rows."""
        edges = [b[0] for b in self.blocks] + [self.blocks[-1][1]]
        idx = np.linspace(0, len(self.blocks), min(n, len(self.blocks)) + 1).astype(int)
        return [edges[i] for i in idx]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        out = x.new_empty(x.shape[0], self.shape[-2])
        for r0, r1, packed, sz in self.blocks:
            out[:, r0:r1] = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, INT4_GROUP, sz).float()
        return out


def _pack_rows(w: Weight) -> tuple:
    q, scale, zero = quants.q4_groups(w.data, w.ggml_type)
    n_rows = w.shape[-2]
    blocks = []
    for r0 in range(0, n_rows, INT4_ROWS_PER_PACK):
        r1 = min(n_rows, r0 + INT4_ROWS_PER_PACK)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r0:r1].to(torch.int32), 1)
        sz = torch.stack([scale[r0:r1].T, zero[r0:r1].T], dim=-1).to(torch.bfloat16).contiguous()
        blocks.append((r0, r1, packed, sz))
    return tuple(blocks)


def _pack_bytes(block) -> int:
    _, _, packed, sz = block
    return packed.numel() * packed.element_size() + sz.numel() * sz.element_size()


# Weights read other than through `mul_mat` (embedding rows, per-head attention
# up-projections) stay as stored.
_NOT_REPACKED = re.compile(r"token_embd|attn_kv_b|attn_k_b|attn_v_b")


PAGE_BYTES = 4096


def fault_in(data: np.ndarray) -> None:
    """Read one byte of every page of a memory-mapped tensor the CPU reads in place.

    Why: a page first read during a run is a page fault inside some token, and when
    the page cache has dropped the file's page, a disk read (with the cache partly
    cold, the token embedding's GET_ROWS took 5-8 ms instead of ~30 us on a third of
    a tg32's tokens). llama.cpp's loader prefetches its map for the same reason
    (MAP_POPULATE).
    """
    flat = data.reshape(-1).view(np.uint8)
    if flat.size:
        flat[::PAGE_BYTES].max()


def can_repack(w: Weight) -> bool:
    """torch's int4 pack needs 4-bit groups of 32 and a row count divisible by 16."""
    return (w.ggml_type in (T.Q4_0, T.Q4_1, T.Q4_K) and len(w.shape) >= 2 and w.shape[-1] % INT4_GROUP == 0
            and w.shape[-2] % 16 == 0 and not _NOT_REPACKED.search(w.name))


def native(w) -> bool:
    """Whether matmuls on w run on the native CPU kernels (see the module docstring)."""
    return (NATIVE and isinstance(w, Weight) and w.ggml_type in MATMUL_KERNELS
            and w.data.device.type == "cpu")


def mul_mat(w: "Weight | Int4Weight", x: torch.Tensor) -> torch.Tensor:
    """x [T, K] f32 @ w^T -> [T, N] f32: the one matmul every weight op goes through."""
    if native(w):
        return MATMUL_KERNELS[w.ggml_type](w, x)
    return w.matmul(x)


@dataclass(frozen=True, eq=False)
class GateUpExperts:
    """The buffer of the fused (-fmoe 1) expert op: gate and up experts read together.

    No copy: it refers to the two stored (or repacked) tensors.
    """
    name: str
    gate: "Weight | Int4Weight"
    up: "Weight | Int4Weight"

    @property
    def n_bytes(self) -> int:
        return self.gate.n_bytes + self.up.n_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.gate.shape


def for_gpu(buf, stored: Callable[[str], Weight], device: torch.device, memo: dict[str, object]):
    """A weight buffer as a GPU holds it: every matmul weight dequantised once, at load, to
    float32 in the device's memory (from the stored tensor, whatever -rtr made of the host's),
    so no GPU op converts a weight per call. Exact (the CPU's exact path computes the same),
    at 32 bits a weight in VRAM: 7.1x a Q4_0 tensor's size, 3.8x a Q8_0's; the report's
    bytes stay the tensors' stored bytes. `memo` (by tensor name) makes the fused gate+up
    pair share the gate and up experts' copies."""
    if isinstance(buf, GateUpExperts):
        return GateUpExperts(buf.name, for_gpu(buf.gate, stored, device, memo), for_gpu(buf.up, stored, device, memo))
    if buf.name not in memo:
        w = stored(buf.name)
        data = quants.dequantize(w.data.to(device), w.ggml_type).reshape(w.shape)
        memo[buf.name] = Weight(w.name, int(T.F32), w.shape, data)
    return memo[buf.name]


def on_device(buf) -> bool:
    """Whether a weight buffer lives in a GPU's memory (the emulated accelerator's is the CPU's)."""
    w = buf.gate if isinstance(buf, GateUpExperts) else buf
    return isinstance(w, Weight) and w.data.device.type != "cpu"


class ModelWeights:
    """Every weight buffer the graph reads, by GGUF name, plus derived ones.

    Derived buffers exist only as views over stored tensors: with `fmoe`,
    `blk.N.ffn_gate_up_exps.weight` pairs the gate and up experts for the fused op.
    """

    def __init__(self, model, rtr: bool = False, fmoe: bool = False, progress: Callable[[str], None] | None = None,
                 on_cpu: Callable[[str], bool] = lambda name: True):
        self.rtr, self.fmoe = rtr, fmoe
        self.buffers: dict[str, object] = {}
        self.parents: dict[str, str] = {}       # derived buffer -> the stored tensor it derives from
        for name, info in model.tensors.items():
            w = Weight.from_tensor(info)
            if rtr and can_repack(w):
                if progress:
                    progress(name)
                w = Int4Weight.from_weight(w)
            elif on_cpu(name):
                packed = None
                if native(w) and not name.startswith("token_embd."):      # (read by rows, no matmul)
                    packed = cpu_kernels.repack(w.data.numpy(), w.ggml_type)   # None: not on this SIMD path
                if packed is None:
                    fault_in(info.data)         # read in place from the map, so read it once now
                else:
                    w = dataclasses.replace(w, packed=packed)
            self.buffers[name] = w
        if fmoe:
            for il in range(model.config.n_layer):
                gate = self.buffers.get(f"blk.{il}.ffn_gate_exps.weight")
                if gate is not None:
                    name = f"blk.{il}.ffn_gate_up_exps.weight"
                    self.buffers[name] = GateUpExperts(name, gate, self.buffers[f"blk.{il}.ffn_up_exps.weight"])
                    self.parents[name] = f"blk.{il}.ffn_gate_exps.weight"

    def __getitem__(self, name: str):
        return self.buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.buffers

    def resident_bytes(self) -> int:
        """Bytes held in process memory beyond the file's page cache (repacked weights)."""
        return (sum(w.n_bytes for w in self.buffers.values() if isinstance(w, Int4Weight))
                + sum(w.packed.nbytes for w in self.buffers.values()
                      if isinstance(w, Weight) and w.packed is not None))
