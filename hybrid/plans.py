"""What the engine would run and hold for a placement, worked out without running it (`hyprof advise`).

For a placement (`-ngl` and `-ot` rules, as `hyprof run` takes them) a `Planner` gives:
- per evaluation kind (one generated token, `tg`; one prompt batch, `pp`) the ops of the
  model's graph with the backend each runs on, the bytes it reads and the flops it does,
  and the backend of each split: the scheduler's own split rule (`hybrid.sched.split_graph`)
  on the engine's own graph, so the split count is the one a run will have;
- the accelerator memory it needs: the weights placed there as stored in the file, the KV
  cache of the layers whose attention runs there (as the engine allocates it: float32, `-c`
  positions), and a compute-buffer estimate (`compute_buffer_bytes`).

The weights are the file's mapped tensors, never read or repacked here, so planning a few
hundred placements takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid.gguf_model import GGUFModel
from hybrid.model import Model
from hybrid.placement import Placement, buffer_backends, parse_override_rules, place
from hybrid.sched import split_graph

DEFAULT_N_UBATCH = 512      # llama.cpp's -ub: the batch its compute buffer is reserved for


def compute_buffer_bytes(config, n_ubatch: int = DEFAULT_N_UBATCH) -> int:
    """Estimated compute buffer on the accelerator: two live float32 activations of the widest
    row a layer makes (the dense FFN, the used experts' hidden rows together, or the attention's
    heads), for a batch of n_ubatch tokens, plus one row of logits (a prompt outputs only its
    last token's). ggml's allocator reuses memory between ops, so at any time about two such
    tensors live; this is an estimate, not the allocator's own sum."""
    widest = max(config.n_embd, config.n_ff, config.n_expert_used * config.n_ff_exp,
                 config.n_head * (config.n_embd_head_k + config.n_embd_head_v))
    return 4 * (2 * n_ubatch * widest + config.n_vocab)


@dataclass(frozen=True)
class Plan:
    placement: Placement
    vram_parts: dict                # "weights", "kv_cache", "compute": bytes on the accelerator
    work: dict                      # "tg" | "pp" -> {"ops": ((backend, op, name, bytes, flops), ...),
                                    #   "splits": (backend of each split, ...), "n_tokens": n}
                                    # (the fields of `analysis.advise.Work`)

    @property
    def vram_bytes(self) -> int:
        return sum(self.vram_parts.values())


class Planner:
    """Plans placements of one model: its graphs built once (fused experts and flash attention,
    `hyprof run`'s defaults; MLA off), each placement cut into splits."""

    def __init__(self, gguf: GGUFModel, *, backends, accel: str, n_ctx: int, n_prompt: int, n_kv: int,
                 n_ubatch: int = DEFAULT_N_UBATCH):
        self.gguf, self.backends, self.accel, self.n_kv = gguf, backends, accel, n_kv
        self.config = gguf.config
        self.model = Model(gguf, n_ctx=n_ctx, fmoe=True, fa=True, on_cpu=lambda name: False)
        self.graphs = {"tg": self.model.graph(1, keep_output=True), "pp": self.model.graph(n_prompt, keep_output=True)}
        self.compute_bytes = compute_buffer_bytes(self.config, n_ubatch)
        self.tensor_bytes = {name: t.n_bytes for name, t in gguf.tensors.items()}

    def placement(self, n_gpu_layers: int, rules: list[str]) -> Placement:
        return place(self.gguf.tensors, parse_override_rules(rules, self.backends), n_gpu_layers,
                     self.config.n_layer, self.backends, self.accel)

    def plan(self, n_gpu_layers: int, rules: list[str]) -> Plan:
        placement = self.placement(n_gpu_layers, rules)
        where = buffer_backends(placement, self.model.derived_buffers())
        weights = sum(b for name, b in self.tensor_bytes.items() if placement.backend[name] == self.accel)
        cache = self.model.cache
        kv = sum(4 * cache.n_ctx * math.prod(row) for name, (row, _) in cache.layout.items() if where[name] == self.accel)
        compute = self.compute_bytes if weights else 0
        work = {kind: self._work(kind, where) for kind in self.graphs}
        return Plan(placement, {"weights": weights, "kv_cache": kv, "compute": compute}, work)

    def _work(self, kind: str, where: dict) -> dict:
        graph = self.graphs[kind]
        plan = split_graph(graph, where.__getitem__)
        n_kv = self.n_kv + graph.n_tokens
        ops = []
        for split in plan.splits:
            for node in split.nodes:
                c = node.cost
                experts = self.config.n_expert_used if c.bytes_per_expert else 0
                n_bytes, flops = c.at(n_kv, experts)
                ops.append((split.backend, node.op, node.name, n_bytes, flops))
        return {"ops": tuple(ops), "splits": tuple(s.backend for s in plan.splits), "n_tokens": graph.n_tokens}
