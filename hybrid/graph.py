"""The compute graph of one evaluation, as ggml has it: a list of named op nodes.

An architecture's graph builder (hybrid/models/, with hybrid/builder.py) describes a `Graph` per batch size;
the scheduler (hybrid/sched.py) assigns each node a backend from the buffer it reads,
cuts the list into splits and runs them. A node knows what it computes and what it
costs, not where it runs. Nodes are immutable: what an op reads is a formula of the
evaluation (`Cost`), not a figure the op rewrites while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple


@dataclass(frozen=True, slots=True)
class Cost:
    """What an op reads (weight or cache bytes, as stored) and computes, as a formula of the
    evaluation: fixed parts, parts per attended position (n_kv = n_past + n_tokens: the
    attention ops), and a part per distinct expert computed (MUL_MAT_ID: which experts a
    batch uses is known only once the router has run, so the op tells how many it read)."""
    bytes: int = 0
    flops: int = 0
    bytes_per_kv: int = 0
    flops_per_kv: int = 0
    bytes_per_expert: int = 0

    def at(self, n_kv: int, n_experts: int = 0) -> tuple[int, int]:
        """(bytes, flops) of one run at n_kv attended positions having computed n_experts
        (`hybrid.program.run_program` computes the same inline). An op with a per-expert part
        returns (value, experts computed) instead of its value."""
        return (self.bytes + self.bytes_per_kv * n_kv + self.bytes_per_expert * n_experts,
                self.flops + self.flops_per_kv * n_kv)


class Forms(NamedTuple):
    """How an op runs on one buffer, made when a backend compiles its split (`Node.make`):
    `serial(*src_values)` on the calling thread, and where the op has one, `parallel(*src_values,
    pool, times)` shared by the threads of a CPU pool (a hybrid._kernels.Pool), filling `times`
    as the pool does (hybrid/backends/cpu.py turns it into op events). An op that reads a
    weight binds its kernels to the buffer it is given: the host's, or a device's own copy.

    `capture(value)`, where the op has one: after a run that gave `value`, the op bound to the
    memory that run used (its native call with its addresses), run(*_) -> the same value, or
    None where it cannot be (it ran in torch, or into fresh memory). A backend whose program's
    memory is fixed captures it so (`hybrid.program.Captures`), as a CUDA graph is captured."""
    serial: Callable[..., Any]
    parallel: Callable[..., Any] | None = None
    capture: Callable[[Any], Callable[..., Any] | None] | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Node:
    op: str                         # ggml op name: MUL_MAT, MUL_MAT_ID, RMS_NORM, ROPE, ...
    name: str                       # weight ops: the weight's GGUF name (blk.3.ffn_up_exps);
                                    # others: a node name with the layer (attn_norm-3)
    srcs: tuple["Node", ...]        # inputs, in the order the op's forms take them
    make: Callable[[Any], Forms] | None  # make(buf) -> the op's forms on buffer buf; None: a graph input
    buffer: str | None = None       # model buffer read: a GGUF weight name or a KV cache
                                    # (cache_k_l3); its placement decides the node's backend
    layer: int = -1
    cost: Cost = Cost()
    n_tokens: int = 0

    @property
    def is_input(self) -> bool:
        return self.make is None


@dataclass(slots=True)
class Graph:
    nodes: list[Node]               # topological order; inputs first
    inputs: dict[str, Node]         # graph inputs by name (inp_tokens, inp_pos, ...)
    output: Node                    # the logits node
    n_tokens: int = 0
    n_past: int = 0                 # cached tokens before this evaluation; ops read it when they
                                    # run, so a graph is reused at the next depth (engine.py)
    input_values: dict[str, Any] = field(default_factory=dict)   # the inputs' memory, the graph's
                                    # own (refilled each evaluation: `hybrid.model.Model.inputs`)
    meta: dict[str, Any] = field(default_factory=dict)
    routes: list[Node] = field(default_factory=list)   # each MoE layer's TOP_K (int64 [T, U]), in
                                    # layer order: the experts it chose, read after the graph (routes.py)

    @property
    def n_kv(self) -> int:
        """Positions the attention ops attend to in the evaluation now running."""
        return self.n_past + self.n_tokens
