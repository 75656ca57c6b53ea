"""Open a GGUF MoE model: its hyperparameters, vocabulary and memory-mapped tensors.

`load_model` never copies weights: every `TensorInfo.data` is a view into the
file's `numpy.memmap` (profiler/gguf_file.py), so a 9 GiB model costs page cache, not
heap, and only the pages a forward pass touches are read from disk. Everything a
file might get wrong (not a GGUF, truncated, unknown architecture, a tensor type the
engine cannot compute, a missing or misshapen tensor) is a one-line `UserError`
that names the file and the culprit.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, quants

from hybrid import arch as arches
from hybrid.config import ModelConfig
from profiler.gguf_file import GGUFFile, GGUFFormatError, GGUFTensor, printable_name, read_gguf
from profiler.errors import UserError

T = GGMLQuantizationType

# Types the engine computes with: those hybrid/quants.py dequantizes (spelled here without
# importing torch; tests/test_quants.py checks that the two agree).
SUPPORTED_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})

_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                     "tokenizer.ggml.scores")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file, as stored.

    `shape` is in NumPy/torch order (n_out, n_in for a 2-D weight). `data` is the
    file's memory-mapped bytes, never a copy:
    - F32 / F16: float32 / float16 values of `shape`;
    - BF16: uint16 bit patterns of `shape` (`torch.from_numpy(d).view(torch.bfloat16)`);
    - quantized types (Q4_0, Q8_0): raw uint8 blocks, shape[:-1] + (bytes per row,);
      decode with `gguf.quants.dequantize(data, ggml_type)`.
    """
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray = field(repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def dequantize(self) -> np.ndarray:
        """A float32 copy of the values, of `shape` (slow for big tensors: for tests and references)."""
        raw = self.data.view(np.uint8) if self.ggml_type == T.BF16 else self.data
        return np.asarray(quants.dequantize(raw, self.ggml_type), dtype=np.float32).reshape(self.shape)


@dataclass(frozen=True, eq=False)
class GGUFModel:
    path: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]          # by GGUF name, in file order
    metadata: dict[str, Any]                # every key/value of the file but the tokenizer arrays
    vocab: list[str] | None                 # tokenizer.ggml.tokens (token id -> text)
    token_types: list[int] | None           # tokenizer.ggml.token_type (1 normal, 3 control, ...)
    merges: list[str] | None                # tokenizer.ggml.merges ("a b", by rank) for BPE vocabularies
    size_bytes: int                         # the file's size

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_data_bytes(self) -> int:
        """Bytes of all tensor data as stored (without alignment padding)."""
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def ftype(self) -> str:
        """The type holding the most bytes, e.g. "Q4_0" (norms stay F32 in every file)."""
        return max(self.type_bytes().items(), key=lambda kv: kv[1])[0]

    def type_bytes(self) -> dict[str, int]:
        """Bytes per tensor type, largest first (the file's type mix)."""
        mix: collections.Counter[str] = collections.Counter()
        for t in self.tensors.values():
            mix[t.type_name] += t.n_bytes
        return dict(mix.most_common())

    @property
    def bos_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.eos_token_id")


def load_model(path: str | Path) -> GGUFModel:
    """Open a GGUF file memory-mapped and check that the engine can run it."""
    path = Path(path)
    gguf = _open(path)
    meta = {k: v for k, v in gguf.fields.items() if k not in _TOKENIZER_ARRAYS}
    arch_name = meta.get("general.architecture")
    if arch_name not in arches.ARCHS:
        raise UserError(f"{path}: unsupported architecture {arch_name!r} "
                        f"(supported: {', '.join(arches.ARCHS)})")
    arch = arches.ARCHS[arch_name]
    tensors = {t.name: _tensor_info(t) for t in gguf.tensors}

    prefix = f"{arch_name}."
    try:
        fields = arches.config_fields(arch, {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)})
    except arches.MetadataError as e:
        raise UserError(f"{path}: {e}") from None
    fields["n_vocab"] = _n_vocab(path, tensors, gguf)
    try:
        config = ModelConfig(**fields)
    except TypeError as e:
        raise UserError(f"{path}: incomplete metadata ({e})") from None
    problems = arches.config_problems(config)
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    _check_tokenizer(path, gguf, config.n_vocab)
    _check_tensors(path, arch, config, tensors)

    return GGUFModel(path=path, config=config, tensors=tensors, metadata=meta,
                     vocab=gguf.fields.get("tokenizer.ggml.tokens"),
                     token_types=gguf.fields.get("tokenizer.ggml.token_type"),
                     merges=gguf.fields.get("tokenizer.ggml.merges"), size_bytes=path.stat().st_size)


def _open(path: Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except GGUFFormatError as e:
        raise UserError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _tensor_info(t: GGUFTensor) -> TensorInfo:
    data = t.data.view(np.uint16) if t.ggml_type == T.BF16 else t.data
    return TensorInfo(name=t.name, ggml_type=t.ggml_type, shape=tuple(reversed(t.dims)), n_bytes=t.n_bytes,
                      data=data)


def _n_vocab(path: Path, tensors: dict[str, TensorInfo], gguf: GGUFFile) -> int:
    """The embedding's row count is the truth; the vocabulary list must agree with it."""
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise UserError(f"{path}: missing tensor token_embd.weight")
    tokens = gguf.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != emb.shape[0]:
        raise UserError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens but "
                        f"token_embd.weight has {emb.shape[0]} rows")
    return emb.shape[0]


def _check_tokenizer(path: Path, gguf: GGUFFile, n_vocab: int) -> None:
    """The vocabulary's arrays hold what the tokenizer reads, one entry per token, and the special
    token ids are tokens."""
    item_types = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.merges": str, "tokenizer.ggml.token_type": int}
    for key, item in item_types.items():
        values = gguf.fields.get(key)
        if values is not None and not (isinstance(values, list) and all(type(v) is item for v in values)):
            raise UserError(f"{path}: {key} is not an array of {item.__name__} values")
    types = gguf.fields.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != n_vocab:
        raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries but token_embd.weight "
                        f"has {n_vocab} rows")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        token = gguf.fields.get(key)
        if token is not None and not (type(token) is int and 0 <= token < n_vocab):
            raise UserError(f"{path}: {key} is {token!r}, not a token id (0 to {n_vocab - 1})")


def _check_tensors(path: Path, arch: arches.Arch, config: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    for t in tensors.values():
        if t.ggml_type not in SUPPORTED_TYPES:
            raise UserError(f"{path}: tensor {printable_name(t.name)} has type {t.type_name}, which hyprof "
                            f"cannot compute (supported: {', '.join(sorted(x.name for x in SUPPORTED_TYPES))})")
    required = arch.tensors(config, False)
    missing = [n for n in required if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path}: missing tensor {missing[0]}{more} required by {arch.name} "
                        f"with this file's hyperparameters")
    for name, shape in arch.tensors(config, True).items():
        if name in tensors and tensors[name].shape != shape:
            raise UserError(f"{path}: tensor {name} has shape {tensors[name].shape}, expected {shape}: "
                            + _first_difference(tensors[name].shape, shape))


def _first_difference(actual: tuple[int, ...], expected: tuple[arches.Dim, ...]) -> str:
    """Which key the first mismatched dimension comes from, with both values."""
    if len(actual) != len(expected):
        return f"{len(actual)} dimensions, not {len(expected)}"
    i = next(i for i, (a, e) in enumerate(zip(actual, expected)) if a != e)
    return f"dimension {i} is {actual[i]}, but {expected[i].source} gives {int(expected[i])}"
