"""A loaded GGUF MoE model: its weights, its KV cache and its options, ready to build graphs.

The architecture (`general.architecture`) picks the graph builder (hybrid/models/); this
file is what every architecture shares: the buffers ops read, the rope table, the
graph's inputs, and a plain sequential `forward` (the reference the engine's scheduled
runs are tested against).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from hybrid.config import ModelConfig
from hybrid.graph import Graph
from hybrid.models import ARCHITECTURES
from hybrid.rope import rope_cos_sin
from hybrid.program import compute
from hybrid.weights import ModelWeights
from profiler.errors import UserError

DEFAULT_N_CTX = 4096     # as llama.cpp's default context; the cache is allocated for all of it


def architecture(config: ModelConfig):
    """The graph-builder module of a model's architecture (hybrid/models/)."""
    arch = ARCHITECTURES.get(config.arch)
    if arch is None:
        raise UserError(f"architecture {config.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


class KVCache:
    """The KV cache: its layout (each buffer's per-position shape and parent tensor, from the
    architecture), its context length, and how many positions it holds (`n_past`).

    Its buffers are allocated by whoever holds them (`allocate`): the engine's backends each
    allocate the caches of the layers whose attention they run, in their own memory."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], str]], n_ctx: int):
        self.layout, self.n_ctx, self.n_past = layout, n_ctx, 0

    def allocate(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        row, _ = self.layout[name]
        return torch.zeros(self.n_ctx, *row, device=device)

    @property
    def parents(self) -> dict[str, str]:
        return {name: parent for name, (_, parent) in self.layout.items()}

    @property
    def n_bytes(self) -> int:
        return sum(4 * self.n_ctx * math.prod(row) for row, _ in self.layout.values())


def kv_cache_bytes(config: ModelConfig, n_ctx: int, mla: bool) -> int:
    """Bytes of a whole KV cache of n_ctx positions (float32)."""
    return KVCache(architecture(config).cache_layout(config, mla), n_ctx).n_bytes


class Model:
    """A loaded GGUF with its weights, KV cache and options, ready to build graphs.

    `mla`: absorbed attention over the compressed cache (-mla 1); `fa`: the attention's kq,
    softmax and kqv as one FLASH_ATTN_EXT op (-fa 1); `fmoe`: fused
    gate+up expert op (-fmoe 1); `rtr`: 4-bit weights repacked at load into torch's
    int4 pack (-rtr 1); `on_cpu(name)`: whether a weight is read on the CPU, where
    the native kernels' types (all of them, on AVX2 and AVX-512) are repacked for them
    (`hybrid.cpu_kernels.repack`).
    """

    def __init__(self, gguf, n_ctx: int | None = None, mla: bool = False, fmoe: bool = False,
                 rtr: bool = False, progress: Callable[[str], None] | None = None,
                 on_cpu: Callable[[str], bool] = lambda name: True, fa: bool = False):
        self.gguf, self.config = gguf, gguf.config
        self.arch = architecture(self.config)
        self.mla, self.fmoe, self.rtr, self.fa = mla, fmoe, rtr, fa
        self.n_ctx = min(n_ctx or DEFAULT_N_CTX, self.config.n_ctx_train)
        self.rope = self.arch.rope_setup(self.config, gguf.metadata)
        self._cos_sin = {torch.device("cpu"): rope_cos_sin(torch.arange(self.n_ctx), self.rope)}
        self.weights = ModelWeights(gguf, rtr=rtr, fmoe=fmoe, progress=progress, on_cpu=on_cpu)
        self.cache = KVCache(self.arch.cache_layout(self.config, mla), self.n_ctx)
        self._host_caches: dict[str, torch.Tensor] = {}

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n_ctx, n_rot/2] of every position (`rope_cos_sin`) on `device`: a table
        made once per model, of which each ROPE op reads its tokens' rows. Computed per
        evaluation instead, in torch, it cost more than all the model's ROPE arithmetic."""
        if device not in self._cos_sin:
            self._cos_sin[device] = tuple(t.to(device) for t in self._cos_sin[torch.device("cpu")])
        return self._cos_sin[device]

    def buffer(self, name: str):
        """The host's buffer a node reads: a weight, or a KV-cache tensor (allocated here at
        its first use: a cache that a device holds is never allocated on the host)."""
        if name in self.cache.layout:
            if name not in self._host_caches:
                self._host_caches[name] = self.cache.allocate(name)
            return self._host_caches[name]
        return self.weights[name]

    def buffer_names(self) -> list[str]:
        return list(self.weights.buffers) + list(self.cache.layout)

    def derived_buffers(self) -> dict[str, str]:
        """Buffers that are not stored tensors -> the stored tensor each derives from (its
        placement is theirs, `hybrid.placement.buffer_backends`): the KV caches, the fused
        gate+up experts."""
        return {**self.cache.parents, **self.weights.parents}

    def graph(self, n_tokens: int, all_logits: bool = False, keep_output: bool = False) -> Graph:
        """The graph evaluating the next n_tokens after what the cache holds."""
        return self.arch.build_graph(self, n_tokens, self.cache.n_past, all_logits, keep_output)

    def inputs(self, graph: Graph, tokens: list[int]) -> dict[str, torch.Tensor]:
        """The graph's inputs, tokens and their positions, written into the graph's own input
        memory through NumPy views made once per graph (made in torch, the inputs cost ~0.1 ms a
        generated token, with the interpreter and torch cold after the token's weights; a
        `.numpy()` each, ~20 us)."""
        values = graph.input_values
        arrays = graph.meta.get("input_arrays")
        if arrays is None:
            arrays = graph.meta["input_arrays"] = values["inp_tokens"].numpy(), values["inp_pos"].numpy()
        token_ids, pos = arrays
        if len(tokens) == 1:          # a generated token: item assignment, ~10 us less than a slice's cold
            token_ids[0], pos[0] = tokens[0], self.cache.n_past
        else:
            token_ids[:] = tokens
            pos[:] = range(self.cache.n_past, self.cache.n_past + len(tokens))
        return values

    def forward(self, tokens: list[int], all_logits: bool = False,
                run: Callable[[Graph, dict, Callable], torch.Tensor] = compute) -> torch.Tensor:
        """Evaluate tokens after the cached ones, advance the cache, return logits.

        `run` executes the graph: the sequential `hybrid.program.compute` by
        default, or the scheduler's.
        """
        if self.cache.n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"{self.cache.n_past + len(tokens)} tokens exceed the context of {self.n_ctx}")
        graph = self.graph(len(tokens), all_logits)
        logits = run(graph, self.inputs(graph, tokens), self.buffer)
        self.cache.n_past += len(tokens)
        return logits

    def reset(self) -> None:
        self.cache.n_past = 0
