"""Programs: a backend's compiled split, the one run loop, and capture at the first run.

A backend compiles each split of a plan into a `Program` (`compile(split)`): its ops as
`Step`s, each one of the node's forms bound to the backend's buffer (its own copy of the
weight) and, on the CPU, to its thread pool. One run loop, `run_program`, runs any
backend's program and calls that backend's one recording hook per op (`begin_op` /
`end_op`), the op's bytes and flops from its node's `Cost`. The CPU and the emulated ACC0,
which compute on the host's memory, then capture each program at its first run
(`Captures`), as a CUDA graph is captured. `compute` is the sequential reference executor
on the same loop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from hybrid.graph import Graph, Node
from hybrid.placement import CPU
from hybrid.sched import Split


@dataclass(frozen=True, eq=False, slots=True)
class Step:
    """One op of a backend's program, as that backend runs it: `run(*src_values, *tail)`, one
    of the node's forms on the backend's buffer, bound when the split was compiled; `tail`
    is what the form takes last (a CPU pool and its times array, for a `pooled` step);
    `srcs` the values it is given (none, once captured: its call holds their addresses)."""
    node: Node
    run: Callable[..., Any]
    tail: tuple = ()
    pooled: bool = False        # shared by the CPU pool's threads: its events come from the pool
    capture: Callable[[Any], Callable[..., Any] | None] | None = None     # `Forms.capture`
    srcs: tuple[Node, ...] | None = None      # None: the node's

    def __post_init__(self):
        if self.srcs is None:
            object.__setattr__(self, "srcs", self.node.srcs)


@dataclass(frozen=True, eq=False)
class Program:
    """A split compiled by its backend: its steps in order, the values it reads that it does
    not compute, and of those the ones in memory fixed for the graph's life (`fixed`): the
    graph's inputs, and the values copied in from other backends (copies land in memory
    kept per node, `to_host` / `to_device`)."""
    steps: tuple[Step, ...]
    inputs: tuple[Node, ...]
    fixed: frozenset[Node] = frozenset()

    @classmethod
    def of(cls, steps: tuple[Step, ...], copied: tuple[Node, ...] = ()) -> "Program":
        made = {step.node for step in steps}
        inputs = tuple(dict.fromkeys(s for step in steps for s in step.node.srcs if s not in made))
        return cls(steps, inputs, frozenset(n for n in inputs if n.is_input or n in copied))


def serial_program(split: Split, buffers: Mapping[str, Any]) -> Program:
    """A split's ops each run whole by the thread that runs the program (a device's, or the
    sequential `compute`'s)."""
    steps = []
    for node in split.nodes:
        forms = node.make(buffers[node.buffer] if node.buffer is not None else None)
        steps.append(Step(node, forms.serial, capture=forms.capture))
    return Program.of(tuple(steps), split.inputs)


class Captures:
    """A backend's programs as captured at their first run, for a backend that computes on the
    host's memory (the CPU, the emulated ACC0).

    At its first run a program's inputs that are not in fixed memory (`Program.fixed`: values
    of the same backend's earlier splits) are copied into memory of its own (`slots`), and it
    runs live (each op's Python checks its operands and calls its native kernel); then each op
    whose operands are all fixed memory (fixed inputs, slots, or what ops captured before it
    wrote) and that noted its native call is captured (`Forms.capture`): from the next run on
    it is that call with those addresses, those inputs copied into the slots first. Ops that
    ran in torch or into fresh memory (a prompt's large values), and those reading their
    values, stay live. So a generated
    token costs one call per op, not its Python (5-30 us an op, cold after the expert weights),
    and no op asks whether its inputs are the objects of the last run: that they are is how the
    captured program was made."""

    def __init__(self):
        self._done: weakref.WeakKeyDictionary[Program, tuple[Program, tuple]] = weakref.WeakKeyDictionary()

    def run(self, program: Program, values: dict, backend: Any, graph_id: int, i_split: int, n_kv: int) -> None:
        done = self._done.get(program)
        if done is not None:
            captured, slots = done
            for node, slot in slots:
                slot.copy_(values[node])
                values[node] = slot
            run_program(captured, values, backend, graph_id, i_split, n_kv)
            return
        slots = tuple((node, values[node].clone()) for node in program.inputs   # (other values stay live)
                      if node not in program.fixed and isinstance(values[node], torch.Tensor))
        for node, slot in slots:
            values[node] = slot
        run_program(program, values, backend, graph_id, i_split, n_kv)
        self._done[program] = _captured(program, values, {node for node, _ in slots} | program.fixed), slots


def _captured(program: Program, values: dict, fixed: set) -> Program:
    """The program after a live run that left `values`: each op captured where its operands
    are `fixed` memory and it can be (`Forms.capture`), which makes its value fixed too."""
    steps = []
    for step in program.steps:
        run = None
        if step.capture is not None and all(s in fixed for s in step.node.srcs):
            run = step.capture(values[step.node])
        if run is None:
            steps.append(step)
        else:
            steps.append(Step(step.node, run, (), step.pooled, srcs=()))
            fixed.add(step.node)
    return Program(tuple(steps), program.inputs)


def run_program(program: Program, values: dict, backend: Any, graph_id: int, i_split: int, n_kv: int) -> None:
    """The run loop, the one every backend runs its programs with: each op's value from its
    sources' values, and, when recording, the backend's hook around it (`begin_op()` -> a
    token, `end_op(token, step, graph_id, i_split, bytes, flops)`), the op's bytes and flops
    from its node's `Cost` at this evaluation's n_kv and the experts it computed.

    Written for its cost: it runs ~35 ops a layer per token, and each Python frame it adds
    per op (a method, a property, a lambda) costs generation ~0.5 us an op with the
    interpreter cold after the expert weights (`sched` in the report)."""
    get = values.__getitem__
    timed = backend.recorder.enabled
    begin, end = backend.begin_op, backend.end_op
    for step in program.steps:
        node = step.node
        cost = node.cost
        token = begin() if timed else None
        value = step.run(*map(get, step.srcs), *step.tail)
        n_experts = 0
        if cost.bytes_per_expert:                   # (value, experts computed)
            value, n_experts = value
        values[node] = value
        if timed:
            end(token, step, graph_id, i_split,
                cost.bytes + cost.bytes_per_kv * n_kv + cost.bytes_per_expert * n_experts,
                cost.flops + cost.flops_per_kv * n_kv)


class _Unrecorded:
    """The recorder of the sequential `compute`: nothing is recorded."""
    enabled = False


class _Sequential:
    recorder = _Unrecorded()
    begin_op = end_op = None


def compute(graph: Graph, input_values: Mapping[str, Any], buffers: Callable[[str], Any]) -> Any:
    """Run every node in order on the calling thread and return the output's value: the
    reference executor (no splits, no threads, no events). `buffers(name)` returns the
    buffer (weight or cache) a node reads."""
    values: dict[Node, Any] = {node: input_values[name] for name, node in graph.inputs.items()}
    ops = [node for node in graph.nodes if not node.is_input]
    split = Split(CPU, 0, len(graph.nodes), tuple(ops), ())
    run_program(serial_program(split, {n.buffer: buffers(n.buffer) for n in ops if n.buffer is not None}),
                values, _Sequential, -1, 0, graph.n_kv)
    return values[graph.output]
