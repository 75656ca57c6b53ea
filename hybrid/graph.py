"""The compute graph of one evaluation, as ggml has it: a list of named op nodes.

The model (hybrid/model.py) builds a `Graph` per evaluated batch; the scheduler
(hybrid/sched.py) assigns each node a backend from the buffer it reads, cuts the
list into splits and runs them; a plain sequential `compute` runs it on one
backend. A node knows what it computes and what it costs, not where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(eq=False, slots=True)
class Node:
    op: str                         # ggml op name: MUL_MAT, MUL_MAT_ID, RMS_NORM, ROPE, ...
    name: str                       # weight ops: the weight's GGUF name (blk.3.ffn_up_exps);
                                    # others: a node name with the layer (attn_norm-3)
    srcs: tuple["Node", ...]        # inputs, in the order `fn` takes them
    fn: Callable[..., Any] | None   # fn(buf, *src_values) -> value; None for graph inputs
    buffer: str | None = None       # model buffer read: a GGUF weight name or a KV cache
                                    # (cache_k_l3); its placement decides the node's backend
    layer: int = -1
    n_bytes: int = 0                # bytes of the buffer read, as stored (for bandwidth)
    flops: int = 0
    n_tokens: int = 0
    # Ops that CPU workers can share: parallel(buf, *src_values, pool, times) -> value, the op
    # run by every thread of `pool` (a hybrid._kernels.Pool; None: the calling thread alone),
    # filling `times` as the pool does (hybrid/backends/cpu.py turns it into op events).
    parallel: Callable[..., Any] | None = None

    @property
    def is_input(self) -> bool:
        return self.fn is None


@dataclass(slots=True)
class Graph:
    nodes: list[Node]               # topological order; inputs first
    inputs: dict[str, Node]         # graph inputs by name (inp_tokens, inp_pos, ...)
    output: Node                    # the logits node
    n_tokens: int = 0
    n_past: int = 0                 # cached tokens before this evaluation; ops read it when they
                                    # run, so a graph is reused at the next depth (engine.py)
    meta: dict[str, Any] = field(default_factory=dict)


def compute(graph: Graph, input_values: dict[str, Any], buffers: Callable[[str], Any]) -> Any:
    """Run every node in order on one backend and return the output's value.

    The reference executor: no splits, no threads, no events. `buffers(name)`
    returns the buffer (weight or cache) a node reads.
    """
    values: dict[int, Any] = {}
    for node in graph.nodes:
        if node.is_input:
            values[id(node)] = input_values[node.name]
            continue
        buf = buffers(node.buffer) if node.buffer is not None else None
        values[id(node)] = node.fn(buf, *(values[id(s)] for s in node.srcs))
    return values[id(graph.output)]
