"""The backend scheduler: cut a graph into backend splits, then run them.

This is ggml's `ggml_backend_sched` in small. `split_graph` holds the split rule,
as ggml's numbered passes, each a small function over one assignment list
parallel to `graph.nodes` (`None`: not yet assigned) that records why each node
landed where it did (its cause, for `describe` and `hyprof model info`):

  1. `1.inp`: graph inputs are set on the host, so they live on the CPU.
     `1.buf`: an op that reads a buffer (a weight or a KV cache) runs on the
     backend holding that buffer, so weights never move, except that
     `1.off`: a matmul on a host weight whose batch is big enough runs on the
     accelerator, which uploads the weight (op offload, hybrid/offload.py).
  2. Weightless ops follow their neighbours along the graph, devices first:
     `2.dev_down` / `2.dev_up` spread device placements down and then up the
     node list, stopping at CPU nodes, then `2.rest_down` / `2.rest_up` spread
     whatever is left. Devices first keeps the glue ops (norms, adds, routing)
     on the accelerator and the CPU splits as short as their weights allow.
  3. `3.src`: a node still unassigned (a graph without any buffer) takes its
     first source's backend, else the CPU.
  4. Maximal runs of same-backend nodes become splits; each split's inputs are
     the values it reads that were computed on another backend. A value is
     copied to a backend once per graph, by the first split there that needs it.
     An offloaded op starts a split of its own, as in ggml: the split uploads its
     weight (a MUL_MAT_ID's used experts only, known once the earlier splits have
     run) before it computes.

With DeepSeek2, `-ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"` gives two splits per MoE
layer: [device: attention, router, shared expert, ...] [CPU: routed experts].

Each backend compiles a split once per plan into a program (hybrid/program.py), which
the scheduler keeps with the plan and runs at every evaluation.

`Scheduler.compute` then runs each split as ggml's `compute_splits` does: set up,
copy its inputs to its backend, dispatch and compute (CPU: on the worker pool;
devices: queued on their stream, run by the device while the host waits on it),
and the split computing the graph's output reads it back to the host. A split
that starts with an offloaded op first reads the batch's expert ids back and
uploads the experts they use (`_upload`: a `copy` event of kind `weights` each).
Every step goes to the recorder on the main lane; ops go to the lane that ran them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hybrid.graph import Graph, Node
from hybrid.offload import OpOffload, stored_parts, used_experts
from hybrid.placement import CPU
from hybrid.routes import record_routes
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE, WEIGHTS_COPY

if TYPE_CHECKING:
    from hybrid.program import Program


@dataclass(frozen=True, eq=False)
class Split:
    """One run of consecutive nodes on one backend (ggml's `ggml_backend_sched_split`)."""
    backend: str
    i_start: int                  # index of its first node in graph.nodes
    i_end: int                    # one past its last node
    nodes: tuple[Node, ...]       # the ops it runs, in order (graph inputs belong to no split)
    inputs: tuple[Node, ...]      # values computed on another backend, copied here first
    upload: Node | None = None    # an offloaded op (its first node): its host weight is uploaded first


@dataclass(frozen=True, eq=False)
class SplitPlan:
    splits: tuple[Split, ...]
    causes: tuple[str, ...]           # per graph node: why it landed where it did (1.buf, 2.dev_down, ...)
    backend_of: Mapping[Node, str]    # every node's backend

    @property
    def n_copies(self) -> int:
        return sum(len(s.inputs) for s in self.splits)


def split_graph(graph: Graph, buffer_backend: Callable[[str], str], offload: OpOffload | None = None) -> SplitPlan:
    """The split rule: assign every node a backend and cut the graph into splits.

    `buffer_backend(name)` is the backend holding a weight or KV-cache buffer (from
    the placement); `offload` says which ops on host weights go to the accelerator
    (None: none). The passes are described in the module docstring.
    """
    nodes = graph.nodes
    backends: list[str | None] = [None] * len(nodes)
    causes: list[str] = [""] * len(nodes)
    _assign_by_buffer(nodes, backends, causes, buffer_backend, offload)
    _expand(nodes, backends, causes, "2.dev_down", reverse=False, devices_only=True)
    _expand(nodes, backends, causes, "2.dev_up", reverse=True, devices_only=True)
    _expand(nodes, backends, causes, "2.rest_down", reverse=False, devices_only=False)
    _expand(nodes, backends, causes, "2.rest_up", reverse=True, devices_only=False)
    backend_of = _assign_leftovers(nodes, backends, causes)
    return SplitPlan(splits=_cut_splits(nodes, backends, causes, backend_of),
                     causes=tuple(causes),
                     backend_of=backend_of)


def _assign_by_buffer(nodes, backends, causes, buffer_backend, offload) -> None:
    """Pass 1: inputs on the host; ops that read a buffer where the buffer is, or, for a big
    batch's matmul on a host weight, on the accelerator (`OpOffload.wants`)."""
    for i, node in enumerate(nodes):
        if node.is_input:
            backends[i], causes[i] = CPU, "1.inp"
        elif node.buffer is not None:
            backends[i], causes[i] = buffer_backend(node.buffer), "1.buf"
            if (backends[i] == CPU and offload is not None
                    and offload.wants(node.op, node.buffer, node.n_tokens)):
                backends[i], causes[i] = offload.accel, "1.off"


def _expand(nodes, backends, causes, cause: str, *, reverse: bool, devices_only: bool) -> None:
    """Pass 2: give unassigned ops the backend of the nearest assigned op before them
    (after them when `reverse`); with `devices_only`, a CPU op stops the spreading."""
    current = None
    order = range(len(nodes) - 1, -1, -1) if reverse else range(len(nodes))
    for i in order:
        if nodes[i].is_input:
            continue
        b = backends[i]
        if b is not None:
            current = None if devices_only and b == CPU else b
        elif current is not None:
            backends[i], causes[i] = current, cause


def _assign_leftovers(nodes, backends, causes) -> dict[Node, str]:
    """Pass 3: what is still unassigned follows its first source, else the CPU."""
    backend_of: dict[Node, str] = {}
    for i, node in enumerate(nodes):
        if backends[i] is None:
            src = next((backend_of[s] for s in node.srcs if s in backend_of), CPU)
            backends[i], causes[i] = src, "3.src"
        backend_of[node] = backends[i]
    return backend_of


def _cut_splits(nodes, backends, causes, backend_of) -> tuple[Split, ...]:
    """Pass 4: maximal same-backend runs, each with the inputs it must copy in; an offloaded
    op starts a new one, which uploads its weight."""
    splits: list[Split] = []
    copied: set[tuple[Node, str]] = set()   # (value, backend) already copied this graph
    run: list[Node] = []
    inputs: list[Node] = []
    i_start = -1

    def close(i_end: int) -> None:
        if run:
            splits.append(Split(backends[i_start], i_start, i_end, tuple(run), tuple(inputs),
                                run[0] if causes[i_start] == "1.off" else None))

    for i, node in enumerate(nodes):
        if node.is_input:
            continue
        b = backends[i]
        if not run or b != backends[i_start] or causes[i] == "1.off":
            close(i)
            run, inputs, i_start = [], [], i
        run.append(node)
        for src in node.srcs:
            if backend_of[src] != b and (src, b) not in copied:
                copied.add((src, b))
                inputs.append(src)
    close(len(nodes))
    return tuple(splits)


class Scheduler:
    """Runs split plans on a set of backends (`hybrid/backends/`), recording every step.

    A backend has `name`, `is_device`, `recorder`, `compile(split) -> Program`,
    `compute(program, values, graph_id, i_split, n_kv)` (which runs `run_program`),
    `begin_op()` / `end_op(...)`, `to_device(value, node)` (host -> backend), `to_host(value, node)`
    (both into memory kept per node: a captured program reads its copied inputs in place)
    and `synchronize()`. Programs are compiled once per plan (the engine reuses a plan for
    every evaluation of a batch size) and kept while the plan lives.
    Each backend keeps its own values: `values[backend][node]` is a node's value
    in that backend's memory, the node's own output or a copy of it.

    A split is: set-up, copy its inputs in, dispatch and compute, and for a device
    wait (`sync`) until its queue has run, since the next split reads its results;
    so every op of a split, on whichever lane, lies inside the split's interval.
    The host's time in that wait is what the report splits into device compute
    and pure synchronisation.
    """

    def __init__(self, backends: Mapping[str, Any], recorder: Recorder):
        self.backends = dict(backends)
        self.recorder = recorder
        self.lane = recorder.lane(MAIN_LANE)
        self._programs: weakref.WeakKeyDictionary[SplitPlan, tuple[Program, ...]] = weakref.WeakKeyDictionary()

    def programs(self, plan: SplitPlan) -> tuple["Program", ...]:
        """Each split of the plan compiled by its backend, once per plan."""
        programs = self._programs.get(plan)
        if programs is None:
            programs = self._programs[plan] = tuple(self.backends[s.backend].compile(s) for s in plan.splits)
        return programs

    def compute(self, graph: Graph, plan: SplitPlan, inputs: Mapping[str, Any] | None,
                graph_id: int) -> Any:
        """Evaluate one graph; returns the output's value on the host. Its inputs are the
        graph's own input memory (`Graph.input_values`, filled by the caller: the engine's
        `Model.inputs`), or, given `inputs`, these copied into it (made at the first call)."""
        values = {name: {} for name in self.backends}
        host = values[CPU]
        own = graph.input_values
        for name, value in (inputs or {}).items():
            if name in own:
                own[name].copy_(value)
            else:
                own[name] = value.clone()
        for name, node in graph.inputs.items():
            host[node] = own[name]
        programs = self.programs(plan)
        try:
            for i_split, split in enumerate(plan.splits):
                self._run_split(split, programs[i_split], i_split, plan, values, graph_id, graph)
        except BaseException:   # Ctrl-C or an op's error: leave no device work behind
            self._abandon()
            raise
        if self.recorder.enabled and graph.routes:
            record_routes(self.recorder, self.lane, graph, graph_id, lambda n: values[plan.backend_of[n]][n])
        return host[graph.output]

    def _run_split(self, split: Split, program: "Program", i_split: int, plan: SplitPlan,
                   values: dict[str, dict], graph_id: int, graph: Graph) -> None:
        rec, lane = self.recorder, self.lane
        on = rec.enabled
        t_split = rec.now() if on else 0
        backend = self.backends[split.backend]
        dst_values = values[split.backend]
        if on:
            lane.phase(t_split, rec.now() - t_split, graph_id, "split_setup")
        for src in split.inputs:
            src_backend = plan.backend_of[src]
            dst_values[src] = self._copy(src, values[src_backend][src], src_backend,
                                         split.backend, graph_id, i_split)
        if split.upload is not None:
            self._upload(split.upload, backend, dst_values, graph_id, i_split)
        backend.compute(program, dst_values, graph_id, i_split, graph.n_kv)
        output = graph.output
        if backend.is_device:
            t = rec.now() if on else 0
            backend.synchronize()
            if on:
                lane.sync(t, rec.now() - t, graph_id, i_split, split.backend)
            if output in dst_values:   # the graph's result goes back to the host
                values[CPU][output] = self._copy(output, dst_values[output], split.backend, CPU,
                                                 graph_id, i_split)
        if on:
            lane.split(t_split, rec.now() - t_split, graph_id, i_split, split.backend,
                       len(split.nodes), len(split.inputs))

    def _copy(self, node: Node, value: Any, src: str, dst: str, graph_id: int,
              i_split: int) -> Any:
        """Copy one node's value between backends (device to device through the
        host, as one copy event)."""
        rec = self.recorder
        t = rec.now() if rec.enabled else 0
        src_backend, dst_backend = self.backends[src], self.backends[dst]
        if src_backend.is_device:
            value = src_backend.to_host(value, node)
        if dst_backend.is_device:
            value = dst_backend.to_device(value, node)
        if rec.enabled:
            self.lane.copy(t, rec.now() - t, graph_id, i_split, src, dst, nbytes(value),
                           node.name, None)
        return value

    def _upload(self, node: Node, backend: Any, values: dict, graph_id: int, i_split: int) -> None:
        """Op offload's upload: the host weight of `node` into the device's staging memory, of a
        MUL_MAT_ID only the rows of the experts its batch uses (its ids, computed by an earlier
        split on this device, which the scheduler has synchronised, read back first), one
        `copy` event of kind `weights` per stored tensor."""
        rec = self.recorder
        experts = None if node.op == "MUL_MAT" else used_experts(values[node.srcs[1]])
        for name in stored_parts(self.backends[CPU].buffers[node.buffer]):
            t = rec.now() if rec.enabled else 0
            n_bytes = backend.upload(name, experts)
            if rec.enabled:
                self.lane.copy(t, rec.now() - t, graph_id, i_split, CPU, backend.name, n_bytes,
                               name.removesuffix(".weight"), WEIGHTS_COPY)

    def _abandon(self) -> None:
        """Wait for every device to finish what was queued, ignoring its errors."""
        for backend in self.backends.values():
            if backend.is_device:
                try:
                    backend.synchronize()
                except Exception:
                    pass


def nbytes(value: Any) -> int:
    """Bytes of a value: a tensor or array, or a tuple/list of them."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    n = getattr(value, "nbytes", None)
    return int(n) if n is not None else 0


def map_values(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply `fn` to a tensor value, or to each tensor of a tuple/list value."""
    if isinstance(value, (tuple, list)):
        return type(value)(map_values(fn, v) for v in value)
    return fn(value)


def describe(plan: SplitPlan) -> list[dict]:
    """The plan as plain rows, one per split: what it runs and what it copies in."""
    return [{"split": i, "backend": s.backend, "n_nodes": len(s.nodes),
             "nodes": [n.name for n in s.nodes], "inputs": [n.name for n in s.inputs],
             "upload": None if s.upload is None else s.upload.name}
            for i, s in enumerate(plan.splits)]

