"""The hybrid engine: a model placed across backends, evaluated split by split.

`Engine` ties the parts together: it loads a GGUF model (hybrid/gguf_model.py),
places each tensor on a backend (`-ngl`, `-ncmoe`, `-ot`, `--accel`; hybrid/placement.py) and
each derived buffer (KV caches, fused experts) where its parent tensor is, gives
each backend its buffers (a device its own copy of the weights it holds and the KV
caches it allocates), builds the graph of each evaluation
(hybrid/model.py, hybrid/models/), cuts it into splits and runs them (hybrid/sched.py) on the CPU
worker pool and the accelerator (hybrid/backends/), a big batch's matmuls on host weights
moved to the accelerator as llama.cpp moves them (op offload, hybrid/offload.py; `-nopo 1`
turns it off). It implements the runner's `BenchEngine` (profiler/bench.py), so `hyprof run`
and `hyprof generate` drive it.

A batch longer than the ubatch (`-ub`, llama.cpp's n_ubatch) runs as several graphs of at
most that many tokens, as llama.cpp's decode splits a batch. Each evaluation is one `graph`
event holding its phases (`graph_build`: the model graph and its splits; `set_inputs`;
`sample`) and the scheduler's events.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import torch

from hybrid import ops
from hybrid.backends.acc import AccBackend
from hybrid.backends.cpu import CpuBackend
from hybrid.gguf_model import load_model
from hybrid.graph import Graph
from hybrid.model import Model
from hybrid.offload import OpOffload, min_batch_from_env
from hybrid.placement import (CPU, available_backends, backend_loads, buffer_backends, n_cpu_moe_rule,
                              parse_override_rules, place)
from hybrid.sched import Scheduler, SplitPlan, split_graph
from hybrid.weights import Weight, for_gpu
from profiler.errors import UserError
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE

MAX_GRAPHS = 8      # reusable graphs kept, one per batch size (pp, tg, depth prompts)
DEFAULT_UBATCH = 512    # llama.cpp's and llama-bench's n_ubatch


def copy_buffer(buf: Any, move: Callable[[torch.Tensor], torch.Tensor],
                memo: dict[int, Any]) -> Any:
    """A copy of a weight (or cache) object with every tensor in it passed through
    `move`; objects met before (the gate and up experts a fused buffer refers
    to) are copied once, through `memo`."""
    key = id(buf)
    if key in memo:
        return memo[key]
    if isinstance(buf, torch.Tensor):
        out = move(buf)
    elif isinstance(buf, tuple):
        out = tuple(copy_buffer(b, move, memo) for b in buf)
    elif dataclasses.is_dataclass(buf) and not isinstance(buf, type):
        out = dataclasses.replace(buf, **{f.name: copy_buffer(getattr(buf, f.name), move, memo)
                                          for f in dataclasses.fields(buf) if f.init})
    else:
        out = buf
    memo[key] = out
    return out


class Engine:
    """A GGUF model placed on CPU + accelerator, evaluated through the scheduler."""

    def __init__(self, model_path: str, *, threads: int = 1, n_gpu_layers: int = 0,
                 overrides: Sequence[str] = (), accel: str = "auto", mla: int = 0,
                 fmoe: int = 0, rtr: int = 0, poll: int = 0, recorder: Recorder | None = None,
                 n_ctx: int | None = None, fa: int = 0, n_ubatch: int = DEFAULT_UBATCH, n_cpu_moe: int = 0,
                 no_op_offload: int = 0, op_offload_min_batch: int | None = None,
                 op_offload: str = "llama.cpp"):
        """`op_offload_min_batch` None: GGML_OP_OFFLOAD_MIN_BATCH, else 32, as llama.cpp reads it;
        `op_offload`: the rule, "llama.cpp" or "ik" (hybrid/offload.py)."""
        if threads < 1:
            raise UserError(f"-t {threads}: the thread count must be >= 1")
        if n_ubatch < 1:
            raise UserError(f"-ub {n_ubatch}: the ubatch must be >= 1 token")
        if n_cpu_moe < 0:
            raise UserError(f"-ncmoe {n_cpu_moe}: the layer count must be >= 0")
        if op_offload_min_batch is None:
            op_offload_min_batch = min_batch_from_env()
        self.recorder = recorder if recorder is not None else Recorder(enabled=False)
        self.lane = self.recorder.lane(MAIN_LANE)
        self.gguf = load_model(model_path)
        backends, self.accel = available_backends(accel)
        rules = parse_override_rules([*n_cpu_moe_rule(n_cpu_moe), *overrides], backends)
        c = self.gguf.config
        self.placement = place(self.gguf.tensors, rules, n_gpu_layers, c.n_layer, backends,
                               self.accel)
        self.model = Model(self.gguf, n_ctx=n_ctx, mla=bool(mla), fmoe=bool(fmoe), rtr=bool(rtr), fa=bool(fa),
                           on_cpu=lambda name: self.placement.backend.get(name) == CPU)
        self.n_vocab = c.n_vocab
        self.n_ubatch = n_ubatch
        self.offload = OpOffload(None if no_op_offload else self.accel, op_offload_min_batch, op_offload,
                                 c.n_expert, c.n_expert_used, frozenset(self.model.weights.buffers))
        self.options = dict(threads=threads, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe,
                            overrides=list(overrides), mla=mla, fa=fa, fmoe=fmoe, rtr=rtr, poll=poll,
                            n_ubatch=n_ubatch, no_op_offload=no_op_offload,
                            op_offload_min_batch=op_offload_min_batch, op_offload=op_offload)
        self._buffer_backend = buffer_backends(self.placement, self.model.derived_buffers())
        self._stored_weights: dict[str, Weight] = {}
        self.backends: dict[str, Any] = {}
        try:
            self.backends[CPU] = CpuBackend(self._buffers_on(CPU, None), threads, poll,
                                            self.recorder)
            devices = set(self._buffer_backend.values()) - {CPU}
            if self.offload.accel is not None:      # it computes offloaded ops even holding no weight
                devices.add(self.offload.accel)
            for name in sorted(devices):
                self.backends[name] = self._make_device(name)
        except BaseException:
            self.close()
            raise
        self.scheduler = Scheduler(self.backends, self.recorder)
        self._graphs: dict[int, tuple[Graph, SplitPlan]] = {}
        self.last_plan: SplitPlan | None = None
        self._greedy = ops.Greedy()          # the greedy token of eval(), by the logits' address

    # -- placement ------------------------------------------------------------

    def _buffers_on(self, backend: str, device: torch.device | None) -> dict[str, Any]:
        """The buffers a backend holds. The CPU reads the model's (host) weights and caches;
        a device (`device`: where its tensors live) gets its own copy of its weights (a GPU:
        dequantised once, `weights.for_gpu`) and allocates its KV caches there, so the host
        holds no cache of a device's layer."""
        memo: dict[int, Any] = {}
        gpu_memo: dict[str, Any] = {}
        out = {}
        for name, b in self._buffer_backend.items():
            if b != backend:
                continue
            if device is None:
                out[name] = self.model.buffer(name)
            elif name in self.model.cache.layout:
                out[name] = self.model.cache.allocate(name, device)
            elif device.type == "cuda":
                out[name] = for_gpu(self.model.weights[name], self._stored, device, gpu_memo)
            else:   # a copy even on the CPU: the emulated device has memory of its own
                out[name] = copy_buffer(self.model.weights[name], lambda t: t.to(device, copy=True), memo)
        return out

    def _stored(self, name: str) -> Weight:
        """A tensor as the file stores it (a view of the map, whatever -rtr or the CPU's repacking
        made of the host's copy): what a device converts at load, and what op offload uploads."""
        w = self._stored_weights.get(name)
        if w is None:
            w = self._stored_weights[name] = Weight.from_tensor(self.gguf.tensors[name])
        return w

    def _make_device(self, name: str):
        """A device backend with the buffers it holds; `host` and `stored` let it stage and
        upload the host weights of the ops offloaded to it."""
        if name.startswith("CUDA"):
            from hybrid.backends.cuda import CudaBackend
            device = torch.device("cuda", int(name[4:]))
            return CudaBackend(self._buffers_on(name, device), self.recorder, index=device.index,
                               host=self.model.buffer, stored=self._stored)
        return AccBackend(self._buffers_on(name, torch.device("cpu")), self.recorder, name,
                          host=self.model.buffer, stored=self._stored)

    # -- evaluation ------------------------------------------------------------

    def forward(self, tokens: Sequence[int], test: str = "") -> torch.Tensor:
        """Evaluate `tokens` after the cached ones (one graph per ubatch); the logits [1, n_vocab]
        of the last token, on the host (a copy: the graph reuses its output's memory)."""
        return self._evaluate_batch(tokens, test, sample=False).clone()

    def eval(self, tokens: Sequence[int], test: str) -> int:
        """BenchEngine: evaluate one batch (one graph per ubatch), return the greedy next token."""
        return self._evaluate_batch(tokens, test, sample=True)

    def _evaluate_batch(self, tokens: Sequence[int], test: str, sample: bool):
        """The batch as ubatches of at most `n_ubatch` tokens, one graph each, in order; the
        last one's result (each graph also computes its last token's logits, which only the
        last ubatch's are read of: one row of the output matmul per ubatch)."""
        if not tokens:
            raise UserError("an evaluation needs at least one token")
        ub = self.n_ubatch
        last = (len(tokens) - 1) // ub * ub
        for start in range(0, last, ub):
            self._evaluate(tokens[start:start + ub], test, sample=False)
        return self._evaluate(tokens[last:], test, sample)

    def _evaluate(self, tokens: Sequence[int], test: str, sample: bool):
        """One `graph` event: build and split the graph, set its inputs, run the
        splits, and (`sample`) pick the greedy token, all inside the interval."""
        rec, lane = self.recorder, self.lane
        model = self.model
        n_past = model.cache.n_past
        if n_past + len(tokens) > model.n_ctx:
            raise UserError(f"{n_past + len(tokens)} tokens exceed the context of {model.n_ctx}")
        graph_id = rec.next_graph()         # unique across the engines of a sweep
        t_graph = rec.now()
        graph, plan = self._graph_for(len(tokens))
        self.last_plan = plan
        graph.n_past = n_past
        t = rec.now()
        model.inputs(graph, list(tokens))          # into the graph's own input memory
        if rec.enabled:
            lane.phase(t_graph, t - t_graph, graph_id, "graph_build")
            lane.phase(t, rec.now() - t, graph_id, "set_inputs")
        result = self.scheduler.compute(graph, plan, None, graph_id)
        model.cache.n_past += len(tokens)
        if sample:
            t = rec.now()
            result = self._greedy(result)
            if rec.enabled:
                lane.phase(t, rec.now() - t, graph_id, "sample")
        if rec.enabled:
            lane.graph(t_graph, rec.now() - t_graph, graph_id, test, len(tokens), n_past)
        return result

    def _graph_for(self, n_tokens: int) -> tuple[Graph, SplitPlan]:
        """The graph of a batch of n_tokens and its split plan, built once and reused (as
        llama.cpp reuses its graph between generated tokens): only n_past changes, and
        building ~130 nodes and their splits again cost ~0.5 ms a token."""
        if n_tokens not in self._graphs:
            if len(self._graphs) >= MAX_GRAPHS:     # the oldest batch size goes
                del self._graphs[next(iter(self._graphs))]
            graph = self.model.graph(n_tokens, keep_output=True)
            self._graphs[n_tokens] = graph, split_graph(graph, self._buffer_backend.__getitem__, self.offload)
        return self._graphs[n_tokens]

    def reset(self) -> None:
        self.model.reset()

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the timings header says ---------------------------------------------

    @property
    def accel_label(self) -> str:
        if self.accel is None:
            return "none"
        return f"{self.accel} (emulated)" if self.accel.startswith("ACC") else self.accel

    def header(self) -> dict:
        g = self.gguf
        loads = backend_loads({n: t.n_bytes for n, t in g.tensors.items()}, g.config, self.placement)
        placement = {ld.backend: {"bytes": ld.n_bytes, "tensors": ld.n_tensors, "expert_bytes": ld.expert_bytes}
                     for ld in loads}
        gpu = None
        if self.accel is not None and self.accel.startswith("CUDA"):
            gpu = torch.cuda.get_device_name(int(self.accel[4:]))
        return {"model": {"path": str(g.path), "arch": g.config.arch, "size_bytes": g.size_bytes,
                          "n_params": g.n_params, "ftype": g.ftype, "n_expert": g.config.n_expert,
                          "n_expert_used": g.config.n_expert_used},
                "config": {**self.options, "accel": self.accel_label},
                "placement": placement, "machine": {"gpu": gpu}}


def make_engine(model_path: str, *, threads: int, n_gpu_layers: int, overrides: Sequence[str],
                accel: str, mla: int, fa: int, fmoe: int, rtr: int, poll: int,
                recorder: Recorder, n_ubatch: int = DEFAULT_UBATCH, n_cpu_moe: int = 0, no_op_offload: int = 0,
                op_offload_min_batch: int | None = None, op_offload: str = "llama.cpp") -> Engine:
    """The runner's `MakeEngine` (profiler/bench.py); tells placement warnings on stderr."""
    engine = Engine(model_path, threads=threads, n_gpu_layers=n_gpu_layers, overrides=overrides,
                    accel=accel, mla=mla, fa=fa, fmoe=fmoe, rtr=rtr, poll=poll, recorder=recorder,
                    n_ubatch=n_ubatch, n_cpu_moe=n_cpu_moe, no_op_offload=no_op_offload,
                    op_offload_min_batch=op_offload_min_batch, op_offload=op_offload)
    for warning in engine.placement.warnings:
        print(f"hyprof: warning: {warning}", file=sys.stderr)
    return engine
